"""The Redis rate-limit backend against a real Redis Cluster of three masters (tests/redis_server.py
creates it with ``redis-cli --cluster create``), by its ``redis+cluster://`` URL.

A decision's keys share the ``{domain}`` hash tag, so however many descriptors a request has, the
decision is one EVALSHA on the one node that owns the tag's slot: Redis would answer CROSSSLOT
(and redis-py refuse to send) a script whose keys span slots.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.crc import key_slot

from mixerhub.monitoring import REGISTRY
from mixerhub.ratelimit.backend import Charge
from mixerhub.ratelimit.matching import Algorithm
from mixerhub.ratelimit.redis import SCRIPT, RedisBackend, redis_key
from tests.harness import LOOPBACK, HubFactory, ProcessGroup, process_group
from tests.redis_server import RedisClusterNodes, requires_redis_cli, start_cluster

pytestmark = requires_redis_cli

ALGORITHMS: tuple[Algorithm, ...] = ("fixed_window", "rolling_window", "token_bucket")
Response = rls_pb2.RateLimitResponse
OK, OVER = Response.Code.OK, Response.Code.OVER_LIMIT


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """One three-master cluster for this module's in-process tests (flushed per test)."""
    directory = tmp_path_factory.mktemp("cluster")
    with process_group(directory) as group:
        yield start_cluster(group, directory)


def node_client(port: int) -> redis.Redis:
    return redis.Redis(host=LOOPBACK, port=port)


@pytest.fixture
def nodes(cluster: RedisClusterNodes) -> Iterator[list[redis.Redis]]:
    clients = [node_client(n.port) for n in cluster.nodes]
    for c in clients:
        c.flushall()
        c.script_flush()
        c.config_resetstat()
    yield clients
    for c in clients:
        c.close()


@pytest.fixture
async def backend(
    cluster: RedisClusterNodes, nodes: list[redis.Redis]
) -> AsyncIterator[RedisBackend]:
    b = RedisBackend.from_url(cluster.url, timeout=1.0)
    yield b
    await b.aclose()


def charge(name: str, algorithm: Algorithm, limit: int, domain: str = "shop") -> Charge:
    return Charge((domain, (("k", name),)), 1, limit, 60, algorithm)


def evalsha_calls(clients: list[redis.Redis]) -> list[int]:
    """EVALSHA calls per node, in the cluster's node order."""
    return [c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0) for c in clients]


def script_errors(clients: list[redis.Redis]) -> dict[str, int]:
    """EVALSHA calls that failed or were refused (CROSSSLOT, MOVED...), and CROSSSLOT replies
    of any command, summed over the nodes (other errors are redis-py's CLIENT SETINFO, which
    Redis 7.0 does not know)."""
    found = {"evalsha_failed": 0, "evalsha_rejected": 0, "crossslot": 0}
    for c in clients:
        evalsha = c.info("commandstats").get("cmdstat_evalsha", {})
        found["evalsha_failed"] += evalsha.get("failed_calls", 0)
        found["evalsha_rejected"] += evalsha.get("rejected_calls", 0)
        found["crossslot"] += c.info("errorstats").get("errorstat_CROSSSLOT", {}).get("count", 0)
    return found


NO_ERRORS = {"evalsha_failed": 0, "evalsha_rejected": 0, "crossslot": 0}


def owner(clients: list[redis.Redis], key: str) -> int:
    """The index of the node that serves ``key``'s slot."""
    slot = key_slot(key.encode())
    for i, c in enumerate(clients):
        for start, stop in _slots(c):
            if start <= slot <= stop:
                return i
    raise AssertionError(f"no node serves slot {slot}")


def _slots(client: redis.Redis) -> list[tuple[int, int]]:
    me = client.execute_command("CLUSTER", "MYID").decode()  # type: ignore[no-untyped-call]
    ranges: list[tuple[int, int]] = []
    for start, stop, master, *_ in client.execute_command("CLUSTER", "SLOTS"):  # type: ignore[no-untyped-call]
        if master[2].decode() == me:
            ranges.append((int(start), int(stop)))
    return ranges


async def test_three_descriptors_are_one_evalsha_on_the_node_owning_the_domain(
    backend: RedisBackend, nodes: list[redis.Redis]
) -> None:
    charges = [charge(f"c{i}", a, 3) for i, a in enumerate(ALGORITHMS)]
    keys = [redis_key(c) for c in charges]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    answers = [await backend.take(charges) for _ in range(5)]
    assert [all(o.charged for o in a) for a in answers] == [True] * 3 + [False] * 2
    assert all(all(o.over_limit for o in a) for a in answers[3:])
    # Four decisions reached Redis (the fifth came from the local over-limit cache), all four on
    # the tag's node, one script run each; no node answered an error.
    calls = evalsha_calls(nodes)
    assert calls[owner(nodes, keys[0])] == 4, calls
    assert sum(calls) == 4, calls
    assert script_errors(nodes) == NO_ERRORS


