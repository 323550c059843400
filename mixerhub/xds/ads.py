"""envoy.service.discovery.v3.AggregatedDiscoveryService over a SnapshotCache.

Both methods, state of the world and delta, serve the same cache; the service sees only the
cache's interface (watch, snapshot, status).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from mixerhub.xds.cache import SnapshotCache, Watch
from mixerhub.xds.delta import DeltaStream
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.sotw import SotwStream
from mixerhub.xds.stream import Streams

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self._streams = Streams(cache)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    def close(self) -> None:
        """End every open stream cleanly and refuse new ones; call before ``server.stop``."""
        self._streams.close()

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        def protocol(proxy: Proxy, watch: Watch) -> SotwStream:
            return SotwStream(proxy, watch, self.cache.status)

        # grpc.aio streams responses only from an async generator function of its own.
        async for response in self._streams.serve(request_iterator, context, protocol):
            yield response

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        def protocol(proxy: Proxy, watch: Watch) -> DeltaStream:
            return DeltaStream(proxy, watch, self.cache.status)

        # grpc.aio streams responses only from an async generator function of its own.
        async for response in self._streams.serve(request_iterator, context, protocol):
            yield response
