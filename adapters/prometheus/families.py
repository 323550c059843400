"""Metric families and the process-wide store that exposes them on a registry across reloads.

A reload builds the new handler while the old one is still open (and an unchanged handler is
reused as it is), so a metric cannot belong to one handler: registering it again would raise
"Duplicated timeseries", and dropping it would reset every counter on each reload. Instead, one
``FamilyStore`` per ``CollectorRegistry`` keeps the families; handlers attach to them when built
and detach when closed:

* a handler whose metric has the same name, kind, label names and buckets as a live family
  attaches to that family, so its series carry on and the registry is not touched;
* a changed definition makes a new family, exposed in place of every family it shares a series
  name with (Mixer: "Metric redefined"); those live on, unexposed, while their handlers are open,
  and the newest of them is exposed again should the new one go first (a rejected configuration
  closes what it built);
* a family goes when the last handler detaches, and its names leave the registry with it.

Each exposed family is one collector on the registry; its ``describe`` lets the registry refuse a
name that something else (the hub's own metrics) already exposes.

Series are plain lists in a dict keyed by label values: an update is a dict lookup and a few list
stores, far cheaper than the client library's locks and validation. The last element of each is
when it was last updated, for the expiration policy.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .config import Expiry, Kind, exposed_names, family_name

log = logging.getLogger("mixerhub.adapter.prometheus")

Clock = Callable[[], float]
LabelValues = tuple[str, ...]
Series = list[Any]  # the kind's values, then when the series was last updated

_INF = math.inf


@dataclass(frozen=True, slots=True)
class Definition:
    """What a metric is. ``name`` is its full name as configured (``istio_requests_total``)."""

    name: str
    kind: Kind
    label_names: tuple[str, ...]
    bounds: tuple[float, ...] = ()
    help: str = ""

    @property
    def identity(self) -> tuple[str, Kind, frozenset[str], tuple[float, ...]]:
        """Equal identities are one metric; the help text and label order do not matter, and
        counters ``requests`` and ``requests_total`` are both istio_requests_total."""
        return (
            family_name(self.kind, self.name),
            self.kind,
            frozenset(self.label_names),
            self.bounds,
        )

    @property
    def names(self) -> frozenset[str]:
        return exposed_names(self.kind, self.name)


@dataclass(eq=False, slots=True)
class Attachment:
    """One handler's hold on families: its name (for logs), expiration policy and clock."""

    handler: str
    expiry: Expiry | None
    clock: Clock = time.monotonic


class Family:
    """A metric and its series. ``record(labels, value, now)`` is the hot path; it may raise
    ValueError or TypeError for a value the metric cannot take."""

    kind: ClassVar[Kind]

    def __init__(self, definition: Definition) -> None:
        self.definition = definition
        self.name = definition.name
        self.label_names = definition.label_names
        self.help = definition.help
        self.series: dict[LabelValues, Series] = {}
        self.owners: list[Attachment] = []
        self._next_sweep = -_INF

    def record(self, labels: LabelValues, value: float, now: float) -> Series:
        """Adds, sets or observes ``value`` in the series of ``labels``, created if need be;
        returns that series, which ``update`` takes while it stays in ``series``."""
        raise NotImplementedError

    def update(self, s: Series, value: float, now: float) -> None:
        """``record`` into a series it returned, without looking the series up again."""
        raise NotImplementedError

    def metric(self) -> Metric:
        """The family as the client library's Metric, with a sample per live series."""
        raise NotImplementedError

    # The registry's collector protocol: each family is registered on its own while exposed.
    def describe(self) -> list[Metric]:
        return [self._empty()]

    def _empty(self) -> Metric:
        raise NotImplementedError

    def collect(self) -> list[Metric]:
        if self.owners:
            self.sweep(self.owners[-1].clock())
        return [self.metric()]

    def sweep(self, now: float) -> None:
        """Remove the series not updated for the newest owner's expiry, if a check is due."""
        expiry = self.owners[-1].expiry if self.owners else None
        if expiry is None or now < self._next_sweep:
            return
        self._next_sweep = now + expiry.interval
        cutoff = now - expiry.ttl
        stale = [k for k, s in list(self.series.items()) if s[-1] < cutoff]
        for k in stale:
            self.series.pop(k, None)

    def _items(self) -> list[tuple[LabelValues, list[Any]]]:
        # A copy: a scrape on another thread must not see the dict change size under it.
        return list(self.series.items())


