"""The ADS servers in process: a grpc.aio server on loopback and a client playing Envoy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import descriptor_pool, json_format, message_factory
from google.rpc import status_pb2

from mixerhub.monitoring import REGISTRY
from mixerhub.xds.ads import AggregatedDiscoveryService
from mixerhub.xds.cache import CacheHooks, SnapshotCache, XdsSnapshot
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Resources
from mixerhub.xds.status import NACKED, STALE, SYNCED, syncz
from tests.test_xds_cache import by_name, eds_cluster, load_assignment, mesh

QUIET = 0.3  # how long "nothing is sent" is watched for


def node(node_id: str = "n1") -> base_pb2.Node:
    return json_format.ParseDict(
        {
            "id": node_id,
            "cluster": "reviews.bookinfo",
            "metadata": {
                "NAMESPACE": "bookinfo",
                "WORKLOAD_NAME": "reviews-v1",
                "SERVICE_ACCOUNT": "bookinfo-reviews",
                "LABELS": {"app": "reviews", "version": "v1"},
            },
        },
        base_pb2.Node(),
    )


class Hooks(CacheHooks):
    def __init__(self) -> None:
        self.opened: list[Proxy] = []
        self.closed: list[Proxy] = []

    def on_stream_open(self, proxy: Proxy) -> None:
        self.opened.append(proxy)

    def on_stream_closed(self, proxy: Proxy) -> None:
        self.closed.append(proxy)


class Client:
    """One stream as Envoy holds it: requests written, responses queued as they come."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self.responses.put_nowait(response)

    async def send(self, request: Any) -> None:
        await self.call.write(request)

    async def recv(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing(self, quiet: float = QUIET) -> None:
        await asyncio.sleep(quiet)
        assert self.responses.empty(), self.responses.get_nowait()

    async def close(self) -> grpc.StatusCode:
        await self.call.done_writing()
        await asyncio.wait_for(self._reader, 5)
        code: grpc.StatusCode = await self.call.code()
        return code


@dataclass
class Ads:
    cache: SnapshotCache
    hooks: Hooks
    service: AggregatedDiscoveryService
    stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub

    def sotw(self) -> Client:
        return Client(self.stub.StreamAggregatedResources())

    def delta(self) -> Client:
        return Client(self.stub.DeltaAggregatedResources())

    def set(self, resources: Resources, node_id: str = "n1") -> XdsSnapshot:
        return self.cache.set_snapshot(node_id, resources)


@pytest.fixture
async def ads() -> AsyncIterator[Ads]:
    hooks = Hooks()
    cache = SnapshotCache(hooks)
    service = AggregatedDiscoveryService(cache)
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Ads(cache, hooks, service, ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
    finally:
        service.close()
        await channel.close()
        await server.stop(1)


def request(type_url: str, *names: str, **fields: Any) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, **fields)


def ack(response: discovery_pb2.DiscoveryResponse, *names: str) -> discovery_pb2.DiscoveryRequest:
    return request(
        response.type_url, *names, version_info=response.version_info, response_nonce=response.nonce
    )


def names(response: Any) -> list[str]:
    """The resource names in a response (a CLA is named by its cluster_name)."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in response.resources]
    out = []
    for packed in response.resources:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.type_url.split("/")[-1])
        message = message_factory.GetMessageClass(descriptor).FromString(packed.value)
        out.append(getattr(message, "cluster_name", "") or message.name)
    return out


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def two_clusters() -> Resources:
    resources = dict(mesh())
    resources[CLUSTER] = by_name(eds_cluster("c1"), eds_cluster("c2"))
    resources[ENDPOINT] = by_name(load_assignment("c1", 1), load_assignment("c2", 2))
    return resources


# State of the world -----------------------------------------------------------------------------


async def test_ack_flow_node_metadata_and_status(ads: Ads) -> None:
    snapshot = ads.set(mesh())
    client = ads.sotw()
    await client.send(request(CLUSTER, node=node()))
    cds = await client.recv()
    assert cds.type_url == CLUSTER
    assert cds.version_info == snapshot.version(CLUSTER)
    assert names(cds) == ["c1"]
    proxy = ads.cache.proxies()["n1"]
    assert proxy == ads.hooks.opened[0]
    assert (proxy.namespace, proxy.workload, proxy.service_account, proxy.cluster) == (
        "bookinfo",
        "reviews-v1",
        "bookinfo-reviews",
        "reviews.bookinfo",
    )
    assert dict(proxy.labels) == {"app": "reviews", "version": "v1"}
    assert ads.cache.status.state("n1", CLUSTER) == STALE
    # Later requests may omit the node.
    await client.send(ack(cds))
    await client.send(request(ENDPOINT, "c1"))
    eds = await client.recv()
    assert names(eds) == ["c1"]
    await client.send(ack(eds, "c1"))
    await client.nothing()
    assert ads.cache.status.state("n1", CLUSTER) == SYNCED
    assert ads.cache.status.state("n1", ENDPOINT) == SYNCED
    [entry] = syncz(ads.cache)
    assert entry["types"]["CDS"]["acked"] == snapshot.version(CLUSTER)
    assert entry["types"]["LDS"]["state"] == "NOT SENT"
    assert await client.close() == grpc.StatusCode.OK


async def test_a_stream_waits_for_its_snapshot_and_unchanged_content_is_not_resent(
    ads: Ads,
) -> None:
    client = ads.sotw()
    await client.send(request(LISTENER, node=node()))
    await client.nothing()
    assert [p.node_id for p in ads.hooks.opened] == ["n1"]
    pushes = metric("mixerhub_xds_pushes_total", type="LDS")
    latencies = metric("mixerhub_xds_push_seconds_count")
    ads.set(mesh())
    lds = await client.recv()
    assert names(lds) == ["l1"]
    assert metric("mixerhub_xds_pushes_total", type="LDS") == pushes + 1
    assert metric("mixerhub_xds_push_seconds_count") == latencies + 1
    await client.send(ack(lds))
    ads.set(mesh())  # same content: same versions
    await client.nothing()
    ads.set(mesh(header="v2"))  # only RDS changed, which this stream did not ask for
    await client.nothing()
    await client.close()


async def test_the_open_hook_may_set_the_snapshot_of_a_node_that_connects_first() -> None:
    cache = SnapshotCache()

    class Compute(CacheHooks):
        def on_stream_open(self, proxy: Proxy) -> None:
            cache.set_snapshot(proxy.node_id, mesh())

    cache.hooks = Compute()
    service = AggregatedDiscoveryService(cache)
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            client = Client(stub.StreamAggregatedResources())
            await client.send(request(CLUSTER, node=node()))
            assert names(await client.recv()) == ["c1"]
            await client.close()
    finally:
        await server.stop(1)


async def test_changes_are_pushed_in_push_order(ads: Ads) -> None:
    ads.set(mesh())
    client = ads.sotw()
    await client.send(request(LISTENER, node=node()))
    await client.send(request(CLUSTER))
    await client.send(request(ROUTE, "r1"))
    await client.send(request(ENDPOINT, "c1"))
    subscriptions = {ROUTE: ["r1"], ENDPOINT: ["c1"]}
    for _ in range(4):
        response = await client.recv()
        await client.send(ack(response, *subscriptions.get(response.type_url, [])))
    await client.nothing()
    # Everything changes at once: CDS, EDS, LDS, RDS (make before break).
    changed = dict(mesh(port=9, header="v2", listen_port=15002))
    changed[CLUSTER] = by_name(eds_cluster("c1", service_name="c1"))
    ads.set(changed)
    order = [(await client.recv()).type_url for _ in range(4)]
    assert order == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    await client.close()


async def test_a_nack_is_recorded_and_the_rejected_version_never_resent(ads: Ads) -> None:
    ads.set(mesh())
    client = ads.sotw()
    await client.send(request(ROUTE, "r1", node=node()))
    first = await client.recv()
    await client.send(ack(first, "r1"))
    await client.nothing()  # the ACK is in before the change
    ads.set(mesh(header="bad"))
    rejected = await client.recv()
    nacks = metric("mixerhub_xds_nacks_total", type="RDS")
    await client.send(
        request(
            ROUTE,
            "r1",
            version_info=first.version_info,
            response_nonce=rejected.nonce,
            error_detail=status_pb2.Status(code=3, message="route: bad header"),
        )
    )
    await client.nothing()
    assert metric("mixerhub_xds_nacks_total", type="RDS") == nacks + 1
    status = ads.cache.status.of("n1", ROUTE)
    assert status.state == NACKED
    assert status.last_nack is not None
    assert status.last_nack.error == "route: bad header"
    assert status.last_nack.version == rejected.version_info
    assert status.acked_version == first.version_info
    [entry] = syncz(ads.cache)
    assert entry["types"]["RDS"]["error"] == "route: bad header"
    # The same rejected content again, even with the subscription re-sent: nothing.
    ads.set(mesh(header="bad"))
    await client.send(request(ROUTE, "r1", version_info=first.version_info))
    await client.nothing()
    # A new version is sent, and its ACK makes the type SYNCED again.
    ads.set(mesh(header="good"))
    fixed = await client.recv()
    assert fixed.version_info not in (first.version_info, rejected.version_info)
    await client.send(ack(fixed, "r1"))
    await client.nothing()
    assert ads.cache.status.state("n1", ROUTE) == SYNCED
    await client.close()


async def test_a_request_with_a_stale_nonce_is_ignored(ads: Ads) -> None:
    ads.set(mesh())
    client = ads.sotw()
    await client.send(request(ROUTE, "r1", node=node()))
    old = await client.recv()
    ads.set(mesh(header="v2"))
    new = await client.recv()
    # Envoy's answer to the older response arrives late, asking for other names: ignored.
    await client.send(
        request(ROUTE, "r1", "r2", version_info=old.version_info, response_nonce=old.nonce)
    )
    await client.nothing()
    assert ads.cache.status.state("n1", ROUTE) == STALE
    await client.send(ack(new, "r1"))
    await client.nothing()
    assert ads.cache.status.state("n1", ROUTE) == SYNCED
    await client.close()


async def test_named_subscriptions_get_what_exists_of_what_they_ask(
    ads: Ads, two_clusters: Resources
) -> None:
    ads.set(two_clusters)
    client = ads.sotw()
    await client.send(request(ENDPOINT, "c1", "missing", node=node()))
    first = await client.recv()
    assert names(first) == ["c1"]
    # A change of names is answered even though the version did not change.
    await client.send(ack(first, "c1", "c2"))
    second = await client.recv()
    assert names(second) == ["c1", "c2"]
    assert second.version_info == first.version_info
    await client.send(ack(second, "c1", "c2"))
    await client.nothing()
    # Names that do not exist yet are not answered; they come with the version that adds them.
    await client.send(request(SECRET, "default"))
    await client.nothing()
    await client.close()


async def test_wildcard_types_are_sent_even_when_empty(ads: Ads) -> None:
    ads.set({CLUSTER: by_name(eds_cluster("c1")), ENDPOINT: by_name(load_assignment("c1", 1))})
    client = ads.sotw()
    await client.send(request(LISTENER, node=node()))
    lds = await client.recv()
    assert list(lds.resources) == []
    await client.send(ack(lds))
    await client.send(request(CLUSTER))
    assert names(await client.recv()) == ["c1"]
    await client.close()


async def test_a_first_request_without_a_node_is_refused(ads: Ads) -> None:
    client = ads.sotw()
    await client.send(request(CLUSTER))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_closing_streams_unregisters_the_proxy_and_shutdown_ends_streams_cleanly(
    ads: Ads,
) -> None:
    ads.set(mesh())
    ads.set(mesh(), "n2")
    connected = metric("mixerhub_xds_connected_proxies")
    first = ads.sotw()
    await first.send(request(CLUSTER, node=node()))
    await first.recv()
    second = ads.delta()
    await second.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, node=node("n2")))
    await second.recv()
    assert set(ads.cache.proxies()) == {"n1", "n2"}
    assert metric("mixerhub_xds_connected_proxies") == connected + 2
    assert await first.close() == grpc.StatusCode.OK
    await asyncio.sleep(0.1)
    assert set(ads.cache.proxies()) == {"n2"}
    assert [p.node_id for p in ads.hooks.closed] == ["n1"]
    assert syncz(ads.cache)[0]["node_id"] == "n2"
    # The service is shutting down: the open stream ends with OK.
    ads.service.close()
    await asyncio.wait_for(second._reader, 5)
    assert await second.call.code() == grpc.StatusCode.OK
    assert ads.cache.proxies() == {}
    assert metric("mixerhub_xds_connected_proxies") == connected


# Delta ------------------------------------------------------------------------------------------


def delta(type_url: str, **fields: Any) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields)


def delta_ack(
    response: discovery_pb2.DeltaDiscoveryResponse,
) -> discovery_pb2.DeltaDiscoveryRequest:
    return delta(response.type_url, response_nonce=response.nonce)


async def test_delta_wildcard_sends_changes_and_removals(ads: Ads, two_clusters: Resources) -> None:
    snapshot = ads.set(two_clusters)
    client = ads.delta()
    await client.send(delta(CLUSTER, node=node()))
    first = await client.recv()
    assert names(first) == ["c1", "c2"]
    assert [r.version for r in first.resources] == [
        snapshot.resource_versions[CLUSTER]["c1"],
        snapshot.resource_versions[CLUSTER]["c2"],
    ]
    assert first.system_version_info == snapshot.version(CLUSTER)
    await client.send(delta_ack(first))
    await client.nothing()
    assert ads.cache.status.state("n1", CLUSTER) == SYNCED
    # c2 goes and c1 changes: only c1 is sent, c2 is removed.
    changed = dict(two_clusters)
    changed[CLUSTER] = by_name(eds_cluster("c1", service_name="c1"))
    changed[ENDPOINT] = by_name(load_assignment("c1", 1))
    ads.set(changed)
    second = await client.recv()
    assert names(second) == ["c1"]
    assert list(second.removed_resources) == ["c2"]
    await client.send(delta_ack(second))
    ads.set(changed)
    await client.nothing()
    await client.close()


async def test_delta_named_subscribe_and_unsubscribe(ads: Ads, two_clusters: Resources) -> None:
    ads.set(two_clusters)
    client = ads.delta()
    await client.send(delta(ENDPOINT, node=node(), resource_names_subscribe=["c1"]))
    first = await client.recv()
    assert names(first) == ["c1"]
    await client.send(delta_ack(first))
    await client.send(delta(ENDPOINT, resource_names_subscribe=["c2"]))
    second = await client.recv()
    assert names(second) == ["c2"]  # only what Envoy does not have
    await client.send(delta_ack(second))
    await client.send(delta(ENDPOINT, resource_names_unsubscribe=["c1"]))
    await client.nothing()
    changed = dict(two_clusters)
    changed[ENDPOINT] = by_name(load_assignment("c1", 11), load_assignment("c2", 2))
    ads.set(changed)  # c1 changed but is no longer subscribed
    await client.nothing()
    changed[ENDPOINT] = by_name(load_assignment("c1", 11))
    changed[CLUSTER] = by_name(eds_cluster("c1"))
    ads.set(changed)  # c2, still subscribed, is gone
    third = await client.recv()
    assert names(third) == []
    assert list(third.removed_resources) == ["c2"]
    # Subscribing again sends it again, however recently Envoy had it.
    await client.send(delta(ENDPOINT, resource_names_subscribe=["c1"]))
    assert names(await client.recv()) == ["c1"]
    await client.close()


async def test_delta_explicit_wildcard_for_a_named_type(ads: Ads, two_clusters: Resources) -> None:
    ads.set(two_clusters)
    client = ads.delta()
    await client.send(delta(ENDPOINT, node=node(), resource_names_subscribe=["*"]))
    assert names(await client.recv()) == ["c1", "c2"]
    await client.close()


async def test_delta_initial_resource_versions_are_not_sent_again(
    ads: Ads, two_clusters: Resources
) -> None:
    snapshot = ads.set(two_clusters)
    client = ads.delta()
    versions = snapshot.resource_versions[ENDPOINT]
    await client.send(
        delta(
            ENDPOINT,
            node=node(),
            resource_names_subscribe=["c1", "c2"],
            initial_resource_versions={"c1": versions["c1"], "c2": "something-older"},
        )
    )
    response = await client.recv()
    assert names(response) == ["c2"]
    await client.send(delta_ack(response))
    # Wildcard CDS that Envoy already has entirely: one empty answer, so its init completes.
    await client.send(
        delta(CLUSTER, initial_resource_versions=dict(snapshot.resource_versions[CLUSTER]))
    )
    cds = await client.recv()
    assert names(cds) == []
    assert list(cds.removed_resources) == []
    await client.close()


async def test_delta_nack_is_recorded_and_not_resent(ads: Ads) -> None:
    ads.set(mesh())
    client = ads.delta()
    await client.send(delta(ROUTE, node=node(), resource_names_subscribe=["r1"]))
    await client.send(delta_ack(await client.recv()))
    await client.nothing()  # the ACK is in before the change
    bad = ads.set(mesh(header="bad"))
    rejected = await client.recv()
    nacks = metric("mixerhub_xds_nacks_total", type="RDS")
    await client.send(
        delta(
            ROUTE,
            response_nonce=rejected.nonce,
            error_detail=status_pb2.Status(code=3, message="nope"),
        )
    )
    await client.nothing()
    assert metric("mixerhub_xds_nacks_total", type="RDS") == nacks + 1
    status = ads.cache.status.of("n1", ROUTE)
    assert status.state == NACKED
    assert status.last_nack is not None
    assert (status.last_nack.version, status.last_nack.error) == (bad.version(ROUTE), "nope")
    ads.set(mesh(header="bad"))
    await client.nothing()
    ads.set(mesh(header="good"))
    assert names(await client.recv()) == ["r1"]
    await client.close()


async def test_a_server_stopped_without_close_still_unregisters_its_streams(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks()
    cache = SnapshotCache(hooks)
    service = AggregatedDiscoveryService(cache)
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cache.set_snapshot("n1", mesh())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = Client(
            ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        )
        await client.send(request(CLUSTER, node=node()))
        await client.recv()
        await server.stop(0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(client._reader, 5)
    assert cache.proxies() == {}
    assert [p.node_id for p in hooks.closed] == ["n1"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
