"""The xDS control plane with real Envoys: several Envoys bootstrapped by `mixerhub bootstrap --ads`
get every listener, route, cluster and endpoint from the hub and follow its changes.

Clients reach services through their own Envoy's egress port (Istio's Sidecar resource, as used
without traffic capture) with the service's host name; upstreams are echo servers on loopback
that say which one answered.
"""

from __future__ import annotations

import collections
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import Hub, ProcessGroup, Upstream, free_port, start_hub, start_upstream
from tests.mesh import (
    AdsEnvoy,
    node,
    run_proxy_status,
    sidecar_egress,
    sidecar_ingress,
    start_ads_envoy,
    sync_of,
    syncz,
    until,
)

REVIEWS = "reviews.shop.svc"
POLL = ["--poll-interval", "0.1", "--log-level", "debug"]
CANARY = {"x-canary": "1"}


@dataclass
class Mesh:
    group: ProcessGroup
    config: Path
    hub: Hub
    v1: Upstream
    v2: Upstream
    egress: dict[str, int]

    def write(self, name: str, text: str) -> None:
        path = self.config / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))

    def server(self, envoy: AdsEnvoy, path: str = "/", **headers: str) -> str:
        response = envoy.get(self.egress[envoy.workload], REVIEWS, path, **headers)
        assert response.status == 200, (response.status, response.body[:300])
        return str(json.loads(response.body)["server"])


def reviews(v1: Upstream, v2: Upstream) -> str:
    return f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: reviews, namespace: shop}}
        spec:
          hosts: [{REVIEWS}]
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          resolution: STATIC
          endpoints:
          - {{address: 127.0.0.1, ports: {{http: {v1.port}}}, labels: {{version: v1}}}}
          - {{address: 127.0.0.1, ports: {{http: {v2.port}}}, labels: {{version: v2}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: reviews, namespace: shop}}
        spec:
          host: {REVIEWS}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
          - {{name: v2, labels: {{version: v2}}}}
        """


def routes(v1_weight: int, extra: str = "", canary: str = "v2") -> str:
    return f"""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: reviews, namespace: shop}}
        spec:
          hosts: [{REVIEWS}]
          http:
          - match: [{{headers: {{x-canary: {{exact: "1"}}}}}}]
            route: [{{destination: {{host: {REVIEWS}, subset: {canary}}}}}]
          {extra}
          - route:
            - {{destination: {{host: {REVIEWS}, subset: v1}}, weight: {v1_weight}}}
            - {{destination: {{host: {REVIEWS}, subset: v2}}, weight: {100 - v1_weight}}}
        """


@pytest.fixture
def mesh(processes: ProcessGroup, tmp_path: Path) -> Mesh:
    config = tmp_path / "config"
    config.mkdir()
    v1 = start_upstream(processes, name="reviews-v1")
    v2 = start_upstream(processes, name="reviews-v2")
    egress = {"productpage": free_port(), "details": free_port()}
    for workload, port in egress.items():
        (config / f"sidecar-{workload}.yaml").write_text(sidecar_egress(workload, port))
    (config / "reviews.yaml").write_text(textwrap.dedent(reviews(v1, v2)))
    (config / "routes.yaml").write_text(textwrap.dedent(routes(75)))
    hub = start_hub(processes, config, extra_args=POLL)
    return Mesh(processes, config, hub, v1, v2, egress)


def test_traffic_follows_header_matches_and_weighted_routes(mesh: Mesh) -> None:
    envoy = start_ads_envoy(mesh.group, mesh.hub, node("productpage"))
    assert {mesh.server(envoy, **{"x-canary": "1"}) for _ in range(20)} == {"reviews-v2"}
    counts = collections.Counter(mesh.server(envoy) for _ in range(400))
    # 75/25 over 400 requests: 300 expected, sd 8.7; 5 sd either side.
    assert 256 <= counts["reviews-v1"] <= 344, counts
    assert counts["reviews-v1"] + counts["reviews-v2"] == 400


def test_a_changed_route_reaches_every_envoy_within_a_second(mesh: Mesh) -> None:
    envoys = [
        start_ads_envoy(mesh.group, mesh.hub, node("productpage")),
        start_ads_envoy(mesh.group, mesh.hub, node("details")),
        start_ads_envoy(mesh.group, mesh.hub, node("details"), delta=True),
    ]
    for envoy in envoys:
        assert mesh.server(envoy, **{"x-canary": "1"}) == "reviews-v2"
    mesh.write("routes", routes(75, canary="v1"))

    # The hub notices the file within its 0.1 s poll and debounces 0.1 s; the rest is the push.
    # The canary header's answer tells the old routes (v2) from the new ones (v1) in one request.
    pending = set(range(len(envoys)))
    started = time.monotonic()
    while pending:
        assert time.monotonic() - started < 5, "not every Envoy got the new routes in 5 s"
        pending = {n for n in pending if mesh.server(envoys[n], **CANARY) != "reviews-v1"}
    took = time.monotonic() - started
    for envoy in envoys:
        assert {mesh.server(envoy, **CANARY) for _ in range(10)} == {"reviews-v1"}
    assert took < 1.0, f"took {took:.2f}s"
    rows = {r["node_id"]: r for r in syncz(mesh.hub)}
    for envoy in envoys:
        row = rows[envoy.node_id]
        assert row["types"]["RDS"]["state"] == "SYNCED", row


def test_retries_get_past_a_failing_upstream(mesh: Mesh) -> None:
    flaky = start_upstream(mesh.group, name="flaky", fail_every=2)
    mesh.write(
        "flaky",
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: flaky, namespace: shop}}
        spec:
          hosts: [flaky.shop.svc, steady.shop.svc]
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          resolution: STATIC
          endpoints: [{{address: 127.0.0.1, ports: {{http: {flaky.port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: flaky, namespace: shop}}
        spec:
          hosts: [flaky.shop.svc]
          http:
          - route: [{{destination: {{host: flaky.shop.svc}}}}]
            retries: {{attempts: 3, perTryTimeout: 5s, retryOn: 5xx}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: steady, namespace: shop}}
        spec:
          hosts: [steady.shop.svc]
          http:
          - route: [{{destination: {{host: steady.shop.svc}}}}]
            retries: {{attempts: 0}}
        """,
    )
    envoy = start_ads_envoy(mesh.group, mesh.hub, node("productpage"))
    port = mesh.egress["productpage"]
    until(lambda: envoy.get(port, "steady.shop.svc").status in (200, 503), what="routes arrive")
    statuses = [envoy.get(port, "flaky.shop.svc").status for _ in range(20)]
    assert statuses == [200] * 20
    without = collections.Counter(envoy.get(port, "steady.shop.svc").status for _ in range(20))
    assert without[503] >= 5, without  # every second request fails when nothing retries


