"""The Check decision cache: keyed on what the rules and policies read, quotas always charged."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from mixerhub import registry
from mixerhub.adapter import AdapterInfo, Handler, QuotaArgs, QuotaResult
from mixerhub.bag import ABSENT
from mixerhub.check_attributes import CheckContext
from mixerhub.ext_authz import AuthorizationService, FailurePolicy, decision_key
from mixerhub.templates import QuotaInstance
from mixerhub.types import Params
from mixerhub.workload import WorkloadIdentity
from tests.test_check import PROBE, Client, _Probe, snapshot_of
from tests.test_check import client as client  # the fixture, re-exported for these tests

QUOTA_AND_CHECK = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: probe}
spec: {compiledAdapter: probe, params: {}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: nothing}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quota}
spec:
  compiledAdapter: memquota
  params:
    quotas: [{name: requests.instance.istio-system, maxAmount: 4, validDuration: 60s}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requests}
spec: {compiledTemplate: quota, params: {dimensions: {path: request.url_path}}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: checks}
spec:
  actions:
  - {handler: probe, instances: [nothing]}
  - {handler: quota, instances: [requests]}
"""


async def test_a_cached_check_decision_still_charges_the_quota_every_time(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(QUOTA_AND_CHECK, tmp_path))
    _Probe.calls = 0
    statuses = [(await client.check("/a")).status.code for _ in range(5)]
    assert statuses == [0, 0, 0, 0, 8]  # maxAmount 4: the fifth is over, cached decision or not
    denied = await client.check("/a")
    assert denied.denied_response.status.code == 429
    # The probe's answer is good for 3 uses: asked on the 1st and the 4th request only.
    assert _Probe.calls == 2
    # Another dimension value is another quota cell, and another decision.
    assert (await client.check("/b")).status.code == 0
    assert _Probe.calls == 3


HEADER_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tenants, namespace: shop}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
    when: [{key: "request.headers[x-tenant]", notValues: [blocked]}]
