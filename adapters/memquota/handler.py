"""memquota's handler: quotas held in this process (Mixer's mixer/adapter/memquota/memquota.go).

A quota with a validDuration is a rate limit, kept in a rolling window; one without is an
allocation counter, which only a negative amount (a release) gives back. State is keyed by the
instance's name and all its dimensions, as Mixer's makeKey did, so each combination of dimension
values has a quota of its own. Retried requests are recognised by their deduplication id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from mixerhub import adapter
from mixerhub.adapter import Env, Handler, InstanceSpec, QuotaArgs, QuotaResult
from mixerhub.quota import Clock, RollingWindow
from mixerhub.quota.overrides import first_override
from mixerhub.templates import QuotaInstance

from .config import MemQuotaParams, Quota

# Mixer's rolling windows count in ticks of 100 ms (dedup.go ticksPerSecond) over the
# validDuration rounded up to whole seconds (memquota.go alloc).
_TICK = 0.1
_MAX_INSTANCES = 4096


@dataclass(frozen=True, slots=True)
class _Limit:
    max_amount: int
    valid_duration: float  # seconds; 0 = allocation counter
    # Made when the handler is built: the rolling window the limit counts in (None for a
    # counter), and the answer to the usual request, one granted in full.
    window: RollingWindow | None = field(compare=False)
    granted_one: QuotaResult = field(compare=False)


@dataclass(frozen=True, slots=True)
class _CompiledQuota:
    default: _Limit
    overrides: tuple[tuple[tuple[tuple[str, str], ...], _Limit], ...]

    def limit(self, dimensions: Mapping[str, object]) -> _Limit:
        """The first override whose dimensions all match (memquota.go limit), else the quota's."""
        return first_override(self.overrides, dimensions, self.default)


def _hashable(value: object) -> Hashable:
    if value.__class__ is str:  # most dimensions: no ABC checks
        return value
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, Hashable):
        return value
    return repr(value)


def _key(instance: QuotaInstance) -> Hashable:
    """The quota's name and every dimension (Mixer's makeKey), independent of their order."""
    dims = tuple(sorted((k, _hashable(v)) for k, v in instance.dimensions.items()))
    return (instance.name, dims)


