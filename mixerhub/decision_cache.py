"""Cached check decisions, like Mixer's check cache.

A decision depends only on the calling workload and on the values of the attributes the active
rules and policies reference, so those values are the key. A decision lives at most as long as
its handlers allowed (valid_duration, valid_use_count) and never past the snapshot it was made
under: each snapshot has its own cache, so a policy change can never be answered by a stale allow.
Quotas are not part of what is cached: a decision that allows carries the quota charges its
rules ask for (instances built, as they depend on the same attributes), and each request, served
from the cache or not, makes them; Mixer's client kept its check and quota caches apart too.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mixerhub import adapter

_MISSING = object()
# Values that are their own key (object: the ABSENT marker).
SCALARS = frozenset({str, int, float, bool, bytes, type(None), object})


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int
    message: str
    denied_by: str
    # (operation, name, value) from the matched rules' header operations.
    request_headers: tuple[tuple[str, str, str], ...] = ()
    response_headers: tuple[tuple[str, str, str], ...] = ()
    extra_headers: tuple[tuple[str, str], ...] = ()
    cacheable: bool = True
    valid_duration: float = adapter.DEFAULT_VALID_DURATION
    valid_use_count: int = adapter.DEFAULT_VALID_USE_COUNT
    # Quota charges an allowed request is still to make: made for every request, a cached
    # decision's too (mixerhub.dispatcher.QuotaCharge).
    charges: tuple[Any, ...] = ()

    @property
    def result(self) -> str:
        return "ok" if self.allowed else "denied"

    @classmethod
    def allow(cls) -> Decision:
        return cls(True, adapter.OK, "", "")

    @classmethod
    def deny(
        cls,
        status: int,
        message: str,
        denied_by: str,
        response_headers: Iterable[tuple[str, str, str]] = (),
        *,
        extra_headers: tuple[tuple[str, str], ...] = (),
        cacheable: bool = True,
        valid_duration: float = adapter.DEFAULT_VALID_DURATION,
        valid_use_count: int = adapter.DEFAULT_VALID_USE_COUNT,
    ) -> Decision:
        return cls(
            False,
            status,
            message,
            denied_by,
            (),
            tuple(response_headers),
            extra_headers,
            cacheable,
            valid_duration,
            valid_use_count,
        )


class DecisionCache:
    def __init__(self, capacity: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.clock = clock
        # key -> [decision, expires_at, uses_left]
        self._entries: OrderedDict[Hashable, list[Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(
        self, workload: Hashable, bag: Mapping[str, object], referenced: Iterable[str]
    ) -> Hashable:
        return (workload, *(freeze(bag.get(name, _MISSING)) for name in referenced))

    def get(self, key: Hashable, *, count_miss: bool = True) -> Decision | None:
        """The decision kept for ``key``, one use spent. ``count_miss`` False: a lookup that
        will be made again on a miss (the Check path's fast lane), which counts it then."""
        entry = self._entries.get(key)
        if entry is None:
            if count_miss:
                self.misses += 1
            return None
        decision, expires_at, uses_left = entry
        if expires_at <= self.clock() or uses_left <= 0:
            del self._entries[key]
            if count_miss:
                self.misses += 1
            return None
        entry[2] = uses_left - 1
        self._entries.move_to_end(key)
        self.hits += 1
        result: Decision = decision
        return result

    def put(self, key: Hashable, decision: Decision) -> None:
        if not decision.cacheable or decision.valid_duration <= 0 or decision.valid_use_count <= 0:
            return
        self._entries[key] = [
            decision,
            self.clock() + decision.valid_duration,
            decision.valid_use_count - 1,  # this request was the first use
        ]
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def freeze(value: object) -> Hashable:
    """A hashable stand-in with the same equality: maps and lists become sorted tuples."""
    if value.__class__ in SCALARS:  # most attributes: no ABC checks
        return value
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    if isinstance(value, Hashable):
        return value
    return repr(value)
