"""The Check decision cache: keyed on what the rules and policies read, quotas always charged."""

from __future__ import annotations

from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2

from mixerhub.bag import ABSENT
from mixerhub.check_attributes import CheckContext
from mixerhub.ext_authz import decision_key
from mixerhub.workload import WorkloadIdentity
from tests.test_check import Client, _Probe, snapshot_of
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
