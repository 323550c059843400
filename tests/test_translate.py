"""mixerhub.xds.translate: Istio networking as one proxy's listeners, routes, clusters and
endpoints; checked field by field and, inlined into a static bootstrap, by a real Envoy."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from mixerhub import registry
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot, default_config_dir
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from mixerhub.xds.translate import translate, translate_data
from tests.harness import envoy_validate

Data = dict[str, dict[str, dict[str, Any]]]

PRODUCTPAGE = Proxy(
    "sidecar~127.0.0.1~productpage.shop~shop.svc.cluster.local",
    namespace="shop",
    workload="productpage",
    labels={"app": "productpage", "version": "v1"},
    service_account="bookinfo-productpage",
)

MESH = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: productpage, namespace: shop}
spec:
  workloadSelector: {labels: {app: productpage}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 9090, protocol: TCP, name: tcp}
    bind: 127.0.0.2
    defaultEndpoint: unix:///tmp/productpage.sock
  egress:
  - port: {number: 15001, protocol: HTTP, name: http-egress}
    hosts: ["./*", "istio-system/telemetry.istio-system.svc.cluster.local"]
  - port: {number: 6379, protocol: TCP, name: redis}
    bind: 127.0.0.3
    hosts: ["./redis.shop.svc"]
  - hosts: ["ext/*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  egress:
  - port: {number: 15002, protocol: HTTP, name: http}
    hosts: ["./details.shop.svc.cluster.local"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress:
  - port: {number: 15003, protocol: HTTP, name: http}
    hosts: ["*/*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: 7001}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {http: 7002}, labels: {version: v2}, weight: 3}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details, namespace: shop}
spec:
  hosts: [details.shop.svc.cluster.local]
  ports: [{number: 9080, name: http}, {number: 9443, name: grpc-admin}]
  resolution: DNS
  endpoints: [{address: localhost, ports: {http: 7003, grpc-admin: 7004}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: redis, namespace: shop}
spec:
  hosts: [redis.shop.svc]
  ports: [{number: 6379, name: tcp-redis, protocol: TCP}]
  resolution: STATIC
  workloadSelector: {labels: {app: redis}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: redis-1, namespace: shop}
spec: {address: 127.0.0.1, labels: {app: redis}, ports: {tcp-redis: 16379}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: telemetry, namespace: istio-system}
spec:
  hosts: [telemetry.istio-system.svc.cluster.local]
  ports: [{number: 9091, name: grpc, protocol: GRPC}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: ext}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hidden, namespace: other}
spec:
  hosts: [hidden.other.svc]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRetries: 3,
             idleTimeout: 30s, maxRequestsPerConnection: 5}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s,
                       maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
      tls: {mode: DISABLE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: canary
    match:
    - headers: {x-canary: {exact: "1"}, x-present: {}}
      method: {exact: POST}
    route: [{destination: {host: reviews, subset: v2}}]
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
      abort: {httpStatus: 418}
  - match: [{uri: {regex: "/api/v[0-9]+/(.*)"}}]
    rewrite: {uri: "/\\\\1"}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /old}}, {uri: {exact: /legacy}, ignoreUriCase: true}]
    rewrite: {uri: /new, authority: reviews.internal}
    timeout: 1.5s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "gateway-error,503"}
    headers:
      request: {set: {x-route: old}, add: {x-added: "1"}, remove: [x-secret]}
      response: {remove: [server]}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{sourceLabels: {app: someone-else}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75,
       headers: {request: {set: {x-subset: v1}}}}
    - {destination: {host: reviews, subset: v2}, weight: 25}
    retries: {attempts: 0}
"""


def compile_text(tmp_path: Path, text: str, *extra: str | Path) -> Snapshot:
    path = tmp_path / "networking.yaml"
    path.write_text(text)
    source = documents.read([path, *extra])
    return compile_snapshot(source, registry.default_registry(), build_handlers=False)


@pytest.fixture
def mesh(tmp_path: Path) -> Snapshot:
    return compile_text(tmp_path, MESH)


