"""statsd's params: Mixer's statsd adapter config (mixer/adapter/statsd/config/config.proto).

Defaults are Mixer's (mixer/adapter/metadata/inventory.go, "statsd"): localhost:8125, no prefix,
a flush every 300ms or 512 bytes, every value sent. ``batching`` bounds the queue in front of
the socket (mixerhub.batching); its flush interval is ``flushDuration`` unless given there (the
two may not disagree).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.batching import BatchParams
from mixerhub.types import Duration, Params

from .names import NameTemplate, TemplateError

# The largest payload of one UDP datagram over IPv4.
MAX_DATAGRAM = 65_507
# Mixer sent 512-byte datagrams when flushBytes was 0 or left out.
DEFAULT_FLUSH_BYTES = 512

_METRIC_TYPES = ("COUNTER", "GAUGE", "DISTRIBUTION")


def _metric_type(value: object) -> object:
    # protobuf JSON also spells an enum by its number (COUNTER = 1); 0 is the proto's UNKNOWN.
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 3:
        return _METRIC_TYPES[value - 1]
    return value


MetricType = Annotated[Literal["COUNTER", "GAUGE", "DISTRIBUTION"], BeforeValidator(_metric_type)]


class MetricInfo(Params):
    """How one metric instance is sent."""

    type: MetricType
    # A Go text/template over the instance's dimensions; empty: the instance's full name.
    name_template: str = ""


class StatsdParams(Params):
    address: str = "localhost:8125"
    # Joined to every name with a dot, as Mixer's statsd client did.
    prefix: str = ""
    flush_duration: Duration = datetime.timedelta(milliseconds=300)
    # Maximum datagram size; 0 means Mixer's default, 512.
    flush_bytes: int = Field(default=DEFAULT_FLUSH_BYTES, ge=0, le=MAX_DATAGRAM)
    # The chance that a value is sent; sent values carry `|@rate` so the server scales them up.
    sampling_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    # Instance full name (requestcount.instance.istio-system) -> how to send it.
    metrics: dict[str, MetricInfo] = Field(default_factory=dict)
    # The queue in front of the socket; it is sent every flushDuration unless this says otherwise.
    batching: BatchParams = Field(
        default_factory=lambda: BatchParams(flush_interval=datetime.timedelta(milliseconds=300))
    )


def flush_interval_given(params: StatsdParams) -> bool:
    """Whether the configuration sets ``batching.flushInterval`` itself."""
    return "batching" in params.model_fields_set and (
        "flush_interval" in params.batching.model_fields_set
    )


def validate(params: StatsdParams, instances: Mapping[str, InstanceSpec]) -> Iterable[FieldError]:
    """Mixer's checks (statsd.go Validate and Build), as errors rather than warnings at build."""
    if problem := address_problem(params.address):
        yield FieldError("address", problem)
    if bad := re.search(r"[:|@\s]", params.prefix):
        yield FieldError("prefix", f"{bad.group(0)!r} cannot be part of a StatsD name")
    if params.flush_duration <= datetime.timedelta(0):
        yield FieldError("flushDuration", "flush duration must be > 0")
    if (
        flush_interval_given(params)
        and "flush_duration" in params.model_fields_set
        and params.batching.flush_interval != params.flush_duration
    ):
        yield FieldError(
            "batching.flushInterval",
            "conflicts with flushDuration, which sets the same interval; give only one",
        )
    yield from routing_problems(params.metrics, instances)
    for name, info in params.metrics.items():
        where = f"metrics.{name}"
        spec = instances.get(name)
        try:
            template = NameTemplate.parse(info.name_template)
        except TemplateError as e:
            yield FieldError(f"{where}.nameTemplate", f"cannot parse {info.name_template!r}: {e}")
            continue
        if spec is None:
            continue
        dimensions = spec.map_keys("dimensions")
        for key in dict.fromkeys(template.keys):
            if key not in dimensions:
                yield FieldError(
                    f"{where}.nameTemplate",
                    f"{{{{.{key}}}}} names no dimension of instance {name}; it has: "
                    f"{', '.join(sorted(dimensions)) or 'none'}",
                )
        if problem := value_type_problem(info.type, spec):
            yield FieldError(f"{where}.type", problem)


def routing_problems(
    configured: Mapping[str, object], instances: Mapping[str, InstanceSpec]
) -> Iterable[FieldError]:
    """Every routed instance configured, every configured one routed (dogstatsd.go Validate).

    A handler no rule uses receives no instances: there is nothing to compare then.
    """
    if not instances:
        return
    routed = ", ".join(sorted(instances))
    for name in configured:
        if name not in instances:
            yield FieldError(
                f"metrics.{name}",
                f"not an instance this handler receives (by full name, such as"
                f" requestcount.instance.istio-system); it receives: {routed}",
            )
    for name in sorted(instances):
        if name not in configured:
            yield FieldError(
                "metrics",
                f"instance {name} is sent to this handler but has no entry here",
            )


_ALLOWED: Mapping[str, frozenset[ValueType]] = {
    "COUNTER": frozenset({ValueType.INT64}),
    "GAUGE": frozenset({ValueType.INT64}),
    "DISTRIBUTION": frozenset({ValueType.INT64, ValueType.DURATION}),
}


def value_type_problem(metric_type: str, spec: InstanceSpec) -> str | None:
    """Mixer's value types: counters and gauges INT64, distributions INT64 or DURATION."""
    value = spec.types.get("value")
    if value is None:
        return f"instance {spec.name} sets no value"
    if value is ValueType.VALUE_TYPE_UNSPECIFIED or value in _ALLOWED[metric_type]:
        return None
    if metric_type == "DISTRIBUTION":
        return f"a DISTRIBUTION needs an INT64 or DURATION value; {spec.name}'s is {value.name}"
    return f"a {metric_type} needs an INT64 value; {spec.name}'s is {value.name}"


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (Go's net.SplitHostPort); an empty host is localhost.
    Raises ValueError."""
    if problem := address_problem(address):
        raise ValueError(problem)
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "localhost", int(port)


def address_problem(address: str) -> str | None:
    if not address:
        return "address is empty; expected host:port, such as localhost:8125"
    host, sep, port = address.rpartition(":")
    if not sep:
        return f"missing port in address {address!r}; expected host:port"
    if host.startswith("["):
        if not host.endswith("]") or "[" in host[1:] or "]" in host[:-1]:
            return f"malformed address {address!r}; an IPv6 host is written [::1]:8125"
    elif ":" in host:
        return f"too many colons in address {address!r}; an IPv6 host is written [::1]:8125"
    elif "[" in host or "]" in host:
        return f"malformed address {address!r}"
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        return f"invalid port {port!r} in address {address!r}: 1 to 65535"
    return None
