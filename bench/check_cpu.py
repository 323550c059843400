"""CPU per ext_authz Check, in process: the hub's Check path against a trivial handler's.

bench/check.py measures throughput through a real Envoy, but on a small machine Envoy, wrk and
the hub share the CPU, so what decides the ratio is how much CPU the hub spends per Check beyond
what any Python ext_authz service spends (parse the CheckRequest, serialize an OK CheckResponse).
This measures exactly that with time.process_time (wall clock is noise on a shared machine):
bench/check.py's policy, compiled into a snapshot, and the serialized CheckRequest Envoy sends
for wrk's request, with the same token every time. The baseline leaves out gRPC itself, which both
servers pay alike, so its ratio is far from bench/check.py's: the figure to watch is the
difference, the hub's CPU beyond the trivial handler's.

    python bench/check_cpu.py [--checks 20000] [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import uvloop
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2
from joserfc import jwk, jwt

from bench.check import ISSUER, policy
from mixerhub import registry
from mixerhub.ext_authz import AuthorizationService
from mixerhub.hub_filters import identity_metadata
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot

_OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
)


class _Context:
    """What the service reads of a grpc.aio.ServicerContext: the call's initial metadata, as
    Envoy sends it (gRPC's own entries, then the bootstrap's workload identity)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def check_request(token: str, n: int) -> bytes:
    """The CheckRequest Envoy (one worker, bench/check.py's bootstrap) sends for wrk's n-th
    GET /: each has its own request id, as Envoy makes one per request (a UUID)."""
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.address.socket_address.port_value = 51234
    attributes.destination.address.socket_address.address = "127.0.0.1"
    attributes.destination.address.socket_address.port_value = 10000
    attributes.request.time.seconds = int(time.time())
    http = attributes.request.http
    http.id = f"5d2f0ed4-8e3c-4c1b-9a77-{n:012x}"
    http.method = "GET"
    http.path = "/"
    http.host = "127.0.0.1:10000"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.headers.update(
        {
            ":authority": "127.0.0.1:10000",
            ":path": "/",
            ":method": "GET",
            ":scheme": "http",
            "authorization": f"Bearer {token}",
            "user-agent": "wrk/4.2.0",
            "accept": "*/*",
            "x-forwarded-proto": "http",
            "x-request-id": http.id,
            "x-envoy-expected-rq-timeout-ms": "15000",
            "x-tenant": "acme",
            "accept-encoding": "gzip",
        }
    )
    return request.SerializeToString()


def metadata() -> tuple[tuple[str, str], ...]:
    grpc_own = (
        ("user-agent", "envoy/1.31.0 grpc"),
        ("x-envoy-internal", "true"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-envoy-expected-rq-timeout-ms", "200"),
    )
    identity = identity_metadata("api", "bench", {"app": "api"}, "")
    return grpc_own + tuple((m["key"], m["value"]) for m in identity)


async def _trivial(data: bytes, context: Any) -> bytes:
    external_auth_pb2.CheckRequest.FromString(data)
    return _OK.SerializeToString()


class Requests:
    """Serialized CheckRequests, each with a request id never used before: memquota remembers
    ids to deduplicate retries, so a repeated id would skip the charge that every real request
    makes."""

    _PLACEHOLDER = b"000000000000"

    def __init__(self, token: str) -> None:
        self._template = check_request(token, 0)
        assert self._template.count(self._PLACEHOLDER) == 2  # http.id and x-request-id
        self._next = 1

    def take(self, n: int) -> list[bytes]:
        first, self._next = self._next, self._next + n
        return [
            self._template.replace(self._PLACEHOLDER, b"%012x" % i) for i in range(first, first + n)
        ]


async def measure(call: Any, requests: list[bytes], context: Any) -> float:
    """µs of CPU per call: the handler awaited in a task, as grpc.aio runs each RPC, and the
    response serialized, as the generic handler's serializer does."""

    async def run() -> None:
        for i, request in enumerate(requests):
            response = await call(request, context)
            if not isinstance(response, bytes):
                response.SerializeToString()
            if i % 32 == 31:
                # A server's loop turns between calls (and drops cancelled timers then).
                await asyncio.sleep(0)

    started = time.process_time()
    await asyncio.create_task(run())
    return (time.process_time() - started) / len(requests) * 1e6


async def main(checks: int, repeats: int, profile: bool) -> None:
    key = jwk.RSAKey.generate_key(2048, parameters={"kid": "bench"}, private=True)
    token = jwt.encode(
        {"alg": "RS256", "kid": "bench"},
        {"iss": ISSUER, "sub": "user-7", "aud": "api", "exp": int(time.time()) + 3600},
        key,
    )
    jwks = json.dumps({"keys": [key.as_dict(private=False)]})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "policy.yaml").write_text(policy(jwks))
        snapshot = compile_snapshot(documents.read([Path(tmp)]), registry.default_registry())
    service = AuthorizationService()
    service.activate(snapshot)
    await asyncio.sleep(0)  # let the key prefetch run

    requests, context = Requests(token), _Context(metadata())
    first = await service.check_bytes(requests.take(1)[0], context)  # type: ignore[arg-type]
    if isinstance(first, bytes):
        first = external_auth_pb2.CheckResponse.FromString(first)
    if first.status.code != 0:
        sys.exit(f"the benchmark request is denied: {first}")
    warm = max(checks // 10, 100)
    await measure(service.check_bytes, requests.take(warm), context)
    await measure(_trivial, requests.take(warm), context)

    if profile:
        batch = requests.take(checks)
        profiler = cProfile.Profile()
        profiler.enable()
        await measure(service.check_bytes, batch, context)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return

    # Interleaved, so that a spell of contention on a shared machine hits both alike.
    hubs, bases = [], []
    for _ in range(repeats):
        hubs.append(await measure(service.check_bytes, requests.take(checks), context))
        bases.append(await measure(_trivial, requests.take(checks), context))
    hub, base = min(hubs), min(bases)
    print(f"CPU per Check, best of {repeats} x {checks} calls (time.process_time)")
    print(f"  trivial handler (parse + OK response):  {base:7.1f} µs")
    print(f"  mixerhub, bench/check.py's policy:      {hub:7.1f} µs")
    print(f"  hub beyond the trivial handler:         {hub - base:7.1f} µs")
    print(f"  ratio hub / trivial:                    {hub / base:7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    uvloop.run(main(args.checks, args.repeats, args.profile))  # as the hub runs
