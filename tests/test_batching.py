"""The background batch sender every network adapter uses."""

from __future__ import annotations

import asyncio

from mixerhub.batching import BatchParams, BatchSender
from mixerhub.monitoring import REGISTRY


def dropped(reason: str, adapter: str) -> float:
    value = REGISTRY.get_sample_value(
        "mixerhub_adapter_dropped_total", {"adapter": adapter, "reason": reason}
    )
    return value or 0.0


class Backend:
    """Records batches; can be made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.down = False
        self.attempts = 0

    async def send(self, batch: list[int]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionRefusedError("backend down")
        self.batches.append(batch)


def params(**kw: object) -> BatchParams:
    kw.setdefault("flush_interval", "20ms")
    kw.setdefault("initial_backoff", "1ms")
    kw.setdefault("max_backoff", "5ms")
    return BatchParams.model_validate(kw)


async def test_batches_by_size_and_by_interval() -> None:
    backend = Backend()
    sender = BatchSender("t-size", "h", backend.send, params(batch_size=3, flush_interval="10s"))
    sender.add(range(7))
    await asyncio.sleep(0.05)
    assert backend.batches == [[0, 1, 2], [3, 4, 5]]  # the 7th waits for the interval...
    await sender.close()
    assert backend.batches[-1] == [6]  # ...or for close, which flushes it

    backend = Backend()
    sender = BatchSender("t-interval", "h", backend.send, params(batch_size=100))
    sender.add([1, 2])
    await asyncio.sleep(0.1)
    assert backend.batches == [[1, 2]]
    await sender.close()


async def test_a_failing_backend_is_retried_with_backoff_then_recovers() -> None:
    backend = Backend()
    backend.down = True
    sender = BatchSender("t-retry", "h", backend.send, params(max_retries=50))
    sender.add([1])
    await asyncio.sleep(0.1)
    assert backend.attempts >= 3
    assert not backend.batches
    backend.down = False
    await asyncio.sleep(0.1)
    assert backend.batches == [[1]]
    await sender.close()


async def test_a_dead_backend_costs_bounded_memory_and_every_drop_is_counted() -> None:
    backend = Backend()
    backend.down = True
    before_full, before_failed = dropped("queue_full", "t-dead"), dropped("send_failed", "t-dead")
    sender = BatchSender(
        "t-dead", "h", backend.send, params(queue_size=10, batch_size=5, max_retries=1)
    )
    for _ in range(20):
        sender.add(range(100))
        assert len(sender) <= 10
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)
    await sender.close(timeout=1)
    full = dropped("queue_full", "t-dead") - before_full
    failed = dropped("send_failed", "t-dead") - before_failed
    shutdown = dropped("shutdown", "t-dead")
    assert full > 1500
    assert full + failed + shutdown >= 2000 - 1e-9  # nothing was delivered, all is accounted for
    assert not backend.batches


async def test_drop_newest_or_oldest() -> None:
    for policy, expected in (("newest", [0, 1, 2]), ("oldest", [7, 8, 9])):
        backend = Backend()
        p = params(queue_size=3, batch_size=100, flush_interval="10s", drop=policy)
        sender = BatchSender(f"t-{policy}", "h", backend.send, p)
        assert sender.add(range(10)) == 7
        await sender.close()
        assert backend.batches == [expected]


async def test_items_added_after_close_are_counted_not_kept() -> None:
    backend = Backend()
    sender = BatchSender("t-closed", "h", backend.send, params())
    await sender.close()
    assert sender.add([1, 2]) == 2
    assert dropped("shutdown", "t-closed") == 2
