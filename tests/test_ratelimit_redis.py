"""The Redis rate-limit backend against a real redis-server (tests/redis_server.py).

The script's logic is compared with the in-memory backend at controlled times (``take_at`` passes
``now`` into the script); the real-time tests use 1 s windows and count; the process tests run
``mixerhub serve --ratelimit-redis`` hubs sharing one server, and kill and restart it under load.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from mixerhub.monitoring import REGISTRY
from mixerhub.rate_limit import RateLimitService
from mixerhub.ratelimit.backend import Charge, MemoryBackend, Outcome
from mixerhub.ratelimit.matching import Algorithm
from mixerhub.ratelimit.redis import RedisBackend, redis_key
from mixerhub.ratelimit.resp import ScriptConnection, command
from tests.harness import LOOPBACK, Hub, HubFactory, ProcessGroup, process_group
from tests.redis_server import (
    RedisServer,
    make_ca_and_server_cert,
    requires_redis,
    start_cluster_node,
    start_redis,
    start_sentinel,
    start_tls_redis,
)
from tests.test_ratelimit import ask, compile_texts

pytestmark = requires_redis

Response = rls_pb2.RateLimitResponse
OK, OVER = Response.Code.OK, Response.Code.OVER_LIMIT
ALGORITHMS: tuple[Algorithm, ...] = ("fixed_window", "rolling_window", "token_bucket")


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the in-process tests of this module (flushed per test)."""
    with process_group(tmp_path_factory.mktemp("redis")) as group:
        yield start_redis(group)


