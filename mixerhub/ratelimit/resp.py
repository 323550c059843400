"""One Redis connection that runs the rate-limit script, written for the decision path.

redis-py spends about a hundred microseconds of Python per command packing arguments and
checking connections out of its pool; a decision here is one EVALSHA whose arguments are
already strings and numbers. This connection writes each EVALSHA as RESP bytes the moment it is
asked for, so the decisions made at the same time share the socket and its round trip (Redis
answers in order), and hiredis parses the replies. It is used for a single Redis server over
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


def _command(*parts: str | int | bytes) -> bytes:
    return b"*%d\r\n%s" % (len(parts), b"".join(map(_bulk, parts)))


# A decision's arguments repeat (its keys, limits, units, the script's SHA): each is encoded
# once, and a command is a join of cached pieces.
@functools.lru_cache(maxsize=65_536, typed=True)  # typed: 1 and True encode differently
def _bulk(part: str | int | bytes) -> bytes:
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
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._lock = asyncio.Lock()

    async def call(self, *parts: str | int | bytes) -> Any:
        """Send one command and wait for its reply; RedisReplyError for an error reply,
        ConnectionError (or OSError) when the connection fails."""
        if self._writer is None:
            await self._connect()
        return await self._send(parts)

    def _send(self, parts: tuple[str | int | bytes, ...]) -> asyncio.Future[Any]:
        writer = self._writer
        if writer is None:
            raise ConnectionError("not connected to Redis")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        writer.write(_command(*parts))
        return future

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
            replies = [self._send(command) for command in first]
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
                    future = self._waiting.popleft()
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
        waiting, self._waiting = self._waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(error)

    async def aclose(self) -> None:
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lost(ConnectionError("connection closed"))