class CounterFamily(Family):
    kind = "COUNTER"

    def record(self, labels: LabelValues, value: float, now: float) -> Series:
        # Prometheus counters only go up (the Go client panicked on a negative Add).
        if not 0 <= value < _INF:
            raise ValueError(f"a counter cannot add {value}")
        s = self.series.get(labels)
        if s is None:
            s = self.series[_checked(labels)] = [float(value), now]
        else:
            s[0] += value
            s[1] = now
        return s

    def update(self, s: Series, value: float, now: float) -> None:
        if not 0 <= value < _INF:
            raise ValueError(f"a counter cannot add {value}")
        s[0] += value
        s[1] = now

    def _empty(self) -> Metric:
        return CounterMetricFamily(self.name, self.help, labels=self.label_names)

    def metric(self) -> Metric:
        m = CounterMetricFamily(self.name, self.help, labels=self.label_names)
        for labels, s in self._items():
            m.add_metric(labels, s[0])
        return m


class GaugeFamily(Family):
    kind = "GAUGE"

    def record(self, labels: LabelValues, value: float, now: float) -> Series:
        if value != value:
            raise ValueError("a gauge cannot be set to NaN")
        s = self.series.get(labels)
        if s is None:
            s = self.series[_checked(labels)] = [value, now]
        else:
            s[0] = value
            s[1] = now
        return s

    def update(self, s: Series, value: float, now: float) -> None:
        if value != value:
            raise ValueError("a gauge cannot be set to NaN")
        s[0] = value
        s[1] = now

    def _empty(self) -> Metric:
        return GaugeMetricFamily(self.name, self.help, labels=self.label_names)

    def metric(self) -> Metric:
        m = GaugeMetricFamily(self.name, self.help, labels=self.label_names)
        for labels, s in self._items():
            m.add_metric(labels, s[0])
        return m


