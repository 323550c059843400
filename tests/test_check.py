"""The ext_authz Check service over a real gRPC channel: rules, denials, headers, cache."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from mixerhub import registry
from mixerhub.adapter import AdapterInfo, CheckResult, Handler
from mixerhub.ext_authz import AuthorizationService, FailurePolicy
from mixerhub.monitoring import REGISTRY
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot
from mixerhub.templates import CheckNothingInstance
from mixerhub.types import Params


class _SlowParams(Params):
    delay: float = 0.0
    fail: bool = False


class _Probe(Handler):
    """A test adapter: counts its calls, can be slow or break."""

    calls = 0

    def __init__(self, params: _SlowParams) -> None:
        self.params = params

    async def handle_checknothing(self, instance: CheckNothingInstance) -> CheckResult:
        type(self).calls += 1
        if self.params.fail:
            raise RuntimeError("backend exploded")
        await asyncio.sleep(self.params.delay)
        return CheckResult(valid_duration=60, valid_use_count=3)


PROBE = AdapterInfo("probe", "test adapter", ("checknothing",), _SlowParams,
                    lambda p, i, e: _Probe(p))  # fmt: skip
REGISTRY_WITH_PROBE = registry.build_registry([*registry.builtin(), ("test", PROBE)])

DENY = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: deny, namespace: istio-system}
spec:
  compiledAdapter: denier
  params: {status: {code: 7, message: Not allowed}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: nothing, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-admin, namespace: istio-system}
spec:
  match: request.url_path.startsWith("/admin") && request.headers["x-user"] != "root"
  actions: [{handler: deny, instances: [nothing]}]
  responseHeaderOperations:
  - {name: x-policy, values: ['"admin-only"']}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: tag, namespace: istio-system}
spec:
  requestHeaderOperations:
  - {name: x-workload, values: [destination.workload.name | "unknown"]}
  - {name: x-secret, operation: REMOVE}
  responseHeaderOperations:
  - {name: x-served-by, values: ['"mixerhub"']}
"""


def snapshot_of(
    text: str, tmp_path: Path, reg: registry.Registry = REGISTRY_WITH_PROBE
) -> Snapshot:
    (tmp_path / "config.yaml").write_text(textwrap.dedent(text))
    return compile_snapshot(documents.read([tmp_path]), reg)


@dataclass
class Client:
    service: AuthorizationService
    stub: Any
    channel: grpc.aio.Channel
    port: int

    async def check(
        self,
        path: str = "/",
        headers: Mapping[str, str] | None = None,
        workload: tuple[str, str] = ("web", "shop"),
    ) -> external_auth_pb2.CheckResponse:
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.path, http.method, http.host = path, "GET", "shop.example"
        http.headers.update(headers or {})
        request.attributes.source.address.socket_address.address = "10.0.0.7"
        metadata = (("x-mixerhub-workload", workload[0]), ("x-mixerhub-namespace", workload[1]))
        response: external_auth_pb2.CheckResponse = await self.stub.Check(
            request, metadata=metadata, timeout=5
        )
        return response


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    service = AuthorizationService()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Client(service, external_auth_pb2_grpc.AuthorizationStub(channel), channel, port)
    finally:
        await channel.close()
        await server.stop(None)


def headers_of(options: Any) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}


async def test_no_configuration_means_fail_closed(client: Client) -> None:
    response = await client.check()
    assert response.status.code == 14
    assert response.denied_response.status.code == 503


async def test_a_denier_rule_denies_with_status_body_and_headers(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(DENY, tmp_path))
    response = await client.check("/admin/users?x=1")
    assert response.status.code == 7
    denied = response.denied_response
    assert denied.status.code == 403
    headers = headers_of(denied.headers)
    assert (
        headers["x-mixerhub-denied-by"] == "deny-admin.rule.istio-system/deny.handler.istio-system"
    )
    assert headers["x-policy"] == "admin-only"
    assert json.loads(denied.body)["error"] == "Not allowed"


async def test_an_allowed_request_gets_the_header_operations(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(DENY, tmp_path))
    response = await client.check("/admin", {"x-user": "root"})
    assert response.status.code == 0
    ok = response.ok_response
    assert headers_of(ok.headers) == {"x-workload": "web"}
    assert list(ok.headers_to_remove) == ["x-secret"]
    assert headers_of(ok.response_headers_to_add) == {"x-served-by": "mixerhub"}


async def test_rules_outside_the_mesh_namespace_apply_to_their_namespace_only(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(DENY.replace("istio-system", "shop"), tmp_path))
    assert (await client.check("/admin", workload=("web", "shop"))).status.code == 7
    assert (await client.check("/admin", workload=("web", "other"))).status.code == 0


PROBE_CONFIG = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: probe}
spec: {compiledAdapter: probe, params: %s}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: nothing}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: probe}
spec:
  match: request.url_path == "/probe"
  actions: [{handler: probe, instances: [nothing]}]
