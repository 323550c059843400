"""The script connection's writes under load (mixerhub/ratelimit/resp.py), against a real
redis-server: on a busy process, commands that come often wait up to ``batch_wait`` to share a
write; on an idle one, or for a caller that waits for each reply, they go at once.

"Busy" is the process's CPU over wall time, so the tests make it busy the way a loaded hub is:
by computing between sends (a spin on the loop's thread), not by sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import cast

import pytest

from mixerhub.ratelimit.resp import ScriptConnection, _demand, command
from tests.harness import LOOPBACK, process_group
from tests.redis_server import RedisServer, requires_redis, start_redis

pytestmark = requires_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with process_group(tmp_path_factory.mktemp("redis")) as group:
        yield start_redis(group)


@pytest.fixture
async def connection(server: RedisServer) -> AsyncIterator[ScriptConnection]:
    conn = ScriptConnection(LOOPBACK, server.port, batch_wait=0.005, batch_size=32)
    assert await conn.call("PING") == b"PONG"
    yield conn
    await conn.aclose()


def spin(seconds: float) -> None:
    """Work on the loop's thread, as a loaded hub does between two decisions."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def writes(conn: ScriptConnection) -> tuple[int, int]:
    return conn.writes_at_once.value, conn.writes_waited.value


async def busy_sends(conn: ScriptConnection, n: int, gap: float = 0.0003) -> list[bytes]:
    """``n`` ECHOs, one every ``gap`` seconds of computing, none awaited before the last."""
    replies = []
    for i in range(n):
        replies.append(conn.send(command("ECHO", str(i)), 2.0))
        spin(gap)
        await asyncio.sleep(0)
    return list(await asyncio.gather(*replies))


async def test_a_busy_process_sends_frequent_commands_together(
    connection: ScriptConnection,
) -> None:
    await busy_sends(connection, 200)  # long enough to measure the process busy
    at_once, waited = writes(connection)
    replies = await busy_sends(connection, 400)
    assert replies == [str(i).encode() for i in range(400)]  # each reply to its command
    at_once, waited = (a - b for a, b in zip(writes(connection), (at_once, waited), strict=True))
    # One write per command before; now the first of a batch waits 5 ms, some 16 commands.
    assert waited > 0
    assert at_once + waited <= 400 / 4, (at_once, waited)


async def test_an_idle_process_writes_each_command_at_once(
    connection: ScriptConnection,
) -> None:
    before = writes(connection)
    for i in range(100):
        assert await connection.send(command("ECHO", str(i)), 2.0) == str(i).encode()
        await asyncio.sleep(0.001)
    at_once, waited = (a - b for a, b in zip(writes(connection), before, strict=True))
    assert (at_once, waited) == (100, 0)


async def test_a_caller_waiting_for_each_reply_seldom_waits(
    connection: ScriptConnection,
) -> None:
    await busy_sends(connection, 200)
    before = writes(connection)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(170):
        assert await connection.send(command("ECHO", str(i)), 2.0) == str(i).encode()
        spin(0.0003)
    elapsed = loop.time() - start
    at_once, waited = (a - b for a, b in zip(writes(connection), before, strict=True))
    # Busy, and one command every round trip: a wait gathers nothing, and after a wait alone
    # the next 16 batches go at once (so about one command in 17 waits).
    assert at_once + waited == 170
    assert 1 <= waited <= 170 / 8, (at_once, waited)
    assert elapsed < 170 * 0.005 / 3, elapsed


async def busy_unanswered(conn: ScriptConnection, n: int) -> list[Awaitable[bytes]]:
    """``n`` ECHOs sent by a busy process, one per turn of the loop, their replies not
    awaited."""
    replies = []
    for i in range(n):
        replies.append(conn.send(command("ECHO", str(i)), 5.0))
        spin(0.001)
        await asyncio.sleep(0)
    return replies


async def test_a_full_batch_goes_without_waiting_out_its_time(server: RedisServer) -> None:
    conn = ScriptConnection(LOOPBACK, server.port, batch_wait=1.0, batch_size=8)
    try:
        await conn.call("PING")
        warm = await busy_unanswered(conn, 60)  # the process is busy from the second window on
        before = writes(conn)
        replies = await busy_unanswered(conn, 80)
        await asyncio.sleep(0.1)  # a tenth of the time the first of a batch may wait
        # Every full batch of 8 went at once; at most the last one still waits.
        assert sum(cast(asyncio.Future[bytes], r).done() for r in replies) >= 72
        at_once, waited = (a - b for a, b in zip(writes(conn), before, strict=True))
        # Batches of 8, whatever the warm-up left queued (it shares the first).
        assert at_once == 0
        assert 9 <= waited <= 11
        assert await asyncio.gather(*warm, *replies) == [str(i).encode() for i in range(60)] + [
            str(i).encode() for i in range(80)
        ]
    finally:
        await conn.aclose()


async def test_a_lost_connection_fails_a_waiting_batch(server: RedisServer) -> None:
    conn = ScriptConnection(LOOPBACK, server.port, batch_wait=1.0, batch_size=1000)
    try:
        await conn.call("PING")
        held = await busy_unanswered(conn, 60)
        await asyncio.sleep(0.01)
        assert not cast(asyncio.Future[bytes], held[-1]).done()  # waiting for company
        conn.drop("a test")
        with pytest.raises(ConnectionError):
            await held[-1]
        await asyncio.gather(*held, return_exceptions=True)
        assert await conn.call("ECHO", "after") == b"after"  # connected again
        await asyncio.sleep(1.0)  # past the lost batch's time
        assert await conn.call("ECHO", "later") == b"later"
    finally:
        await conn.aclose()


def test_the_loop_is_busy_while_it_runs_or_waits_to_run() -> None:
    # A thread that computes for 0.2 s of wall time has been running or runnable all along,
    # even when another process shares its core (the CPU time alone would then read less).
    before = _demand()
    spin(0.2)
    assert 0.18 <= _demand() - before <= 0.3
