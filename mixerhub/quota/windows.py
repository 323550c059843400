"""Rate-limit algorithms over keyed, in-memory state: fixed window, rolling window, GCRA.

Each limiter answers ``take(key, amount, limit, now)`` with a ``Take``: how much was granted, how
much is left, and how long until the key is back at its full limit. The limit comes with each call
(an override may give one key a different limit from the next); the durations belong to the
limiter. Time is a monotonic clock in seconds, injected (``clock``) or passed (``now``), and is
counted internally in whole nanoseconds so that window edges are exact.

Memory stays bounded however many keys appear: every limiter keeps its keys in the order in which
their expiry moves, and each call drops the expired ones from the front, so a key costs memory for
at most one window after it was last charged. ``max_keys`` caps the count on top of that by
evicting the least recently charged key, which then starts afresh (fail open for that key).

Limiters are not thread-safe: use one from one event loop.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

Clock = Callable[[], float]

_NS = 1_000_000_000


class Take(NamedTuple):
    """The answer to one ``take``: amount granted, amount left, seconds until the key is full."""

    granted: int
    remaining: int
    reset_after: float


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


def _check_args(amount: int, limit: int) -> None:
    if amount < 0:
        raise ValueError(f"amount must be >= 0, got {amount}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


S = TypeVar("S")


class _Keyed(Generic[S]):
    """Per-key state in expiry order, with the expired front dropped on every call."""

    def __init__(self, clock: Clock, max_keys: int | None) -> None:
        if max_keys is not None and max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._clock = clock
        self._max_keys = max_keys
        self._state: OrderedDict[Hashable, S] = OrderedDict()
        self.evicted = 0  # live keys dropped because of max_keys

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return key in self._state

    def _now(self, now: float | None) -> int:
        return _ns(self._clock() if now is None else now)

    def _expired(self, state: S, now: int) -> bool:
        raise NotImplementedError

    def sweep(self, now: float | None = None) -> int:
        """Drop the keys whose state has expired; returns how many. ``take`` does this itself."""
        return self._sweep(self._now(now))

    def _sweep(self, now: int) -> int:
        dropped = 0
        while self._state:
            key, state = next(iter(self._state.items()))
            if not self._expired(state, now):
                break
            del self._state[key]
            dropped += 1
        return dropped

    def _store(self, key: Hashable, state: S) -> None:
        """Record a key's state as the latest to expire."""
        if key in self._state:
            self._state.move_to_end(key)
        elif self._max_keys is not None and len(self._state) >= self._max_keys:
            self._state.popitem(last=False)
            self.evicted += 1
        self._state[key] = state


@dataclass(slots=True)
class _Window:
    start: int
    used: int


class FixedWindow(_Keyed[_Window]):
    """At most ``limit`` per window of ``window`` seconds.

    A key's window starts at its first charge (as Mixer's redisquota FIXED_WINDOW did, a key
    expiring ``validDuration`` after it was created), or with ``aligned`` at multiples of
    ``window`` on the clock (Envoy's ratelimit service: per second, minute, hour). Either way up to
    twice the limit can pass across a window edge.
    """

    def __init__(
        self,
        window: float,
        *,
        aligned: bool = False,
        clock: Clock = time.monotonic,
        max_keys: int | None = None,
    ) -> None:
        super().__init__(clock, max_keys)
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self.window = window
        self.aligned = aligned
        self._window = _ns(window)

    def _expired(self, state: _Window, now: int) -> bool:
        return state.start + self._window <= now

    def take(
        self,
        key: Hashable,
        amount: int,
        limit: int,
        now: float | None = None,
        *,
        best_effort: bool = False,
    ) -> Take:
        _check_args(amount, limit)
        t = self._now(now)
        self._sweep(t)
        state = self._state.get(key)
        if state is None or self._expired(state, t):
            start = t - t % self._window if self.aligned else t
            state = _Window(start, 0)
            fresh = True
        else:
            fresh = False
        left = max(0, limit - state.used)
        granted = min(amount, left) if best_effort else (amount if amount <= left else 0)
        if granted:
            state.used += granted
            if fresh:
                self._store(key, state)
        elif fresh:  # nothing charged: a new window has nothing to remember
            return Take(0, left, 0.0)
        return Take(granted, left - granted, (state.start + self._window - t) / _NS)


