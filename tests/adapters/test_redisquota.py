"""redisquota against a real redis-server: windows, overrides, dedup, and Redis going away."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from mixerhub.adapters.redisquota import INFO, RedisQuotaHandler, RedisQuotaParams
from mixerhub.adapters.redisquota.handler import redis_key
from prometheus_client import CollectorRegistry

from mixerhub import adapter, registry
from mixerhub.adapter import Env, InstanceSpec, QuotaArgs, QuotaResult
from mixerhub.dispatcher import CheckDispatcher
from mixerhub.monitoring import REGISTRY
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot
from mixerhub.templates import QuotaInstance
from tests.harness import LOOPBACK, ProcessGroup, free_port, tcp_probe

NAME = "requestcountquota.instance.istio-system"
POLICY = Path(__file__).parent.parent / "data" / "istio-1.4" / "policy"
SAMPLES = sorted(POLICY.glob("*redis-quota*.yaml"))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_url(processes: ProcessGroup) -> str:
    """A redis-server of this test's own, on a free loopback port, with nothing persisted."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly"]
    process = processes.start("redis", [*argv, "no"])
    process.wait_ready(tcp_probe(LOOPBACK, port), timeout=10)
    return f"{LOOPBACK}:{port}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def env() -> Env:
    return Env("redisquota", "h.handler.ns", logging.getLogger("test"), CollectorRegistry())


@pytest.fixture
async def make(redis_url: str, clock: Clock) -> AsyncIterator[Any]:
    handlers: list[RedisQuotaHandler] = []

    def factory(*quotas: dict[str, Any], url: str = redis_url, **kw: Any) -> RedisQuotaHandler:
        params = RedisQuotaParams.model_validate(
            {"redisServerUrl": url, "quotas": list(quotas), **kw}
        )
        assert not list(INFO.validate(params, {}))
        h = RedisQuotaHandler(params, env(), clock)
        handlers.append(h)
        return h

    yield factory
    for h in handlers:
        await h.close()


def quota(**kw: Any) -> dict[str, Any]:
    return {"name": NAME, "maxAmount": 3, "validDuration": "1s", **kw}


def q(**dimensions: object) -> QuotaInstance:
    return QuotaInstance(NAME, dict(dimensions))


async def ask(h: RedisQuotaHandler, inst: QuotaInstance, amount: int = 1, **kw: Any) -> QuotaResult:
    return await h.handle_quota(inst, QuotaArgs(amount=amount, **kw))


