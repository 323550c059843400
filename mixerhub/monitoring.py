"""The hub's own metrics, exposed on /metrics beside what the Prometheus adapter exports.

One registry per process: handlers built from configuration register their collectors here too
(``Env.registry``), so a scrape of the hub sees both.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_float_text

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

CONFIG_ERRORS = Counter(
    "mixerhub_config_errors",
    "Configuration loads rejected because they had errors (the last good config stays active).",
    registry=REGISTRY,
)
CONFIG_LOADS = Counter(
    "mixerhub_config_loads",
    "Configuration loads attempted, by result.",
    ["result"],
    registry=REGISTRY,
)
# Named after Prometheus's own prometheus_config_last_reload_* gauges, which alerts already use.
CONFIG_LAST_RELOAD_SUCCESSFUL = Gauge(
    "mixerhub_config_last_reload_successful",
    "1 if the last configuration load succeeded, 0 if it was rejected.",
    registry=REGISTRY,
)
CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP = Gauge(
    "mixerhub_config_last_reload_success_timestamp_seconds",
    "When the active configuration was loaded.",
    registry=REGISTRY,
)
ADAPTER_ERRORS = Counter(
    "mixerhub_adapter_errors",
    "Requests an adapter failed to handle (its result was an error or it raised).",
    ["adapter"],
    registry=REGISTRY,
)
ADAPTER_DROPPED = Counter(
    "mixerhub_adapter_dropped",
    "Items an adapter dropped without delivering them, by reason.",
    ["adapter", "reason"],
    registry=REGISTRY,
)
HANDLERS = Gauge(
    "mixerhub_handlers",
    "Handlers built by the active configuration, by adapter.",
    ["adapter"],
    registry=REGISTRY,
)
XDS_CONNECTED_PROXIES = Gauge(
    "mixerhub_xds_connected_proxies",
    "Open ADS streams (state of the world and delta).",
    registry=REGISTRY,
)
XDS_PUSHES = Counter(
    "mixerhub_xds_pushes",
    "xDS responses sent, by type (LDS, RDS, CDS, EDS, SDS).",
    ["type"],
    registry=REGISTRY,
)
XDS_PUSH_SECONDS = Histogram(
    "mixerhub_xds_push_seconds",
    "From a snapshot being set to a response for it being sent on an open stream.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)
XDS_NACKS = Counter(
    "mixerhub_xds_nacks",
    "xDS responses Envoy rejected, by type (LDS, RDS, CDS, EDS, SDS).",
    ["type"],
    registry=REGISTRY,
)


# --- counted on the event loop ------------------------------------------------------------------
#
# prometheus_client's metrics take a lock on every increment, so that threads may share them. The
# Check path runs on the event loop's one thread, where a plain int attribute is several times
# cheaper; a scrape (on another thread, possibly) reads the ints, which the GIL keeps whole. What a
# scrape sees is what prometheus_client's Counter and Histogram expose.


# How prometheus_client writes a bucket's bound (``le``), as Go does: "+Inf", "0.005", "1e+06".
_float_text = cast(Callable[[float], str], _untyped_float_text)


class Count:
    """One label set's count: ``value += 1`` where the increment is hot, ``inc()`` elsewhere."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter counted on the event loop: NAME_total and NAME_created per label set."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> Count:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = Count()
        return child

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in tuple(self._children.items()):  # one step: safe from any thread
            family.add_metric(list(values), child.value, created=child.created)
        yield family


class LoopHistogram(Collector):
    """A histogram observed on the event loop: NAME_bucket{le}, NAME_count, NAME_sum and
    NAME_created, with prometheus_client's bucket rule (the first bound >= the value)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        self._name, self._documentation = name, documentation
        self._bounds = tuple(bounds)
        self._les = tuple(_float_text(b) for b in (*bounds, math.inf))
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, "histogram")
        counts, total = list(self._counts), self.sum
        cumulative = 0
        for le, count in zip(self._les, counts, strict=True):
            cumulative += count
            metric.add_sample(f"{self._name}_bucket", {"le": le}, cumulative)
        metric.add_sample(f"{self._name}_count", {}, cumulative)
        metric.add_sample(f"{self._name}_sum", {}, total)
        metric.add_sample(f"{self._name}_created", {}, self.created)
        yield metric
