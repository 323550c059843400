"""The baseline for bench/quota.py: a grpc.aio rate-limit server that answers OK to everything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import grpc
import uvloop
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

_OK = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


class Allow(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request, context):  # type: ignore[no-untyped-def]
        return _OK


async def main(port: int) -> None:
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Allow(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
