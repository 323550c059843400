"""The Redis rate-limit backend through Redis Sentinel (``redis+sentinel://host:port/service``),
against real processes: a master, its replica and one Sentinel (quorum 1), on free ports.

The failover test kills the master: while the Sentinel promotes the replica, decisions are the
failure policy's, each within the timeout and counted; then they come from the new master, with
the counts the replica had copied.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from mixerhub.monitoring import REGISTRY
from mixerhub.ratelimit.backend import Charge
from mixerhub.ratelimit.redis import RedisBackend
from mixerhub.ratelimit.sentinel import SwitchMasterWatch
from tests.harness import LOOPBACK, ProcessGroup
from tests.redis_server import (
    RedisServer,
    requires_redis,
    sentinel_master,
    start_redis,
    start_replica,
    start_sentinel,
)

pytestmark = requires_redis

SERVICE = "mymaster"


@dataclass
class Topology:
    master: RedisServer
    replica: RedisServer
    sentinel: RedisServer

    @property
    def url(self) -> str:
        return f"redis+sentinel://{LOOPBACK}:{self.sentinel.port}/{SERVICE}"


@pytest.fixture
def topology(tmp_path: Path, processes: ProcessGroup) -> Topology:
    master = start_redis(processes)
    replica = start_replica(processes, master)
    sentinel = start_sentinel(processes, master, tmp_path, SERVICE, replicas=1)
    return Topology(master, replica, sentinel)


def failures() -> float:
    return sum(
        REGISTRY.get_sample_value("mixerhub_ratelimit_redis_failures_total", {"reason": r}) or 0.0
        for r in ("timeout", "error")
    )


def evalsha_calls(port: int) -> int:
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        calls: int = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        return calls
    finally:
        client.close()


async def decide_until_on_replica(
    b: RedisBackend, c: Charge, topology: Topology, failure: str
) -> None:
    """Decide until a script runs on the replica (30 s at most), which the Sentinel must by
    then name as the master."""
    deadline = time.monotonic() + 30
    while evalsha_calls(topology.replica.port) == 0:
        assert time.monotonic() < deadline, failure
        await b.take([c])
        await asyncio.sleep(0.05)
    assert sentinel_master(topology.sentinel.port, SERVICE) == topology.replica.port


async def test_decisions_go_to_the_master_the_sentinel_names(topology: Topology) -> None:
    b = RedisBackend.from_url(topology.url, timeout=1.0)
    try:
        c = Charge(("d", (("k", "v"),)), 1, 2, 60, "rolling_window")
        assert [(await b.take([c]))[0].charged for _ in range(3)] == [True, True, False]
        assert evalsha_calls(topology.master.port) == 3
        assert evalsha_calls(topology.replica.port) == 0
    finally:
        await b.aclose()


async def test_concurrent_decisions_share_one_connection_to_the_master(
    topology: Topology,
) -> None:
    b = RedisBackend.from_url(topology.url, timeout=1.0)
    try:
        many = [[Charge(("d", (("k", f"v{i % 10}"),)), 1, 1000, 60, "fixed_window")]
                for i in range(300)]  # fmt: skip
        outcomes = await asyncio.gather(*(b.take(c) for c in many))
        assert all(o[0].charged for o in outcomes)
        assert evalsha_calls(topology.master.port) == 300
        master = redis.Redis(host=LOOPBACK, port=topology.master.port)
        try:
            # Ours, the Sentinel's two and this one: not one per concurrent call.
            assert int(master.info("clients")["connected_clients"]) <= 5
        finally:
            master.close()
    finally:
        await b.aclose()


async def test_a_master_demoted_alive_is_left_for_the_promoted_replica(
    topology: Topology,
) -> None:
    # A limit never reached: no decision is answered by the local over-limit cache.
    c = Charge(("d", (("user", "u2"),)), 1, 1_000_000, 60, "fixed_window")
    b = RedisBackend.from_url(topology.url, timeout=0.5)
    b.backoff = 0.0
    try:
        assert (await b.take([c]))[0].charged
        sentinel = redis.Redis(host=LOOPBACK, port=topology.sentinel.port)
        try:
            deadline = time.monotonic() + 20
            while True:  # NOGOODSLAVE until the Sentinel has seen the replica recently
                try:
                    sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
                    break
                except redis.ResponseError:
                    assert time.monotonic() < deadline, "the Sentinel never agreed to fail over"
                    await asyncio.sleep(0.2)
        finally:
            sentinel.close()
        # The Sentinel names the replica at once, but the old master, alive, runs scripts until
        # the Sentinel turns it into a replica: READONLY then drops the connection.
        await decide_until_on_replica(b, c, topology, "decisions never reached the replica")
        # The old master, now a replica, is alive: it gets no more scripts.
        on_old = evalsha_calls(topology.master.port)
        assert all([(await b.take([c]))[0].charged for _ in range(5)])
        assert evalsha_calls(topology.master.port) == on_old
    finally:
        await b.aclose()


async def test_after_a_failover_decisions_resume_on_the_promoted_replica(
    topology: Topology,
) -> None:
    limit = 5
    c = Charge(("d", (("user", "u1"),)), 1, limit, 60, "rolling_window")
    b = RedisBackend.from_url(topology.url, timeout=0.2, failure="allow")
    b.backoff = 0.0
    try:
        assert [(await b.take([c]))[0].charged for _ in range(3)] == [True] * 3
        # The replica has the three hits before its master dies (replication is asynchronous).
        master = redis.Redis(host=LOOPBACK, port=topology.master.port)
        try:
            assert master.execute_command("WAIT", 1, 5000) == 1  # type: ignore[no-untyped-call]
        finally:
            master.close()

        before = failures()
        topology.master.kill()
        answered: list[bool] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            start = time.monotonic()
            outcome = (await b.take([c]))[0]
            assert time.monotonic() - start < 1.0, "a decision waited on the dead master"
            answered.append(outcome.charged)
            if outcome.charged:
                break
            # Allowed by the failure policy: not over the limit, not charged.
            assert not outcome.over_limit
            time.sleep(0.05)
        assert answered[-1], "no decision reached the promoted replica in 30 s"
        assert failures() - before == len(answered) - 1 >= 1
        assert sentinel_master(topology.sentinel.port, SERVICE) == topology.replica.port

        # The fourth hit was the first on the new master; the fifth fits, the sixth does not.
        after = [await b.take([c]) for _ in range(2)]
        assert [o[0].charged for o in after] == [True, False]
        assert after[-1][0].over_limit
        assert evalsha_calls(topology.replica.port) >= 2
    finally:
        await b.aclose()


async def test_a_master_that_hangs_is_left_when_the_sentinel_switches(
    topology: Topology,
) -> None:
    # Stopped, the master keeps its connections open and answers nothing: no call fails but by
    # its timeout, so only the Sentinel's +switch-master notice tells that another master rules.
    c = Charge(("d", (("user", "u3"),)), 1, 1_000_000, 60, "fixed_window")
    b = RedisBackend.from_url(topology.url, timeout=0.2)
    b.backoff = 0.0
    switches = REGISTRY.get_sample_value("mixerhub_ratelimit_redis_master_switches_total") or 0.0
    try:
        assert (await b.take([c]))[0].charged
        os.kill(topology.master.process.pid, signal.SIGSTOP)
        try:
            await decide_until_on_replica(b, c, topology, "decisions stayed with the hung master")
            assert all([(await b.take([c]))[0].charged for _ in range(3)])
            assert (
                REGISTRY.get_sample_value("mixerhub_ratelimit_redis_master_switches_total")
                == switches + 1
            )
        finally:
            os.kill(topology.master.process.pid, signal.SIGCONT)
    finally:
        await b.aclose()


def test_only_the_services_own_switches_are_followed() -> None:
    switched: list[tuple[str, int]] = []
    watch = SwitchMasterWatch([], SERVICE, lambda host, port: switched.append((host, port)))
    watch._notice(b"othermaster 10.0.0.1 6379 10.0.0.2 6379")  # another service's failover
    watch._notice(b"mymaster 10.0.0.1 6379")  # not what Sentinel sends
    watch._notice("mymaster 10.0.0.1 6379 10.0.0.2 port")
    assert switched == []
    watch._notice(b"mymaster 10.0.0.1 6379 10.0.0.2 6380")
    assert switched == [("10.0.0.2", 6380)]
