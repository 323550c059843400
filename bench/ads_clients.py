"""N simulated Envoys on ADS (state of the world), for bench/xds.py: a separate process.

Each client does what Envoy does on one ADS stream: asks for clusters and listeners (wildcard),
then for the endpoints of its EDS clusters and the route configurations its listeners name,
and ACKs every response. It is driven over stdin/stdout in lines:

    -> "ready <n>"                once every client has ACKed its first config
    <- "measure <t0>"             t0: time.time() of the config change
    -> {"converged": seconds...}  once no response has arrived for --quiet seconds

    python bench/ads_clients.py --target 127.0.0.1:PORT --clients 1000 [--namespace bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import grpc
import uvloop
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
STREAMS_PER_CHANNEL = 50


class Client:
    def __init__(self, n: int, namespace: str, workloads: int) -> None:
        workload = f"client-{n % workloads}"
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "NAMESPACE": namespace,
                "WORKLOAD_NAME": workload,
                "SERVICE_ACCOUNT": workload,
                "LABELS": {"app": workload},
            }
        )
        self.node_id = f"sidecar~127.0.0.1~{workload}-{n}.{namespace}~{namespace}.svc.cluster.local"
        self.node = discovery_pb2.DiscoveryRequest().node
        self.node.id = self.node_id
        self.node.cluster = workload
        self.node.metadata.CopyFrom(metadata)
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.subscribed: dict[str, tuple[str, ...]] = {}
        self.last_response = 0.0
        self.responses = 0
        self.arrivals: list[float] = []  # time.time() of every response
        self.acked: set[str] = set()

    def request(
        self, type_url: str, names: tuple[str, ...] = (), version: str = "", nonce: str = ""
    ) -> None:
        r = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names, version_info=version, response_nonce=nonce
        )
        if not self.subscribed:
            r.node.CopyFrom(self.node)
        self.subscribed[type_url] = names
        self.queue.put_nowait(r)

    async def requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self.queue.get()

    def on_response(self, response: discovery_pb2.DiscoveryResponse) -> None:
        self.responses += 1
        self.last_response = time.time()
        self.arrivals.append(self.last_response)
        t = response.type_url
        self.request(t, self.subscribed.get(t, ()), response.version_info, response.nonce)
        self.acked.add(t)
        if t == CLUSTER:
            names = []
            for any_ in response.resources:
                c = cluster_pb2.Cluster()
                any_.Unpack(c)
                if c.type == cluster_pb2.Cluster.EDS:
                    names.append(c.eds_cluster_config.service_name or c.name)
            self._subscribe(ENDPOINT, tuple(sorted(names)))
        elif t == LISTENER:
            routes = []
            for any_ in response.resources:
                listener = listener_pb2.Listener()
                any_.Unpack(listener)
                for chain in listener.filter_chains:
                    for f in chain.filters:
                        if f.typed_config.type_url.endswith("HttpConnectionManager"):
                            hcm = hcm_pb2.HttpConnectionManager()
                            f.typed_config.Unpack(hcm)
                            if hcm.HasField("rds"):
                                routes.append(hcm.rds.route_config_name)
            self._subscribe(ROUTE, tuple(sorted(set(routes))))

    def _subscribe(self, type_url: str, names: tuple[str, ...]) -> None:
        if names and self.subscribed.get(type_url) != names:
            self.request(type_url, names)

    async def run(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub, sds: bool) -> None:
        self.request(CLUSTER)
        self.request(LISTENER)
        if sds:  # what an Envoy with mTLS asks for: its certificate and the trust bundle
            self.request(SECRET, ("ROOTCA", "default"))
        async for response in stub.StreamAggregatedResources(self.requests()):
            self.on_response(response)


async def main(args: argparse.Namespace) -> None:
    clients = [Client(n, args.namespace, args.workloads) for n in range(args.clients)]
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(0, args.clients, STREAMS_PER_CHANNEL)
    ]
    tasks = [
        asyncio.create_task(
            c.run(
                ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[n // STREAMS_PER_CHANNEL]),
                args.sds,
            )
        )
        for n, c in enumerate(clients)
    ]
    wanted = {CLUSTER, LISTENER, *((SECRET,) if args.sds else ())}
    while not all(wanted <= c.acked for c in clients):
        for t in tasks:
            if t.done():
                t.result()  # a stream that failed says why
        await asyncio.sleep(0.05)
    await quiet(clients, args.quiet)
    print(f"ready {len(clients)}", flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    t0 = float(line.split()[1])
    await quiet(clients, args.quiet, since=t0)
    # Responses that arrived before this process read the line still count: go by arrival time.
    after = [[t for t in c.arrivals if t >= t0] for c in clients]
    updated = [a for a in after if a]
    last = max((max(a) for a in updated), default=t0)
    print(
        json.dumps(
            {
                "converged": last - t0,
                "updated": len(updated),
                "responses": sum(len(a) for a in after),
            }
        ),
        flush=True,
    )
    for t in tasks:
        t.cancel()
    for ch in channels:
        await ch.close()


async def quiet(clients: list[Client], seconds: float, since: float = 0.0) -> None:
    """Until no client has had a response for ``seconds`` (counted from ``since`` at least)."""
    while True:
        last = max(since, *(c.last_response for c in clients))
        idle = time.time() - last
        if idle >= seconds:
            return
        await asyncio.sleep(seconds - idle + 0.01)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--namespace", default="bench")
    parser.add_argument("--workloads", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=1.5)
    parser.add_argument("--sds", action="store_true", help="also subscribe to default and ROOTCA")
    uvloop.run(main(parser.parse_args()))
