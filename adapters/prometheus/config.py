"""prometheus's params: Mixer's prometheus adapter config
(mixer/adapter/prometheus/config/config.proto), the names and buckets it derives from them, and
the checks Mixer and Prometheus made.

Mixer's behaviour followed here (istio/istio release-1.4, mixer/adapter/prometheus/prometheus.go):
a metric's name defaults to its instance_name; namespace and name are made Prometheus-safe by
dropping a leading ``/``, turning ``/ . space`` into ``_`` and dropping ``-`` (safeName); linear and
exponential buckets have ``numFiniteBuckets + 1`` bounds; a DISTRIBUTION without buckets gets the
Prometheus client's default buckets; the help text defaults to the name; a metrics expiry duration
must be > 0 and the check interval defaults to half of it.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.types import Duration, Params

Kind = Literal["UNSPECIFIED", "GAUGE", "COUNTER", "DISTRIBUTION"]
DurationUnit = Literal["SECONDS", "MILLISECONDS"]

DEFAULT_NAMESPACE = "istio"
# The Prometheus client's DefBuckets: what Mixer gave a DISTRIBUTION with no buckets.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Not Mixer's: a bound on linear and exponential buckets, so a typo cannot make the hub build
# (and expose, per label set) millions of buckets.
MAX_FINITE_BUCKETS = 10_000

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SAFE = str.maketrans({"/": "_", ".": "_", " ": "_", "-": None})
# Values that can never be read as a number (Mixer's promValue took numbers, durations, strings).
_NOT_NUMBERS = frozenset({ValueType.TIMESTAMP, ValueType.IP_ADDRESS, ValueType.STRING_MAP})


class LinearBuckets(Params):
    num_finite_buckets: int = 0
    width: float = 0.0
    offset: float = 0.0


class ExponentialBuckets(Params):
    num_finite_buckets: int = 0
    growth_factor: float = 0.0
    scale: float = 0.0


class ExplicitBuckets(Params):
    bounds: list[float] = Field(default_factory=list)


class BucketsDefinition(Params):
    """A oneof in the proto: exactly one of the three."""

    linear_buckets: LinearBuckets | None = None
    exponential_buckets: ExponentialBuckets | None = None
    explicit_buckets: ExplicitBuckets | None = None


class MetricInfo(Params):
    namespace: str = DEFAULT_NAMESPACE
    name: str = ""
    instance_name: str = ""
    description: str = ""
    kind: Kind = "UNSPECIFIED"
    buckets: BucketsDefinition | None = None
    label_names: list[str] = Field(default_factory=list)
    # Not in Mixer: what a duration value is recorded as. Mixer recorded seconds (promValue);
    # Istio's later istio_request_duration_milliseconds needs milliseconds from response.duration.
    duration_unit: DurationUnit = "SECONDS"


class MetricsExpirationPolicy(Params):
    metrics_expiry_duration: Duration = datetime.timedelta(0)
    # 0: half of metrics_expiry_duration, as in Mixer.
    expiry_check_interval_duration: Duration = datetime.timedelta(0)


class PrometheusParams(Params):
    metrics: list[MetricInfo] = Field(default_factory=list)
    metrics_expiration_policy: MetricsExpirationPolicy | None = None


def safe_name(text: str) -> str:
    """Mixer's safeName: a leading "/" dropped, "/", "." and " " to "_", "-" dropped."""
    return text.removeprefix("/").translate(_SAFE)


def full_name(m: MetricInfo) -> str:
    """``istio_requests_total``: the namespace ("istio" when empty) and the name, or the instance
    name when the metric has none, joined as Prometheus's BuildFQName joins them."""
    namespace = safe_name(m.namespace) if m.namespace else DEFAULT_NAMESPACE
    name = safe_name(m.name or m.instance_name)
    return "_".join(part for part in (namespace, name) if part) if name else ""


def family_name(kind: Kind, name: str) -> str:
    """The metric family's name as the Python Prometheus client exposes it: a counter's family
    has no ``_total`` (its sample gets one), so counters ``requests`` and ``requests_total`` are
    one metric."""
    return name.removesuffix("_total") if kind == "COUNTER" else name


def exposed_names(kind: Kind, name: str) -> frozenset[str]:
    """Every name the metric claims on a registry (what CollectorRegistry checks for clashes)."""
    family = family_name(kind, name)
    suffixes = {
        "COUNTER": ("", "_total", "_created"),
        "DISTRIBUTION": ("", "_bucket", "_sum", "_count", "_created"),
    }.get(kind, ("",))
    return frozenset(family + s for s in suffixes)


