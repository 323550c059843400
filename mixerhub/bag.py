"""An attribute bag that fills itself: each attribute is computed on first read, then kept.

Envoy's messages carry far more than a configuration reads; a bag computes only what rules,
instances and policies actually ask for. Extractors return ``ABSENT`` for an attribute the
message does not carry, which reads as a missing attribute (KeyError), as in any bag.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

C = TypeVar("C")


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()

Extractors = Mapping[str, Callable[[C], Any]]


class LazyBag(dict[str, Any], Generic[C]):
    """Attributes of one message, filled in on first read. Use as any Mapping bag."""

    __slots__ = ("_absent", "_context", "_extractors")

    def __init__(self, context: C, extractors: Extractors[C]) -> None:
        super().__init__()
        self._context = context
        self._extractors = extractors
        self._absent: set[str] = set()

    @property
    def context(self) -> C:
        return self._context

    def __missing__(self, name: str) -> Any:
        extractor = self._extractors.get(name)
        if extractor is None or name in self._absent:
            raise KeyError(name)
        value = extractor(self._context)
        if value is ABSENT:
            self._absent.add(name)
            raise KeyError(name)
        self[name] = value
        return value

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return self.get(name, ABSENT) is not ABSENT if isinstance(name, str) else False


# What Envoy's messages carry in the same shape, whichever message it is (a CheckRequest, an
# access-log entry): parsed one way for both.


class _KnownText:
    """An address that keeps its text and hash: the same few peers are printed and looked up
    entry after entry, where ipaddress would compute both anew each time."""

    __slots__ = ()
    _text: str
    _hash: int

    def __init__(self, address: str) -> None:
        super().__init__(address)  # type: ignore[call-arg]  # the ipaddress class after this one
        # The slots are the subclasses': a mixin's own would clash with ipaddress's layout.
        self._text = super().__str__()  # type: ignore[misc]
        self._hash = super().__hash__()  # type: ignore[misc]

    def __str__(self) -> str:
        return self._text

    def __hash__(self) -> int:
        return self._hash


class KnownIPv4Address(_KnownText, ipaddress.IPv4Address):
    __slots__ = ("_hash", "_text")


class KnownIPv6Address(_KnownText, ipaddress.IPv6Address):
    __slots__ = ("_hash", "_text")


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> Any:
    """An address's IP, or ABSENT (a pipe, an empty or unparseable address). Cached: the same
    few peer addresses come back request after request."""
    if not text:
        return ABSENT
    try:
        return KnownIPv4Address(text)
    except ValueError:
        pass
    try:
        return KnownIPv6Address(text)
    except ValueError:
        return ABSENT


def principal(spiffe: str) -> Any:
    """Istio's principal drops the scheme: spiffe://td/ns/a/sa/b -> td/ns/a/sa/b."""
    return spiffe.removeprefix("spiffe://") if spiffe else ABSENT


@functools.lru_cache(maxsize=4096)
def namespace_of(principal: Any) -> Any:
    """The namespace a principal names (td/ns/<ns>/sa/<sa>), or ABSENT. Cached: the same few
    principals come back request after request."""
    if principal is ABSENT:
        return ABSENT
    parts = principal.split("/")
    for i in range(len(parts) - 1):
        if parts[i] == "ns" and parts[i + 1]:
            return parts[i + 1]
    return ABSENT
