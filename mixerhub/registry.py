"""The adapter registry: the built-in adapters plus those installed under an entry-point group.

Built-in adapters are the packages under ``mixerhub.adapters`` (the top-level ``adapters/``
folder), each exporting ``INFO``. Third-party packages add theirs with::

    [project.entry-points."mixerhub.adapters"]
    myadapter = "my_package.adapter:INFO"

Every declaration is checked when loaded; one that does not fit is left out with a clear problem
reported, and the rest of the hub carries on (as OpenTelemetry does with its exporter entry points).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import mixerhub.adapters
from mixerhub.adapter import AdapterInfo, check_info

ENTRY_POINT_GROUP = "mixerhub.adapters"


@dataclass(frozen=True)
class Registry:
    adapters: Mapping[str, AdapterInfo[Any]]
    problems: tuple[str, ...] = ()

    def supports(self, adapter: str, template: str) -> bool:
        info = self.adapters.get(adapter)
        return info is not None and template in info.templates


def builtin() -> list[tuple[str, object]]:
    """(origin, declaration) for every adapter folder under mixerhub.adapters."""
    found: list[tuple[str, object]] = []
    for module in pkgutil.iter_modules(mixerhub.adapters.__path__):
        if not module.ispkg:
            continue
        full = f"mixerhub.adapters.{module.name}"
        imported = importlib.import_module(full)
        found.append((full, getattr(imported, "INFO", None)))
    return found


def from_entry_points(group: str = ENTRY_POINT_GROUP) -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for ep in entry_points(group=group):
        found.append((_origin(ep), _load(ep)))
    return found


def build_registry(declarations: Iterable[tuple[str, object]]) -> Registry:
    adapters: dict[str, AdapterInfo[Any]] = {}
    problems: list[str] = []
    for origin, info in declarations:
        if isinstance(info, _LoadFailure):
            problems.append(f"{origin}: cannot load: {info.reason}")
            continue
        errs = check_info(info)
        if not errs and isinstance(info, AdapterInfo) and info.name in adapters:
            errs = [f"adapter name {info.name!r} is already registered"]
        if errs:
            problems += [f"{origin}: {e}" for e in errs]
            continue
        assert isinstance(info, AdapterInfo)
        adapters[info.name] = info
    return Registry(dict(sorted(adapters.items())), tuple(problems))


def default_registry() -> Registry:
    return build_registry([*builtin(), *from_entry_points()])


@dataclass(frozen=True)
class _LoadFailure:
    reason: str


def _load(ep: EntryPoint) -> object:
    try:
        return ep.load()
    except Exception as e:  # third-party code may fail to import in any way
        return _LoadFailure(f"{type(e).__name__}: {e}")


def _origin(ep: EntryPoint) -> str:
    return f"entry point {ep.name!r} ({ep.value}) in group {ep.group!r}"
