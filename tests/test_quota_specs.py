"""QuotaSpec and QuotaSpecBinding: loading, errors, and the charge they set on Check."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from mixerhub import adapter, registry
from mixerhub.adapter import QuotaArgs
from mixerhub.dispatcher import CheckDispatcher
from mixerhub.quota.charges import ServiceSelector
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot

DATA = Path(__file__).parent / "data" / "istio-1.4" / "policy"

QUOTA = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quotahandler, namespace: istio-system}
spec:
  compiledAdapter: memquota
  params:
    quotas:
    - {name: requestcountquota.instance.istio-system, maxAmount: 10, validDuration: 60s}
    - {name: other.instance.istio-system, maxAmount: 3, validDuration: 60s}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcountquota, namespace: istio-system}
spec:
  compiledTemplate: quota
  params:
    dimensions: {destination: destination.workload.name | "unknown"}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: other, namespace: istio-system}
spec:
  compiledTemplate: quota
  params: {dimensions: {}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions: [{handler: quotahandler, instances: [requestcountquota, other]}]
"""

SPECS = """
---
apiVersion: config.istio.io/v1alpha2
kind: QuotaSpec
metadata: {name: request-count, namespace: istio-system}
spec:
  rules:
  - match:
    - clause:
        request.path: {prefix: /upload}
        request.method: {exact: POST}
    - clause:
        request.headers[x-expensive]: {regex: "y(es)?"}
    quotas: [{quota: requestcountquota, charge: 4}]
  - quotas: [{quota: requestcountquota, charge: 1}]
---
apiVersion: config.istio.io/v1alpha2
kind: QuotaSpecBinding
metadata: {name: request-count, namespace: istio-system}
spec:
  quotaSpecs: [{name: request-count}]
  services: [{name: ratings, namespace: default}, {service: reviews.shop.svc.cluster.local}]
"""


def snapshot_of(text: str, tmp_path: Path) -> Snapshot:
    (tmp_path / "config.yaml").write_text(textwrap.dedent(text))
    return compile_snapshot(documents.read([tmp_path]), registry.default_registry())


def rejected(text: str, tmp_path: Path) -> list[tuple[str, str, str]]:
    with pytest.raises(Rejected) as e:
        snapshot_of(text, tmp_path)
    return [(f"{err.kind}/{err.name}", err.path, err.reason) for err in e.value.errors]


def bag(workload: str = "ratings-v1", namespace: str = "default", **attrs: Any) -> dict[str, Any]:
    return {
        "destination.workload.name": workload,
        "destination.namespace": namespace,
        "destination.labels": {"app": workload.partition("-")[0]},
        "request.path": "/",
        "request.method": "GET",
        "request.headers": {},
        **attrs,
    }


async def check(d: CheckDispatcher, b: dict[str, Any], dedup: str = "") -> Any:
    return await d.check(b, str(b["destination.namespace"]), QuotaArgs(deduplication_id=dedup))


# --- loading ------------------------------------------------------------------------------------


def test_specs_load_and_compile(tmp_path: Path) -> None:
    snapshot = snapshot_of(QUOTA + SPECS, tmp_path)
    charges = snapshot.quota_charges
    assert charges.governed == {"requestcountquota.instance.istio-system"}
    [binding] = charges.bindings
    assert binding.name == "request-count.istio-system"
    assert [s.name for s in binding.specs] == ["request-count.istio-system"]
    assert binding.services[0] == ServiceSelector("ratings", "default")


