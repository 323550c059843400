"""Istio's standard metrics from a real Envoy's access logs, scraped by a real Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from mixerhub.bootstrap import Workload
from tests.harness import (
    Envoy,
    EnvoyFactory,
    Hub,
    ProcessGroup,
    Upstream,
    free_port,
    http_probe,
    http_request,
    loopback_options,
)

N = 25


def samples(hub: Hub, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of a metric on the hub's /metrics, with its labels."""
    out = []
    for line in hub.get("/metrics").body.decode().splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out


def total(hub: Hub, name: str) -> float:
    return sum(value for _, value in samples(hub, name))


def wait_until(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def proxy(upstream: Upstream, hub: Hub, envoy: EnvoyFactory) -> Envoy:
    workload = Workload("productpage", "bookinfo", {"app": "productpage", "version": "v1"})
    return envoy(loopback_options(upstream.address, hub.grpc_address, workload=workload))


def test_istio_requests_total_counts_every_request_with_istios_labels(
    proxy: Envoy, hub: Hub
) -> None:
    for i in range(N):
        assert proxy.get(f"/productpage?i={i}").status == 200
    wait_until(lambda: total(hub, "istio_requests_total") == N)
    (labels, value), *others = samples(hub, "istio_requests_total")
    assert not others
    assert value == N
    assert labels == {
        "reporter": "destination",
        "source_workload": "unknown",
        "source_workload_namespace": "unknown",
        "source_principal": "unknown",
        "source_app": "unknown",
        "source_version": "unknown",
        "source_cluster": "unknown",
        "destination_workload": "productpage",
        "destination_workload_namespace": "bookinfo",
        "destination_principal": "unknown",
        "destination_app": "productpage",
        "destination_version": "v1",
        "destination_service": "127.0.0.1",
        "destination_service_name": "unknown",  # an address names no service
        "destination_service_namespace": "bookinfo",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "none",
    }
    wait_until(lambda: total(hub, "istio_request_duration_milliseconds_count") == N)
    assert total(hub, "istio_request_duration_milliseconds_sum") > 0
    assert total(hub, "istio_request_bytes_count") == N
    assert total(hub, "istio_response_bytes_count") == N
    # The le buckets of a milliseconds histogram are milliseconds: no request took an hour.
    inf = [
        v
        for labels, v in samples(hub, "istio_request_duration_milliseconds_bucket")
        if labels["le"] == "+Inf"
    ]
    assert inf == [N]


def test_a_real_prometheus_scrapes_the_hub(
    proxy: Envoy, hub: Hub, processes: ProcessGroup, tmp_path: Path
) -> None:
    if shutil.which("prometheus") is None:
        # CI installs it (.ci/run); elsewhere a missing package is a skip, never in CI.
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: apt-get install prometheus")
        pytest.skip("Debian's prometheus package is not installed: apt-get install prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"- job_name: mixerhub\n  static_configs: [{{targets: ['127.0.0.1:{hub.http_port}']}}]\n"
    )
    prometheus = processes.start(
        "prometheus",
        [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
    )  # fmt: skip
    prometheus.wait_ready(http_probe("127.0.0.1", port, "/-/ready"), 30)
    for i in range(N):
        assert proxy.get(f"/reviews/{i}").status == 200

    def query(promql: str) -> list[dict[str, object]]:
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(http_request("127.0.0.1", port, "GET", path).body)
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    promql = 'sum(istio_requests_total{reporter="destination",destination_workload="productpage"})'
    wait_until(lambda: [r["value"][1] for r in query(promql)] == [str(N)], timeout=30)  # type: ignore[index]
    by_code = query("sum by (response_code) (istio_requests_total)")
    assert [(r["metric"], r["value"][1]) for r in by_code] == [({"response_code": "200"}, str(N))]  # type: ignore[index]
