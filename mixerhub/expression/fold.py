"""Constant folding over the typed tree, before code generation.

Whatever can be computed when configuration is loaded is: literal conversions such as
``ip("0.0.0.0")`` (so a malformed one is a load-time error, where Mixer failed at request time),
comparisons and sums of literals, ``|`` options after one that is always present, branches a
constant condition never takes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from mixerhub.attributes import ValueType
from mixerhub.expression import typed
from mixerhub.expression.errors import EvaluationError, ExpressionError
from mixerhub.expression.functions import EQUALITY, wrap_int64


def fold(tree: typed.Node, source: str) -> typed.Node:
    """``tree`` with its constant parts computed; ExpressionError if one of them cannot be."""
    return _Folder(source).fold(tree)


def nillable(node: typed.Node) -> bool:
    """Whether ``node`` can be absent, so that a ``|`` after it may apply. As in Mixer's compiler
    (nmJmpOnValue): attributes, map lookups, and chains of those. Anything else, a function call
    included, yields a value or fails."""
    match node:
        case typed.Attribute() | typed.Lookup():
            return True
        case typed.Default():
            return all(nillable(o) for o in node.options)
    return False


_ORDER: Mapping[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def compare(op: str, value_type: ValueType, left: object, right: object) -> bool:
    """The meaning of a comparison; used for folding, and what the generated code inlines."""
    if op in ("==", "!="):
        equal = EQUALITY.get(value_type)
        same = equal(left, right) if equal else left == right
        return same if op == "==" else not same
    return _ORDER[op](left, right)


class _Folder:
    """Constant folding. It never removes an operand whose evaluation could fail, except where
    evaluation would not have reached it (after a constant ``|`` option, in the branch a constant
    condition does not take, after a constant ``&&``/``||`` left operand)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fold(self, node: typed.Node) -> typed.Node:
        match node:
            case typed.Const() | typed.Attribute():
                return node
            case typed.Lookup():
                return self.lookup(node)
            case typed.Default():
                return self.default(node)
            case typed.Call():
                return self.call(node)
            case typed.Compare():
                left, right = self.fold(node.left), self.fold(node.right)
                if isinstance(left, typed.Const) and isinstance(right, typed.Const):
                    value = compare(node.op, left.type, left.value, right.value)
                    return typed.Const(ValueType.BOOL, value)
                if left.type is ValueType.BOOL and node.op in ("==", "!="):
                    # `match(...) == false`, common in Istio's rules, is a plain negation.
                    for constant, other in ((left, right), (right, left)):
                        if isinstance(constant, typed.Const):
                            keep = constant.value == (node.op == "==")
                            return other if keep else typed.Not(other)
                return typed.Compare(node.op, left, right)
            case typed.Logic():
                return self.logic(node)
            case typed.Not():
                operand = self.fold(node.operand)
                if isinstance(operand, typed.Const):
                    return typed.Const(ValueType.BOOL, not operand.value)
                return typed.Not(operand)
            case typed.Negate():
                operand = self.fold(node.operand)
                if isinstance(operand, typed.Const):
                    number: Any = operand.value
                    if node.type is ValueType.INT64:
                        return typed.Const(node.type, wrap_int64(-number))
                    return typed.Const(node.type, -number)
                return typed.Negate(node.type, operand)
            case typed.Add():
                left, right = self.fold(node.left), self.fold(node.right)
                if isinstance(left, typed.Const) and isinstance(right, typed.Const):
                    augend: Any = left.value
                    total = augend + right.value
                    if node.type is ValueType.INT64:
                        total = wrap_int64(total)
                    return typed.Const(node.type, total)
                return typed.Add(node.type, left, right)
            case typed.Conditional():
                condition = self.fold(node.condition)
                if isinstance(condition, typed.Const):
                    return self.fold(node.then if condition.value else node.otherwise)
                then, otherwise = self.fold(node.then), self.fold(node.otherwise)
                return typed.Conditional(node.type, condition, then, otherwise)
        raise AssertionError(f"unexpected node {node!r}")  # pragma: no cover

    def lookup(self, node: typed.Lookup) -> typed.Node:
        map_, key = self.fold(node.map), self.fold(node.key)
        if isinstance(map_, typed.Const) and isinstance(key, typed.Const):
            mapping: Any = map_.value
            return typed.Const(ValueType.STRING, mapping.get(key.value, ""))
        return typed.Lookup(map_, key)

    def default(self, node: typed.Default) -> typed.Node:
        options: list[typed.Node] = []
        for option in node.options:
            folded = self.fold(option)
            options.append(folded)
            if not nillable(folded):
                break  # it always yields a value (or fails): later options are never reached
        if len(options) == 1:
            return options[0]
        return typed.Default(node.type, tuple(options))

    def call(self, node: typed.Call) -> typed.Node:
        args = tuple(self.fold(a) for a in node.args)
        if all(isinstance(a, typed.Const) for a in args):
            values = [a.value for a in args if isinstance(a, typed.Const)]
            try:
                return typed.Const(node.type, node.function.impl(*values))
            except EvaluationError as e:
                # ip("10.1.12") can never succeed: say so when the configuration is loaded.
                raise ExpressionError(self.source, node.position, str(e)) from None
        return typed.Call(node.type, node.function, args, node.position)

    def logic(self, node: typed.Logic) -> typed.Node:
        left, right = self.fold(node.left), self.fold(node.right)
        if isinstance(left, typed.Const):
            decided = left.value if node.op == "||" else not left.value
            return left if decided else right
        return typed.Logic(node.op, left, right)
