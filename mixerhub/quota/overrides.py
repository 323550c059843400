"""Quota overrides, as Mixer's memquota and redisquota matched them: the first override whose
dimensions all equal the instance's, each compared as text."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import TypeVar

from mixerhub.attributes import format_value

L = TypeVar("L")

Override = tuple[tuple[tuple[str, str], ...], L]


def dimension_text(value: object) -> str:
    """An instance's dimension as the text an override names. Mixer compared the value, or its
    String() form (an IP address); config.proto: "String representation of instance dimensions
    is used"."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    return str(format_value(value))


def first_override(
    overrides: Sequence[Override[L]], dimensions: Mapping[str, object], default: L
) -> L:
    """The limit of the first override whose dimensions all match, else ``default``."""
    for wanted, limit in overrides:
        if all(k in dimensions and dimension_text(dimensions[k]) == v for k, v in wanted):
            return limit
    return default
