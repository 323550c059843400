"""Compiled rate-limit descriptor trees: a request's descriptor walks plain dicts to its limit.

The matching follows envoyproxy/ratelimit (src/config/config_impl.go GetLimit): at each level the
request's entry tries ``key`` with its exact ``value`` first, then the wildcard values (a trailing
``*`` is a prefix) in configuration order, then the value-less ``key`` that matches any value. A
limit applies only when every entry of the descriptor matched, level by level, and the last
matched node has a limit: a descriptor with more or fewer entries than the configuration's nesting
matches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

Algorithm = Literal["fixed_window", "rolling_window", "token_bucket"]
Unit = Literal["second", "minute", "hour", "day", "week", "month", "year"]

# envoyproxy/ratelimit's UnitToDivider: a month is 30 days and a year 365.
UNIT_SECONDS: Final[Mapping[Unit, int]] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}

Entry = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Limit:
    """One configured limit, with what the descriptor that holds it says about it."""

    requests_per_unit: int
    unit: Unit
    name: str = ""
    algorithm: Algorithm = "fixed_window"
    unlimited: bool = False
    shadow_mode: bool = False
    detailed_metric: bool = False
    replaces: frozenset[str] = frozenset()
    # The configuration path, ``key_value.key``: the metrics' descriptor label.
    path: str = ""

    @property
    def unit_seconds(self) -> int:
        return UNIT_SECONDS[self.unit]


@dataclass(frozen=True, slots=True)
class Level:
    """The descriptors at one nesting level, indexed for the three kinds of match."""

    exact: Mapping[Entry, Node] = field(default_factory=dict)
    # key -> (value prefix, node) in configuration order: the first that fits wins.
    wildcards: Mapping[str, tuple[tuple[str, Node], ...]] = field(default_factory=dict)
    any_value: Mapping[str, Node] = field(default_factory=dict)

    def match(self, key: str, value: str) -> Node | None:
        node = self.exact.get((key, value))
        if node is not None:
            return node
        for prefix, candidate in self.wildcards.get(key, ()):
            if value.startswith(prefix):
                return candidate
        return self.any_value.get(key)


@dataclass(frozen=True, slots=True)
class Node:
    limit: Limit | None
    children: Level


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    descriptors: Level
    source: str = ""  # file: document N, for the duplicate-domain error

    def find(self, entries: Sequence[Entry]) -> Limit | None:
        """The limit for one descriptor, or None when the descriptor matches no limit."""
        level = self.descriptors
        node: Node | None = None
        for key, value in entries:
            node = level.match(key, value)
            if node is None:
                return None
            level = node.children
        return None if node is None else node.limit


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Every configured domain: what a snapshot carries for ShouldRateLimit."""

    domains: Mapping[str, Domain] = field(default_factory=dict)