def hcm(listener: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def filter_names(listener: dict[str, Any]) -> list[str]:
    return [f["name"] for f in hcm(listener)["http_filters"]]


def vhost(data: Data, route: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        v for v in data[ROUTE][route]["virtual_hosts"] if v["name"] == name
    ]
    assert len(found) == 1, [v["name"] for v in data[ROUTE][route]["virtual_hosts"]]
    return found[0]


def test_the_sidecar_gives_inbound_and_outbound_listeners(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    assert sorted(data[LISTENER]) == [
        "127.0.0.1_15001",
        "127.0.0.1_9080",
        "127.0.0.2_9090",
        "127.0.0.3_6379",
    ]
    inbound = data[LISTENER]["127.0.0.1_9080"]
    assert inbound["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9080}}
    route = hcm(inbound)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["cluster"] == "inbound|9080||"
    assert data[CLUSTER]["inbound|9080||"]["load_assignment"]["endpoints"][0]["lb_endpoints"] == [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}
    ]
    tcp_in = data[LISTENER]["127.0.0.2_9090"]["filter_chains"][0]["filters"][0]
    assert tcp_in["name"] == "envoy.filters.network.tcp_proxy"
    assert tcp_in["typed_config"]["cluster"] == "inbound|9090||"
    pipe = data[CLUSTER]["inbound|9090||"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert pipe == [{"endpoint": {"address": {"pipe": {"path": "/tmp/productpage.sock"}}}}]
    outbound = hcm(data[LISTENER]["127.0.0.1_15001"])
    assert outbound["rds"]["route_config_name"] == "15001"
    assert filter_names(data[LISTENER]["127.0.0.1_15001"]) == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    redis = data[LISTENER]["127.0.0.3_6379"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert redis["cluster"] == "outbound|6379||redis.shop.svc"


def test_egress_hosts_choose_the_reachable_services(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    hosts = {name.split("|")[3] for name in data[CLUSTER] if name.startswith("outbound")}
    # ./* is the proxy's own namespace, the catch-all egress adds ext/*; other/ is not named.
    assert hosts == {
        "reviews.shop.svc.cluster.local",
        "details.shop.svc.cluster.local",
        "redis.shop.svc",
        "telemetry.istio-system.svc.cluster.local",
        "api.example.com",
    }
    # The route configuration holds the egress listener's own hosts, HTTP ports only.
    names = [v["name"] for v in data[ROUTE]["15001"]["virtual_hosts"]]
    assert names == [
        "details.shop.svc.cluster.local:9080",
        "details.shop.svc.cluster.local:9443",
        "reviews.shop.svc.cluster.local:9080",
        "telemetry.istio-system.svc.cluster.local:9091",
    ]


def test_domains_are_host_host_port_and_short_names(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    assert vhost(data, "15001", "reviews.shop.svc.cluster.local:9080")["domains"] == [
        "reviews.shop.svc.cluster.local",
        "reviews.shop.svc",
        "reviews.shop",
        "reviews",
        "reviews.shop.svc.cluster.local:9080",
        "reviews.shop.svc:9080",
        "reviews.shop:9080",
        "reviews:9080",
    ]
    # The second port answers only with its port; the bare name goes to the first port.
    assert vhost(data, "15001", "details.shop.svc.cluster.local:9443")["domains"] == [
        "details.shop.svc.cluster.local:9443",
        "details.shop.svc:9443",
        "details.shop:9443",
        "details:9443",
    ]
    # Another namespace's service has no namespace-less short name.
    assert (
        "telemetry"
        not in vhost(data, "15001", "telemetry.istio-system.svc.cluster.local:9091")["domains"]
    )


def test_static_services_get_eds_clusters_per_subset(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    names = [n for n in data[CLUSTER] if n.endswith("|reviews.shop.svc.cluster.local")]
    assert names == [
        "outbound|9080||reviews.shop.svc.cluster.local",
        "outbound|9080|v1|reviews.shop.svc.cluster.local",
        "outbound|9080|v2|reviews.shop.svc.cluster.local",
    ]
    for name in names:
        assert data[CLUSTER][name]["type"] == "EDS"
        assert data[CLUSTER][name]["eds_cluster_config"]["service_name"] == name

    def ports(name: str) -> list[tuple[int, int | None]]:
        (locality,) = data[ENDPOINT][name]["endpoints"]
        return [
            (
                e["endpoint"]["address"]["socket_address"]["port_value"],
                e.get("load_balancing_weight"),
            )
            for e in locality["lb_endpoints"]
        ]

    assert ports(names[0]) == [(7001, None), (7002, 3)]
    assert ports(names[1]) == [(7001, None)]
    assert ports(names[2]) == [(7002, 3)]


def test_dns_services_resolve_inline_and_workload_entries_fill_eds(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    details = data[CLUSTER]["outbound|9443||details.shop.svc.cluster.local"]
    assert details["type"] == "STRICT_DNS"
    assert "outbound|9443||details.shop.svc.cluster.local" not in data[ENDPOINT]
    endpoint = details["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint == {"address": {"socket_address": {"address": "localhost", "port_value": 7004}}}
    # grpc-admin is a gRPC port by Istio's naming convention: HTTP/2 upstream.
    options = details["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(options.values()))["explicit_http_config"]
    # A DNS ServiceEntry without endpoints resolves its own host.
    telemetry = data[CLUSTER]["outbound|9091||telemetry.istio-system.svc.cluster.local"]
    address = telemetry["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {
        "address": "telemetry.istio-system.svc.cluster.local",
        "port_value": 9091,
    }
    redis = data[ENDPOINT]["outbound|6379||redis.shop.svc"]["endpoints"][0]["lb_endpoints"]
    assert redis[0]["endpoint"]["address"]["socket_address"]["port_value"] == 16379
    passthrough = data[CLUSTER]["outbound|80||api.example.com"]
    assert passthrough["type"] == "ORIGINAL_DST"
    assert passthrough["original_dst_lb_config"] == {"use_http_header": True}


def test_destination_rule_policies_and_subset_overrides(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    base = data[CLUSTER]["outbound|9080||reviews.shop.svc.cluster.local"]
    assert base["lb_policy"] == "LEAST_REQUEST"
    assert base["connect_timeout"] == "0.250000000s"
    assert base["circuit_breakers"]["thresholds"][0] == {
        "max_connections": 100,
        "max_pending_requests": 10,
        "max_requests": 1000,
        "max_retries": 3,
        "track_remaining": True,
    }
    assert base["outlier_detection"] == {
        "consecutive_5xx": 5,
        "enforcing_consecutive_5xx": 100,
        "enforcing_consecutive_gateway_failure": 0,
        "enforcing_success_rate": 0,
        "interval": "10s",
        "base_ejection_time": "30s",
        "max_ejection_percent": 50,
    }
    options = next(iter(base["typed_extension_protocol_options"].values()))
    assert options["common_http_protocol_options"] == {
        "idle_timeout": "30s",
        "max_requests_per_connection": 5,
    }
    tls = base["transport_socket"]["typed_config"]
    assert tls["sni"] == "outbound_.9080_._.reviews.shop.svc.cluster.local"
    context = tls["common_tls_context"]
    assert [s["name"] for s in context["tls_certificate_sds_secret_configs"]] == ["default"]
    assert context["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert context["tls_certificate_sds_secret_configs"][0]["sds_config"]["ads"] == {}
    v1 = data[CLUSTER]["outbound|9080|v1|reviews.shop.svc.cluster.local"]
    assert v1["lb_policy"] == "LEAST_REQUEST"
    assert "transport_socket" in v1
    v2 = data[CLUSTER]["outbound|9080|v2|reviews.shop.svc.cluster.local"]
    assert v2["lb_policy"] == "RANDOM"
    assert "transport_socket" not in v2  # the subset's DISABLE overrides ISTIO_MUTUAL
    assert v2["circuit_breakers"] == base["circuit_breakers"]  # the rest is the rule's


def test_port_level_settings_override_for_their_port(tmp_path: Path) -> None:
    text = MESH + textwrap.dedent(
        """\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: details, namespace: shop}
        spec:
          host: details.shop.svc.cluster.local
          trafficPolicy:
            loadBalancer: {simple: RANDOM}
            portLevelSettings:
            - port: {number: 9443}
              loadBalancer: {simple: LEAST_REQUEST}
        """
    )
    data = translate_data(PRODUCTPAGE, compile_text(tmp_path, text))
    assert data[CLUSTER]["outbound|9080||details.shop.svc.cluster.local"]["lb_policy"] == "RANDOM"
    assert (
        data[CLUSTER]["outbound|9443||details.shop.svc.cluster.local"]["lb_policy"]
        == "LEAST_REQUEST"
    )


def test_virtual_service_routes(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    routes = vhost(data, "15001", "reviews.shop.svc.cluster.local:9080")["routes"]
    canary, regex, old, legacy, split = routes  # the sourceLabels route is not for productpage
    assert canary["name"] == "canary"
    assert canary["match"] == {
        "prefix": "/",
        "headers": [
            {"name": "x-canary", "string_match": {"exact": "1"}},
            {"name": "x-present", "present_match": True},
            {"name": ":method", "string_match": {"exact": "POST"}},
        ],
    }
    assert canary["route"]["cluster"] == "outbound|9080|v2|reviews.shop.svc.cluster.local"
    fault = canary["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["delay"] == {
        "fixed_delay": "2s",
        "percentage": {"numerator": 125000, "denominator": "MILLION"},
    }
    assert fault["abort"] == {
        "http_status": 418,
        "percentage": {"numerator": 1000000, "denominator": "MILLION"},
    }
    assert regex["match"] == {"safe_regex": {"regex": "/api/v[0-9]+/(.*)"}}
    assert regex["route"]["regex_rewrite"] == {
        "pattern": {"regex": "/api/v[0-9]+/(.*)"},
        "substitution": "/\\1",
    }
    assert old["match"] == {"prefix": "/old"}
    assert legacy["match"] == {"path": "/legacy", "case_sensitive": False}
    action = old["route"]
    assert action["prefix_rewrite"] == "/new"
    assert action["host_rewrite_literal"] == "reviews.internal"
    assert action["timeout"] == "1.500000000s"
    assert action["retry_policy"]["num_retries"] == 4
    assert action["retry_policy"]["per_try_timeout"] == "0.500000000s"
    assert action["retry_policy"]["retry_on"] == "gateway-error,retriable-status-codes"
    assert action["retry_policy"]["retriable_status_codes"] == [503]
    assert old["request_headers_to_add"] == [
        {
            "header": {"key": "x-route", "value": "old"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        },
        {"header": {"key": "x-added", "value": "1"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"},
    ]
    assert old["request_headers_to_remove"] == ["x-secret"]
    assert old["response_headers_to_remove"] == ["server"]
    assert split["match"] == {"prefix": "/"}
    assert split["route"]["weighted_clusters"]["clusters"] == [
        {
            "name": "outbound|9080|v1|reviews.shop.svc.cluster.local",
            "weight": 75,
            "request_headers_to_add": [
                {
                    "header": {"key": "x-subset", "value": "v1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        },
        {"name": "outbound|9080|v2|reviews.shop.svc.cluster.local", "weight": 25},
    ]
    assert "retry_policy" not in split["route"]  # attempts: 0
    assert split["route"]["timeout"] == "0s"  # Istio turns Envoy's 15 s default off


def test_source_labels_select_routes_per_proxy(mesh: Snapshot) -> None:
    other = Proxy("n2", namespace="shop", workload="x", labels={"app": "someone-else"})
    data = translate_data(other, mesh)
    # This proxy gets the namespace-wide Sidecar: its egress names details only.
    assert [v["name"] for v in data[ROUTE]["15002"]["virtual_hosts"]] == [
        "details.shop.svc.cluster.local:9080",
        "details.shop.svc.cluster.local:9443",
    ]
    proxy = Proxy("n3", namespace="shop", workload="pp2", labels={"app": "productpage"})
    names = [
        r.get("name")
        for r in vhost(translate_data(proxy, mesh), "15001", "reviews.shop.svc.cluster.local:9080")[
            "routes"
        ]
    ]
    assert len(names) == 5


def test_services_without_virtual_service_get_a_default_route(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    (route,) = vhost(data, "15001", "details.shop.svc.cluster.local:9443")["routes"]
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["cluster"] == "outbound|9443||details.shop.svc.cluster.local"
    assert route["route"]["retry_policy"]["num_retries"] == 2  # Istio's default retries


def test_egress_hosts_import_virtual_services_by_namespace_and_host(tmp_path: Path) -> None:
    elsewhere = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details-abort, namespace: other}
spec:
  hosts: [details.shop.svc.cluster.local]
  http:
  - fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: details.shop.svc.cluster.local}}]
"""
    snapshot = compile_text(tmp_path, MESH + "---\n" + elsewhere)
    # productpage's egress imports ./* and one istio-system host: not other's VirtualService.
    data = translate_data(PRODUCTPAGE, snapshot)
    (route,) = vhost(data, "15001", "details.shop.svc.cluster.local:9080")["routes"]
    assert "typed_per_filter_config" not in route
    assert route["route"]["cluster"] == "outbound|9080||details.shop.svc.cluster.local"
    # istio-system's Sidecar imports */*: other's VirtualService routes details there.
    root = translate_data(Proxy("b", namespace="ext"), snapshot)
    (route,) = vhost(root, "15003", "details.shop.svc.cluster.local:9080")["routes"]
    assert "envoy.filters.http.fault" in route["typed_per_filter_config"]


def test_sidecar_selection_per_proxy(mesh: Snapshot) -> None:
    selected = translate_data(PRODUCTPAGE, mesh)
    namespace_wide = translate_data(Proxy("a", namespace="shop", labels={"app": "x"}), mesh)
    root = translate_data(Proxy("b", namespace="ext"), mesh)
    assert "127.0.0.1_15001" in selected[LISTENER]
    assert list(namespace_wide[LISTENER]) == ["127.0.0.1_15002"]
    assert list(root[LISTENER]) == ["127.0.0.1_15003"]
    # istio-system's Sidecar says */*: every service exported to ext, "hidden" included.
    hosts = {n.split("|")[3] for n in root[CLUSTER]}
    assert "hidden.other.svc" in hosts


def test_no_sidecar_means_no_listeners_and_every_visible_service(tmp_path: Path) -> None:
    text = "\n---\n".join(d for d in MESH.split("---\n") if "kind: Sidecar" not in d)
    data = translate_data(PRODUCTPAGE, compile_text(tmp_path, text))
    assert data[LISTENER] == {}
    assert data[ROUTE] == {}
    assert "outbound|80||hidden.other.svc" in data[CLUSTER]


def test_every_referenced_rds_and_eds_name_is_in_the_output(mesh: Snapshot) -> None:
    for proxy in (PRODUCTPAGE, Proxy("a", namespace="shop"), Proxy("b", namespace="ext")):
        data = translate_data(proxy, mesh)
        for listener in data[LISTENER].values():
            for f in listener["filter_chains"][0]["filters"]:
                rds = f["typed_config"].get("rds")
                if rds is not None:
                    assert rds["route_config_name"] in data[ROUTE]
        for cluster in data[CLUSTER].values():
            if cluster["type"] == "EDS":
                assert cluster["eds_cluster_config"]["service_name"] in data[ENDPOINT]
        assert set(data[ENDPOINT]) <= set(data[CLUSTER])


def test_translate_returns_protobuf_messages(mesh: Snapshot) -> None:
    resources = translate(PRODUCTPAGE, mesh)
    listener = resources[LISTENER]["127.0.0.1_15001"]
    assert type(listener).DESCRIPTOR.full_name == "envoy.config.listener.v3.Listener"
    cla = resources[ENDPOINT]["outbound|9080|v1|reviews.shop.svc.cluster.local"]
    assert cla.cluster_name == "outbound|9080|v1|reviews.shop.svc.cluster.local"  # type: ignore[attr-defined]
    assert set(resources) == {LISTENER, ROUTE, CLUSTER, ENDPOINT}


# --- the hub's filters ---------------------------------------------------------------------

DENY_IN_SHOP = """\
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: deny, namespace: shop}
spec: {compiledAdapter: denier, params: {status: {code: 7}}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: nothing, namespace: shop}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny, namespace: shop}
spec:
  match: source.labels["version"] == "v3"
  actions: [{handler: deny, instances: [nothing]}]
"""

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-only, namespace: shop}
spec:
  selector: {matchLabels: {app: ratings}}
  rules: [{from: [{source: {namespaces: [shop]}}]}]
"""

RATE_LIMITS = """\
domain: mixerhub
descriptors:
- key: workload
  rate_limit: {unit: second, requests_per_unit: 10}
"""


def inbound_of(data: Data) -> dict[str, Any]:
    return data[LISTENER]["127.0.0.1_9080"]


def test_no_hub_filters_when_nothing_applies(mesh: Snapshot) -> None:
    data = translate_data(PRODUCTPAGE, mesh)
    assert filter_names(inbound_of(data)) == ["envoy.filters.http.router"]
    assert "access_log" not in hcm(inbound_of(data))
    assert "access_log" not in hcm(data[LISTENER]["127.0.0.1_15001"])


def test_check_rules_bring_ext_authz_to_their_namespace_only(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(DENY_IN_SHOP)
    snapshot = compile_text(tmp_path, MESH, rules)
    data = translate_data(PRODUCTPAGE, snapshot)
    assert filter_names(inbound_of(data)) == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    authz = hcm(inbound_of(data))["http_filters"][0]["typed_config"]
    assert authz["grpc_service"]["envoy_grpc"] == {"cluster_name": "mixerhub"}
    assert authz["grpc_service"]["initial_metadata"] == [
        {"key": "x-mixerhub-workload", "value": "productpage"},
        {"key": "x-mixerhub-namespace", "value": "shop"},
        {"key": "x-mixerhub-labels", "value": "app=productpage,version=v1"},
        {"key": "x-mixerhub-service-account", "value": "bookinfo-productpage"},
    ]
    elsewhere = Proxy("e", namespace="ext", labels={"app": "productpage"})
    sidecar_in_ext = MESH.replace(
        "namespace: shop}\nspec:\n  workloadSelector",
        "namespace: ext}\nspec:\n  workloadSelector",
        1,
    )
    other = compile_text(tmp_path, sidecar_in_ext, rules)
    assert filter_names(translate_data(elsewhere, other)[LISTENER]["127.0.0.1_9080"]) == [
        "envoy.filters.http.router"
    ]


def test_an_authorization_policy_brings_ext_authz_to_the_workloads_it_selects(
    tmp_path: Path,
) -> None:
    snapshot = compile_text(tmp_path, MESH + "---\n" + POLICY)
    assert filter_names(inbound_of(translate_data(PRODUCTPAGE, snapshot))) == [
        "envoy.filters.http.router"
    ]
    ratings = Proxy("r", namespace="shop", workload="ratings", labels={"app": "productpage"})
    selected = compile_text(
        tmp_path, MESH + "---\n" + POLICY.replace("app: ratings", "app: productpage")
    )
    assert (
        filter_names(inbound_of(translate_data(ratings, selected)))[0]
        == "envoy.filters.http.ext_authz"
    )


def test_rate_limits_bring_the_ratelimit_filter_and_route_descriptors(tmp_path: Path) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(RATE_LIMITS)
    data = translate_data(PRODUCTPAGE, compile_text(tmp_path, MESH, limits))
    listener = inbound_of(data)
    assert filter_names(listener) == ["envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    assert hcm(listener)["http_filters"][0]["typed_config"]["domain"] == "mixerhub"
    route = hcm(listener)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    key = {"generic_key": {"descriptor_key": "workload", "descriptor_value": "productpage"}}
    assert route["rate_limits"] == [{"actions": [key]}, {"actions": [key, {"remote_address": {}}]}]


def test_report_rules_bring_access_logs_inbound_and_outbound(tmp_path: Path) -> None:
    metrics = Path(default_config_dir()) / "metrics.yaml"
    data = translate_data(PRODUCTPAGE, compile_text(tmp_path, MESH, metrics))

    def log_names(listener: dict[str, Any]) -> list[str]:
        config = listener["filter_chains"][0]["filters"][0]["typed_config"]
        return [
            a["typed_config"]["common_config"]["log_name"] for a in config.get("access_log", [])
        ]

    assert log_names(inbound_of(data)) == ["mixerhub"]
    assert log_names(data[LISTENER]["127.0.0.1_15001"]) == ["mixerhub.outbound"]
    assert log_names(data[LISTENER]["127.0.0.2_9090"]) == ["mixerhub"]  # the TCP access log
    assert log_names(data[LISTENER]["127.0.0.3_6379"]) == ["mixerhub.outbound"]
    assert filter_names(inbound_of(data)) == ["envoy.filters.http.router"]  # reports only


# --- Envoy's own verdict -------------------------------------------------------------------


# What the SDS secrets are fetched from in the static bootstrap: `envoy --mode validate` crashes
# (Envoy 1.40) on an ADS config source for SDS, so the test asks the hub's cluster directly.
_SDS_SOURCE = {
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "mixerhub"}}],
    },
    "resource_api_version": "V3",
}


def sds_from_the_hub(socket: dict[str, Any] | None) -> None:
    """A TLS transport socket's SDS secrets asked of the hub's cluster rather than over ADS."""
    if socket is None:
        return
    context = socket["typed_config"]["common_tls_context"]
    assert context["validation_context_sds_secret_config"]["sds_config"]["ads"] == {}
    context["validation_context_sds_secret_config"]["sds_config"] = _SDS_SOURCE
    for secret in context["tls_certificate_sds_secret_configs"]:
        assert secret["sds_config"]["ads"] == {}
        secret["sds_config"] = _SDS_SOURCE


_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def static_bootstrap(data: Data) -> dict[str, Any]:
    """The translated resources as one static bootstrap: RDS inlined, EDS clusters made
    STATIC with their ClusterLoadAssignment, SDS asked of the hub's cluster, which the hub's
    filters call too."""
    listeners = json.loads(json.dumps(list(data[LISTENER].values())))
    for listener in listeners:
        for f in listener["filter_chains"][0]["filters"]:
            config = f["typed_config"]
            rds = config.pop("rds", None)
            if rds is not None:
                # Every cluster this configuration routes to exists: let Envoy check that too.
                config["route_config"] = data[ROUTE][rds["route_config_name"]] | {
                    "validate_clusters": True
                }
    clusters = []
    for cluster in json.loads(json.dumps(list(data[CLUSTER].values()))):
        if cluster["type"] == "EDS":
            eds = cluster.pop("eds_cluster_config")
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = data[ENDPOINT][eds["service_name"]]
        sds_from_the_hub(cluster.get("transport_socket"))
        clusters.append(cluster)
    hub = {
        "name": "mixerhub",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "mixerhub",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": 9091}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": "type.googleapis.com/" + _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    return {
        "node": {"id": PRODUCTPAGE.node_id, "cluster": "productpage"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": [*clusters, hub]},
    }


def test_envoy_validates_the_translated_resources(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(DENY_IN_SHOP)
    limits = tmp_path / "limits.yaml"
    limits.write_text(RATE_LIMITS)
    metrics = Path(default_config_dir()) / "metrics.yaml"
    snapshot = compile_text(tmp_path, MESH, rules, limits, metrics)
    data = translate_data(PRODUCTPAGE, snapshot)
    assert filter_names(inbound_of(data))[:2] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
    ]
    config = static_bootstrap(data)
    envoy_validate(yaml.safe_dump(config, sort_keys=False), tmp_path)


PORTS = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  egress:
  - port: {number: 8000, protocol: HTTP}
    hosts: ["./*"]
  - port: {number: 5432, protocol: TCP}
    hosts: ["./*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.shop.svc]
  ports: [{number: 80, name: http}, {number: 8000, name: http-admin}]
  resolution: DNS_ROUND_ROBIN
  endpoints: [{address: localhost}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db-a.shop.svc, db-b.shop.svc]
  ports: [{number: 5432, name: tcp-postgres}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.shop.svc]
  http:
  - match: [{port: 8000}]
    route: [{destination: {host: api.shop.svc, port: {number: 80}}}]
  - route: [{destination: {host: api.shop.svc}}]
"""


def test_ports_pick_routes_and_primary_domains(tmp_path: Path) -> None:
    data = translate_data(Proxy("p", namespace="shop"), compile_text(tmp_path, PORTS))
    assert data[CLUSTER]["outbound|80||api.shop.svc"]["type"] == "LOGICAL_DNS"
    # The listener's own number is the primary port: the bare host name goes to it.
    admin = vhost(data, "8000", "api.shop.svc:8000")
    assert admin["domains"] == ["api.shop.svc", "api.shop.svc:8000"]
    assert [r["route"]["cluster"] for r in admin["routes"]] == [
        "outbound|80||api.shop.svc",
        "outbound|8000||api.shop.svc",  # a destination without a port keeps the host's
    ]
    plain = vhost(data, "8000", "api.shop.svc:80")
    assert plain["domains"] == ["api.shop.svc:80"]
    # match.port 8000 does not hold on port 80.
    assert [r["route"]["cluster"] for r in plain["routes"]] == ["outbound|80||api.shop.svc"]


def test_a_tcp_egress_port_with_several_services_is_left_out(tmp_path: Path) -> None:
    data = translate_data(Proxy("p", namespace="shop"), compile_text(tmp_path, PORTS))
    assert "127.0.0.1_5432" not in data[LISTENER]
    assert "outbound|5432||db-a.shop.svc" in data[CLUSTER]
