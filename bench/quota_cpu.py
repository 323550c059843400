"""CPU per ShouldRateLimit decision, in process: the hub's rate-limit path against a trivial
handler's.

bench/quota.py measures throughput over gRPC, where the load generator, Redis and the hub share
two cores, so what decides its ratio is the CPU the hub spends per decision beyond what any
Python rate-limit service spends (parse the RateLimitRequest, serialize a response). This
measures that with time.process_time (wall clock is noise on a shared machine), best of many
timings: bench/quota.py's limits and its 3-descriptor requests, through the memory backend and
through a real redis-server (tests/redis_server.py; its CPU is another process's, only the
hub's side of the connection counts here). The Redis figure runs ``--concurrency`` decisions
at a time, as the load does, so that the script connection pipelines them. gRPC itself, which
both servers pay alike, is left out: the figure to watch is the hub's CPU beyond the trivial
handler's.

    python bench/quota_cpu.py [--calls 2000] [--repeats 15] [--concurrency 32] [--no-redis]
                              [--profile memory|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import uvloop
from envoy.service.ratelimit.v3 import rls_pb2

from bench.quota import LIMITS, request
from mixerhub import registry
from mixerhub.rate_limit import RateLimitService
from mixerhub.ratelimit.backend import Backend, MemoryBackend
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot
from tests.harness import process_group
from tests.redis_server import redis_available, start_redis

_Response = rls_pb2.RateLimitResponse
# What bench/trivial_rls.py answers: one OK status per descriptor, made per call.
_OK = _Response.Code.OK

Call = Callable[[bytes], Awaitable[bytes]]


async def _trivial(data: bytes) -> bytes:
    request = rls_pb2.RateLimitRequest.FromString(data)
    response = _Response(overall_code=_OK)
    for _ in request.descriptors:
        response.statuses.add(code=_OK)
    return response.SerializeToString()


def _hub(service: RateLimitService) -> Call:
    """The hub's gRPC method as grpc.aio calls it: bytes in, bytes out."""

    async def call(data: bytes) -> bytes:
        return await service.should_rate_limit_bytes(data, None)

    return call


async def cpu_per_call(call: Call, requests: list[bytes], concurrency: int) -> float:
    """µs of CPU per call: ``concurrency`` tasks, as grpc.aio runs each RPC in one, share the
    requests."""

    async def run(share: list[bytes]) -> None:
        for i, data in enumerate(share):
            await call(data)
            if i % 32 == 31:
                # A server's loop turns between calls (and drops cancelled timers then).
                await asyncio.sleep(0)

    shares = [requests[n::concurrency] for n in range(concurrency)]
    started = time.process_time()
    await asyncio.gather(*(asyncio.create_task(run(share)) for share in shares))
    return (time.process_time() - started) / len(requests) * 1e6


async def best(call: Call, requests: list[bytes], concurrency: int, repeats: int) -> float:
    """The best of ``repeats`` timings: other processes slow ours down in bursts, the best of
    many short timings is the figure that reproduces."""
    return min([await cpu_per_call(call, requests, concurrency) for _ in range(repeats)])


def service(backend: Backend) -> RateLimitService:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "limits.yaml").write_text(LIMITS)
        snapshot = compile_snapshot(documents.read([Path(tmp)]), registry.default_registry())
    s = RateLimitService(backend)
    s.activate(snapshot)
    return s


async def check(call: Call, data: bytes) -> None:
    answer = _Response.FromString(await call(data))
    limited = [s for s in answer.statuses if s.HasField("current_limit")]
    if answer.overall_code != _OK or len(limited) != 3:
        sys.exit(f"the benchmark request is not decided by three limits: {answer}")


def profile(call: Call, requests: list[bytes], concurrency: int) -> Awaitable[float]:
    async def run() -> float:
        profiler = cProfile.Profile()
        profiler.enable()
        cpu = await cpu_per_call(call, requests, concurrency)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return cpu

    return run()


async def main(args: argparse.Namespace) -> None:
    requests = [request(i).SerializeToString() for i in range(args.calls)]
    memory = service(MemoryBackend())
    hub_memory = _hub(memory)
    await check(hub_memory, requests[0])
    for call in (_trivial, hub_memory):
        await cpu_per_call(call, requests, 1)  # warm up

    with tempfile.TemporaryDirectory() as tmp, process_group(Path(tmp)) as group:
        hub_redis: Call | None = None
        redis_service: RateLimitService | None = None
        if not args.no_redis and redis_available():
            from mixerhub.ratelimit.redis import RedisBackend

            server = start_redis(group)
            redis_service = service(RedisBackend.from_url(server.url, timeout=1.0))
            hub_redis = _hub(redis_service)
            await check(hub_redis, requests[0])
            await cpu_per_call(hub_redis, requests, args.concurrency)

        if args.profile:
            call = hub_redis if args.profile == "redis" else hub_memory
            if call is None:
                sys.exit("no redis-server to profile with")
            cpu = await profile(call, requests * 5, args.concurrency)
            print(f"{cpu:.1f} µs per call under the profiler")
        else:
            base = await best(_trivial, requests, 1, args.repeats)
            mem = await best(hub_memory, requests, 1, args.repeats)
            print(
                f"CPU per ShouldRateLimit (3 descriptors), best of {args.repeats} x {args.calls}"
                " calls (time.process_time)"
            )
            print(f"  trivial handler (parse + OK statuses):  {base:7.1f} µs")
            print(f"  mixerhub, memory backend:               {mem:7.1f} µs"
                  f"   ({mem - base:5.1f} µs beyond, {mem / base:4.1f}x)")  # fmt: skip
            if hub_redis is not None:
                red = await best(hub_redis, requests, args.concurrency, args.repeats)
                print(f"  mixerhub, redis-server, {args.concurrency:3} at a time:  {red:7.1f} µs"
                      f"   ({red - base:5.1f} µs beyond, {red / base:4.1f}x)")  # fmt: skip
            else:
                print("  (no redis-server: the Redis figure is left out)")
        if redis_service is not None:
            await redis_service.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=15, help="timings; the best counts")
    parser.add_argument("--concurrency", type=int, default=32, help="Redis: decisions at once")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--profile", choices=("memory", "redis"), help="print cProfile's top")
    uvloop.run(main(parser.parse_args()))  # as the hub runs
