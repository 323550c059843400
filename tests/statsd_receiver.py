"""A StatsD / DogStatsD receiver for tests: a UDP server on 127.0.0.1 that keeps every datagram.

Lines parse into ``Sample(name, value, type, rate, tags)`` following etsy/statsd's format
(``name:value|type[|@rate]``) and DogStatsD's additions (``|#tag:v,tag2``, ``|c:``, ``|T``...).
The receiver can be stopped and started again on the same port, to play a server going away.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    name: str
    value: str  # as sent: "1", "1.5", "-3"
    type: str  # c, g, ms, h, d, s
    rate: float | None  # None when the line has no |@rate
    tags: tuple[str, ...] = ()

    @property
    def number(self) -> float:
        return float(self.value)

    @property
    def tag_map(self) -> dict[str, str]:
        return dict(tag.partition(":")[::2] for tag in self.tags)


def parse_line(line: str) -> Sample:
    head, *fields = line.split("|")
    name, sep, value = head.rpartition(":")
    if not sep or not name or not fields:
        raise ValueError(f"not a StatsD line: {line!r}")
    rate: float | None = None
    tags: tuple[str, ...] = ()
    for f in fields[1:]:
        if f.startswith("@"):
            rate = float(f[1:])
        elif f.startswith("#"):
            tags = tuple(f[1:].split(",")) if f[1:] else ()
    return Sample(name, value, fields[0], rate, tags)


def parse_datagram(data: bytes) -> list[Sample]:
    return [parse_line(line) for line in data.decode().split("\n") if line]


class StatsdReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> StatsdReceiver:
        """Listen on 127.0.0.1, on the same port as before when restarted."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self._transport = transport
        return self

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)  # let the transport release its socket

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def samples(self) -> list[Sample]:
        return [s for d in self.datagrams for s in parse_datagram(d)]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.datagrams.append(data)
        self._arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Sample]:
        """The samples once at least ``count`` have arrived (or what arrived by the timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.samples) < count and time.monotonic() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        return self.samples

    async def quiet(self, period: float = 0.1) -> list[Sample]:
        """The samples once nothing has arrived for ``period`` seconds."""
        while True:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), period)
            except TimeoutError:
                return self.samples

    def clear(self) -> None:
        self.datagrams.clear()


def free_udp_port() -> int:
    """A port nothing listens on (bound a moment ago, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
