"""prometheus's handler: metric instances recorded into families exposed on the hub's /metrics.

What each instance does is resolved when the handler is built: per instance name, the families it
feeds, the dimension names in each family's label order and how a duration is scaled. Handling a
batch is then, per instance and metric, a value conversion and a few list stores into its series
(Mixer: COUNTER adds the value, GAUGE sets it, DISTRIBUTION observes it); the series is found by
its label texts once per batch and label set.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixerhub.adapter import Env, ExportResult, Handler, InstanceSpec
from mixerhub.attributes import STRING_LIKE, ValueType, format_value
from mixerhub.templates import MetricInstance

from .config import (
    MetricInfo,
    PrometheusParams,
    bucket_bounds,
    expiry_of,
    full_name,
    validate,
)
from .families import Attachment, Clock, Definition, Family, LabelValues, Series, store_for

_DURATION_SCALE = {"SECONDS": 1.0, "MILLISECONDS": 1000.0}


@dataclass(frozen=True, slots=True)
class _Target:
    """One metric an instance feeds."""

    index: int  # its place among the handler's targets
    record: Callable[[LabelValues, float, float], Series]  # the family's record(labels, value, now)
    update: Callable[[Series, float, float], None]  # the family's update(series, value, now)
    # The label values in the family's label order, as text: raises KeyError for a missing
    # dimension, TypeError or ValueError for a value that has no text.
    labels: Callable[[Mapping[str, Any]], LabelValues]
    duration_scale: float


class PrometheusHandler(Handler):
    def __init__(
        self,
        params: PrometheusParams,
        instances: Mapping[str, InstanceSpec],
        env: Env,
        clock: Clock = time.monotonic,
    ) -> None:
        problems = list(validate(params, instances))
        if problems:  # the hub validates before it builds: this is a caller's mistake
            raise ValueError("; ".join(f"{p.path}: {p.reason}" for p in problems))
        self.env = env
        self._clock = clock
        expiry = expiry_of(params)
        self._owner = Attachment(env.handler, expiry, clock)
        self._store = store_for(env.registry)
        self._families: list[Family] = []
        routes: dict[str, list[_Target]] = {}
        try:
            for i, m in enumerate(params.metrics):
                try:
                    family = self._store.attach(_definition(m), self._owner)
                except ValueError as e:  # the client library's DuplicateTimeseries
                    raise ValueError(
                        f"metrics[{i}]: {full_name(m)} clashes with a metric the hub already"
                        f" exposes: {e}"
                    ) from e
                self._families.append(family)
                target = _Target(
                    i,
                    family.record,
                    family.update,
                    _label_getter(
                        family.label_names,
                        _not_strings(instances.get(m.instance_name), family.label_names),
                    ),
                    _DURATION_SCALE[m.duration_unit],
                )
                routes.setdefault(m.instance_name, []).append(target)
        except BaseException:
            self._detach()
            raise
        self._routes = {name: tuple(targets) for name, targets in routes.items()}
        self._width = len(params.metrics)
        self._sweep_interval = expiry.interval if expiry else math.inf
        self._next_sweep = clock() + self._sweep_interval

    def handle_metric(self, instances: Sequence[MetricInstance]) -> ExportResult:
        now = self._clock()
        routes = self._routes
        failed = 0
        first_error = ""
        # The series each target records into, found once per batch and label set: entries
        # with the same label values share one dimensions map (the generated access-log dispatch
        # makes one per distinct values in a message, and Istio's four HTTP metrics share it),
        # so a record does not hash the label values again. Keyed by the map's id: the batch
        # holds every map, so no id is reused. A series found here was just updated at ``now``,
        # the batch's one time, so expiry cannot remove it while the batch runs (unless the
        # batch outlasts metricsExpiryDuration); new series are still made by ``record`` alone.
        found: dict[int, list[Series | None]] = {}
        width = self._width
        row: list[Series | None] = []
        row_dimensions: object = None
        # Metrics with the same labels share their getter: the label values of a label set are
        # read once per run of it.
        last_dimensions: object = None
        last_getter: object = None
        labels: LabelValues = ()
        for instance in instances:
            targets = routes.get(instance.name)
            if targets is None:
                failed += 1
                first_error = first_error or f"no metric is configured for {instance.name}"
                continue
            dimensions = instance.dimensions
            if dimensions is not row_dimensions:
                row = found.get(id(dimensions)) or found.setdefault(id(dimensions), [None] * width)
                row_dimensions = dimensions
            for target in targets:
                try:
                    value = instance.value
                    if type(value) is not int and type(value) is not float:
                        value = _number(value, target.duration_scale)
                    series = row[target.index]
                    if series is not None:
                        target.update(series, value, now)
                        continue
                    getter = target.labels
                    if dimensions is not last_dimensions or getter is not last_getter:
                        last_dimensions, last_getter = None, None  # until it has succeeded
                        labels = getter(dimensions)
                        last_dimensions, last_getter = dimensions, getter
                    row[target.index] = target.record(labels, value, now)
                except (KeyError, TypeError, ValueError, OverflowError) as e:
                    failed += 1
                    first_error = first_error or f"{instance.name}: {_reason(e)}"
        if now >= self._next_sweep:
            self._sweep(now)
        if failed:
            self.env.count_error(failed)
            self.env.logger.debug("%d metric values skipped; first: %s", failed, first_error)
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def _sweep(self, now: float) -> None:
        # Mixer's TTL cache checked on a timer; here the check rides on the batches (and on
        # scrapes, in Family.collect), so an idle hub does no work for it.
        self._next_sweep = now + self._sweep_interval
        for family in self._families:
            family.sweep(now)

    def _detach(self) -> None:
        families, self._families = self._families, []
        for family in families:
            self._store.detach(family, self._owner)

    async def close(self) -> None:
        # A batch still in flight may arrive after this; it records into families that other
        # handlers may still hold, which is where it belongs.
        self._detach()


def build(
    params: PrometheusParams, instances: Mapping[str, InstanceSpec], env: Env
) -> PrometheusHandler:
    return PrometheusHandler(params, instances, env)


def _definition(m: MetricInfo) -> Definition:
    name = full_name(m)
    bounds = bucket_bounds(m) if m.kind == "DISTRIBUTION" else ()
    # Mixer's help text when the metric has no description: its name as configured.
    help_text = m.description or m.name or m.instance_name
    return Definition(name, m.kind, tuple(m.label_names), bounds, help_text)


@functools.lru_cache(maxsize=1024)
def _label_getter(
    names: tuple[str, ...], convert: tuple[int, ...]
) -> Callable[[Mapping[str, Any]], LabelValues]:
    """A generated function: the dimensions in label order as one tuple display, with only the
    dimensions that may not be strings passed through label_text (a string is its own text).
    One call per instance and metric, where a generic loop cost a call per label. Metrics with
    the same labels share one."""
    metric = ",".join(names)[:80]
    items = []
    for i, name in enumerate(names):
        item = f"d[{name!r}]"
        items.append(f"_text({item})" if i in convert else item)
    source = f"def labels(d):\n    return ({', '.join(items)}{',' if len(items) == 1 else ''})\n"
    namespace: dict[str, Any] = {"_text": _text}
    exec(compile(source, f"<prometheus labels {metric}>", "exec"), namespace)
    function: Callable[[Mapping[str, Any]], LabelValues] = namespace["labels"]
    return function


def _text(value: object) -> str:
    return value if type(value) is str else label_text(value)


def _not_strings(spec: InstanceSpec | None, dimensions: tuple[str, ...]) -> tuple[int, ...]:
    types = spec.types if spec is not None else {}
    return tuple(
        i
        for i, d in enumerate(dimensions)
        if types.get(f"dimensions.{d}", ValueType.VALUE_TYPE_UNSPECIFIED) not in STRING_LIKE
    )


def _number(value: object, duration_scale: float) -> float:
    """Mixer's promValue: numbers, durations (in seconds, or as the metric's durationUnit says)
    and numeric text. Booleans count as 1 and 0 (Mixer refused them)."""
    if type(value) is datetime.timedelta:  # Istio's request duration: the common case
        return value.total_seconds() * duration_scale
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds() * duration_scale
    if isinstance(value, str):
        return float(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not a number")


def label_text(value: object) -> str:
    """A dimension value as a label value, as Mixer's adapter.Stringify wrote it: "" for none,
    true/false, numbers without exponent, maps as k=v&k=v; durations, timestamps and IPs as the
    hub prints them everywhere (format_value)."""
    if type(value) is int:  # the common case: response_code
        return str(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, Mapping):
        return "&".join(f"{k}={label_text(v)}" for k, v in sorted(value.items()))
    text = format_value(value)
    return text if isinstance(text, str) else str(text)


def _float_text(value: float) -> str:
    # Go's strconv.FormatFloat(v, 'f', -1, 64): the shortest digits, never an exponent.
    if not math.isfinite(value):
        return "NaN" if value != value else ("+Inf" if value > 0 else "-Inf")
    text = format(decimal.Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"dimension {e.args[0]!r} is missing"
    return str(e)
