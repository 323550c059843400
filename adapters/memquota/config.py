"""memquota's params: Mixer's memquota config (mixer/adapter/memquota/config/config.proto)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping

from pydantic import Field, field_validator

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.types import Duration, Params


def _text(value: object) -> object:
    # A YAML scalar such as `code: 200` or `internal: true` means the text a dimension compares
    # against; the proto's map<string, string> has no other reading.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


class Override(Params):
    """A limit for the instances whose dimensions all equal these (by their text)."""

    dimensions: dict[str, str] = Field(default_factory=dict)
    max_amount: int = Field(default=0, ge=0)
    # As in Mixer, an override's own validDuration applies, 0 (a plain counter) when left out.
    valid_duration: Duration = datetime.timedelta(0)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _dimension_text(cls, value: object) -> object:
        if isinstance(value, Mapping):
            return {k: _text(v) for k, v in value.items()}
        return value


class Quota(Params):
    """One quota, named as the instance it serves (``requestcountquota.instance.istio-system``)."""

    name: str = ""
    max_amount: int = Field(default=0, ge=0)
    # 0: an allocation counter, released only by negative amounts; > 0: a rolling window.
    valid_duration: Duration = datetime.timedelta(0)
    # The first override whose dimensions all match wins.
    overrides: list[Override] = Field(default_factory=list)


class MemQuotaParams(Params):
    quotas: list[Quota] = Field(default_factory=list)
    # Mixer's default: a retried request is recognised for at least 1 s.
    min_deduplication_duration: Duration = datetime.timedelta(seconds=1)


def validate(params: MemQuotaParams, instances: Mapping[str, InstanceSpec]) -> Iterable[FieldError]:
    """Mixer's checks (memquota.go Validate and Build) plus names that can never match."""
    if params.min_deduplication_duration <= datetime.timedelta(0):
        yield FieldError(
            "minDeduplicationDuration",
            f"deduplication window of {params.min_deduplication_duration.total_seconds():g}s"
            " is invalid, must be > 0",
        )
    first: dict[str, int] = {}
    for i, q in enumerate(params.quotas):
        if not q.name:
            yield FieldError(f"quotas[{i}].name", "required field is missing")
        elif q.name in first:
            yield FieldError(
                f"quotas[{i}].name",
                f"duplicate quota {q.name!r} (first at quotas[{first[q.name]}])",
            )
        else:
            first[q.name] = i
    # Mixer looked a quota up by the instance's full name and refused to build a handler that
    # would receive an instance without one ("did not find limit defined for quota").
    for name in instances:
        if name not in first:
            yield FieldError(
                "quotas",
                f"did not find limit defined for quota {name}"
                " (a quota's name is the full name of the instance it serves)",
            )
