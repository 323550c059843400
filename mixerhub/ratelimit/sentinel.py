"""A Sentinel's ``+switch-master`` notices, followed (Redis's guidelines for Sentinel clients).

The script connection asks the sentinels where the master is before every connection, and drops
a connection whose server answers READONLY (a master demoted alive). A master that hangs rather
than dies (stopped, cut off by the network) does neither: every call to it times out, no error
closes the connection, and decisions would stay with it however long the new master has ruled.
The sentinels announce each failover on their ``+switch-master`` channel
(``<service> <old ip> <old port> <new ip> <new port>``): ``SwitchMasterWatch`` listens to one
sentinel at a time, moving on to the next when one fails, and reports each switch of its service,
so that the connection is dropped at once and the next call asks where the master now is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from mixerhub.monitoring import REGISTRY

log = logging.getLogger("mixerhub.ratelimit.sentinel")

CHANNEL = "+switch-master"

SWITCHES = Counter(
    "mixerhub_ratelimit_redis_master_switches",
    "Failovers a Sentinel announced for the rate-limit service's master, each one followed.",
    registry=REGISTRY,
)


class SwitchMasterWatch:
    """Calls ``on_switch(host, port)`` when a sentinel announces a new master for ``service``.

    Runs from ``start`` (idempotent, on the running loop) to ``aclose``. Its connections are
    its own, without the sentinels' short socket timeout: a subscriber waits for as long as no
    failover happens."""

    def __init__(
        self,
        sentinels: Sequence[aioredis.Redis],
        service: str,
        on_switch: Callable[[str, int], None],
        *,
        retry: float = 1.0,
        poll: float = 5.0,
    ) -> None:
        self.service = service
        self._on_switch = on_switch
        self._retry = retry
        self._poll = poll
        self._clients = [_subscriber(s, health_check=2 * poll) for s in sentinels]
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for client in self._clients:
                try:
                    await self._follow(client)
                except (RedisError, OSError) as e:
                    log.info("Sentinel %s: %s; trying the next", _address(client), e)
            await asyncio.sleep(self._retry)

    async def _follow(self, client: aioredis.Redis) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self._poll
                )
                if message is not None and message.get("type") == "message":
                    self._notice(message["data"])

    def _notice(self, data: bytes | str) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        parts = text.split()
        if len(parts) != 5 or parts[0] != self.service or not parts[4].isdigit():
            return  # another service's failover, or nothing Sentinel sends
        host, port = parts[3], int(parts[4])
        SWITCHES.inc()
        log.warning("Sentinel: the master of %s is now %s:%d", self.service, host, port)
        self._on_switch(host, port)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in self._clients:
            await client.aclose()


def _subscriber(sentinel: aioredis.Redis, health_check: float) -> aioredis.Redis:
    """A client of the same sentinel (address, credentials, TLS), for waiting on a channel."""
    pool = sentinel.connection_pool
    kwargs = {
        **pool.connection_kwargs,
        "socket_timeout": None,  # a quiet channel is not a dead server
        "health_check_interval": health_check,
    }
    return aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1, **kwargs
        )
    )


def _address(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}"
