"""The syntax tree the parser produces: what was written, with positions, before any typing.

Mixer's own AST (mixer/pkg/lang/ast) flattened a selector chain ``a.b.c`` into one variable name,
because attribute names are a flat namespace with dots in them; :class:`Name` does the same. Every
node keeps ``start``, the 0-based offset of its first character, for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Literal:
    """A string, integer, floating-point or boolean literal."""

    start: int
    value: str | int | float | bool


@dataclass(frozen=True, slots=True)
class Name:
    """A dotted identifier chain such as ``destination.service.host``: one attribute name.

    ``last_start`` is where its last segment begins (the method name in ``x.startsWith(...)``).
    """

    start: int
    name: str
    last_start: int


@dataclass(frozen=True, slots=True)
class Paren:
    """A parenthesized expression; kept so that ``(a).b`` is not read as the attribute ``a.b``."""

    start: int
    inner: Node


@dataclass(frozen=True, slots=True)
class Select:
    """``x.field`` where ``x`` is not a plain name; only valid as a method call's callee."""

    start: int
    base: Node
    field: str
    field_start: int


@dataclass(frozen=True, slots=True)
class Index:
    """``target[key]``: a string-map lookup."""

    start: int
    target: Node
    key: Node
    bracket: int


@dataclass(frozen=True, slots=True)
class Call:
    """``name(args)``, or ``target.name(args)`` for a method such as ``startsWith``."""

    start: int
    name: str
    name_start: int
    target: Node | None
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Unary:
    start: int
    op: str
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    start: int
    op: str
    op_start: int
    left: Node
    right: Node


Node = Literal | Name | Paren | Select | Index | Call | Unary | Binary
