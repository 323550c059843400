"""Type aliases and value types shared across the hub."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer
from pydantic.alias_generators import to_camel

# An attribute bag: attribute name -> value. Reading a missing name raises KeyError.
Bag = Mapping[str, object]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> datetime.timedelta:
    """Go's time.ParseDuration syntax ("1m30s", "500ms", "10s"), which Mixer's YAML used; it covers
    protobuf JSON's "1.5s" too. A bare number is seconds. Negative durations are refused."""
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("a duration such as 10s, 500ms or 1m30s")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text in ("0", ""):
            return datetime.timedelta(0)
        pos, seconds = 0, 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                raise ValueError(
                    f"invalid duration {value!r}: a duration such as 10s, 500ms or 1m30s"
                )
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
    else:
        raise ValueError("a duration such as 10s, 500ms or 1m30s")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return datetime.timedelta(seconds=seconds)


def format_duration(value: datetime.timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:g}s"


Duration = Annotated[
    datetime.timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]


def expression_text(value: object) -> object:
    """YAML reads ``match: true`` or ``value: 1`` as a boolean or a number; as expressions they
    are the same literals, so they are taken as their text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return value


# A configuration field that holds an expression (compiled later, against the attribute manifest).
ExpressionText = Annotated[str, BeforeValidator(expression_text)]


class Params(BaseModel):
    """Base for adapter params and config specs.

    Mixer's YAML is protobuf JSON, which accepts a field's camelCase and snake_case spellings
    (Istio's prometheus handler mixes ``label_names`` with ``metricsExpirationPolicy``), so both
    are accepted here. Unknown fields are errors: a typo must not silently turn a feature off.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_defaults=False)
