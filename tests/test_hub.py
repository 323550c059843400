"""`mixerhub serve` as a user runs it: ports, health, debug pages, hot reload and shutdown."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.harness import Hub, http_request
from tests.test_store import DENY, write


def metric(hub: Hub, name: str) -> float:
    text = hub.get("/metrics").body.decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_default_config_serves_http_and_grpc(hub: Hub) -> None:
    assert hub.get("/healthz").status == 200
    assert hub.get("/readyz").status == 200
    assert metric(hub, "mixerhub_config_last_reload_successful") == 1
    configz = hub.get("/debug/configz").json()
    assert configz["rejected"] is None
    assert {r["name"] for r in configz["active"]["rules"]} == {
        "stdio.rule.istio-system",
        "stdiotcp.rule.istio-system",
        "promhttp.rule.istio-system",
        "promtcp.rule.istio-system",
        "promtcpconnectionclosed.rule.istio-system",
    }
    adapters = hub.get("/debug/adapters").json()
    names = {a["name"]: a for a in adapters["adapters"]}
    assert {"stdio", "denier"} <= set(names)
    assert names["stdio"]["handlers"] == ["stdio.handler.istio-system"]
    assert names["denier"]["defaultParams"]["status"]["code"] == 9

    with grpc.insecure_channel(f"127.0.0.1:{hub.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        listed = {s.name for s in reply.list_services_response.service}
    assert {
        "envoy.service.auth.v3.Authorization",
        "envoy.service.accesslog.v3.AccessLogService",
        "envoy.service.ratelimit.v3.RateLimitService",
        "grpc.health.v1.Health",
    } <= listed


def test_hot_reload_swaps_good_config_and_keeps_the_last_good_one(make_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config"
    write(config, "deny.yaml", DENY)
    hub = make_hub(config, extra_args=["--poll-interval", "0.1"])
    first = hub.get("/debug/configz").json()["active"]["version"]

    write(config, "deny.yaml", DENY.replace("[nothing]", "[nothing, missing]"))
    wait_for(lambda: hub.get("/debug/configz").json()["rejected"] is not None)
    configz = hub.get("/debug/configz").json()
    assert configz["active"]["version"] == first
    (error,) = configz["rejected"]["errors"]
    assert error["path"] == "spec.actions[0].instances[1]"
    assert error["message"].startswith(f"{config / 'deny.yaml'}: document 3 (rule/deny-v3): ")
    assert metric(hub, "mixerhub_config_errors_total") == 1
    assert metric(hub, "mixerhub_config_last_reload_successful") == 0
    assert hub.get("/readyz").status == 200
    assert "configuration rejected" in hub.log()

    write(config, "deny.yaml", DENY.replace('"v3"', '"v2"'))
    wait_for(lambda: hub.get("/debug/configz").json()["active"]["version"] != first)
    configz = hub.get("/debug/configz").json()
    assert configz["rejected"] is None
    assert 'source.labels["version"] == "v2"' in configz["active"]["rules"][0]["match"]
    assert metric(hub, "mixerhub_config_last_reload_successful") == 1


def test_a_hub_started_on_bad_config_is_not_ready_until_it_is_fixed(
    processes, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from tests.harness import free_port, hub_command

    config = tmp_path / "config"
    write(config, "deny.yaml", DENY.replace("denier", "nosuch"))
    http_port = free_port()
    process = processes.start(
        "hub",
        [*hub_command(), "serve", "--config", str(config), "--grpc-port", str(free_port()),
         "--http-port", str(http_port), "--poll-interval", "0.1"],
    )  # fmt: skip

    def status(path: str) -> int:
        try:
            return http_request("127.0.0.1", http_port, "GET", path).status
        except OSError:
            return 0

    wait_for(lambda: status("/healthz") == 200)
    assert status("/readyz") == 503
    errors = http_request("127.0.0.1", http_port, "GET", "/debug/configz").json()["rejected"]
    assert "unknown adapter 'nosuch'" in errors["errors"][0]["reason"]
    write(config, "deny.yaml", DENY)
    wait_for(lambda: status("/readyz") == 200)
    assert process.returncode is None


def test_sigterm_drains_and_exits_zero(hub: Hub) -> None:
    hub.process._signal(signal.SIGTERM)
    wait_for(lambda: hub.process.returncode is not None)
    assert hub.process.returncode == 0
    assert "stopped" in hub.log()