"""


async def test_decisions_depend_on_the_headers_policies_read_not_on_every_header(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(HEADER_POLICY, tmp_path))
    checker = client.service.checker
    assert checker is not None
    for n in range(5):  # Envoy gives every request its own id: still one decision
        response = await client.check("/", {"x-tenant": "acme", "x-request-id": f"id-{n}"})
        assert response.status.code == 0
    assert len(checker.cache) == 1
    assert checker.cache.hits == 4
    blocked = await client.check("/", {"x-tenant": "blocked", "x-request-id": "id-9"})
    assert blocked.status.code == 7
    assert (await client.check("/", {"x-request-id": "id-10"})).status.code == 0
    assert len(checker.cache) == 3


async def test_a_policy_change_is_never_answered_from_the_old_cache(
    client: Client, tmp_path: Path
) -> None:
    client.service.activate(snapshot_of(HEADER_POLICY, tmp_path))
    assert (await client.check("/", {"x-tenant": "acme"})).status.code == 0
    assert (await client.check("/", {"x-tenant": "acme"})).status.code == 0
    client.service.activate(snapshot_of(HEADER_POLICY.replace("blocked", "acme"), tmp_path))
    assert (await client.check("/", {"x-tenant": "acme"})).status.code == 7


def _context(path: str, headers: dict[str, str], labels: dict[str, str]) -> CheckContext:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.path = path
    request.attributes.request.http.headers.update(headers)
    return CheckContext(
        request, WorkloadIdentity("web", "shop", labels, key=("web", "shop", "", ""))
    )


def test_the_decision_key_holds_the_values_read_frozen_and_nothing_else() -> None:
    key = decision_key(
        ("destination.labels", "request.url_path", "not.an.attribute", "odd'\nname"), ("x-env",)
    )
    first = key(_context("/a?x=1", {"x-env": "prod", "x-request-id": "1"}, {"app": "web"}))
    # The labels map is frozen into a hashable stand-in; an unknown attribute is absent.
    assert first == (("web", "shop", "", ""), (("app", "web"),), "/a", ABSENT, ABSENT, "prod")
    assert hash(first) == hash(first)
    # What nothing reads (the query, another header) does not change the key; what is read does.
    assert key(_context("/a?y=2", {"x-env": "prod", "x-request-id": "2"}, {"app": "web"})) == first
    assert key(_context("/a", {"x-env": "dev"}, {"app": "web"})) != first
    assert key(_context("/a", {}, {"app": "web"}))[-1] is None
    assert key(_context("/a", {"x-env": "prod"}, {"app": "api"})) != first


class _AwaitedQuota(Handler):
    """A quota handler that answers only in a coroutine (as a network backend does)."""

    async def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        return QuotaResult(args.amount, 60.0)


AWAITED = AdapterInfo("awaited", "test quota adapter", ("quota",), Params,
                      lambda p, i, e: _AwaitedQuota())  # fmt: skip


def _check_request(path: str, request_id: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.path, http.method, http.id = path, "GET", request_id
    return request


_SHOP = WorkloadIdentity("web", "shop", {}, key=("web", "shop", "", ""))


async def test_a_repeated_check_is_answered_now_and_charged_exactly_once_per_request(
    tmp_path: Path,
) -> None:
    service = AuthorizationService()
    service.activate(snapshot_of(QUOTA_AND_CHECK, tmp_path))
    checker = service.checker
    assert checker is not None
    assert checker.answers_now
    # Nothing cached yet: the fast lane answers nothing, and has charged nothing.
    assert checker.answer_now(_check_request("/a", "r0"), _SHOP) is None

    def status(answer: bytes | external_auth_pb2.CheckResponse | None) -> int:
        assert isinstance(answer, bytes)
        return external_auth_pb2.CheckResponse.FromString(answer).status.code

    assert status(await service.check(_check_request("/a", "r0"), _SHOP)) == 0
    # The probe's answer is good for 3 uses: two more requests, then the slow path again.
    assert [status(checker.answer_now(_check_request("/a", r), _SHOP)) for r in ("r1", "r2")] == [
        0,
        0,
    ]
    assert checker.answer_now(_check_request("/a", "r3"), _SHOP) is None
    assert status(await service.check(_check_request("/a", "r3"), _SHOP)) == 0
    # maxAmount 4 charged by r0..r3, on either lane: the fifth request is over.
    assert status(checker.answer_now(_check_request("/a", "r4"), _SHOP)) == 8
    # A retried request (the same id) is memquota's deduplicated charge: its first answer again.
    assert status(checker.answer_now(_check_request("/a", "r2"), _SHOP)) == 0


async def test_a_quota_failing_on_the_fast_lane_follows_the_failure_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for fail_open, expected in ((False, 14), (True, 0)):
        service = AuthorizationService(FailurePolicy(fail_open=fail_open))
        snapshot = snapshot_of(QUOTA_AND_CHECK, tmp_path)
        service.activate(snapshot)
        assert isinstance(await service.check(_check_request("/a", "r0"), _SHOP), bytes)
        quota = snapshot.handlers["quota.handler.istio-system"].handler

        def broken(*args: object) -> None:
            raise RuntimeError("memory exploded")

        async def full_path(*args: object) -> bytes:
            raise AssertionError("a cached decision left the fast lane")

        monkeypatch.setattr(quota, "_handle", broken)
        monkeypatch.setattr(service, "check", full_path)  # the answer must come from the lane
        answer = await service.check_bytes(
            _check_request("/a", "r1").SerializeToString(),
            None,
            _SHOP,  # type: ignore[arg-type]
        )
        response = external_auth_pb2.CheckResponse.FromString(answer)
        assert response.status.code == expected, fail_open


async def test_a_quota_that_must_be_awaited_keeps_checks_off_the_fast_lane(
    tmp_path: Path,
) -> None:
    reg = registry.build_registry([*registry.builtin(), ("test", PROBE), ("test2", AWAITED)])
    text = QUOTA_AND_CHECK.replace("compiledAdapter: memquota", "compiledAdapter: awaited")
    text = text.replace(
        "params:\n    quotas: [{name: requests.instance.istio-system, maxAmount: 4,"
        " validDuration: 60s}]",
        "params: {}",
    )
    service = AuthorizationService()
    service.activate(snapshot_of(text, tmp_path, reg))
    checker = service.checker
    assert checker is not None
    assert not checker.answers_now
    for n in range(3):  # answered all the same, by the awaited path
        answer = await service.check(_check_request("/a", f"r{n}"), _SHOP)
        assert isinstance(answer, bytes)
        assert external_auth_pb2.CheckResponse.FromString(answer).status.code == 0
    assert checker.cache.hits == 2
