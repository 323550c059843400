"""The baseline for bench/xds.py: an ADS server that does no per-proxy work at all.

It serves every stream the same resources (read once from a JSON file shaped like the hub's
/debug/config_dump: {"resources": {type_url: [resource as JSON with "@type"]}}), serialized once,
answers requests whose nonce it has not seen yet for a type, and on SIGUSR1 bumps the version of
one type (``--push-type``, route configurations by default) and pushes it to every stream: the
floor for a "one change, every proxy ACKs" round.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import grpc
import uvloop
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

# The hub's translation imports every message type it emits, so JSON with "@type" parses.
import mixerhub.xds.translate  # noqa: F401

ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def load(path: Path) -> dict[str, list[any_pb2.Any]]:
    dump: dict[str, Any] = json.loads(path.read_text())
    out: dict[str, list[any_pb2.Any]] = {}
    for type_url, resources in dump["resources"].items():
        out[type_url] = [json_format.ParseDict(r, any_pb2.Any()) for r in resources]
    return out


class Server(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, resources: dict[str, list[any_pb2.Any]], push_type: str) -> None:
        self.resources = resources
        self.push_type = push_type
        self.version = 1
        self.nonces = itertools.count()
        self.streams: set[asyncio.Queue[str]] = set()

    def response(self, type_url: str) -> discovery_pb2.DiscoveryResponse:
        return discovery_pb2.DiscoveryResponse(
            type_url=type_url,
            version_info=str(self.version),
            nonce=str(next(self.nonces)),
            resources=self.resources.get(type_url, []),
        )

    def push(self) -> None:
        self.version += 1
        for queue in self.streams:
            queue.put_nowait(self.push_type)

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        pushes: asyncio.Queue[str] = asyncio.Queue()
        self.streams.add(pushes)
        answered: set[str] = set()

        async def read() -> None:
            async for request in requests:
                if request.type_url not in answered or request.response_nonce == "":
                    answered.add(request.type_url)
                    pushes.put_nowait(request.type_url)

        reader = asyncio.create_task(read())
        try:
            while True:
                type_url = await pushes.get()
                yield self.response(type_url)
        finally:
            reader.cancel()
            self.streams.discard(pushes)


async def main(port: int, resources: Path, push_type: str) -> None:
    server = grpc.aio.server()
    ads = Server(load(resources), push_type)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, ads.push)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--resources", type=Path, required=True)
    parser.add_argument("--push-type", default=ROUTE)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.resources, args.push_type))