class _Dedup:
    """Answers already given, by deduplication id, kept for 1x to 2x minDeduplicationDuration.

    Mixer kept two maps and, on a ticker of minDeduplicationDuration, dropped the older and
    demoted the newer (dedup.go reapDedup). The same turns happen here on the same grid of
    periods, done by the first call that finds one due rather than by a timer.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.recent: dict[tuple[str, str], tuple[int, float | None]] = {}
        self.old: dict[tuple[str, str], tuple[int, float | None]] = {}
        self._origin: float | None = None
        self._period = 0
        self._next_turn = -math.inf  # when the next period begins: nothing to do before

    def _turn(self, now: float) -> None:
        if self._origin is None:
            self._origin = now
        period = math.floor((now - self._origin) / self.window)
        if period == self._period + 1:
            self.recent, self.old = {}, self.recent
        elif period > self._period + 1:
            self.recent, self.old = {}, {}
        self._period = max(self._period, period)
        self._next_turn = self._origin + (self._period + 1) * self.window

    def get(self, key: tuple[str, str], now: float) -> tuple[int, float | None] | None:
        if now >= self._next_turn:
            self._turn(now)
        found = self.recent.get(key)
        return found if found is not None else self.old.get(key)

    def put(self, key: tuple[str, str], amount: int, expires: float | None) -> None:
        self.recent[key] = (amount, expires)

    def __len__(self) -> int:
        return len(self.recent) + len(self.old)


class MemQuotaHandler(Handler):
    def __init__(self, params: MemQuotaParams, env: Env, clock: Clock = time.monotonic) -> None:
        self.env = env
        self._clock = clock
        self._windows: dict[int, RollingWindow] = {}  # by window length in whole seconds
        self._quotas = {q.name: self._compile(q) for q in params.quotas}
        self._dedup = _Dedup(params.min_deduplication_duration.total_seconds())
        self._cells: dict[Hashable, int] = {}  # allocation counters (validDuration 0)
        self._instances: dict[int, tuple[QuotaInstance, Hashable, _Limit]] = {}

    def _compile(self, q: Quota) -> _CompiledQuota:
        return _CompiledQuota(
            self._limit(q.max_amount, q.valid_duration.total_seconds()),
            tuple(
                (
                    tuple(sorted(o.dimensions.items())),
                    self._limit(o.max_amount, o.valid_duration.total_seconds()),
                )
                for o in q.overrides
            ),
        )

    def _limit(self, max_amount: int, valid_duration: float) -> _Limit:
        window = None
        if valid_duration != 0:
            seconds = math.ceil(valid_duration)
            window = self._windows.get(seconds)
            if window is None:
                window = self._windows[seconds] = RollingWindow(seconds, _TICK, clock=self._clock)
        # Mixer answered a full grant with the validDuration as configured (not rounded).
        return _Limit(max_amount, valid_duration, window, QuotaResult(1, valid_duration))

    @property
    def keys(self) -> int:
        """Keys holding state (counters and windows), for tests and debugging."""
        return len(self._cells) + sum(len(w) for w in self._windows.values())

    async def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        return self.handle_quota_now(instance, args)

    def handle_quota_now(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        """The answer, from memory: the Check path charges a cached decision's quota with
        this, without a coroutine."""
        try:
            return self._handle(instance, args)
        except Exception as e:  # a request must not break the dispatcher; count and answer
            self.env.count_error()
            self.env.logger.exception("memquota: %s failed", instance.name)
            return QuotaResult(0, 0.0, adapter.INTERNAL, f"memquota failed: {e}")

    def _handle(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        # A cached check decision hands in the same instance request after request: its key and
        # limit are worked out once. The entry holds the instance, so its id stays its own.
        known = self._instances.get(id(instance))
        if known is not None and known[0] is instance:
            _, key, lim = known
        else:
            quota = self._quotas.get(instance.name)
            if quota is None:  # validation makes this unreachable for configured instances
                self.env.count_error()
                return QuotaResult(
                    0, 0.0, adapter.NOT_FOUND, f"memquota has no quota named {instance.name!r}"
                )
            lim = quota.limit(instance.dimensions)
            key = _key(instance)
            if len(self._instances) >= _MAX_INSTANCES:
                self._instances.clear()
            self._instances[id(instance)] = (instance, key, lim)
        amount = args.amount
        if amount == 0:
            return QuotaResult(0)
        now = self._clock()
        dedup_id = args.deduplication_id
        if dedup_id:
            dedup_key = (instance.name, dedup_id)
            seen = self._dedup.get(dedup_key, now)
            if seen is not None:  # the same answer, and no second charge (dedup.go)
                granted, expires = seen
                return QuotaResult(granted, max(0.0, expires - now) if expires else 0.0)
        window = lim.window
        if amount > 0 and window is not None:  # a rate limit: what almost every request asks
            granted = window.charge(key, amount, lim.max_amount, now, args.best_effort)
            if granted < amount and not args.best_effort:
                granted, valid = 0, 0.0
            else:
                # Mixer answered a best-effort request with the validDuration even when it
                # granted nothing, and a full grant with it as configured (not rounded).
                valid = lim.valid_duration
        elif amount > 0:
            granted, valid = self._count(key, amount, args.best_effort, lim)
        else:
            granted, valid = self._release(key, -amount, lim, now), 0.0
        if dedup_id:
            self._dedup.put(dedup_key, granted, now + valid if valid else None)
        if granted == 1 and valid == lim.valid_duration:
            return lim.granted_one
        return QuotaResult(granted, valid)

    def _count(
        self, key: Hashable, amount: int, best_effort: bool, lim: _Limit
    ) -> tuple[int, float]:
        """An allocation counter's grant (validDuration 0)."""
        in_use = self._cells.get(key, 0)
        left = max(0, lim.max_amount - in_use)
        if amount > left:
            if not best_effort:
                return 0, 0.0
            amount = left  # grab as much as we can
        if amount:
            self._cells[key] = in_use + amount
        return amount, 0.0

    def _release(self, key: Hashable, amount: int, lim: _Limit, now: float) -> int:
        if lim.window is None:
            in_use = self._cells.get(key, 0)
            if amount >= in_use:
                self._cells.pop(key, None)
                return in_use
            self._cells[key] = in_use - amount
            return amount
        # Releasing a rate limit is racy by nature (it may free a newer window), as Mixer warned.
        assert lim.window is not None
        return lim.window.release(key, amount, now)


def build(
    params: MemQuotaParams, instances: Mapping[str, InstanceSpec], env: Env
) -> MemQuotaHandler:
    return MemQuotaHandler(params, env)
