"""Mixer's function table: each function's typed signature for the checker and its Python
implementation for evaluation and constant folding.

The table is Istio 1.4's: the externs of mixer/pkg/lang/externs.go (match, matches, startsWith,
endsWith, ip, timestamp, dnsName, email, uri, emptyStringMap, conditionalString, toLower) and the
intrinsics of mixer/pkg/lang/ast/func.go that are called like functions (size, and conditional,
whose result type is its branches' and so is checked in check.py rather than listed here).
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mixerhub.attributes import ValueType
from mixerhub.expression import conversions
from mixerhub.expression.errors import EvaluationError

_S = ValueType.STRING


@dataclass(frozen=True, slots=True)
class Function:
    """One entry of the table. A method (Mixer's ``Instance``) is called as ``target.name(args)``
    and ``parameters[0]`` is its target's type."""

    name: str
    parameters: tuple[ValueType, ...]
    result: ValueType
    impl: Callable[..., object]
    method: bool = False


def match(value: str, pattern: str) -> bool:
    """Mixer's glob: a trailing ``*`` matches a prefix, else a leading ``*`` a suffix, else the
    whole string. (So ``"*"`` matches everything and ``"*a*"`` is the prefix ``"*a"``.)"""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


@functools.lru_cache(maxsize=256)
def compile_regex(pattern: str) -> re.Pattern[str]:
    """Go's regexp is RE2; Python's re accepts the RE2 syntax used in practice (classes,
    repetition, groups, anchors) and more."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise EvaluationError(f"invalid regular expression {pattern!r}: {e}") from None


def matches(pattern: str, value: str) -> bool:
    """``pattern.matches(value)``: note the receiver is the pattern, as in Mixer's
    ``"svc.*".matches(destination.service)`` (CEL has it the other way round). Unanchored, like
    Go's regexp.MatchString."""
    return compile_regex(pattern).search(value) is not None


def starts_with(value: str, prefix: str) -> bool:
    return value.startswith(prefix)


def ends_with(value: str, suffix: str) -> bool:
    return value.endswith(suffix)


def to_lower(value: str) -> str:
    return value.lower()


def size(value: str) -> int:
    """The length in bytes of the UTF-8 text: Mixer's size compiled to Go's len(string)."""
    return len(value.encode())


EMPTY_STRING_MAP: Mapping[str, str] = types.MappingProxyType({})


def empty_string_map() -> Mapping[str, str]:
    return EMPTY_STRING_MAP


def conditional_string(condition: bool, then: str, otherwise: str) -> str:
    return then if condition else otherwise


FUNCTIONS: Mapping[str, Function] = {
    f.name: f
    for f in (
        Function("match", (_S, _S), ValueType.BOOL, match),
        Function("matches", (_S, _S), ValueType.BOOL, matches, method=True),
        Function("startsWith", (_S, _S), ValueType.BOOL, starts_with, method=True),
        Function("endsWith", (_S, _S), ValueType.BOOL, ends_with, method=True),
        Function("ip", (_S,), ValueType.IP_ADDRESS, conversions.ip),
        Function("timestamp", (_S,), ValueType.TIMESTAMP, conversions.timestamp),
        Function("dnsName", (_S,), ValueType.DNS_NAME, conversions.dns_name),
        Function("email", (_S,), ValueType.EMAIL_ADDRESS, conversions.email),
        Function("uri", (_S,), ValueType.URI, conversions.uri),
        Function("emptyStringMap", (), ValueType.STRING_MAP, empty_string_map),
        Function("conditionalString", (ValueType.BOOL, _S, _S), _S, conditional_string),
        Function("toLower", (_S,), _S, to_lower),
        Function("size", (_S,), ValueType.INT64, size),
    )
}

# Equality that is not Python's ==: Mixer's ip_equal, dnsName_equal, email_equal, uri_equal.
EQUALITY: Mapping[ValueType, Callable[[Any, Any], bool]] = {
    ValueType.IP_ADDRESS: conversions.ip_equal,
    ValueType.DNS_NAME: conversions.dns_name_equal,
    ValueType.EMAIL_ADDRESS: conversions.email_equal,
    ValueType.URI: conversions.uri_equal,
}


def wrap_int64(value: int) -> int:
    """Go's int64 arithmetic wraps around; so does INT64 here."""
    return ((value + 2**63) & (2**64 - 1)) - 2**63