def bucket_bounds(m: MetricInfo) -> tuple[float, ...]:
    """The finite upper bounds of a DISTRIBUTION's buckets (the +Inf bucket is implied).

    Built by repeated addition and multiplication, as the Go client's LinearBuckets and
    ExponentialBuckets did, so the ``le`` labels are the same numbers Mixer exposed."""
    b = m.buckets
    if b is None:
        return DEFAULT_BUCKETS
    if b.explicit_buckets is not None:
        return tuple(float(x) for x in b.explicit_buckets.bounds)
    out: list[float] = []
    if b.linear_buckets is not None:
        lin = b.linear_buckets
        at = lin.offset
        for _ in range(lin.num_finite_buckets + 1):
            out.append(at)
            at += lin.width
    elif b.exponential_buckets is not None:
        exp = b.exponential_buckets
        at = exp.scale
        for _ in range(exp.num_finite_buckets + 1):
            out.append(at)
            at *= exp.growth_factor
    return tuple(out) if out else DEFAULT_BUCKETS


@dataclass(frozen=True, slots=True)
class Expiry:
    """A label set not updated for ``ttl`` seconds is removed; checked every ``interval``."""

    ttl: float
    interval: float


def expiry_of(params: PrometheusParams) -> Expiry | None:
    policy = params.metrics_expiration_policy
    if policy is None:
        return None
    ttl = policy.metrics_expiry_duration.total_seconds()
    interval = policy.expiry_check_interval_duration.total_seconds() or ttl / 2
    return Expiry(ttl, interval)


def validate(
    params: PrometheusParams, instances: Mapping[str, InstanceSpec]
) -> Iterator[FieldError]:
    """Mixer's checks and the Prometheus client's, every error keyed by its field path.

    ``instances`` are those the rules route to this handler; with none, the handler is unused
    (Mixer did not build it), so only the params themselves are checked."""
    policy = params.metrics_expiration_policy
    if policy is not None and policy.metrics_expiry_duration <= datetime.timedelta(0):
        yield FieldError(
            "metricsExpirationPolicy.metricsExpiryDuration",
            f"metricsExpiryDuration {policy.metrics_expiry_duration.total_seconds():g}s is"
            " invalid, must be > 0",
        )
    # family name -> (index, kind, label set, bounds) of its first definition
    defined: dict[str, tuple[int, Kind, frozenset[str], tuple[float, ...]]] = {}
    claimed: dict[str, int] = {}  # exposed name -> index of the metric that exposes it
    for i, m in enumerate(params.metrics):
        path = f"metrics[{i}]"
        errors = list(_check_metric(m, path, instances))
        yield from errors
        name = full_name(m)
        if errors or not name:
            continue
        family = family_name(m.kind, name)
        shape = (m.kind, frozenset(m.label_names), _bounds(m))
        first = defined.get(family)
        if first is not None:
            j, *first_shape = first
            if tuple(first_shape) != shape:
                what = [
                    w
                    for w, a, b in zip(
                        ("kind", "labels", "buckets"), first_shape, shape, strict=True
                    )
                    if a != b
                ]
                yield FieldError(
                    path,
                    f"metric {name} is already defined by metrics[{j}] with different"
                    f" {' and '.join(what)}; one name is one metric",
                )
            continue
        defined[family] = (i, *shape)
        clashes = sorted({claimed[n] for n in exposed_names(m.kind, name) if n in claimed})
        if clashes:
            yield FieldError(
                f"{path}.name",
                f"metric {name} exposes a series name that metrics[{clashes[0]}] exposes too",
            )
            continue
        claimed.update(dict.fromkeys(exposed_names(m.kind, name), i))


def _bounds(m: MetricInfo) -> tuple[float, ...]:
    return bucket_bounds(m) if m.kind == "DISTRIBUTION" else ()


def _check_metric(
    m: MetricInfo, path: str, instances: Mapping[str, InstanceSpec]
) -> Iterator[FieldError]:
    if m.kind == "UNSPECIFIED":
        yield FieldError(f"{path}.kind", "kind must be GAUGE, COUNTER or DISTRIBUTION")
    yield from _check_instance(m, path, instances)
    name = full_name(m)
    if not _METRIC_NAME.fullmatch(name):
        field = "name" if m.name else "instanceName"
        yield FieldError(
            f"{path}.{field}",
            f"{name!r} is not a valid Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)",
        )
    seen: set[str] = set()
    for j, label in enumerate(m.label_names):
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
            yield FieldError(
                f"{path}.labelNames[{j}]",
                f"{label!r} is not a valid Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*,"
                " not starting with __)",
            )
        elif label in seen:
            yield FieldError(f"{path}.labelNames[{j}]", f"label {label!r} is listed twice")
        elif label == "le" and m.kind == "DISTRIBUTION":
            yield FieldError(
                f"{path}.labelNames[{j}]", "'le' is reserved for a histogram's bucket bounds"
            )
        seen.add(label)
    if m.kind == "DISTRIBUTION" and m.buckets is not None:
        yield from _check_buckets(m.buckets, f"{path}.buckets")