def test_a_fault_abort_answers_for_the_upstream(mesh: Mesh) -> None:
    fault = (
        "- match: [{uri: {prefix: /broken}}]\n"
        "            fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n"
        f"            route: [{{destination: {{host: {REVIEWS}, subset: v1}}}}]"
    )
    mesh.write("routes", routes(100, fault))
    envoy = start_ads_envoy(mesh.group, mesh.hub, node("productpage"))
    port = mesh.egress["productpage"]
    until(lambda: envoy.get(port, REVIEWS, "/broken/x").status == 418, what="the fault")
    assert mesh.server(envoy, "/fine") == "reviews-v1"


def test_a_config_envoy_rejects_is_nacked_shown_and_the_old_one_keeps_serving(
    mesh: Mesh,
) -> None:
    envoy = start_ads_envoy(mesh.group, mesh.hub, node("productpage"))
    assert mesh.server(envoy, **{"x-canary": "1"}) == "reviews-v2"
    # Valid for the hub, too big for Envoy: RE2 programs over 100 instructions are refused
    # (re2.max_program_size.error_level), which the hub does not try to predict.
    huge = "- match: [{uri: {regex: '/(alpha|beta|gamma|delta){1,40}'}}]\n"
    huge += f"            route: [{{destination: {{host: {REVIEWS}, subset: v1}}}}]"
    mesh.write("routes", routes(75, huge, canary="v1"))

    def nacked() -> bool:
        row = sync_of(mesh.hub, envoy.node_id)
        return row is not None and row["types"]["RDS"]["state"] == "NACKED"

    until(nacked, timeout=10, what="the hub records Envoy's NACK")
    row = sync_of(mesh.hub, envoy.node_id)
    assert row is not None
    assert "program size" in row["types"]["RDS"]["error"], row["types"]["RDS"]
    # Envoy keeps its last accepted routes (canary still on v2), and the hub does not resend
    # the rejected ones.
    assert {mesh.server(envoy, **CANARY) for _ in range(10)} == {"reviews-v2"}
    rejected = envoy.stat(r"rds\..*\.update_rejected$")
    assert rejected >= 1
    time.sleep(1.0)
    assert envoy.stat(r"rds\..*\.update_rejected$") == rejected
    status = run_proxy_status(mesh.hub)
    assert "NACKED" in status
    assert "program size" in status.split("rejected:")[1]