"""


async def test_a_failing_handler_fails_closed_or_open_as_configured(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(PROBE_CONFIG % "{fail: true}", tmp_path))
    response = await client.check("/probe")
    assert response.denied_response.status.code == 503
    assert "handler probe.handler.istio-system failed" in response.denied_response.body
    errors = REGISTRY.get_sample_value("mixerhub_adapter_errors_total", {"adapter": "probe"})
    assert errors is not None
    assert errors >= 1

    client.service.failure = FailurePolicy(fail_open=True)
    assert (await client.check("/probe")).status.code == 0


async def test_a_check_never_exceeds_its_budget(client: Client, tmp_path: Path) -> None:
    client.service.activate(snapshot_of(PROBE_CONFIG % "{delay: 5}", tmp_path))
    client.service.failure = FailurePolicy(budget=0.05)
    started = asyncio.get_running_loop().time()
    response = await client.check("/probe")
    assert asyncio.get_running_loop().time() - started < 1
    assert response.denied_response.status.code == 503
    assert "exceeded its 50 ms budget" in response.denied_response.body


async def test_each_check_in_flight_keeps_its_own_budget(client: Client, tmp_path: Path) -> None:
    # One timer keeps every deadline: slow Checks started at different times each expire on
    # their own, fast ones in between are answered, and nothing is held once all have answered.
    slow = snapshot_of(PROBE_CONFIG % "{delay: 5}", tmp_path)
    client.service.activate(slow)
    client.service.failure = FailurePolicy(budget=0.1)
    loop = asyncio.get_running_loop()

    async def timed(path: str) -> tuple[float, external_auth_pb2.CheckResponse]:
        started = loop.time()
        response = await client.check(path)
        return loop.time() - started, response

    first = asyncio.ensure_future(timed("/probe"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(timed("/probe"))
    fast = [await client.check("/") for _ in range(3)]
    assert all(r.status.code == 0 for r in fast)
    for elapsed, response in (await first, await second):
        assert "exceeded its 100 ms budget" in response.denied_response.body
        assert 0.09 <= elapsed < 1
    # A shorter budget set while Checks are in flight applies to the next ones.
    client.service.failure = FailurePolicy(budget=0.03)
    elapsed, response = await timed("/probe")
    assert "exceeded its 30 ms budget" in response.denied_response.body
    assert elapsed < 0.09
    await asyncio.sleep(0.05)
    assert len(client.service._budget) == 0


async def test_decisions_are_cached_by_what_they_depend_on_until_uses_run_out(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(PROBE_CONFIG % "{}", tmp_path))
    _Probe.calls = 0
    for _ in range(5):  # valid_use_count 3: the handler is asked again on the 4th
        assert (await client.check("/probe", {"x-anything": "a"})).status.code == 0
    assert _Probe.calls == 2
    # Another value of a referenced attribute is another decision.
    await client.check("/probe?other")  # url_path is the same: cached
    assert _Probe.calls == 2
    await client.check("/elsewhere")
    assert _Probe.calls == 2  # the rule does not match: no handler call at all


async def test_a_config_change_empties_the_cache(client: Client, tmp_path: Path) -> None:
    client.service.activate(snapshot_of(DENY, tmp_path))
    assert (await client.check("/admin")).status.code == 7
    client.service.activate(
        snapshot_of(DENY.replace('startsWith("/admin")', 'startsWith("/x")'), tmp_path)
    )
    assert (await client.check("/admin")).status.code == 0


async def test_garbage_bytes_get_a_clear_denial(client: Client, tmp_path: Path) -> None:
    client.service.activate(snapshot_of(DENY, tmp_path))
    call = client.channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
    raw = await call(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=5)
    response = external_auth_pb2.CheckResponse.FromString(raw)
    assert response.status.code == 3
    assert response.denied_response.status.code == 400
    # Invalid UTF-8 inside a header value: protobuf refuses the string field.
    good = external_auth_pb2.CheckRequest()
    good.attributes.request.http.headers["x"] = "PLACEHOLDER"
    bad = good.SerializeToString().replace(
        b"PLACEHOLDER", b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5"
    )
    response = external_auth_pb2.CheckResponse.FromString(await call(bad, timeout=5))
    assert response.denied_response.status.code == 400
    assert (await client.check("/")).status.code == 0  # and it keeps serving


CUSTOM = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: deny, namespace: istio-system}
spec:
  compiledAdapter: denier
  params: {status: {code: 7, message: external says no}}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: probe, namespace: istio-system}
spec: {compiledAdapter: probe}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: %s}
  rules: [{to: [{operation: {paths: ["/private*"]}}]}]
"""


@pytest.mark.parametrize(
    ("provider", "status", "message"),
    [
        ("deny.istio-system", 7, "external says no"),
        ("probe", 0, ""),
        ("nobody", 7, "CUSTOM provider 'nobody' is not a handler of this configuration"),
    ],
)
async def test_custom_policies_ask_a_handler(
    client: Client, tmp_path: Path, provider: str, status: int, message: str
) -> None:
    client.service.activate(snapshot_of(CUSTOM % provider, tmp_path))
    response = await client.check("/private/1")
    assert response.status.code == status
    if status:
        assert json.loads(response.denied_response.body)["error"] == message
        denied_by = headers_of(response.denied_response.headers)["x-mixerhub-denied-by"]
        assert denied_by == f"AuthorizationPolicy CUSTOM/{provider}"
    assert (await client.check("/public")).status.code == 0


@dataclass
class _CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


def test_each_calling_workload_has_its_check_handler_found_from_the_metadata() -> None:
    handlers = AuthorizationService().generic_handler()
    check = "/envoy.service.auth.v3.Authorization/Check"
    web = (
        ("user-agent", "envoy"),
        ("x-mixerhub-workload", "web"),
        ("x-mixerhub-namespace", "shop"),
    )
    api = (("x-mixerhub-workload", "api"), ("x-mixerhub-namespace", "shop"))
    first = handlers.service(_CallDetails(check, web))
    assert first is not None
    assert first.unary_unary.keywords["workload"].name == "web"
    assert handlers.service(_CallDetails(check, (("x-other", "1"), *web[1:]))) is first
    other = handlers.service(_CallDetails(check, api))
    assert other is not first
    assert other.unary_unary.keywords["workload"].name == "api"
    assert handlers.service(_CallDetails("/envoy.service.auth.v3.Authorization/Other", web)) is None
