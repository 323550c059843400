"""One Redis connection that runs the rate-limit script, written for the decision path.

redis-py spends about a hundred microseconds of Python per command packing arguments and
checking connections out of its pool; a decision here is one EVALSHA whose arguments are
already encoded. This connection queues each command as RESP bytes the moment it is asked for
and writes the queue at the end of the loop's turn, or, while commands are in flight, as soon as
their replies are all in (automatic pipelining, as ioredis and Lettuce do: under load a write
carries every decision made during one round trip, and Redis, which runs commands one at a time,
is no slower for it); replies are parsed by
hiredis straight from the transport's data_received (an asyncio Protocol: no reader task, no
stream buffer). A caller may build its command's RESP bytes itself (``send``) from pieces it
keeps encoded.

Under load a write may also wait a little for company (``batch_wait``, as Kafka's linger.ms):
each write and each read costs both processes a system call, a wakeup and a trip through the
loopback TCP stack, which on a small machine weigh more than a decision's own work. The waits
adapt: only while the loop's thread is busy (running or waiting to run 75% of the time) and
commands arrive more often than one per ``batch_wait`` (a moving average) does the first of a
batch wait, at most ``batch_wait`` (its wait for replies in flight included); a batch of
``batch_size`` goes at once. Idle or lightly loaded, every command goes at the end of the loop's
turn, as before: there a wait would add latency and save CPU nothing needs. When the waits
gather next to nothing (a caller that sends one command at a time and waits for each), they stop
for the next ``_PROBE_AFTER`` batches, so such a caller pays for them only now and then.

It serves every single-master setup: plain TCP, TLS (``tls``: an SSLContext) and a Sentinel's
master (``locate`` asks the sentinels where it is before every connection; a connection to a
server that is not, or no longer, a master is dropped, so a failover is followed). A lost
connection fails the calls in flight (the backend's failure policy answers them) and the next
call connects again. Connecting runs in a task of its own, bounded by ``connect_timeout``: a
call gives up waiting on it at its own timeout without cancelling it, so a handshake slower than
one decision may wait (a Sentinel's answer, TLS, SCRIPT LOAD) still completes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from mixerhub.monitoring import Count


class RedisReplyError(Exception):
    """Redis answered a command with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


def command(*parts: str | int | bytes) -> bytes:
    """A command as RESP: an array of bulk strings."""
    return b"*%d\r\n%s" % (len(parts), b"".join(map(bulk, parts)))


# A decision's arguments repeat (its keys, limits, units, the script's SHA): each is encoded
# once, and a command is a join of cached pieces.
@functools.lru_cache(maxsize=65_536, typed=True)  # typed: 1 and True encode differently
def bulk(part: str | int | bytes) -> bytes:
    """One argument as a RESP bulk string."""
    data = part if isinstance(part, bytes) else str(part).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


Address = tuple[str, int]

# The moving average of the time between commands gives each new gap this weight.
_GAP_WEIGHT = 0.125
# After waits that gathered next to nothing, this many batches go without waiting.
_PROBE_AFTER = 16
# Writes wait for company only while the loop's thread is this busy (see _demand), measured
# over _BUSY_WINDOW seconds: below it, a wait adds latency and saves CPU that nothing needs.
_BUSY = 0.75
_BUSY_WINDOW = 0.05
_schedstat = threading.local()


def _demand() -> float:
    """Seconds the calling thread has run or waited to run: /proc's schedstat (run and run-queue
    time). CPU time alone would read a saturated loop that gets half a core (a Kubernetes limit
    of 500m, a busy neighbour) as half busy. Without /proc, the thread's CPU time."""
    fd = getattr(_schedstat, "fd", None)
    if fd is None:
        try:
            fd = _schedstat.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            fd = _schedstat.fd = -1
    if fd < 0:
        return time.thread_time()
    run, wait, _ = os.pread(fd, 128, 0).split()
    return (int(run) + int(wait)) / 1e9


