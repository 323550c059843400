"""The baseline for bench/report.py: an access-log server that parses every message and nothing
more. What any Python access-log service costs at the least."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import grpc
import uvloop
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc


class Parse(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def main(port: int) -> None:
    server = grpc.aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(Parse(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
