"""Configuration errors as values: every error a load finds, each with where it is and why."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in one document, printed as ``FILE: document N (kind/name): field.path: reason``.

    ``document`` counts from 1 within its file (0 when the error is about the file as a whole);
    ``path`` is dotted with list indexes in brackets, e.g. ``spec.actions[0].handler``.
    """

    file: str
    document: int
    kind: str
    name: str
    path: str
    reason: str

    def __str__(self) -> str:
        where = self.file
        if self.document:
            what = f"{self.kind}/{self.name}" if self.kind or self.name else "?"
            where += f": document {self.document} ({what})"
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"

    def as_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "document": self.document,
            "kind": self.kind,
            "name": self.name,
            "path": self.path,
            "reason": self.reason,
        }


class ConfigRejected(Exception):
    """A configuration that did not compile; carries every error found, in file order."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: Sequence[ConfigError] = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


def join_path(*parts: str | int) -> str:
    """``join_path("spec", "actions", 0, "handler")`` -> ``spec.actions[0].handler``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out = f"{out}.{part}" if out else part
    return out