class ScriptConnection:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 1.0,
        on_connect: tuple[tuple[str | int | bytes, ...], ...] = (),
        tls: ssl.SSLContext | None = None,
        locate: Callable[[], Awaitable[Address]] | None = None,
        batch_wait: float = 0.0,
        batch_size: int = 32,
        writes_at_once: Count | None = None,
        writes_waited: Count | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.connect_timeout = connect_timeout
        # Commands every new connection runs first (e.g. SCRIPT LOAD), before any call's.
        self.on_connect = on_connect
        self.tls = tls
        # Where to connect, asked again before every connection (a Sentinel's current master);
        # None: host and port.
        self.locate = locate
        self._transport: asyncio.Transport | None = None
        self._parser = hiredis.Reader(replyError=RedisReplyError)
        # Each command's reply future, and the loop time after which it fails (TimeoutError).
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        # One timer for the connection, at the earliest deadline in flight: a timer per call
        # (call_later, then cancel) costs more than the rest of a command's sending.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._connecting: asyncio.Task[None] | None = None
        self._out: list[bytes] = []  # commands not written yet, in order
        # Seconds the first command of a batch may wait for others (0: none), and the batch
        # that goes without waiting longer.
        self.batch_wait = batch_wait
        self.batch_size = batch_size
        self._gap = math.inf  # moving average of the time between two commands
        self._last = -math.inf  # when the last command was queued (loop time)
        self._first_at = 0.0  # when the first command not written yet was queued
        self._lingering: asyncio.TimerHandle | None = None  # the waiting batch's timer
        # Writes to Redis made at once, and those that waited for company.
        self.writes_at_once = writes_at_once if writes_at_once is not None else Count()
        self.writes_waited = writes_waited if writes_waited is not None else Count()
        self._plain = 0  # batches left to write without waiting (see _PROBE_AFTER)
        self._gathered = 2.0  # moving average of the commands a wait gathered
        self._busy = 0.0  # the loop thread's demand (_demand) over wall time, last window
        self._window_at = -math.inf  # when the window began (loop time), and _demand() then
        self._window_used = 0.0

    @property
    def connected(self) -> bool:
        return self._transport is not None

    async def call(self, *parts: str | int | bytes) -> Any:
        """Send one command and wait for its reply; RedisReplyError for an error reply,
        ConnectionError (or OSError) when the connection fails."""
        if self._transport is None:
            await asyncio.shield(self._connection())
        return await self._send(command(*parts))

    def send(self, resp: bytes, timeout: float) -> Awaitable[Any]:
        """Send one command already encoded as RESP; its reply, awaited, comes within
        ``timeout`` seconds (else TimeoutError); otherwise as ``call``. Connected, this is the
        reply's future itself, with no coroutine to run."""
        if self._transport is None:
            return self._connect_and_send(resp, timeout)
        return self._send(resp, timeout)

    async def _connect_and_send(self, resp: bytes, timeout: float) -> Any:
        await asyncio.wait_for(asyncio.shield(self._connection()), timeout)
        return await self._send(resp, timeout)

    def _send(self, resp: bytes, timeout: float | None = None) -> asyncio.Future[Any]:
        if self._transport is None:
            raise ConnectionError("not connected to Redis")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        deadline = math.inf if timeout is None else now + timeout
        if deadline < self._expiry_at:
            self._arm(loop, deadline)
        gap = now - self._last
        self._last = now
        self._gap = gap if self._gap == math.inf else self._gap + (gap - self._gap) * _GAP_WEIGHT
        if now - self._window_at >= _BUSY_WINDOW:
            used = _demand()
            self._busy = (used - self._window_used) / (now - self._window_at)
            self._window_at, self._window_used = now, used
        self._waiting.append((future, deadline))
        out = self._out
        out.append(resp)
        if len(out) == 1:
            self._first_at = now
            if len(self._waiting) == 1:  # nothing in flight
                self._write_soon(loop, now)
        elif len(out) >= self.batch_size and self._lingering is not None:
            self._flush()
        # Otherwise the commands wait for the replies in flight and go together (_received),
        # or for the batch's time (_write_soon).
        return future

    def _write_soon(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        """Write the queued commands at the end of this turn of the loop (with any others made
        in it), or, on a busy process with commands coming often enough for others to join
        them, once the first has waited batch_wait (its wait for replies in flight counts)."""
        linger = 0 < self._gap <= self.batch_wait and self._busy >= _BUSY
        if linger and not self._plain:
            at = self._first_at + self.batch_wait
            if at > now:
                self._lingering = loop.call_at(at, self._flush_lingered)
                return
        else:
            self._plain = max(0, self._plain - 1)
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        waited = self._lingering
        if waited is not None:
            waited.cancel()
            self._lingering = None
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(b"".join(out))
            (self.writes_at_once if waited is None else self.writes_waited).value += 1

    def _flush_lingered(self) -> None:
        gathered = self._gathered = self._gathered + (len(self._out) - self._gathered) * 0.25
        if gathered < 1.5:
            # Waiting gathers next to nothing: the callers are few, whatever their pace.
            self._plain = _PROBE_AFTER
            self._gathered = 1.6  # one wait alone, after the pause, pauses again
        self._flush()

    def _connection(self) -> asyncio.Task[None]:
        """The task connecting, started when none is (one, however many calls wait on it)."""
        task = self._connecting
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._connect())
            task.add_done_callback(_retrieve)
            self._connecting = task
        return task

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry, self._expiry_at = loop.call_at(deadline, self._expire_due), deadline

    def _expire_due(self) -> None:
        """Fail the calls past their deadline (their commands, sent, still get replies, which
        are dropped), and wait for the next deadline."""
        self._expiry, self._expiry_at = None, math.inf
        loop = asyncio.get_running_loop()
        now, earliest = loop.time(), math.inf
        for future, deadline in self._waiting:
            if future.done():
                continue
            if deadline <= now:
                future.set_exception(TimeoutError("no reply from Redis in time"))
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._arm(loop, earliest)

    async def _connect(self) -> None:
        if self._transport is None:
            await asyncio.wait_for(self._open(), self.connect_timeout)

    async def _open(self) -> None:
        host, port = (self.host, self.port) if self.locate is None else await self.locate()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(
            lambda: _Replies(self),
            host,
            port,
            ssl=self.tls,
            server_hostname=host if self.tls is not None else None,
        )
        self._parser = hiredis.Reader(replyError=RedisReplyError)
        self._transport = transport
        first: list[tuple[str | int | bytes, ...]] = []
        if self.password is not None:
            first.append(("AUTH", self.username, self.password) if self.username
                         else ("AUTH", self.password))  # fmt: skip
        if self.locate is not None:
            first.append(("ROLE",))  # a Sentinel may name a master that was just demoted
        if self.db:
            first.append(("SELECT", self.db))
        first += self.on_connect
        # Queued before this coroutine yields, so they precede every other call's command on
        # the connection (Redis runs a connection's commands in order).
        replies = [self._send(command(*parts)) for parts in first]
        try:
            for parts, reply in zip(first, replies, strict=True):
                answer = await reply
                if parts == ("ROLE",) and (not answer or answer[0] != b"master"):
                    raise ConnectionError(f"{host}:{port} is not a master")
        except Exception as e:
            self._lost(e)
            raise

    def _received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        waiting = self._waiting
        while (reply := parser.gets()) is not False:
            if not waiting:
                self._lost(ConnectionError("a reply from Redis that no command asked for"))
                return
            future, _ = waiting.popleft()
            if future.done():  # its caller gave up (timeout) meanwhile
                continue
            if isinstance(reply, RedisReplyError):
                future.set_exception(reply)
                if str(reply).startswith("READONLY"):
                    # A demoted master (after a failover): the next call finds the new one.
                    self._lost(ConnectionError("Redis is no longer the master"))
                    return
            else:
                future.set_result(reply)
        if self._out and len(waiting) == len(self._out):
            # The batch in flight is answered: the commands queued meanwhile go together.
            loop = asyncio.get_running_loop()
            self._write_soon(loop, loop.time())

    def drop(self, reason: str) -> None:
        """Close the connection (its calls in flight fail with ``reason``): the next call
        connects again, asking ``locate`` where to."""
        self._lost(ConnectionError(reason))

    def _lost(self, error: Exception) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._out = []
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        waiting, self._waiting = self._waiting, collections.deque()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry, self._expiry_at = None, math.inf
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    async def aclose(self) -> None:
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        self._lost(ConnectionError("connection closed"))


class _Replies(asyncio.Protocol):
    """The transport's side of a ScriptConnection: bytes in go to its parser."""

    def __init__(self, connection: ScriptConnection) -> None:
        self.connection = connection

    def data_received(self, data: bytes) -> None:
        self.connection._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.connection
        if c._transport is not None and c._transport.get_protocol() is self:
            c._lost(exc or ConnectionError("Redis closed the connection"))


def _retrieve(task: asyncio.Task[None]) -> None:
    """A failed connection is its waiting calls' error; nobody else need hear of it."""
    if not task.cancelled():
        task.exception()
