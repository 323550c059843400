"""An attribute bag that fills itself: each attribute is computed on first read, then kept.

Envoy's messages carry far more than a configuration reads; a bag computes only what rules,
instances and policies actually ask for. Extractors return ``ABSENT`` for an attribute the
message does not carry, which reads as a missing attribute (KeyError), as in any bag.
"""

from __future__ import annotations

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