class HistogramFamily(Family):
    """Series are [count per bucket (the last one +Inf)..., sum, updated]."""

    kind = "DISTRIBUTION"

    def __init__(self, definition: Definition) -> None:
        super().__init__(definition)
        self._bounds = list(definition.bounds)
        self._size = len(self._bounds) + 1
        # The ``le`` texts the client library's own Histogram writes ("0.005", "10.0", "1e+08").
        self._le: list[str] = [*(_le_text(b) for b in definition.bounds), "+Inf"]

    def record(self, labels: LabelValues, value: float, now: float) -> Series:
        if value != value:
            raise ValueError("a histogram cannot observe NaN")
        s = self.series.get(labels)
        if s is None:
            s = self.series[_checked(labels)] = [0] * self._size + [0.0, now]
        # bisect_left: the first bound >= value, since a bucket counts values <= its bound (le).
        s[bisect.bisect_left(self._bounds, value)] += 1
        s[-2] += value
        s[-1] = now
        return s

    def update(self, s: Series, value: float, now: float) -> None:
        if value != value:
            raise ValueError("a histogram cannot observe NaN")
        s[bisect.bisect_left(self._bounds, value)] += 1
        s[-2] += value
        s[-1] = now

    def _empty(self) -> Metric:
        return HistogramMetricFamily(self.name, self.help, labels=self.label_names)

    def metric(self) -> Metric:
        m = HistogramMetricFamily(self.name, self.help, labels=self.label_names)
        size = self._size
        for labels, s in self._items():
            cumulative, buckets = 0, []
            for le, n in zip(self._le, s[:size], strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            m.add_metric(labels, buckets, s[size])
        return m


def _checked(labels: LabelValues) -> LabelValues:
    # Label values are texts; one that is not (a dimension typed STRING that was not one at run
    # time) would break every later scrape, so it is refused when its series would be created.
    for v in labels:
        if type(v) is not str:
            raise TypeError(f"label value {v!r} is not text")
    return labels


def _le_text(bound: float) -> str:
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


_KINDS: dict[str, type[Family]] = {
    "COUNTER": CounterFamily,
    "GAUGE": GaugeFamily,
    "DISTRIBUTION": HistogramFamily,
}


class FamilyStore:
    """The families exposed on one registry, shared by every prometheus handler using it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = weakref.ref(registry)
        self._live: list[Family] = []  # every family some handler holds; the newest last
        self._exposed: set[Family] = set()  # those registered (no two share a series name)
        self._lock = threading.Lock()

    def attach(self, definition: Definition, owner: Attachment) -> Family:
        """The family for this definition, found or created, exposed; ``owner`` now holds it.

        Raises ValueError (the client library's DuplicateTimeseries) when one of its names is
        taken on the registry by something other than this store; nothing changes then."""
        registry = self._registry()
        assert registry is not None, "a handler outlived the registry it was built for"
        with self._lock:
            before = list(self._live)
            family = next((f for f in before if f.definition.identity == definition.identity), None)
            if family is None:
                family = _KINDS[definition.kind](definition)
            else:
                self._live.remove(family)
            self._live.append(family)
            try:
                self._expose(registry, family, owner)
            except ValueError:
                self._live[:] = before
                raise
            family.help = definition.help
            family.owners.append(owner)
            return family

    def detach(self, family: Family, owner: Attachment) -> None:
        """``owner`` lets go of ``family``; the last owner to go removes it, and the newest of
        the families it shadowed is exposed again."""
        with self._lock:
            if owner in family.owners:
                family.owners.remove(owner)
            if family.owners or family not in self._live:
                return
            self._live.remove(family)
            registry = self._registry()
            if family not in self._exposed or registry is None:
                return
            self._exposed.discard(family)
            registry.unregister(family)
            for shadowed in reversed(self._live):
                if shadowed in self._exposed or self._clashes(shadowed):
                    continue
                try:
                    registry.register(shadowed)
                except ValueError:  # taken meanwhile by another collector: stays unexposed
                    log.exception("metric %s cannot be exposed again", shadowed.name)
                    continue
                self._exposed.add(shadowed)

    def _expose(self, registry: CollectorRegistry, family: Family, owner: Attachment) -> None:
        if family in self._exposed:
            return  # the same metric as before: the registry is left alone
        shadowed = self._clashes(family)
        for f in shadowed:
            registry.unregister(f)
            self._exposed.discard(f)
        try:
            registry.register(family)
        except ValueError:
            for f in shadowed:
                registry.register(f)
                self._exposed.add(f)
            raise
        self._exposed.add(family)
        if shadowed:
            others = sorted({o.handler for f in shadowed for o in f.owners} - {owner.handler})
            log.warning(
                "metric %s redefined by %s; its series start again%s",
                family.name,
                owner.handler,
                f" (still defined differently by {', '.join(others)})" if others else "",
            )

    def _clashes(self, family: Family) -> list[Family]:
        names = family.definition.names
        return [f for f in self._exposed if f is not family and f.definition.names & names]

    def exposed(self) -> list[Family]:
        """The families on the registry now (for tests and debugging)."""
        with self._lock:
            return [f for f in self._live if f in self._exposed]


_STORES: weakref.WeakKeyDictionary[CollectorRegistry, FamilyStore] = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def store_for(registry: CollectorRegistry) -> FamilyStore:
    """The process-wide store of the families exposed on ``registry``."""
    with _STORES_LOCK:
        store = _STORES.get(registry)
        if store is None:
            store = _STORES[registry] = FamilyStore(registry)
        return store