def test_envoys_keep_serving_without_the_hub_and_resync_when_it_returns(mesh: Mesh) -> None:
    envoys = [
        start_ads_envoy(mesh.group, mesh.hub, node("productpage")),
        start_ads_envoy(mesh.group, mesh.hub, node("details"), delta=True),
    ]
    ports = (mesh.hub.grpc_port, mesh.hub.http_port)
    mesh.hub.process.stop()
    for envoy in envoys:  # what they have keeps working
        assert {mesh.server(envoy, **{"x-canary": "1"}) for _ in range(10)} == {"reviews-v2"}
    mesh.write("routes", routes(0))  # changed while the hub is away
    hub = start_hub(mesh.group, mesh.config, extra_args=POLL, ports=ports)

    def resynced() -> bool:
        return all(all(mesh.server(e) == "reviews-v2" for _ in range(10)) for e in envoys)

    until(resynced, timeout=15, what="both Envoys reconnect and get the new routes")
    rows = {r["node_id"]: r for r in syncz(hub)}
    assert {e.node_id for e in envoys} <= set(rows)


def test_proxy_status_lists_every_proxy(mesh: Mesh) -> None:
    envoys = [
        start_ads_envoy(mesh.group, mesh.hub, node("productpage")),
        start_ads_envoy(mesh.group, mesh.hub, node("details"), delta=True),
    ]
    until(
        lambda: all(
            (r := sync_of(mesh.hub, e.node_id)) is not None
            and all(r["types"][t]["state"] == "SYNCED" for t in ("CDS", "LDS", "EDS", "RDS"))
            for e in envoys
        ),
        what="both proxies synced",
    )
    out = run_proxy_status(mesh.hub)
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "CLUSTER"]
    for envoy in envoys:
        row = next(line for line in lines if line.startswith(envoy.node_id))
        assert row.split()[1] == envoy.workload
        assert row.split()[2:6] == ["SYNCED"] * 4


def test_a_service_behind_its_own_envoy_gets_the_hubs_policy(mesh: Mesh) -> None:
    app = start_upstream(mesh.group, name="ratings")
    inbound = free_port()
    mesh.write(
        "ratings",
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ratings, namespace: shop}}
        spec:
          hosts: [ratings.shop.svc]
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          resolution: STATIC
          workloadSelector: {{labels: {{app: ratings}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {{name: ratings-1, namespace: shop}}
        spec:
          address: 127.0.0.1
          ports: {{http: {inbound}}}
          labels: {{app: ratings}}
          serviceAccount: ratings
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: no-admin, namespace: shop}}
        spec:
          selector: {{matchLabels: {{app: ratings}}}}
          action: DENY
          rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
        """,
    )
    mesh.write("sidecar-ratings", sidecar_ingress("ratings", inbound, app.port))
    ratings = start_ads_envoy(mesh.group, mesh.hub, node("ratings"))
    client = start_ads_envoy(mesh.group, mesh.hub, node("productpage"))
    port = mesh.egress["productpage"]
    until(lambda: client.get(port, "ratings.shop.svc").status == 200, what="ratings reachable")
    ok = client.get(port, "ratings.shop.svc", "/stars")
    assert json.loads(ok.body)["server"] == "ratings"
    # The ratings Envoy's inbound listener asks the hub, which applies the policy.
    denied = client.get(port, "ratings.shop.svc", "/admin/users")
    assert denied.status == 403, denied
    assert "no-admin" in denied.headers.get("x-mixerhub-denied-by", ""), denied.headers
    assert ratings.stat(r"ext_authz\.denied$") >= 1
