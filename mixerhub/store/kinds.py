"""Configuration kinds: each is one spec model and one compile step.

A new kind (a security, networking or rate-limit resource) is added by declaring a ``Kind`` in
its own module and listing it in ``KINDS``; the store validates the spec against the model,
reporting every error with its field path, and calls the compile step in phase order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class Kind(Generic[S]):
    group: str  # the apiVersion before the slash, e.g. config.istio.io
    versions: tuple[str, ...]  # accepted versions, e.g. ("v1alpha2",)
    kind: str
    spec: type[S]
    # Lower phases compile first: attribute manifests (0) before instances (20), rules (30)...
    phase: int
    compile: Callable[[Document, S, Compilation], None]

    @property
    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{v}" for v in self.versions)


def kind_table(kinds: tuple[Kind[Any], ...]) -> Mapping[tuple[str, str], Kind[Any]]:
    """(group, kind) -> Kind. Two kinds with one (group, kind) is a programming error."""
    table: dict[tuple[str, str], Kind[Any]] = {}
    for k in kinds:
        key = (k.group, k.kind)
        if key in table:
            raise ValueError(f"kind {k.kind} of {k.group} is declared twice")
        table[key] = k
    return table


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version