def test_errors_carry_their_field_paths(tmp_path: Path) -> None:
    bad = """
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: QuotaSpec
    metadata: {name: broken, namespace: istio-system}
    spec:
      rules:
      - match:
        - clause:
            request.path: {exact: /a, prefix: /b}
            no.such.attribute: {exact: x}
            request.host: {regex: "("}
        quotas: [{quota: nosuch}, {quota: requestcountquota, charge: -1}]
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: QuotaSpec
    metadata: {name: unknown-field, namespace: istio-system}
    spec:
      rules: [{quotas: [{quota: nothing}], unknown: 1}]
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: QuotaSpec
    metadata: {name: not-quota, namespace: istio-system}
    spec:
      rules: [{quotas: [{quota: nothing}]}]
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: instance
    metadata: {name: nothing, namespace: istio-system}
    spec: {compiledTemplate: checknothing}
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: QuotaSpecBinding
    metadata: {name: b, namespace: istio-system}
    spec:
      quotaSpecs: [{name: missing}, {name: not-quota}, {name: q, namespace: elsewhere}]
      services: [{namespace: default}]
    """
    errors = rejected(QUOTA + textwrap.dedent(bad), tmp_path)
    assert errors == [
        (
            "QuotaSpec/broken",
            "spec.rules[0].match[0].clause.request.path",
            "exactly one of exact, prefix or regex is required (got exact, prefix)",
        ),
        (
            "QuotaSpec/broken",
            "spec.rules[0].quotas[1].charge",
            "Input should be greater than or equal to 0 (got -1)",
        ),
        ("QuotaSpec/unknown-field", "spec.rules[0].unknown", "unknown field"),
        (
            "QuotaSpec/not-quota",
            "spec.rules[0].quotas[0].quota",
            "instance nothing.instance.istio-system is of template 'checknothing',"
            " not a quota template",
        ),
        (
            "QuotaSpecBinding/b",
            "spec.quotaSpecs[0]",
            "unknown QuotaSpec 'missing' in namespace 'istio-system'",
        ),
        (
            "QuotaSpecBinding/b",
            "spec.quotaSpecs[2]",
            "unknown QuotaSpec 'q' in namespace 'elsewhere'",
        ),
        ("QuotaSpecBinding/b", "spec.services[0]", "a service needs a name or service"),
    ]


def test_compile_errors_of_a_valid_shape(tmp_path: Path) -> None:
    bad = """
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: QuotaSpec
    metadata: {name: broken, namespace: istio-system}
    spec:
      rules:
      - match:
        - clause:
            no.such.attribute: {exact: x}
            request.host: {regex: "("}
        quotas: [{quota: nosuch}]
    ---
    apiVersion: config.istio.io/v1alpha2
    kind: QuotaSpecBinding
    metadata: {name: b, namespace: istio-system}
    spec:
      quotaSpecs: [{name: broken}]
    """
    errors = rejected(QUOTA + textwrap.dedent(bad), tmp_path)
    assert [(k, p) for k, p, _ in errors] == [
        ("QuotaSpec/broken", "spec.rules[0].match[0].clause.no.such.attribute"),
        ("QuotaSpec/broken", "spec.rules[0].match[0].clause.request.host.regex"),
        ("QuotaSpec/broken", "spec.rules[0].quotas[0].quota"),
        # the broken spec is not reported again by its binding
        ("QuotaSpecBinding/b", "spec.services"),
    ]
    assert errors[0][2] == "unknown attribute 'no.such.attribute'"
    assert errors[2][2].startswith("unknown quota instance:")


# --- the charge on Check ------------------------------------------------------------------------


async def test_the_bound_specs_set_the_charge(tmp_path: Path) -> None:
    d = CheckDispatcher(snapshot_of(QUOTA + SPECS, tmp_path))
    # 10 per minute: a plain request costs 1, an upload 4 (the first matching rule's charge
    # adds to every other matching rule's: 4 + 1)
    upload = bag(**{"request.path": "/upload/x", "request.method": "POST"})
    assert (await check(d, upload)).ok  # 5
    assert (await check(d, bag(**{"request.headers": {"x-expensive": "yes"}}))).ok  # 10
    out = await check(d, bag())
    assert not out.ok
    assert out.status == adapter.RESOURCE_EXHAUSTED
    assert "requestcountquota" in out.message


async def test_an_unbound_request_is_not_charged_by_governed_quotas(tmp_path: Path) -> None:
    d = CheckDispatcher(snapshot_of(QUOTA + SPECS, tmp_path))
    # productpage is not bound: requestcountquota is never asked; `other` (no spec names it)
    # keeps the hub's default, 1 per matching rule, and runs out after 3.
    results = [(await check(d, bag("productpage-v1"))).ok for _ in range(4)]
    assert results == [True, True, True, False]
    # ratings in another namespace is not the bound ratings: only `other` is charged (3 left).
    d = CheckDispatcher(snapshot_of(QUOTA + SPECS, tmp_path))
    assert [(await check(d, bag("ratings-v1", "elsewhere"))).ok for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]