@pytest.fixture
def sync_redis(shared_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(shared_redis.url)
    client.flushall()
    client.script_flush()
    client.config_resetstat()
    yield client
    client.close()


@pytest.fixture
async def backend(
    shared_redis: RedisServer, sync_redis: redis.Redis
) -> AsyncIterator[RedisBackend]:
    b = RedisBackend.from_url(shared_redis.url, timeout=1.0)
    yield b
    await b.aclose()


def charge(
    name: str,
    algorithm: Algorithm,
    limit: int,
    *,
    unit: int = 60,
    hits: int = 1,
    enforced: bool = True,
    domain: str = "d",
) -> Charge:
    return Charge((domain, (("k", name),)), hits, limit, unit, algorithm, enforced)


def same(a: Outcome, b: Outcome) -> bool:
    return (a.over_limit, a.charged, a.remaining) == (b.over_limit, b.charged, b.remaining) and (
        abs(a.reset_after - b.reset_after) < 0.002
    )


def evalsha_calls(port: int) -> int:
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        calls: int = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        return calls
    finally:
        client.close()


def counter(name: str, reason: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total", {"reason": reason}) or 0.0


# --- the script's logic, at controlled times, against the in-memory backend ---


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_the_script_decides_as_the_memory_backend_across_window_edges(
    backend: RedisBackend, algorithm: Algorithm
) -> None:
    now = [1_800_000_000.0]  # on a minute edge
    memory = MemoryBackend(lambda: now[0])
    rng = random.Random(f"redis-{algorithm}")
    names = ["a", "b", "c"]
    for step in range(400):
        now[0] += rng.choice([0.0, 0.001, 0.25, 1.0, 7.5, 20.0, 59.999])
        # A key's limit may change between requests (an override), not within one.
        limits = {n: rng.choice([0, 1, 3, 5]) for n in names}
        picked = [rng.choice(names) for _ in range(rng.randint(1, 3))]
        charges = [
            charge(
                name,
                algorithm,
                limits[name],
                hits=rng.choice([1, 1, 1, 2]),
                enforced=rng.random() > 0.2,
            )
            for name in picked
        ]
        expected = memory.take_now(charges)
        got = await backend.take_at(charges, now[0])
        assert all(same(e, g) for e, g in zip(expected, got, strict=True)), str(
            (step, now[0], charges, expected, got),
        )


async def test_a_fixed_window_resets_on_its_edge(backend: RedisBackend) -> None:
    c = charge("edge", "fixed_window", 2, unit=1)
    edge = 1_800_000_001.0
    assert [(await backend.take_at([c], edge - 0.002))[0].charged for _ in range(3)] == [
        True,
        True,
        False,
    ]
    last = (await backend.take_at([c], edge - 0.001))[0]
    assert last.over_limit
    assert abs(last.reset_after - 0.001) < 1e-6
    assert (await backend.take_at([c], edge))[0] == Outcome(False, True, 1, 1.0)


async def test_a_fixed_window_key_expires_after_its_window_set_once_by_its_first_charge(
    backend: RedisBackend, sync_redis: redis.Redis
) -> None:
    c = charge("ttl", "fixed_window", 10, unit=60)
    assert (await backend.take([c]))[0].charged
    [key] = sync_redis.keys()  # the window's own: KEY:index
    assert key.decode().startswith(redis_key(c) + ":")
    first = sync_redis.pttl(key)
    # The window's end plus a second, as Redis's clock says: within the 61 s a minute allows.
    assert 1_000 < first <= 61_000
    sync_redis.execute_command("PEXPIRE", key, 5_000)  # type: ignore[no-untyped-call]
    assert (await backend.take([c]))[0].charged
    assert sync_redis.get(key) == b"2"
    # The second charge wrote the count only: the expiry is the one it found.
    assert 4_000 < sync_redis.pttl(key) <= 5_000
    calls = sync_redis.info("commandstats")
    assert calls["cmdstat_pexpire"]["calls"] == 2  # the script's first, and this test's


async def test_a_token_bucket_refills_one_token_per_interval(backend: RedisBackend) -> None:
    c = charge("gcra", "token_bucket", 4, unit=1)
    t = 1_800_000_000.0
    assert [(await backend.take_at([c], t))[0].charged for _ in range(5)] == [True] * 4 + [False]
    assert not (await backend.take_at([c], t + 0.249))[0].charged
    assert (await backend.take_at([c], t + 0.25))[0].charged
    assert not (await backend.take_at([c], t + 0.25))[0].charged


async def test_an_enforced_limit_over_stops_every_charge_and_a_shadow_one_stops_none(
    backend: RedisBackend,
) -> None:
    t = 1_800_000_000.0
    tight = charge("tight", "fixed_window", 1)
    loose = charge("loose", "rolling_window", 10)
    shadow = charge("shadow", "token_bucket", 1, enforced=False)
    assert [o.charged for o in await backend.take_at([tight, loose, shadow], t)] == [True] * 3
    blocked = await backend.take_at([tight, loose], t)
    assert [(o.over_limit, o.charged) for o in blocked] == [(True, False), (False, False)]
    passed = await backend.take_at([loose, shadow], t)
    assert [(o.over_limit, o.charged) for o in passed] == [(False, True), (True, False)]
    assert passed[0].remaining == 8  # the blocked request charged nothing


def test_keys_carry_the_domain_as_a_cluster_hash_tag() -> None:
    key = redis_key(charge("x", "token_bucket", 1, domain="shop"))
    assert key.startswith("mixerhub:rl:{shop}:token_bucket:60:")


# --- real time, short windows ---


def _after_a_second_edge() -> None:
    time.sleep(1.02 - time.time() % 1.0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_each_algorithm_with_redis_time_over_one_second(
    backend: RedisBackend, algorithm: Algorithm
) -> None:
    c = charge(f"real-{algorithm}", algorithm, 5, unit=1)
    _after_a_second_edge()
    first = [(await backend.take([c]))[0].charged for _ in range(12)]
    assert first.count(True) == 5
    assert first[:5] == [True] * 5
    await asyncio.sleep(1.05)
    again = [(await backend.take([c]))[0].charged for _ in range(12)]
    assert again.count(True) == 5


# --- one round trip per decision, the local over-limit cache ---


async def test_one_evalsha_per_decision_whatever_the_descriptors(
    backend: RedisBackend, sync_redis: redis.Redis
) -> None:
    charges = [charge(f"n{i}", a, 100) for i, a in enumerate(ALGORITHMS * 2)]
    for _ in range(25):
        await backend.take(charges)
    stats = sync_redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 25
    assert stats["cmdstat_script|load"]["calls"] == 1
    assert "cmdstat_eval" not in stats

    # A restarted (flushed) script cache costs one NOSCRIPT and one reload, no failure.
    sync_redis.script_flush()
    before = counter("mixerhub_ratelimit_redis_failures", "error")
    assert (await backend.take(charges))[0].charged
    assert counter("mixerhub_ratelimit_redis_failures", "error") == before


async def test_concurrent_decisions_share_round_trips_and_never_run_out_of_connections(
    backend: RedisBackend, sync_redis: redis.Redis
) -> None:
    # More decisions at once than the pool has connections (256): pipelined, they all count.
    charges = [[charge(f"burst{i % 40}", "fixed_window", 10_000)] for i in range(1000)]
    before = counter("mixerhub_ratelimit_redis_failures", "error")
    outcomes = await asyncio.gather(*(backend.take(c) for c in charges))
    assert all(o[0].charged for o in outcomes)
    assert counter("mixerhub_ratelimit_redis_failures", "error") == before
    stats = sync_redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1000  # still one script per decision
    assert int(sync_redis.info("clients")["connected_clients"]) < 20  # not one per decision
    remaining = sorted({o[0].remaining for o in outcomes if o[0].remaining < 10_000 - 20})
    assert remaining == list(range(10_000 - 25, 10_000 - 20))  # every charge landed, once


async def test_keys_over_their_limit_are_answered_without_redis_until_their_reset(
    backend: RedisBackend, sync_redis: redis.Redis
) -> None:
    c = charge("cached", "fixed_window", 2, unit=60)
    other = charge("other", "token_bucket", 50)
    cached_before = counter("mixerhub_ratelimit_redis_local_decisions", "cache")
    outcomes = [await backend.take([c, other]) for _ in range(10)]
    assert [o[0].charged for o in outcomes] == [True, True] + [False] * 8
    assert all(o[0].over_limit and 0 < o[0].reset_after <= 60 for o in outcomes[2:])
    assert sync_redis.info("commandstats")["cmdstat_evalsha"]["calls"] == 3
    assert counter("mixerhub_ratelimit_redis_local_decisions", "cache") - cached_before == 7
    # A request without the over-limit key still goes to Redis.
    assert (await backend.take([other]))[0].charged


# --- Redis slow or down ---


async def charged_soon(b: RedisBackend, c: Charge) -> bool:
    """Whether ``c`` is charged within a second (a call may time out on a loaded machine)."""
    for _ in range(50):
        if (await b.take([c]))[0].charged:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_stopped_redis_costs_one_timeout_and_the_failure_policy_answers(
    shared_redis: RedisServer, sync_redis: redis.Redis
) -> None:
    allow = RedisBackend.from_url(shared_redis.url)  # the default 15 ms timeout
    deny = RedisBackend.from_url(shared_redis.url, failure="deny")
    allow.backoff = deny.backoff = 0.0
    # (A call that timed out may still be run once Redis wakes up: the limit leaves room.)
    c = charge("slow", "fixed_window", 100)
    shadow = charge("s", "fixed_window", 100, enforced=False)
    try:
        assert await charged_soon(allow, c)
        assert await charged_soon(deny, c)
        timeouts = counter("mixerhub_ratelimit_redis_failures", "timeout")
        os.kill(shared_redis.process.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            a = await allow.take([c, shadow])
            d = await deny.take([c, shadow])
            elapsed = time.monotonic() - start
        finally:
            os.kill(shared_redis.process.pid, signal.SIGCONT)
        assert elapsed < 0.5, elapsed
        assert [(o.over_limit, o.charged) for o in a] == [(False, False), (False, False)]
        assert [(o.over_limit, o.charged) for o in d] == [(True, False), (False, False)]
        assert counter("mixerhub_ratelimit_redis_failures", "timeout") - timeouts == 2
        # The pool reconnects by itself.
        assert await charged_soon(allow, c)
        assert await charged_soon(deny, c)
    finally:
        await allow.aclose()
        await deny.aclose()


async def test_each_call_times_out_at_its_own_deadline(
    shared_redis: RedisServer, sync_redis: redis.Redis
) -> None:
    conn = ScriptConnection(LOOPBACK, shared_redis.port)
    try:
        assert await conn.call("PING") == b"PONG"
        os.kill(shared_redis.process.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            start = loop.time()
            late = asyncio.ensure_future(conn.send(command("PING"), 0.4))
            soon = asyncio.ensure_future(conn.send(command("ECHO", "x"), 0.05))
            with pytest.raises(TimeoutError):
                await soon  # not held back by the later deadline armed first
            assert loop.time() - start < 0.3
            assert not late.done()
            with pytest.raises(TimeoutError):
                await late
            assert 0.4 <= loop.time() - start < 1.5
        finally:
            os.kill(shared_redis.process.pid, signal.SIGCONT)
        # The late replies are matched to their commands and dropped: the next reply is ours.
        assert await conn.call("ECHO", "after") == b"after"
    finally:
        await conn.aclose()


async def test_the_service_answers_from_redis(backend: RedisBackend) -> None:
    s = RateLimitService(backend)
    s.activate(
        compile_texts(
            """
            domain: shop
            descriptors:
              - key: user
                rate_limit: {unit: minute, requests_per_unit: 2, algorithm: token_bucket}
            """
        )
    )
    codes = [(await ask(s, "shop", [("user", "u1")])).overall_code for _ in range(3)]
    assert codes == [OK, OK, OVER]
    answer = await ask(s, "shop", [("user", "u2")])
    assert answer.statuses[0].limit_remaining == 1
    assert answer.statuses[0].duration_until_reset.seconds == 30


# --- hubs as processes ---

LIMIT = 10
CONFIG = f"""
domain: global
descriptors:
  - key: client
    rate_limit:
      unit: minute
      requests_per_unit: {LIMIT}
      algorithm: rolling_window
"""


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config"
    config.mkdir()
    (config / "ratelimit.yaml").write_text(CONFIG)
    return config


def _request(client: str = "c1") -> rls_pb2.RateLimitRequest:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="client", value=client)
    return rls_pb2.RateLimitRequest(
        domain="global", descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
    )


class Caller:
    def __init__(self, hub: Hub) -> None:
        self.channel = grpc.insecure_channel(f"{hub.host}:{hub.grpc_port}")
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def __call__(self, client: str = "c1") -> int:
        answer: rls_pb2.RateLimitResponse = self.stub.ShouldRateLimit(_request(client), timeout=5)
        return int(answer.overall_code)


def _metric(hub: Hub, name: str) -> float:
    text = hub.get("/metrics").body.decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def test_two_hubs_sharing_one_redis_enforce_one_global_limit(
    tmp_path: Path, processes: ProcessGroup, make_hub: HubFactory
) -> None:
    server = start_redis(processes)
    config = _config(tmp_path)
    # A generous timeout: a loaded test machine must not turn into failure-policy answers.
    args = ["--ratelimit-redis", server.url, "--ratelimit-redis-timeout", "0.5"]
    hubs = [make_hub(config, extra_args=args) for _ in range(2)]
    callers = [Caller(h) for h in hubs]
    codes = [callers[i % 2]() for i in range(3 * LIMIT)]
    assert codes.count(OK) == LIMIT, codes
    assert codes[:LIMIT] == [OK] * LIMIT
    for c in callers:
        c.channel.close()
    # Decisions past the limit come from each hub's over-limit cache.
    assert LIMIT <= evalsha_calls(server.port) < 3 * LIMIT


def test_redis_killed_under_load_then_restarted(
    tmp_path: Path, processes: ProcessGroup, make_hub: HubFactory
) -> None:
    server = start_redis(processes)
    hub = make_hub(
        _config(tmp_path),
        extra_args=[
            *("--ratelimit-redis", server.url, "--ratelimit-redis-failure", "deny"),
            *("--ratelimit-redis-timeout", "0.5"),
        ],
    )
    call = Caller(hub)
    errors: list[BaseException] = []
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                codes.append(call(f"load-{n}"))  # a fresh key each time: all OK unless denied
            except BaseException as e:
                errors.append(e)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.3)
        assert codes
        assert set(codes) == {OK}
        server.kill()
        time.sleep(0.5)
        down = len(codes)
        time.sleep(0.5)
        assert set(codes[down:]) == {OVER}, "deny while Redis is down"
        server.restart()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and codes[-1] != OK:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors[:3]
    assert codes[-1] == OK, "the hub reconnected by itself"
    assert hub.process.returncode is None, hub.log()
    # Redis is back, empty: the limit is enforced again from zero.
    answers = [call("after") for _ in range(LIMIT + 2)]
    assert answers == [OK] * LIMIT + [OVER, OVER]
    assert _metric(hub, "mixerhub_ratelimit_redis_failures_total") > 0
    assert _metric(hub, "mixerhub_ratelimit_redis_local_decisions_total") > 0
    call.channel.close()


async def _hammer(hub: Hub, keys: list[str], concurrency: int = 64) -> list[int]:
    """One decision per key, ``concurrency`` at a time, as Envoy's workers call under load."""
    codes: list[int] = []
    async with grpc.aio.insecure_channel(f"{hub.host}:{hub.grpc_port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)

        async def worker(mine: list[str]) -> None:
            for key in mine:
                answer = await stub.ShouldRateLimit(_request(key), timeout=5)
                codes.append(int(answer.overall_code))

        await asyncio.gather(*(worker(keys[n::concurrency]) for n in range(concurrency)))
    return codes


@pytest.mark.parametrize("batch_wait", ["0.005", "0"])
async def test_a_loaded_hub_batches_its_writes_and_counts_every_hit_once(
    tmp_path: Path, processes: ProcessGroup, make_hub: HubFactory, batch_wait: str
) -> None:
    server = start_redis(processes)
    hub = make_hub(
        _config(tmp_path),
        extra_args=[
            *("--ratelimit-redis", server.url, "--ratelimit-redis-timeout", "0.5"),
            *("--ratelimit-redis-batch-wait", batch_wait),
        ],
    )
    # Enough load for the hub's loop to be busy; then every one of 100 clients at its limit.
    assert set(await _hammer(hub, [f"warm-{i}" for i in range(600)])) == {OK}
    keys = [f"client-{i % 100}" for i in range(100 * LIMIT)]
    assert set(await _hammer(hub, keys)) == {OK}
    assert set(await _hammer(hub, [f"client-{i}" for i in range(100)])) == {OVER}
    text = hub.get("/metrics").body.decode()
    writes = {
        batch: float(v)
        for batch, v in re.findall(
            r'^mixerhub_ratelimit_redis_writes_total\{batch="(\w+)"\} (\S+)$', text, re.M
        )
    }
    decisions = 600 + 100 * LIMIT + 100
    assert 0 < writes["at_once"] + writes["waited"] <= decisions
    if batch_wait == "0":
        assert writes["waited"] == 0
    else:
        assert writes["waited"] > 0, writes
        assert writes["at_once"] + writes["waited"] < decisions / 2, writes


# --- Redis Cluster and Sentinel ---


async def test_a_redis_cluster_keeps_a_decision_in_one_slot(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    node = start_cluster_node(processes, tmp_path)
    b = RedisBackend.from_url(f"redis+cluster://{LOOPBACK}:{node.port}", timeout=1.0)
    try:
        charges = [charge(f"c{i}", a, 3, domain="shop") for i, a in enumerate(ALGORITHMS)]
        answers = [await b.take(charges) for _ in range(5)]
        assert [all(o.charged for o in a) for a in answers] == [True] * 3 + [False] * 2
        assert evalsha_calls(node.port) == 4  # the fifth came from the local cache
    finally:
        await b.aclose()


async def test_a_sentinel_url_finds_its_master(tmp_path: Path, processes: ProcessGroup) -> None:
    master = start_redis(processes)
    sentinel = start_sentinel(processes, master, tmp_path)
    b = RedisBackend.from_url(f"redis+sentinel://{LOOPBACK}:{sentinel.port}/mymaster", timeout=1.0)
    try:
        c = charge("s", "rolling_window", 2)
        assert [(await b.take([c]))[0].charged for _ in range(4)] == [True, True, False, False]
        assert evalsha_calls(master.port) == 3  # the fourth came from the local cache
    finally:
        await b.aclose()


async def test_tls_decisions_are_pipelined_over_one_verified_connection(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    server = start_tls_redis(processes, tmp_path)
    admin = redis.Redis(host=LOOPBACK, port=server.port, ssl=True, ssl_ca_certs=str(server.ca_file))
    b = RedisBackend.from_url(server.url(), timeout=1.0)
    try:
        charges = [[charge(f"tls{i % 10}", "fixed_window", 10_000)] for i in range(300)]
        outcomes = await asyncio.gather(*(b.take(c) for c in charges))
        assert all(o[0].charged for o in outcomes)
        assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] == 300
        # redis-py would have opened a connection per concurrent call: ours and the admin's.
        assert int(admin.info("clients")["connected_clients"]) <= 2
    finally:
        await b.aclose()
    # A CA that did not sign the server's certificate: refused, the failure policy answers.
    other_ca, _, _ = make_ca_and_server_cert(tmp_path, "other")
    untrusting = RedisBackend.from_url(server.url(other_ca), timeout=1.0)
    errors = counter("mixerhub_ratelimit_redis_failures", "error")
    try:
        [outcome] = await untrusting.take([charge("mitm", "fixed_window", 5)])
        assert (outcome.over_limit, outcome.charged) == (False, False)
        assert counter("mixerhub_ratelimit_redis_failures", "error") == errors + 1
        assert admin.info("commandstats")["cmdstat_evalsha"]["calls"] == 300
    finally:
        await untrusting.aclose()
        admin.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://x",
        "redis+cluster://h:1/0",
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/svc/x",
        "redis+other://h:1",
    ],
)
def test_unsupported_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"Redis|Sentinel|Cluster"):
        RedisBackend.from_url(url)


async def test_a_password_and_a_database_in_the_url_are_used(shared_redis: RedisServer) -> None:
    admin = redis.Redis(host=LOOPBACK, port=shared_redis.port)
    admin.config_set("requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@{LOOPBACK}:{shared_redis.port}/3"
        b = RedisBackend.from_url(url, timeout=1.0)
        try:
            [outcome] = await b.take([charge("authed", "fixed_window", 5)])
            assert outcome.charged
        finally:
            await b.aclose()
        authed = redis.Redis(host=LOOPBACK, port=shared_redis.port, password="s3cret", db=3)
        assert any(b"authed" in k for k in authed.keys("*"))
        authed.close()
        wrong = RedisBackend.from_url(f"redis://:nope@{LOOPBACK}:{shared_redis.port}", timeout=1.0)
        try:  # a wrong password is a Redis failure: the failure policy answers
            [outcome] = await wrong.take([charge("refused", "fixed_window", 5)])
            assert not outcome.over_limit
            assert not outcome.charged
        finally:
            await wrong.aclose()
    finally:
        redis.Redis(host=LOOPBACK, port=shared_redis.port, password="s3cret").config_set(
            "requirepass", ""
        )
        admin.close()
