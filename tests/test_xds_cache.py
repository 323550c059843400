"""The snapshot cache: content versions, the consistency check, watches, hooks and syncz."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (for ParseDict)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from mixerhub.xds.cache import CacheHooks, InconsistentSnapshot, SnapshotCache, XdsSnapshot
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Resources
from mixerhub.xds.status import NACKED, NOT_SENT, STALE, SYNCED, syncz

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


# Resource builders, shared with the ADS tests ---------------------------------------------------


def eds_cluster(name: str, service_name: str = "") -> cluster_pb2.Cluster:
    doc: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
    }
    if service_name:
        doc["eds_cluster_config"]["service_name"] = service_name
    return json_format.ParseDict(doc, cluster_pb2.Cluster())


def load_assignment(
    name: str, port: int, host: str = "127.0.0.1"
) -> endpoint_pb2.ClusterLoadAssignment:
    return json_format.ParseDict(
        {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
        endpoint_pb2.ClusterLoadAssignment(),
    )


def hcm_listener(name: str, route_name: str, port: int) -> listener_pb2.Listener:
    return json_format.ParseDict(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": HCM,
                                "stat_prefix": name,
                                "rds": {
                                    "route_config_name": route_name,
                                    "config_source": {"ads": {}, "resource_api_version": "V3"},
                                },
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {"@type": ROUTER},
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener(),
    )


def route_config(name: str, cluster: str, header: str = "v1") -> route_pb2.RouteConfiguration:
    return json_format.ParseDict(
        {
            "name": name,
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": cluster},
                            "response_headers_to_add": [
                                {"header": {"key": "x-route", "value": header}}
                            ],
                        }
                    ],
                }
            ],
        },
        route_pb2.RouteConfiguration(),
    )


def by_name(*messages: Message) -> dict[str, Message]:
    out: dict[str, Message] = {}
    for m in messages:
        name = getattr(m, "cluster_name", "") or m.name
        out[name] = m
    return out


def mesh(port: int = 8080, header: str = "v1", listen_port: int = 15001) -> Resources:
    """One listener using RDS route r1, routing to EDS cluster c1 at 127.0.0.1:``port``."""
    return {
        CLUSTER: by_name(eds_cluster("c1")),
        ENDPOINT: by_name(load_assignment("c1", port)),
        LISTENER: by_name(hcm_listener("l1", "r1", listen_port)),
        ROUTE: by_name(route_config("r1", "c1", header)),
    }


# XdsSnapshot ------------------------------------------------------------------------------------


def test_versions_are_content_hashes_per_type_and_per_resource() -> None:
    a = XdsSnapshot.from_resources(mesh())
    b = XdsSnapshot.from_resources(mesh())
    assert a.versions == b.versions
    assert set(a.versions) >= {CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET}
    changed = XdsSnapshot.from_resources(mesh(header="v2"))
    assert changed.version(ROUTE) != a.version(ROUTE)
    for type_url in (CLUSTER, ENDPOINT, LISTENER, SECRET):
        assert changed.version(type_url) == a.version(type_url)
    assert changed.resource_versions[ROUTE]["r1"] != a.resource_versions[ROUTE]["r1"]
    assert changed.resource_versions[CLUSTER]["c1"] == a.resource_versions[CLUSTER]["c1"]
    # An empty type is present with a version of its own, so LDS/CDS can be sent empty.
    assert a.resources[SECRET] == {}
    assert a.version(SECRET)


def test_a_snapshot_does_not_change_when_the_callers_messages_do() -> None:
    resources = mesh()
    snapshot = XdsSnapshot.from_resources(resources)
    version = snapshot.version(ROUTE)
    resources[ROUTE]["r1"].name = "mutated"
    assert snapshot.resources[ROUTE]["r1"].name == "r1"
    assert XdsSnapshot.from_resources(mesh()).version(ROUTE) == version
    packed = snapshot.packed[ROUTE]["r1"]
    assert packed.type_url == ROUTE
    assert route_pb2.RouteConfiguration.FromString(packed.value).name == "r1"


def test_a_resource_under_the_wrong_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="RouteConfiguration"):
        XdsSnapshot.from_resources({CLUSTER: {"r1": route_config("r1", "c1")}})


def test_the_consistency_check_lists_every_missing_route_and_endpoint() -> None:
    resources: Resources = {
        CLUSTER: by_name(
            eds_cluster("c1"), eds_cluster("c2", service_name="svc2"), eds_cluster("c3")
        ),
        ENDPOINT: by_name(load_assignment("c1", 1)),
        LISTENER: by_name(hcm_listener("l1", "r1", 1), hcm_listener("l2", "r2", 2)),
        ROUTE: by_name(route_config("r1", "c1")),
    }
    with pytest.raises(InconsistentSnapshot) as caught:
        XdsSnapshot.from_resources(resources)
    assert caught.value.missing == {ROUTE: ["r2"], ENDPOINT: ["c3", "svc2"]}
    assert "r2" in str(caught.value)
    assert "svc2" in str(caught.value)


def test_secrets_static_clusters_and_inline_routes_need_nothing_more() -> None:
    static = json_format.ParseDict(
        {"name": "s", "type": "STATIC", "load_assignment": {"cluster_name": "s"}},
        cluster_pb2.Cluster(),
    )
    listener = hcm_listener("l1", "r1", 1)
    # The same listener with the route inline in a default filter chain: nothing to look up.
    chain = listener.filter_chains[0]
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    hcm.ClearField("rds")
    hcm.route_config.name = "inline"
    chain.filters[0].typed_config.Pack(hcm)
    listener.default_filter_chain.CopyFrom(chain)
    del listener.filter_chains[:]
    resources: Resources = {
        CLUSTER: by_name(static),
        LISTENER: by_name(listener),
        SECRET: {"default": secret_pb2.Secret(name="default")},
    }
    XdsSnapshot.from_resources(resources).check_consistency()


def test_routes_in_the_default_filter_chain_are_checked() -> None:
    listener = hcm_listener("l1", "missing", 1)
    listener.default_filter_chain.CopyFrom(listener.filter_chains[0])
    del listener.filter_chains[:]
    with pytest.raises(InconsistentSnapshot, match="missing"):
        XdsSnapshot.from_resources({LISTENER: by_name(listener)})


# SnapshotCache ----------------------------------------------------------------------------------


class RecordingHooks(CacheHooks):
    def __init__(self, cache: SnapshotCache | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.cache = cache

    def on_stream_open(self, proxy: Proxy) -> None:
        self.events.append(("open", proxy.node_id))
        if self.cache is not None and self.cache.get_snapshot(proxy.node_id) is None:
            self.cache.set_snapshot(proxy.node_id, mesh())

    def on_stream_closed(self, proxy: Proxy) -> None:
        self.events.append(("closed", proxy.node_id))


def test_set_get_clear_and_an_inconsistent_snapshot_keeps_the_previous_one() -> None:
    cache = SnapshotCache()
    assert cache.get_snapshot("n1") is None
    snapshot = cache.set_snapshot("n1", mesh())
    assert cache.get_snapshot("n1") is snapshot
    broken = dict(mesh())
    broken[ROUTE] = {}
    with pytest.raises(InconsistentSnapshot):
        cache.set_snapshot("n1", broken)
    unchecked = XdsSnapshot.from_resources(broken, check=False)
    with pytest.raises(InconsistentSnapshot):
        cache.set_snapshot("n1", unchecked)
    assert cache.get_snapshot("n1") is snapshot
    assert cache.node_ids() == ["n1"]
    cache.clear_snapshot("n1")
    assert cache.get_snapshot("n1") is None


def test_watches_are_notified_of_their_node_only_and_hooks_see_streams() -> None:
    hooks = RecordingHooks()
    cache = SnapshotCache(hooks)
    calls: list[str] = []
    w1 = cache.watch(Proxy("n1", namespace="ns"), lambda: calls.append("n1"))
    w2 = cache.watch(Proxy("n2"), lambda: calls.append("n2"))
    assert w1.snapshot() is None
    cache.set_snapshot("n1", mesh())
    assert calls == ["n1"]
    current = w1.snapshot()
    assert current is not None
    assert current[0] is cache.get_snapshot("n1")
    assert set(cache.proxies()) == {"n1", "n2"}
    assert cache.proxies()["n1"].namespace == "ns"
    w1.close()
    w1.close()  # twice is harmless
    cache.set_snapshot("n1", mesh(header="v2"))
    assert calls == ["n1"]
    assert set(cache.proxies()) == {"n2"}
    w2.close()
    assert hooks.events == [("open", "n1"), ("open", "n2"), ("closed", "n1"), ("closed", "n2")]


def test_the_open_hook_can_set_the_snapshot_of_a_node_that_has_none() -> None:
    cache = SnapshotCache()
    cache.hooks = RecordingHooks(cache)
    calls: list[int] = []
    watch = cache.watch(Proxy("n1"), lambda: calls.append(1))
    assert watch.snapshot() is not None
    assert calls == [1]
    watch.close()


def test_syncz_gives_each_connected_proxy_and_its_state_per_type() -> None:
    cache = SnapshotCache()
    labels = {"app": "reviews"}
    watch = cache.watch(Proxy("n1", "c", "bookinfo", "reviews-v1", labels, "sa"), lambda: None)
    cache.set_snapshot("n1", mesh())
    status = cache.status
    status.record_sent("n1", CLUSTER, "v1", "1")
    status.record_ack("n1", CLUSTER, "v1")
    status.record_sent("n1", LISTENER, "v1", "2")
    status.record_sent("n1", ROUTE, "r1", "3")
    status.record_nack("n1", ROUTE, "r1", "3", "bad route")
    [entry] = syncz(cache)
    assert entry["node_id"] == "n1"
    assert entry["proxy"] == {
        "cluster": "c",
        "namespace": "bookinfo",
        "workload": "reviews-v1",
        "labels": labels,
        "service_account": "sa",
    }
    types = entry["types"]
    assert types["CDS"]["state"] == SYNCED
    assert types["CDS"]["acked"] == "v1"
    assert types["LDS"]["state"] == STALE
    assert types["EDS"]["state"] == NOT_SENT
    assert types["EDS"]["sent"] is None
    assert types["RDS"]["state"] == NACKED
    assert types["RDS"]["error"] == "bad route"
    assert types["RDS"]["nacked"] == "r1"
    assert types["RDS"]["counts"] == {"sent": 1, "acked": 0, "nacked": 1}
    snapshot = cache.get_snapshot("n1")
    assert snapshot is not None
    assert types["LDS"]["snapshot"] == snapshot.version(LISTENER)
    # A newer version sent after the NACK is STALE until acked, then SYNCED.
    status.record_sent("n1", ROUTE, "r2", "4")
    assert status.state("n1", ROUTE) == STALE
    status.record_ack("n1", ROUTE, "r2")
    assert status.state("n1", ROUTE) == SYNCED
    watch.close()
    assert syncz(cache) == []
