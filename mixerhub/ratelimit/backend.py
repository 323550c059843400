"""Where the counters behind the limits live: a small interface and the in-memory backend.

A backend takes one request's charges together and answers all or nothing, as envoyproxy/
ratelimit does with STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT: when any enforced charge would go
over its limit, none is charged. In memory that is exact (nothing runs between the check and the
charge); the Redis backend (ratelimit/redis.py) gets the same guarantee by checking and charging
inside one Lua script.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from mixerhub.quota.windows import Clock, FixedWindow, RollingWindow, TokenBucket
from mixerhub.ratelimit.matching import Algorithm

# A rolling window counts in buckets of this fraction of its unit (one second per minute).
_ROLLING_BUCKETS = 60
# Per window object: beyond this many live keys the least recently charged starts afresh.
_MAX_KEYS = 1_000_000


@dataclass(frozen=True, slots=True)
class Charge:
    key: Hashable  # the domain and the request's descriptor entries
    hits: int
    limit: int
    unit_seconds: int
    algorithm: Algorithm
    # False for a shadow-mode limit: its being over stops no other charge.
    enforced: bool = True


# A NamedTuple: as immutable as a frozen dataclass, made at a third of the cost (a decision
# makes one per descriptor).
class Outcome(NamedTuple):
    over_limit: bool  # this charge alone does not fit in what is left
    charged: bool
    remaining: int
    reset_after: float  # seconds until the key is back at its full limit


class Backend(Protocol):
    """Where counters live. A backend that answers from memory also offers
    ``take_now(charges)``, the same answer without a coroutine, which callers prefer."""

    async def take(self, charges: Sequence[Charge]) -> Sequence[Outcome]:
        """One outcome per charge, in order."""
        ...


_Window = FixedWindow | RollingWindow | TokenBucket


class MemoryBackend:
    """Counters in this process, one window object per (algorithm, unit).

    The backend outlives snapshots, so a reload keeps every key's count. Fixed windows are
    aligned on the wall clock, as envoyproxy/ratelimit's are (a minute limit resets on the minute).
    """

    def __init__(self, clock: Clock = time.time, max_keys: int = _MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._windows: dict[tuple[Algorithm, int], _Window] = {}

    def _window(self, algorithm: Algorithm, unit: int) -> _Window:
        window = self._windows.get((algorithm, unit))
        if window is None:
            if algorithm == "rolling_window":
                window = RollingWindow(
                    unit, unit / _ROLLING_BUCKETS, clock=self._clock, max_keys=self._max_keys
                )
            elif algorithm == "token_bucket":
                window = TokenBucket(unit, clock=self._clock, max_keys=self._max_keys)
            else:
                window = FixedWindow(unit, aligned=True, clock=self._clock, max_keys=self._max_keys)
            self._windows[(algorithm, unit)] = window
        return window

    async def take(self, charges: Sequence[Charge]) -> Sequence[Outcome]:
        return self.take_now(charges)

    def take_now(self, charges: Sequence[Charge]) -> list[Outcome]:
        now = self._clock()
        if len(charges) == 1:
            # Alone, a charge stops no other: taking it is its own check (a window grants all
            # or nothing), without the peek that several charges need first.
            c = charges[0]
            w = self._window(c.algorithm, c.unit_seconds)
            took = w.take(c.key, c.hits, c.limit, now)
            if took.granted or not c.hits:
                return [Outcome(False, True, took.remaining, took.reset_after)]
            return [Outcome(True, False, took.remaining, _reset(w, took, now))]
        windows = [self._window(c.algorithm, c.unit_seconds) for c in charges]
        # First check every charge (the same key twice in one request adds up), then charge.
        wanted: dict[tuple[int, Hashable], int] = {}
        peeks = []
        blocked = False
        for c, w in zip(charges, windows, strict=True):
            peek = w.take(c.key, 0, c.limit, now)
            slot = (id(w), c.key)
            wanted[slot] = wanted.get(slot, 0) + c.hits
            over = wanted[slot] > peek.remaining
            blocked = blocked or (over and c.enforced)
            peeks.append((peek, over))
        outcomes: list[Outcome] = []
        for c, w, (peek, over) in zip(charges, windows, peeks, strict=True):
            if blocked or over:
                outcomes.append(Outcome(over, False, peek.remaining, _reset(w, peek, now)))
                continue
            took = w.take(c.key, c.hits, c.limit, now)
            outcomes.append(Outcome(False, True, took.remaining, took.reset_after))
        return outcomes


def _reset(window: _Window, peek: tuple[int, int, float], now: float) -> float:
    reset = peek[2]
    if reset == 0.0 and isinstance(window, FixedWindow):
        # An unused aligned window: it still ends at the next edge.
        return window.window - now % window.window
    return reset
