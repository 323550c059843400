"""Metric names from Go text/template strings, and dimension values as text.

Mixer's statsd adapter filled ``name_template`` (Go's text/template syntax, e.g.
``requests.{{.response_code}}``) with the instance's dimensions. What such templates do in
practice is read a dimension, so that is what is supported: text and ``{{.key}}`` actions (spaces
inside the braces allowed, as in Go). Any other action (pipelines, functions, ``if``, ``-``
trimming) is refused when configuration loads, with the action quoted.
"""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mixerhub.attributes import format_go_duration, format_value

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# A Go field name: what `{{.key}}` can reach in a map.
_FIELD = re.compile(r"\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*")
# Characters that delimit StatsD lines and fields: a name must not carry them.
_RESERVED = re.compile(r"[:|@\s]")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class NameTemplate:
    """Literal text and the dimension keys between it: ``("requests.", "code", "")``."""

    parts: tuple[str, ...]  # literal, key, literal, key, ..., literal

    @classmethod
    def parse(cls, text: str) -> NameTemplate:
        parts: list[str] = []
        pos = 0
        for m in _ACTION.finditer(text):
            field = _FIELD.fullmatch(m.group(1))
            if field is None:
                raise TemplateError(
                    f"unsupported action {m.group(0)!r}: only {{{{.dimension}}}} is supported"
                )
            parts += [text[pos : m.start()], field.group(1)]
            pos = m.end()
        rest = text[pos:]
        if "{{" in rest:
            raise TemplateError(f"unclosed action at {rest[rest.index('{{') :]!r}")
        parts.append(rest)
        literal = "".join(parts[0::2])
        if bad := _RESERVED.search(literal):
            raise TemplateError(
                f"{bad.group(0)!r} cannot be part of a StatsD name (it delimits lines and fields)"
            )
        return cls(tuple(parts))

    @property
    def keys(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def render(self, dimensions: Mapping[str, object]) -> str:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(safe(dimension_text(dimensions.get(parts[i], ""))))
            out.append(parts[i + 1])
        return "".join(out)


def safe(text: str) -> str:
    """A dimension's text made safe inside a StatsD name: a request's path or header can hold
    ``:``, ``|`` or a newline, which would otherwise end the name or inject lines."""
    return _RESERVED.sub("_", text)


def dimension_text(value: object) -> str:
    """A dimension value as text, as Mixer's adapter.Stringify printed it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return decimal_text(value)
    if isinstance(value, datetime.timedelta):
        return format_go_duration(value)
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, Mapping):
        return "&".join(f"{k}={dimension_text(v)}" for k, v in sorted(value.items()))
    return str(format_value(value))


def decimal_text(value: float) -> str:
    """Go's strconv.FormatFloat(v, 'f', -1, 64): the shortest exact digits, never an exponent."""
    if value.is_integer():
        return str(int(value))
    text = repr(value)
    if "e" in text or "E" in text:
        text = format(decimal.Decimal(text), "f")
    return text
