"""redisquota against a real three-master Redis Cluster (``redis+cluster://``) and through
Sentinel: each allocation's keys (the quota's, its deduplication key and the rolling window's
buckets) share one hash tag, so the script runs on one slot whatever the dimensions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from mixerhub.adapters.redisquota import INFO, RedisQuotaHandler, RedisQuotaParams
from mixerhub.adapters.redisquota.handler import redis_key
from prometheus_client import CollectorRegistry
from redis.crc import key_slot

from mixerhub import adapter
from mixerhub.adapter import Env, QuotaArgs, QuotaResult
from mixerhub.templates import QuotaInstance
from tests.harness import LOOPBACK, ProcessGroup, process_group
from tests.redis_server import (
    RedisClusterNodes,
    requires_redis_cli,
    start_cluster,
    start_redis,
    start_sentinel,
)

pytestmark = requires_redis_cli

NAME = "requestcountquota.instance.istio-system"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    directory = tmp_path_factory.mktemp("cluster")
    with process_group(directory) as group:
        yield start_cluster(group, directory)


@pytest.fixture
def nodes(cluster: RedisClusterNodes) -> Iterator[list[redis.Redis]]:
    clients = [redis.Redis(host=LOOPBACK, port=n.port) for n in cluster.nodes]
    for c in clients:
        c.flushall()
        c.config_resetstat()
    yield clients
    for c in clients:
        c.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make(cluster: RedisClusterNodes, nodes: list[redis.Redis]) -> AsyncIterator[Any]:
    handlers: list[RedisQuotaHandler] = []

    def factory(*quotas: dict[str, Any], url: str = cluster.url, clock: Any = time.time) -> Any:
        params = RedisQuotaParams.model_validate({"redisServerUrl": url, "quotas": list(quotas)})
        assert not list(INFO.validate(params, {}))
        env = Env("redisquota", "h.handler.ns", logging.getLogger("test"), CollectorRegistry())
        h = RedisQuotaHandler(params, env, clock, timeout=1.0)
        handlers.append(h)
        return h

    yield factory
    for h in handlers:
        await h.close()


def quota(**kw: Any) -> dict[str, Any]:
    return {"name": NAME, "maxAmount": 3, "validDuration": "10s", **kw}


async def ask(
    h: RedisQuotaHandler, amount: int = 1, dedup: str = "", **dims: object
) -> QuotaResult:
    return await h.handle_quota(
        QuotaInstance(NAME, dims), QuotaArgs(amount=amount, deduplication_id=dedup)
    )


def error_replies(clients: list[redis.Redis]) -> set[str]:
    """The kinds of error any node answered (INFO errorstats), but two expected ones: NOSCRIPT,
    once per node and script before it is loaded, and ERR, redis-py's CLIENT SETINFO, which
    Redis 7.0 does not know. CROSSSLOT, MOVED or ASK would show up here."""
    found = {name for c in clients for name in c.info("errorstats")}
    return found - {"errorstat_NOSCRIPT", "errorstat_ERR"}


def evalsha_nodes(clients: list[redis.Redis]) -> int:
    """How many nodes ran a script."""
    return sum(1 for c in clients if c.info("commandstats").get("cmdstat_evalsha"))


@pytest.mark.parametrize("algorithm", ["FIXED_WINDOW", "ROLLING_WINDOW"])
async def test_allocations_on_the_cluster_with_deduplication(
    make: Any, nodes: list[redis.Redis], algorithm: str
) -> None:
    h = make(quota(rateLimitAlgorithm=algorithm, bucketDuration="1s"))
    # redis-py sends its very first command before it has read the slots, which may earn one
    # MOVED: the count of errors starts after it.
    assert (await ask(h, user="warm-up")).amount == 1
    for c in nodes:
        c.config_resetstat()
    users = [f"user-{i}" for i in range(12)]
    for user in users:
        got = [(await ask(h, user=user, dedup=f"{user}-{n}")).amount for n in range(4)]
        assert got == [1, 1, 1, 0], (user, got)
        # A retried request (same deduplication id) gets its first answer, charged once.
        assert (await ask(h, user=user, dedup=f"{user}-0")).amount == 1
    assert error_replies(nodes) == set()
    assert evalsha_nodes(nodes) == 3  # twelve users' keys: every node has some


def test_an_allocations_keys_share_one_slot_whatever_the_dimensions() -> None:
    for dims in ({}, {"user": "a"}, {"user": "}{x}"}, {"a": "{b}", "c": 1}):
        key = redis_key(NAME, dims, "abc")
        related = [key, f"{key};dedup=req-{{7}}", f"{key};data"]
        assert len({key_slot(k.encode()) for k in related}) == 1, related


async def test_a_sentinel_url(tmp_path: Path, processes: ProcessGroup, make: Any) -> None:
    master = start_redis(processes)
    sentinel = start_sentinel(processes, master, tmp_path)
    h = make(quota(maxAmount=2), url=f"redis+sentinel://{LOOPBACK}:{sentinel.port}/mymaster")
    assert [(await ask(h, user="u")).amount for _ in range(3)] == [1, 1, 0]
    client = redis.Redis(host=LOOPBACK, port=master.port)
    try:
        assert client.hget(redis_key(NAME, {"user": "u"}), "used") == b"2"
    finally:
        client.close()


async def test_a_cluster_node_down_is_an_error_status_within_the_timeout(
    tmp_path: Path, processes: ProcessGroup, make: Any
) -> None:
    own = start_cluster(processes, tmp_path)  # a cluster of its own: it loses a node
    h = make(quota(maxAmount=100), url=own.url)
    assert (await ask(h, user="u")).status == adapter.OK
    for node in own.nodes:
        node.kill()
    start = time.monotonic()
    result = await ask(h, user="u")
    assert time.monotonic() - start < 2.5  # twice the 1 s timeout at most
    assert result.amount == 0
    assert result.status in (adapter.UNAVAILABLE, adapter.DEADLINE_EXCEEDED, adapter.INTERNAL)
