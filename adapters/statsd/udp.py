"""A UDP client endpoint on the event loop: datagrams go out without blocking, errors are counted.

StatsD and DogStatsD speak UDP. A send never waits for the receiver, and a receiver that is not
there shows only as an ICMP port unreachable, which the kernel reports on a later send or receive
of the same connected socket (ConnectionRefusedError). asyncio hands such errors to the protocol's
``error_received``; here they are counted through ``on_error``, never raised, and the next
``open()`` connects afresh (resolving the name again, in case the receiver moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from mixerhub.adapter import Env


class Outage:
    """Socket errors of one handler: each counted, logged once when an outage starts and once
    when sending works again. UDP reports a missing receiver late (an ICMP port unreachable, on
    a later send or receive), so the error rarely belongs to the datagram that met it."""

    def __init__(self, what: str, env: Env, where: str) -> None:
        self.what, self.env, self.where = what, env, where
        self.failing = False

    def error(self, exc: OSError) -> None:
        self.env.count_error()
        if not self.failing:
            self.failing = True
            self.env.logger.warning(
                "%s %s: sending to %s failed: %s", self.what, self.env.handler, self.where, exc
            )

    def recovered(self) -> None:
        if self.failing:
            self.failing = False
            self.env.logger.info(
                "%s %s: sending to %s again", self.what, self.env.handler, self.where
            )


class UdpEndpoint:
    """A connected UDP socket owned by the running event loop."""

    def __init__(self, host: str, port: int, on_error: Callable[[OSError], None]) -> None:
        self.host, self.port = host, port
        self._on_error = on_error
        self._transport: asyncio.DatagramTransport | None = None
        self._closed: asyncio.Future[None] | None = None
        self._stale = False  # an error was reported since the socket was connected
        self._paused = False  # the socket's send buffer is full: datagrams are dropped
        self.errors = 0

    @property
    def connected(self) -> bool:
        t = self._transport
        return t is not None and not t.is_closing() and not self._stale

    async def open(self) -> None:
        """Connect, unless connected and healthy. Raises OSError when the name does not resolve."""
        if self.connected:
            return
        await self.close()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"{self.host}:{self.port} resolves to no address")
        # IPv4 first when a name has both, as Go's net.ResolveUDPAddr (Mixer's clients) and the
        # datadog client do: a receiver listening on 127.0.0.1 is what "localhost" means to them.
        family, _, _, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)
        closed: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self, closed),
            remote_addr=(str(address[0]), int(address[1])),
            family=family,
        )
        self._transport, self._closed = transport, closed
        self._stale = self._paused = False

    def send(self, datagram: bytes) -> bool:
        """Hand one datagram to the socket; False when it was refused at once (and is lost)."""
        t = self._transport
        if t is None or t.is_closing() or self._paused:
            return False
        before = self.errors
        t.sendto(datagram)  # an OSError here reaches error_received before sendto returns
        return self.errors == before

    async def close(self, timeout: float = 1.0) -> None:
        """Close the socket once what the transport buffered is written (or ``timeout`` passes)."""
        t, closed = self._transport, self._closed
        self._transport = self._closed = None
        if t is None:
            return
        t.close()
        if closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), timeout)

    def _error(self, exc: OSError) -> None:
        self.errors += 1
        self._stale = True
        self._on_error(exc)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: UdpEndpoint, closed: asyncio.Future[None]) -> None:
        self._endpoint, self._closed = endpoint, closed

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        pass  # StatsD receivers do not answer

    def error_received(self, exc: Exception) -> None:
        self._endpoint._error(exc if isinstance(exc, OSError) else OSError(str(exc)))

    def pause_writing(self) -> None:
        self._endpoint._paused = True

    def resume_writing(self) -> None:
        self._endpoint._paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