def errors(params: dict[str, Any], instances: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    model = RedisQuotaParams.model_validate(params)
    specs = {n: InstanceSpec(n, "quota", {}) for n in instances}
    return [(e.path, e.reason) for e in INFO.validate(model, specs)]


# --- params -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_istio_samples_validate(sample: Path) -> None:
    handler = next(d for d in yaml.safe_load_all(sample.read_text()) if d["kind"] == "handler")
    assert errors(handler["spec"]["params"], (NAME,)) == []


def test_mixer_validation() -> None:
    found = errors(
        {
            "redisServerUrl": "",
            "connectionPoolSize": 0,
            "quotas": [
                {"name": "a", "maxAmount": 0, "validDuration": "0s"},
                {
                    "name": "b",
                    "maxAmount": 1,
                    "validDuration": "1s",
                    "rateLimitAlgorithm": "ROLLING_WINDOW",
                },
                {
                    "name": "c",
                    "maxAmount": 1,
                    "validDuration": "1s",
                    "bucketDuration": "1s",
                    "rateLimitAlgorithm": "ROLLING_WINDOW",
                    "overrides": [{"maxAmount": 0}],
                },
                {"name": "c", "maxAmount": 1, "validDuration": "1s"},
            ],
        },
        ("missing.instance.ns",),
    )
    paths = [p for p, _ in found]
    assert paths == [
        "redisServerUrl",
        "connectionPoolSize",
        "quotas[0].maxAmount",
        "quotas[0].validDuration",
        "quotas[1].bucketDuration",
        "quotas[2].validDuration",
        "quotas[2].overrides[0].maxAmount",
        "quotas[2].overrides[0].dimensions",
        "quotas[3].name",
        "quotas",
    ]
    assert "validDuration must be > bucketDuration" in dict(found)["quotas[2].validDuration"]


@pytest.mark.parametrize(
    "url", ["http://h:1", "redis+sentinel://h:1", "redis+cluster://h:1/0", "redis+x://h:1"]
)
def test_a_url_connect_cannot_read_is_a_config_error(url: str) -> None:
    found = errors({"redisServerUrl": url, "quotas": [quota()]}, (NAME,))
    assert [path for path, _ in found] == ["redisServerUrl"], found


def test_sentinel_and_cluster_urls_validate() -> None:
    for url in ("redis+sentinel://h:26379,h2:26379/mymaster/1", "redis+cluster://h:1,h:2"):
        assert errors({"redisServerUrl": url, "quotas": [quota()]}, (NAME,)) == []


def test_unknown_algorithm_is_rejected() -> None:
    with pytest.raises(ValueError, match="FIXED_WINDOW"):
        RedisQuotaParams.model_validate(
            {"redisServerUrl": "x:1", "quotas": [quota(rateLimitAlgorithm="LEAKY")]}
        )


# --- fixed window -------------------------------------------------------------------------------


async def test_fixed_window_allocates_up_to_max_then_resets(make: Any, clock: Clock) -> None:
    h = make(quota())
    start = clock.now
    assert [(await ask(h, q(d="x"))).amount for _ in range(4)] == [1, 1, 1, 0]
    clock.now = start + 0.4
    denied = await ask(h, q(d="x"))
    assert denied == QuotaResult(0, 0.0)  # exhausted: no error status, just nothing granted
    clock.now = start + 1.0  # the window ends: a fresh one
    granted = await ask(h, q(d="x"), amount=3)
    assert granted.amount == 3
    assert granted.valid_duration == pytest.approx(1.0)


async def test_fixed_window_grant_holds_until_the_window_ends(make: Any, clock: Clock) -> None:
    h = make(quota())
    start = clock.now
    await ask(h, q())
    clock.now = start + 0.25
    assert (await ask(h, q())).valid_duration == pytest.approx(0.75)


async def test_dimensions_have_counts_of_their_own(make: Any) -> None:
    h = make(quota(maxAmount=1))
    assert (await ask(h, q(d="a", s="1"))).amount == 1
    assert (await ask(h, q(s="1", d="a"))).amount == 0  # same key whatever the order
    assert (await ask(h, q(d="b", s="1"))).amount == 1


async def test_best_effort_takes_what_is_left(make: Any) -> None:
    h = make(quota(maxAmount=5))
    assert (await ask(h, q(), amount=3)).amount == 3
    assert (await ask(h, q(), amount=3)).amount == 0
    assert (await ask(h, q(), amount=3, best_effort=True)).amount == 2
    assert (await ask(h, q(), amount=1, best_effort=True)).amount == 0


async def test_state_is_in_redis_under_mixers_key_as_a_hash_tag(make: Any, redis_url: str) -> None:
    a = make(quota(maxAmount=2))
    b = make(quota(maxAmount=2))  # a second hub on the same Redis shares the count
    assert (await ask(a, q(destination="reviews"))).amount == 1
    assert (await ask(b, q(destination="reviews"))).amount == 1
    assert (await ask(a, q(destination="reviews"))).amount == 0
    # Mixer's key, in a hash tag (one slot per allocation in a Redis Cluster).
    assert (
        redis_key(NAME, {"destination": "reviews", "a": 1}) == f"{{{NAME};a=1;destination=reviews}}"
    )
    client = aioredis.Redis.from_url(f"redis://{redis_url}")
    try:
        stored = await client.hget(redis_key(NAME, {"destination": "reviews"}), "used")
        assert stored == b"2"
        assert await client.pttl(redis_key(NAME, {"destination": "reviews"})) > 0
    finally:
        await client.aclose()


# --- rolling window -----------------------------------------------------------------------------


async def test_rolling_window_frees_buckets_as_they_leave(make: Any, clock: Clock) -> None:
    h = make(quota(maxAmount=4, bucketDuration="250ms", rateLimitAlgorithm="ROLLING_WINDOW"))
    start = clock.now
    assert (await ask(h, q(), amount=2)).amount == 2
    clock.now = start + 0.5
    granted = await ask(h, q(), amount=2)
    assert granted.amount == 2
    assert granted.valid_duration == pytest.approx(1.0)
    clock.now = start + 0.9
    assert (await ask(h, q())).amount == 0
    # A fixed window would have reset entirely at start + 1; a rolling one frees the first
    # bucket's 2 only, the 2 taken at start + 0.5 still count.
    clock.now = start + 1.05
    assert (await ask(h, q(), amount=3)).amount == 0
    assert (await ask(h, q(), amount=2)).amount == 2
    assert (await ask(h, q())).amount == 0
    clock.now = start + 1.6
    assert (await ask(h, q(), amount=2)).amount == 2


async def test_rolling_window_best_effort(make: Any) -> None:
    h = make(quota(maxAmount=3, bucketDuration="100ms", rateLimitAlgorithm="ROLLING_WINDOW"))
    assert (await ask(h, q(), amount=2)).amount == 2
    assert (await ask(h, q(), amount=2, best_effort=True)).amount == 1
    assert (await ask(h, q(), amount=1, best_effort=True)).amount == 0


async def test_fixed_window_admits_a_burst_at_the_edge_rolling_does_not(
    make: Any, clock: Clock
) -> None:
    fixed = make(quota(name="f", maxAmount=2))
    rolling = make(
        quota(name="r", maxAmount=2, bucketDuration="100ms", rateLimitAlgorithm="ROLLING_WINDOW")
    )
    start = clock.now
    clock.now = start + 0.9
    f, r = QuotaInstance("f", {}), QuotaInstance("r", {})
    assert (await ask(fixed, f, 2)).amount == 2
    assert (await ask(rolling, r, 2)).amount == 2
    clock.now = start + 1.0  # 100 ms later
    assert (await ask(fixed, f, 2)).amount == 0  # the fixed window began at start + 0.9
    clock.now = start + 1.95
    assert (await ask(fixed, f, 2)).amount == 2  # new fixed window: 4 within 100 ms... of 1.9
    assert (await ask(rolling, r, 2)).amount == 2  # the rolling one freed what left it


# --- overrides ----------------------------------------------------------------------------------


async def test_first_matching_override_wins(make: Any) -> None:
    sample = POLICY / "mixer-rule-productpage-redis-quota-rolling-window.yaml"
    params = next(d for d in yaml.safe_load_all(sample.read_text()) if d["kind"] == "handler")
    h = make(*params["spec"]["params"]["quotas"])
    reviews = q(destination="reviews", source="1.2.3.4")
    assert [(await ask(h, reviews)).amount for _ in range(2)] == [1, 0]
    page = q(destination="productpage", source="9.9.9.9")
    assert [(await ask(h, page)).amount for _ in range(3)] == [1, 1, 0]
    special = q(destination="productpage", source="10.28.11.20")
    assert [(await ask(h, special)).amount for _ in range(3)] == [1, 1, 1]
    other = q(destination="ratings", source="9.9.9.9")
    assert (await ask(h, other, amount=500)).amount == 500
    assert (await ask(h, other)).amount == 0


async def test_changing_an_override_starts_a_fresh_count(make: Any) -> None:
    first = make(quota(maxAmount=9, overrides=[{"dimensions": {"d": "x"}, "maxAmount": 1}]))
    assert (await ask(first, q(d="x"))).amount == 1
    assert (await ask(first, q(d="x"))).amount == 0
    second = make(quota(maxAmount=9, overrides=[{"dimensions": {"d": "x"}, "maxAmount": 2}]))
    assert (await ask(second, q(d="x"))).amount == 1


# --- deduplication ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["FIXED_WINDOW", "ROLLING_WINDOW"])
async def test_a_retried_request_is_charged_once(make: Any, clock: Clock, algorithm: str) -> None:
    h = make(quota(maxAmount=2, bucketDuration="100ms", rateLimitAlgorithm=algorithm))
    first = await ask(h, q(), deduplication_id="req-1")
    again = await ask(h, q(), deduplication_id="req-1")
    assert first.amount == again.amount == 1
    assert (await ask(h, q(), deduplication_id="req-2")).amount == 1
    assert (await ask(h, q(), deduplication_id="req-3")).amount == 0
    assert (await ask(h, q(), deduplication_id="req-1")).amount == 1  # still the same answer
    clock.now += 1.01  # the first grant has expired: req-1 is a new request now
    assert (await ask(h, q(), deduplication_id="req-1")).amount == 1


# --- Redis away ---------------------------------------------------------------------------------


async def test_redis_down_is_an_error_status_not_a_raise(make: Any) -> None:
    h = make(quota(), url=f"{LOOPBACK}:{free_port()}")
    began = time.monotonic()
    result = await ask(h, q())
    assert time.monotonic() - began < 1.0
    assert result.amount == 0
    assert result.status == adapter.UNAVAILABLE
    assert "redis unavailable" in result.message


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_hung_redis_times_out_quickly(make: Any, silent_port: int) -> None:
    h = make(quota(), url=f"redis://{LOOPBACK}:{silent_port}/0")
    began = time.monotonic()
    results = await asyncio.gather(*(ask(h, q()) for _ in range(3)))
    assert time.monotonic() - began < 1.0
    assert {r.status for r in results} == {adapter.DEADLINE_EXCEEDED}


def adapter_errors() -> float:
    sample = REGISTRY.get_sample_value("mixerhub_adapter_errors_total", {"adapter": "redisquota"})
    return sample or 0.0


async def test_after_a_failure_redis_is_left_alone_for_the_backoff(
    make: Any, silent_port: int
) -> None:
    # As the rate-limit backend: a hung Redis costs one timeout, not one per request.
    h = make(quota(), url=f"redis://{LOOPBACK}:{silent_port}/0")
    h.backoff = 30.0
    before = adapter_errors()
    began = time.monotonic()
    assert (await ask(h, q())).status == adapter.DEADLINE_EXCEEDED
    assert time.monotonic() - began < 1.0
    began = time.monotonic()
    during = [await ask(h, q()) for _ in range(20)]
    assert time.monotonic() - began < 0.1
    assert {(r.amount, r.status) for r in during} == {(0, adapter.UNAVAILABLE)}
    assert "backing off" in during[0].message
    assert adapter_errors() - before == 21  # every failed allocation is counted


async def test_redis_going_away_and_back(
    make: Any, processes: ProcessGroup, redis_url: str
) -> None:
    h = make(quota(maxAmount=100))
    assert (await ask(h, q())).amount == 1
    processes.processes[-1].stop()
    assert (await ask(h, q())).status in (adapter.UNAVAILABLE, adapter.DEADLINE_EXCEEDED)
    port = redis_url.rpartition(":")[2]
    again = processes.start(
        "redis",
        ["redis-server", "--port", port, "--bind", LOOPBACK, "--save", "", "--appendonly", "no"],
    )
    again.wait_ready(tcp_probe(LOOPBACK, int(port)), timeout=10)
    result = await ask(h, q())
    assert result.status == adapter.OK
    assert result.amount == 1


async def test_redis_down_leaves_the_decision_to_the_failure_policy(tmp_path: Path) -> None:
    config = f"""
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {{name: redishandler, namespace: istio-system}}
spec:
  compiledAdapter: redisquota
  params:
    redisServerUrl: {LOOPBACK}:{free_port()}
    quotas: [{{name: {NAME}, maxAmount: 5, validDuration: 1s}}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {{name: requestcountquota, namespace: istio-system}}
spec: {{compiledTemplate: quota, params: {{dimensions: {{}}}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: quota, namespace: istio-system}}
spec:
  actions: [{{handler: redishandler, instances: [requestcountquota]}}]
"""
    (tmp_path / "config.yaml").write_text(config)
    snapshot = compile_snapshot(documents.read([tmp_path]), registry.default_registry())
    try:
        outcome = await CheckDispatcher(snapshot).check({}, "default", QuotaArgs())
        assert outcome.failed  # the check service's failure policy decides, never a hang
        assert outcome.status == adapter.UNAVAILABLE
    finally:
        for h in snapshot.handlers.values():
            if h.handler is not None:
                await h.handler.close()
