"""Attributes: Mixer's typed name/value vocabulary describing one request or connection.

The value types are those of istio.policy.v1beta1.ValueType. At run time an attribute bag is any
``Mapping[str, object]``; a missing name raises ``KeyError``. Each type's Python value:

===============  =========================================
STRING           str
INT64            int
DOUBLE           float
BOOL             bool
TIMESTAMP        datetime.datetime (timezone-aware, UTC)
DURATION         datetime.timedelta
IP_ADDRESS       ipaddress.IPv4Address | IPv6Address
EMAIL_ADDRESS    str
URI              str
DNS_NAME         str
STRING_MAP       Mapping[str, str]
===============  =========================================
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
from collections.abc import Mapping


class ValueType(enum.Enum):
    """istio.policy.v1beta1.ValueType; VALUE_TYPE_UNSPECIFIED is "any" for template fields."""

    VALUE_TYPE_UNSPECIFIED = 0
    STRING = 1
    INT64 = 2
    DOUBLE = 3
    BOOL = 4
    TIMESTAMP = 5
    IP_ADDRESS = 6
    EMAIL_ADDRESS = 7
    URI = 8
    DNS_NAME = 9
    DURATION = 10
    STRING_MAP = 11

    @classmethod
    def parse(cls, name: str) -> ValueType:
        """The manifest spelling (``STRING``, ``INT64``...) to a member; raises ValueError."""
        try:
            return cls[name]
        except KeyError:
            raise ValueError(
                f"unknown value type {name!r}; expected one of"
                f" {', '.join(m.name for m in list(cls)[1:])}"
            ) from None


# The types that are strings at run time: they compare and concatenate as strings.
STRING_LIKE = frozenset(
    {ValueType.STRING, ValueType.EMAIL_ADDRESS, ValueType.URI, ValueType.DNS_NAME}
)

AttributeTypes = Mapping[str, ValueType]


def format_value(value: object) -> object:
    """An attribute value as JSON-ready data, the way backends print it: timestamps in RFC 3339,
    durations in Go's notation ("1.5ms", as Mixer's adapters printed them), IPs as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, datetime.timedelta):
        return format_go_duration(value)
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): format_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [format_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def format_go_duration(value: datetime.timedelta) -> str:
    """Go's time.Duration.String(): "1h2m3.5s", "1.5ms", "0s"."""
    ns = value.days * 86_400_000_000_000 + value.seconds * 1_000_000_000 + value.microseconds * 1000
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:  # whole microseconds (a timedelta's resolution): "%g" writes them as int
        return f"{sign}{ns // 1_000}µs"
    if ns < 1_000_000_000:
        return f"{sign}{ns / 1_000_000:g}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = f"{rest / 1_000_000_000:.9f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    out += f"{minutes}m" if hours or minutes else ""
    return f"{sign}{out}{seconds}s"


def from_json(value: object, value_type: ValueType) -> object:
    """A JSON value (what `mixerhub eval --attributes` and tests give) as the attribute's run-time
    value: "10.0.0.1" -> IPv4Address, RFC 3339 text -> datetime, "10ms" -> timedelta. Raises
    ValueError when the value cannot be that type."""
    match value_type:
        case ValueType.STRING | ValueType.EMAIL_ADDRESS | ValueType.URI | ValueType.DNS_NAME:
            if isinstance(value, str):
                return value
        case ValueType.INT64:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        case ValueType.DOUBLE:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        case ValueType.BOOL:
            if isinstance(value, bool):
                return value
        case ValueType.TIMESTAMP:
            if isinstance(value, str):
                parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=datetime.UTC)
                return parsed
        case ValueType.DURATION:
            from mixerhub.types import parse_duration  # types imports pydantic; keep this light

            return parse_duration(value)
        case ValueType.IP_ADDRESS:
            if isinstance(value, str):
                return ipaddress.ip_address(value)
        case ValueType.STRING_MAP:
            if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
                return {str(k): v for k, v in value.items()}
    raise ValueError(f"{value!r} is not a {value_type.name}")