@dataclass(slots=True)
class _Buckets:
    # (bucket index, amount charged in it), oldest first; ``total`` is their sum.
    counts: deque[list[int]] = field(default_factory=deque)
    total: int = 0


class RollingWindow(_Keyed[_Buckets]):
    """At most ``limit`` within any ``window`` seconds, counted in buckets of ``bucket`` seconds.

    A charge belongs to the bucket of its time (buckets are aligned on the clock) and is released
    when that bucket leaves the window: a window of n buckets covers the current bucket and the
    n - 1 before it. This is Mixer's memquota rolling window (mixer/adapter/memquota/
    rollingWindow.go: one slot per 100 ms tick, a slot reclaimed once the window has rolled past
    it) and redisquota's ROLLING_WINDOW (bucketDuration within validDuration).
    """

    def __init__(
        self,
        window: float,
        bucket: float,
        *,
        clock: Clock = time.monotonic,
        max_keys: int | None = None,
    ) -> None:
        super().__init__(clock, max_keys)
        if bucket <= 0:
            raise ValueError(f"bucket must be > 0, got {bucket}")
        if window < bucket:
            raise ValueError(f"window ({window}) must be at least one bucket ({bucket})")
        self.window, self.bucket = window, bucket
        self._bucket = _ns(bucket)
        self.buckets = math.ceil(_ns(window) / self._bucket)
        # The bucket index before which no key can have expired (the oldest key's expiry, as of
        # the last sweep): keys are in expiry order, so until then there is nothing to sweep.
        self._sweep_from = 0

    def _first_live(self, now: int) -> int:
        """The oldest bucket index still inside the window at ``now``."""
        return now // self._bucket - self.buckets + 1

    def _expired(self, state: _Buckets, now: int) -> bool:
        return not state.counts or state.counts[-1][0] < self._first_live(now)

    def _roll(self, state: _Buckets, now: int) -> None:
        first = self._first_live(now)
        while state.counts and state.counts[0][0] < first:
            state.total -= state.counts.popleft()[1]

    def _reset_after(self, state: _Buckets, now: int) -> float:
        if not state.counts:
            return 0.0
        return ((state.counts[-1][0] + self.buckets) * self._bucket - now) / _NS

    def take(
        self,
        key: Hashable,
        amount: int,
        limit: int,
        now: float | None = None,
        *,
        best_effort: bool = False,
    ) -> Take:
        if amount < 0 or limit < 0:
            _check_args(amount, limit)
        t = round((self._clock() if now is None else now) * _NS)
        granted = self._charge(key, amount, limit, t, best_effort)
        state = self._state.get(key)
        if state is None:  # unknown and nothing granted: the whole limit is left
            return Take(granted, limit, 0.0)
        counts = state.counts
        remaining = limit - state.total
        if remaining < 0:
            remaining = 0
        if not counts:
            return Take(granted, remaining, 0.0)
        return Take(granted, remaining, ((counts[-1][0] + self.buckets) * self._bucket - t) / _NS)

    def charge(
        self, key: Hashable, amount: int, limit: int, now: float | None = None,
        best_effort: bool = False,
    ) -> int:  # fmt: skip
        """``take``'s grant alone, which is all memquota asks on every request."""
        if amount < 0 or limit < 0:
            _check_args(amount, limit)
        return self._charge(
            key, amount, limit, round((self._clock() if now is None else now) * _NS), best_effort
        )

    def _charge(self, key: Hashable, amount: int, limit: int, t: int, best_effort: bool) -> int:
        # memquota charges every request here: _sweep, _expired and _roll are inlined.
        index = t // self._bucket
        first = index - self.buckets + 1
        states = self._state
        if index >= self._sweep_from:
            while states:
                oldest = next(iter(states))
                counts = states[oldest].counts
                if counts and counts[-1][0] >= first:
                    # Nothing expires before the oldest key does: no sweep until then.
                    self._sweep_from = counts[-1][0] + self.buckets
                    break
                del states[oldest]
            else:
                self._sweep_from = 0
        state = states.get(key)
        known = state is not None
        if state is None:
            state = _Buckets()
        counts = state.counts
        while counts and counts[0][0] < first:
            state.total -= counts.popleft()[1]
        left = limit - state.total
        if left < 0:
            left = 0
        granted = min(amount, left) if best_effort else (amount if amount <= left else 0)
        if granted:
            if counts and counts[-1][0] == index:
                counts[-1][1] += granted
            else:
                counts.append([index, granted])
            state.total += granted
            if known:
                states.move_to_end(key)  # the latest to expire (what _store does for a known key)
            else:
                self._store(key, state)
        return granted

    def release(self, key: Hashable, amount: int, now: float | None = None) -> int:
        """Give back up to ``amount`` from the newest buckets backwards (as Mixer's memquota did
        for a negative allocation); returns how much was released."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        t = self._now(now)
        self._sweep(t)
        # Released buckets may make a key expire before the oldest: the next charge sweeps.
        self._sweep_from = 0
        state = self._state.get(key)
        if state is None:
            return 0
        self._roll(state, t)
        released = 0
        while state.counts and released < amount:
            newest = state.counts[-1]
            part = min(newest[1], amount - released)
            newest[1] -= part
            released += part
            if newest[1] == 0:
                state.counts.pop()
        state.total -= released
        if not state.counts:
            del self._state[key]
        return released


@dataclass(slots=True)
class _Cell:
    # The theoretical arrival time (when the bucket would be full again) in nanoseconds times
    # ``limit``: a charge of n then moves it by exactly n * period, with no rounding.
    tat: int
    limit: int
    updated: int


class TokenBucket(_Keyed[_Cell]):
    """A token bucket of ``limit`` tokens refilled at ``limit`` per ``period``, as GCRA.

    The generic cell rate algorithm keeps one timestamp per key, the theoretical arrival time
    (TAT): a charge of n moves it n * period / limit later, and is allowed while the TAT stays
    within one period of now (a burst of up to ``limit``). A denied charge changes nothing.
    """

    def __init__(
        self,
        period: float,
        *,
        clock: Clock = time.monotonic,
        max_keys: int | None = None,
    ) -> None:
        super().__init__(clock, max_keys)
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.period = period
        self._period = _ns(period)

    def _expired(self, state: _Cell, now: int) -> bool:
        # Every granted charge leaves TAT <= updated + period, so this implies TAT <= now (a full
        # bucket, the same as no state); keys sit in the order of their last update.
        return state.updated + self._period <= now

    def take(
        self,
        key: Hashable,
        amount: int,
        limit: int,
        now: float | None = None,
        *,
        best_effort: bool = False,
    ) -> Take:
        _check_args(amount, limit)
        t = self._now(now)
        self._sweep(t)
        if limit == 0:
            return Take(0, 0, 0.0)
        state = self._state.get(key)
        if state is None:
            tat = t * limit
        elif state.limit == limit:
            tat = max(state.tat, t * limit)
        else:  # the key's limit changed: rescale its TAT, rounding towards fewer tokens
            tat = max(-(-state.tat * limit // state.limit), t * limit)
        left = (t * limit + self._period * limit - tat) // self._period
        granted = min(amount, left) if best_effort else (amount if amount <= left else 0)
        if granted:
            tat += granted * self._period
            left -= granted
            self._store(key, _Cell(tat, limit, t))
        return Take(granted, left, (tat - t * limit) / limit / _NS)
