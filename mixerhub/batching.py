"""One background sender for every network adapter (OpenTelemetry's batch processor, as here).

A report handler must never wait on its backend: it ``add``s items to a bounded queue and
returns. A worker task takes batches (when ``batch_size`` items are waiting or ``flush_interval``
has passed), sends each with a timeout, and retries a failed batch with exponential backoff and
jitter. A backend that is down therefore costs at most ``queue_size`` items of memory: past that,
items are dropped (the newest or the oldest, as configured) and every drop is counted in
``mixerhub_adapter_dropped_total{adapter, reason}``. ``close()`` sends what is queued, within a
deadline, and counts what it could not send.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Generic, Literal, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import Field

from mixerhub.monitoring import ADAPTER_DROPPED, REGISTRY
from mixerhub.types import Duration, Params

T = TypeVar("T")

log = logging.getLogger("mixerhub.batching")

SENT = Counter(
    "mixerhub_adapter_sent",
    "Items an adapter delivered to its backend.",
    ["adapter"],
    registry=REGISTRY,
)
SEND_FAILURES = Counter(
    "mixerhub_adapter_send_failures",
    "Attempts to send a batch that failed (each retry counts).",
    ["adapter"],
    registry=REGISTRY,
)
QUEUED = Gauge(
    "mixerhub_adapter_queue_length",
    "Items waiting to be sent, by handler.",
    ["adapter", "handler"],
    registry=REGISTRY,
)


class BatchParams(Params):
    """How a network adapter queues and sends. Every network adapter's params take these as
    ``batching``."""

    queue_size: int = Field(default=10_000, gt=0)
    batch_size: int = Field(default=512, gt=0)
    flush_interval: Duration = timedelta(seconds=1)
    timeout: Duration = timedelta(seconds=5)
    max_retries: int = Field(default=5, ge=0)
    initial_backoff: Duration = timedelta(milliseconds=100)
    max_backoff: Duration = timedelta(seconds=30)
    # Which items give way when the queue is full: the ones arriving (newest) or the ones that
    # waited longest (oldest, when fresh data matters more than old).
    drop: Literal["newest", "oldest"] = "newest"


class BatchSender(Generic[T]):
    """Queue items; send them in batches in the background. ``send`` raises on failure."""

    def __init__(
        self,
        adapter: str,
        handler: str,
        send: Callable[[list[T]], Awaitable[None]],
        params: BatchParams | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.adapter, self.handler = adapter, handler
        self.params = params or BatchParams()
        self._send = send
        self._sleep = sleep
        self._clock = clock
        self._queue: collections.deque[T] = collections.deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._sent = SENT.labels(adapter)
        self._failures = SEND_FAILURES.labels(adapter)
        self._length = QUEUED.labels(adapter, handler)
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def add(self, items: Iterable[T]) -> int:
        """Queue items without waiting; returns how many were dropped because the queue is full."""
        if self._closing:
            n = sum(1 for _ in items)
            self._dropped("shutdown", n)
            return n
        queue, limit = self._queue, self.params.queue_size
        dropped = 0
        for item in items:
            if len(queue) >= limit:
                dropped += 1
                if self.params.drop == "newest":
                    continue
                queue.popleft()
            queue.append(item)
        if dropped:
            self._dropped("queue_full", dropped)
        self._length.set(len(queue))
        if len(queue) >= self.params.batch_size:
            self._wake.set()
        return dropped

    def __len__(self) -> int:
        return len(self._queue)

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (one attempt per batch) within ``timeout``; count the rest."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout)
        except (TimeoutError, asyncio.CancelledError):
            self._worker.cancel()
        if self._queue:
            self._dropped("shutdown", len(self._queue))
            self._queue.clear()
        self._length.set(0)

    async def _run(self) -> None:
        interval = self.params.flush_interval.total_seconds()
        while True:
            if not self._closing and len(self._queue) < self.params.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            while self._queue:
                batch = [
                    self._queue.popleft()
                    for _ in range(min(self.params.batch_size, len(self._queue)))
                ]
                self._length.set(len(self._queue))
                await self._deliver(batch)
                if not self._closing and len(self._queue) < self.params.batch_size:
                    break  # a partial batch waits for the next tick
            if self._closing and not self._queue:
                return

    async def _deliver(self, batch: list[T]) -> None:
        p = self.params
        backoff = p.initial_backoff.total_seconds()
        attempts = 1 if self._closing else p.max_retries + 1
        for attempt in range(attempts):
            try:
                await asyncio.wait_for(self._send(batch), p.timeout.total_seconds())
                self._sent.inc(len(batch))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any backend failure: count it, back off, retry
                self._failures.inc()
                log.warning(
                    "%s: sending %d items failed (attempt %d of %d): %s",
                    self.handler, len(batch), attempt + 1, attempts, e or type(e).__name__,
                )  # fmt: skip
                if attempt + 1 < attempts and not self._closing:
                    # Full jitter (AWS architecture blog): spreads retries of many hubs.
                    await self._sleep(random.uniform(0, backoff))
                    backoff = min(backoff * 2, p.max_backoff.total_seconds())
        self._dropped("send_failed", len(batch))

    def _dropped(self, reason: str, n: int) -> None:
        ADAPTER_DROPPED.labels(self.adapter, reason).inc(n)
