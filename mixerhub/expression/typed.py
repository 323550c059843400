"""The typed tree the checker produces and the code generator consumes.

Operators are resolved to what they mean for their operand types, literals are converted to the
type they are used as (a ``"10s"`` compared with a DURATION is a timedelta here), and ``a | b | c``
is one :class:`Default` with its options in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixerhub.attributes import ValueType
from mixerhub.expression.functions import Function

_BOOL = ValueType.BOOL
_STRING = ValueType.STRING


@dataclass(frozen=True, slots=True)
class Const:
    type: ValueType
    value: object


@dataclass(frozen=True, slots=True)
class Attribute:
    type: ValueType
    name: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """``map[key]`` on a STRING_MAP. A missing key reads as "" (Mixer's NLookup) unless a ``|``
    default follows, which then applies."""

    map: Node
    key: Node
    type: ValueType = _STRING


@dataclass(frozen=True, slots=True)
class Default:
    """``options[0] | options[1] | ...``: the first option that is present (Mixer's OR)."""

    type: ValueType
    options: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Call:
    """A call of a function in the function table; a method's target is ``args[0]``."""

    type: ValueType
    function: Function
    args: tuple[Node, ...]
    position: int  # where the call is in the source, for errors found while folding


@dataclass(frozen=True, slots=True)
class Compare:
    """``== != < <= > >=`` on two operands of one type (``left.type``)."""

    op: str
    left: Node
    right: Node
    type: ValueType = _BOOL


@dataclass(frozen=True, slots=True)
class Logic:
    """Short-circuit ``&&`` or ``||``."""

    op: str
    left: Node
    right: Node
    type: ValueType = _BOOL


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node
    type: ValueType = _BOOL


@dataclass(frozen=True, slots=True)
class Negate:
    type: ValueType
    operand: Node


@dataclass(frozen=True, slots=True)
class Add:
    """``+``: string concatenation, or INT64 (wrapping as Go's int64 does) or DOUBLE addition."""

    type: ValueType
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Conditional:
    """``conditional(condition, then, otherwise)``; only the chosen branch is evaluated."""

    type: ValueType
    condition: Node
    then: Node
    otherwise: Node


Node = (
    Const | Attribute | Lookup | Default | Call | Compare | Logic | Not | Negate | Add | Conditional
)