def test_the_same_keys_without_a_common_hash_tag_would_be_crossslot(
    nodes: list[redis.Redis],
) -> None:
    # The control for the test above: three such keys without their tag span slots, and Redis
    # refuses them in one script.
    keys = [
        redis_key(charge(f"c{i}", a, 3)).replace("{shop}", "shop") for i, a in enumerate(ALGORITHMS)
    ]
    assert len({key_slot(k.encode()) for k in keys}) > 1
    per_key: list[str | int] = [1, 3, 60_000_000, "f", 1]
    with pytest.raises(redis.ResponseError, match="don't hash to the same slot"):
        nodes[0].eval(SCRIPT, len(keys), *keys, "", *(per_key * len(keys)))
    assert script_errors(nodes)["crossslot"] == 1


async def test_domains_spread_over_the_nodes_and_each_decides(
    backend: RedisBackend, nodes: list[redis.Redis]
) -> None:
    domains = [f"d{i}" for i in range(12)]
    owners = {d: owner(nodes, redis_key(charge("x", "fixed_window", 1, d))) for d in domains}
    assert len(set(owners.values())) == 3, owners  # twelve domains: every node gets some
    for d in domains:
        charges = [charge(f"c{i}", a, 2, d) for i, a in enumerate(ALGORITHMS)]
        assert [all(o.charged for o in await backend.take(charges)) for _ in range(3)] == [
            True,
            True,
            False,
        ]
    calls = evalsha_calls(nodes)
    for i in range(3):
        assert calls[i] == 3 * sum(1 for o in owners.values() if o == i), (calls, owners)
    assert script_errors(nodes) == NO_ERRORS


async def test_a_node_down_is_answered_by_the_failure_policy_in_bounded_time(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    # A cluster of its own: this one loses a node.
    cluster = start_cluster(processes, tmp_path)
    deny = RedisBackend.from_url(cluster.url, timeout=0.2, failure="deny")
    deny.backoff = 0.0
    try:
        c = charge("k", "rolling_window", 100)
        assert (await deny.take([c]))[0].charged
        clients = [node_client(n.port) for n in cluster.nodes]
        try:
            victim = owner(clients, redis_key(c))
        finally:
            for client in clients:
                client.close()
        before = _failures()
        cluster.nodes[victim].kill()
        for _ in range(5):
            start = time.monotonic()
            outcome = (await deny.take([c]))[0]
            assert time.monotonic() - start < 1.0
            assert (outcome.over_limit, outcome.charged) == (True, False)
        assert _failures() - before == 5
    finally:
        await deny.aclose()


def _failures() -> float:
    return sum(
        REGISTRY.get_sample_value("mixerhub_ratelimit_redis_failures_total", {"reason": r}) or 0.0
        for r in ("timeout", "error")
    )


# --- hubs as processes, sharing the cluster ---

LIMIT = 4
CONFIG = f"""
domain: global
descriptors:
  - key: client
    rate_limit: {{unit: minute, requests_per_unit: {LIMIT}, algorithm: rolling_window}}
  - key: path
    rate_limit: {{unit: minute, requests_per_unit: 1000, algorithm: token_bucket}}
  - key: tenant
    rate_limit: {{unit: minute, requests_per_unit: 1000, algorithm: fixed_window}}
"""


def _request() -> rls_pb2.RateLimitRequest:
    def descriptor(key: str, value: str) -> ratelimit_pb2.RateLimitDescriptor:
        entry = ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=value)
        return ratelimit_pb2.RateLimitDescriptor(entries=[entry])

    return rls_pb2.RateLimitRequest(
        domain="global",
        descriptors=[
            descriptor("client", "c1"),
            descriptor("path", "/a"),
            descriptor("tenant", "t"),
        ],
    )


def test_two_hubs_share_one_limit_through_the_cluster(
    tmp_path: Path, cluster: RedisClusterNodes, nodes: list[redis.Redis], make_hub: HubFactory
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "ratelimit.yaml").write_text(CONFIG)
    args = ["--ratelimit-redis", cluster.url, "--ratelimit-redis-timeout", "0.5"]
    hubs = [make_hub(config, extra_args=args) for _ in range(2)]
    channels = [grpc.insecure_channel(f"{h.host}:{h.grpc_port}") for h in hubs]
    try:
        stubs = [rls_pb2_grpc.RateLimitServiceStub(ch) for ch in channels]
        answers = [stubs[i % 2].ShouldRateLimit(_request(), timeout=5) for i in range(2 * LIMIT)]
    finally:
        for ch in channels:
            ch.close()
    codes = [a.overall_code for a in answers]
    assert codes == [OK] * LIMIT + [OVER] * LIMIT, codes
    assert [s.code for s in answers[-1].statuses] == [OVER, OK, OK]
    assert script_errors(nodes) == NO_ERRORS
    assert sum(evalsha_calls(nodes)) >= LIMIT + 1