def _check_instance(
    m: MetricInfo, path: str, instances: Mapping[str, InstanceSpec]
) -> Iterator[FieldError]:
    if not m.instance_name:
        yield FieldError(
            f"{path}.instanceName",
            "required: the full name of the metric instance to record, such as"
            " requestcount.instance.istio-system",
        )
        return
    if not instances:
        return
    spec = instances.get(m.instance_name)
    if spec is None:
        yield FieldError(
            f"{path}.instanceName",
            f"no instance named {m.instance_name!r} is routed to this handler;"
            f" routed: {', '.join(sorted(instances))}",
        )
        return
    value_type = spec.types.get("value")
    if value_type is not None and value_type in _NOT_NUMBERS:
        yield FieldError(
            f"{path}.instanceName",
            f"the value of instance {m.instance_name} is {value_type.name}; a metric value must be"
            " a number, a boolean or a duration",
        )
    # Mixer's rule: the label names are the instance's dimensions, no more and no fewer.
    dimensions = set(spec.map_keys("dimensions"))
    labels = set(m.label_names)
    if labels != dimensions:
        problems = []
        if missing := sorted(dimensions - labels):
            problems.append(f"missing {', '.join(missing)}")
        if extra := sorted(labels - dimensions):
            problems.append(f"not dimensions of the instance: {', '.join(extra)}")
        yield FieldError(
            f"{path}.labelNames",
            f"label names must be exactly the dimensions of instance {m.instance_name}: "
            + "; ".join(problems),
        )


def _check_buckets(b: BucketsDefinition, path: str) -> Iterator[FieldError]:
    chosen = [
        name
        for name, value in (
            ("linearBuckets", b.linear_buckets),
            ("exponentialBuckets", b.exponential_buckets),
            ("explicitBuckets", b.explicit_buckets),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        yield FieldError(
            path,
            "set exactly one of linearBuckets, exponentialBuckets and explicitBuckets"
            + (f"; found {', '.join(chosen)}" if chosen else ""),
        )
        return
    if b.linear_buckets is not None:
        lin, at = b.linear_buckets, f"{path}.linearBuckets"
        yield from _check_count(lin.num_finite_buckets, at)
        if not lin.width > 0:
            yield FieldError(f"{at}.width", "must be greater than 0")
        if not math.isfinite(lin.offset):
            yield FieldError(f"{at}.offset", "must be a finite number")
    elif b.exponential_buckets is not None:
        exp, at = b.exponential_buckets, f"{path}.exponentialBuckets"
        yield from _check_count(exp.num_finite_buckets, at)
        if not exp.growth_factor > 1:
            yield FieldError(f"{at}.growthFactor", "must be greater than 1")
        if not exp.scale > 0:
            yield FieldError(f"{at}.scale", "must be greater than 0")
    elif b.explicit_buckets is not None:
        yield from _check_bounds(b.explicit_buckets.bounds, f"{path}.explicitBuckets.bounds")
        return
    counted = b.linear_buckets or b.exponential_buckets
    if counted is not None and 0 < counted.num_finite_buckets <= MAX_FINITE_BUCKETS:
        # A large count or factor can overflow to infinity; the bounds must stay finite numbers.
        bounds = bucket_bounds(MetricInfo(kind="DISTRIBUTION", buckets=b))
        if not _all_finite(bounds):
            yield FieldError(path, "the bucket bounds grow past the largest number")


def _check_count(count: int, path: str) -> Iterator[FieldError]:
    if count <= 0:
        yield FieldError(f"{path}.numFiniteBuckets", "must be greater than 0")
    elif count > MAX_FINITE_BUCKETS:
        yield FieldError(f"{path}.numFiniteBuckets", f"must be at most {MAX_FINITE_BUCKETS}")


def _check_bounds(bounds: Iterable[float], path: str) -> Iterator[FieldError]:
    previous: float | None = None
    count = 0
    for k, bound in enumerate(bounds):
        count += 1
        if not math.isfinite(bound):
            yield FieldError(f"{path}[{k}]", f"{bound} is not a finite number")
            return
        if previous is not None and bound <= previous:
            yield FieldError(
                f"{path}[{k}]",
                f"bounds must increase: {bound:g} follows {previous:g}",
            )
            return
        previous = bound
    if count == 0:
        yield FieldError(path, "needs at least one bound")


def _all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)
