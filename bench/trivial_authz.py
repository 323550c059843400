"""The baseline for bench/check.py: a grpc.aio ext_authz server that allows everything.

What any Python ext_authz service costs at the least: gRPC, protobuf and uvloop, no policy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

_OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
)


class Allow(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: object, context: object) -> object:
        return _OK


async def main(port: int) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Allow(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
