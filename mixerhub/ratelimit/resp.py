"""One Redis connection that runs the rate-limit script, written for the decision path.

redis-py spends about a hundred microseconds of Python per command packing arguments and
checking connections out of its pool; a decision here is one EVALSHA whose arguments are
already strings and numbers. This connection writes each EVALSHA as RESP bytes the moment it is
asked for, into a buffer written out once per turn of the event loop, so the decisions made at
the same time share one write, the socket and its round trip (Redis answers in order), and
hiredis parses the replies. A caller may build its command's RESP bytes itself (``send``) from
pieces it keeps encoded. It is used for a single Redis server over
plain TCP; TLS, Sentinel and Cluster keep redis-py.

A lost connection fails the calls in flight (the backend's failure policy answers them) and the
next call connects again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from typing import Any

import hiredis


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
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.connect_timeout = connect_timeout
        # Commands every new connection runs first (e.g. SCRIPT LOAD), before any call's.
        self.on_connect = on_connect
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        # Each command's reply future, and the timer that fails it when it takes too long.
        self._waiting: collections.deque[tuple[asyncio.Future[Any], asyncio.TimerHandle | None]] = (
            collections.deque()
        )
        self._lock = asyncio.Lock()
        self._out: list[bytes] = []  # commands not written yet, in order

    async def call(self, *parts: str | int | bytes) -> Any:
        """Send one command and wait for its reply; RedisReplyError for an error reply,
        ConnectionError (or OSError) when the connection fails."""
        if self._writer is None:
            await self._connect()
        return await self._send(command(*parts))

    async def send(self, resp: bytes, timeout: float) -> Any:
        """Send one command already encoded as RESP and wait for its reply, at most
        ``timeout`` seconds (then TimeoutError); otherwise as ``call``."""
        if self._writer is None:
            await self._connect()
        return await self._send(resp, timeout)

    def _send(self, resp: bytes, timeout: float | None = None) -> asyncio.Future[Any]:
        if self._writer is None:
            raise ConnectionError("not connected to Redis")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # A bare timer rather than asyncio.wait_for, which costs a task per call.
        timer = None if timeout is None else loop.call_later(timeout, _expire, future)
        self._waiting.append((future, timer))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(resp)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._writer is not None and out:
            self._writer.write(b"".join(out))

    async def _connect(self) -> None:
        async with self._lock:  # one connection, however many calls find it missing
            if self._writer is not None:
                return
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout
            )
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
            first: list[tuple[str | int | bytes, ...]] = []
            if self.password is not None:
                first.append(("AUTH", self.username, self.password) if self.username
                             else ("AUTH", self.password))  # fmt: skip
            if self.db:
                first.append(("SELECT", self.db))
            first += self.on_connect
            # Written before this coroutine yields, so they precede every other call's command
            # on the connection (Redis runs a connection's commands in order).
            replies = [self._send(command(*parts)) for parts in first]
            try:
                for reply in replies:
                    await reply
            except Exception as e:
                self._lost(e)
                raise

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader(replyError=RedisReplyError)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, timer = self._waiting.popleft()
                    if timer is not None:
                        timer.cancel()
                    if future.done():  # its caller gave up (timeout) meanwhile
                        continue
                    if isinstance(reply, RedisReplyError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            self._lost(ConnectionError("connection closed"))
            raise
        except Exception as e:
            self._lost(e)

    def _lost(self, error: Exception) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        self._out = []
        waiting, self._waiting = self._waiting, collections.deque()
        for future, timer in waiting:
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.set_exception(error)

    async def aclose(self) -> None:
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lost(ConnectionError("connection closed"))


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no reply from Redis in time"))