async def test_a_service_host_binds_by_request_host(tmp_path: Path) -> None:
    d = CheckDispatcher(snapshot_of(QUOTA + SPECS, tmp_path))
    host = {"request.host": "reviews.shop.svc.cluster.local:9080", "request.method": "POST"}
    upload = bag("reviews-v1", "shop", **host, **{"request.path": "/upload"})
    assert (await check(d, upload)).ok  # 5 of 10
    assert (await check(d, upload)).ok  # 10 of 10
    assert not (await check(d, upload)).ok


@pytest.mark.parametrize(
    ("selector", "attrs", "namespace", "expected"),
    [
        (ServiceSelector(service="*"), {}, "ns", True),
        (ServiceSelector("ratings"), {"destination.workload.name": "ratings"}, "ns", True),
        (ServiceSelector("ratings"), {"destination.labels": {"app": "ratings"}}, "ns", True),
        (
            ServiceSelector("ratings", "default"),
            {"destination.workload.name": "ratings"},
            "x",
            False,
        ),
        (
            ServiceSelector("ratings", "default"),
            {"request.host": "ratings.default:9080"},
            "x",
            True,
        ),
        (ServiceSelector("ratings"), {"request.host": "ratings:9080"}, "ns", True),
        (ServiceSelector("ratings"), {"request.host": "reviews:9080"}, "ns", False),
        (
            ServiceSelector(service="a.b.svc.cluster.local"),
            {"request.host": "a.b.svc.cluster.local"},
            "x",
            True,
        ),
        (
            ServiceSelector(service="a.b.svc.cluster.local"),
            {"destination.workload.name": "a"},
            "b",
            True,
        ),
        (
            ServiceSelector("a", labels=(("version", "v2"),)),
            {"destination.workload.name": "a", "destination.labels": {"version": "v1"}},
            "ns",
            False,
        ),
    ],
)
def test_service_selectors(
    selector: ServiceSelector, attrs: dict[str, Any], namespace: str, expected: bool
) -> None:
    assert selector.matches(attrs, namespace) is expected


# --- the bookinfo samples -----------------------------------------------------------------------


async def test_bookinfo_ratings_ratelimit_behaves(tmp_path: Path) -> None:
    text = (DATA / "mixer-rule-ratings-ratelimit.yaml").read_text()
    d = CheckDispatcher(snapshot_of(text, tmp_path))

    def ratings_from(source: str) -> dict[str, Any]:
        return {
            "destination.workload.name": "ratings-v1",
            "destination.namespace": "default",
            "destination.labels": {"app": "ratings", "version": "v1"},
            "source.labels": {"app": source, "version": "v2"},
        }

    # ratings called by reviews: the first override, 1 per second
    assert (await check(d, ratings_from("reviews"))).ok
    assert not (await check(d, ratings_from("reviews"))).ok
    # ratings called by something else: the second override, 100 per second
    assert all([(await check(d, ratings_from("productpage"))).ok for _ in range(100)])
    assert not (await check(d, ratings_from("productpage"))).ok
    # an unbound service is never charged
    unbound = {
        "destination.workload.name": "mongodb-v1",
        "destination.namespace": "default",
        "destination.labels": {"app": "mongodb"},
    }
    assert all([(await check(d, unbound)).ok for _ in range(20)])


async def test_bookinfo_redis_sample_loads(tmp_path: Path) -> None:
    text = (DATA / "mixer-rule-productpage-redis-quota-rolling-window.yaml").read_text()
    snapshot = snapshot_of(text, tmp_path)
    assert snapshot.handlers["redishandler.handler.istio-system"].adapter.name == "redisquota"
    [binding] = snapshot.quota_charges.bindings
    assert binding.services == (ServiceSelector("productpage", "default"),)
    await snapshot.handlers["redishandler.handler.istio-system"].handler.close()  # type: ignore[union-attr]
