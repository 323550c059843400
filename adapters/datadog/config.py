"""dogstatsd's params: Mixer's Datadog adapter config (mixer/adapter/dogstatsd/config/config.proto).

Defaults are Mixer's (mixer/adapter/metadata/inventory.go, "dogstatsd"; the proto's comments):
localhost:8125, the prefix ``istio.``, every value sent. ``batching`` bounds the queue in front of
the client; it flushes every 100ms by default, as Mixer's buffered client (datadog-go) did.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping

from pydantic import Field, field_validator

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.batching import BatchParams
from mixerhub.types import Params

from ..statsd.config import MetricType, address_problem, routing_problems, value_type_problem
from ..statsd.names import dimension_text

# Characters that end a DogStatsD metric name; tags are escaped by the client itself.
_RESERVED = re.compile(r"[:|@#,\s]")


def _tag_text(value: object) -> object:
    # map<string, string> in the proto: a YAML `version: 1` or `canary: true` means its text.
    if isinstance(value, Mapping):
        return {str(k): v if isinstance(v, str) else dimension_text(v) for k, v in value.items()}
    return value


class MetricInfo(Params):
    """How one metric instance is sent to Datadog."""

    name: str
    type: MetricType
    # Tags added to the instance's dimensions; a dimension of the same name wins.
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_as_text(cls, value: object) -> object:
        return _tag_text(value)


class DogStatsdParams(Params):
    address: str = "localhost:8125"
    # Put before every name; a dot is added when it does not end with one (as Mixer did).
    prefix: str = "istio."
    # At most this many metrics per datagram. 0: as many as fit in the client's UDP payload
    # (Mixer then sent one datagram per metric; a datagram per metric only costs syscalls).
    buffer_length: int = Field(default=0, ge=0)
    global_tags: dict[str, str] = Field(default_factory=dict)
    # The proto documents 1 as the default (Mixer's inventory left it 0, which sends nothing).
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    # Instance full name (requestcount.instance.istio-system) -> how to send it.
    metrics: dict[str, MetricInfo] = Field(default_factory=dict)
    batching: BatchParams = Field(
        default_factory=lambda: BatchParams(flush_interval=datetime.timedelta(milliseconds=100))
    )

    @field_validator("global_tags", mode="before")
    @classmethod
    def _tags_as_text(cls, value: object) -> object:
        return _tag_text(value)


def validate(
    params: DogStatsdParams, instances: Mapping[str, InstanceSpec]
) -> Iterable[FieldError]:
    """Mixer's checks (dogstatsd.go Validate), each with its field."""
    if problem := address_problem(params.address):
        yield FieldError("address", problem)
    if bad := _RESERVED.search(params.prefix):
        yield FieldError("prefix", f"{bad.group(0)!r} cannot be part of a metric name")
    yield from routing_problems(params.metrics, instances)
    for name, info in params.metrics.items():
        where = f"metrics.{name}"
        if not info.name:
            yield FieldError(f"{where}.name", "the metric's name in Datadog is required")
        elif bad := _RESERVED.search(info.name):
            yield FieldError(f"{where}.name", f"{bad.group(0)!r} cannot be part of a metric name")
        spec = instances.get(name)
        if spec is not None and (problem := value_type_problem(info.type, spec)):
            yield FieldError(f"{where}.type", problem)
