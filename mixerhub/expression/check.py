"""Type checking against the attribute manifest: syntax tree to typed tree.

The rules are Mixer's (mixer/pkg/lang/ast, Expression.EvalType, and the function table in
functions.py): an attribute has its declared type; an operator's operands must have one type;
``&&`` and ``||`` take BOOL; ``[]`` takes a STRING_MAP and a STRING key; a function's arguments
must have its parameter types exactly. The one conversion Mixer made is a string literal that
parses as a Go duration used where a DURATION is wanted (``response.duration | "0ms"``).

Beyond Mixer (which had no function for them): unary ``!`` on BOOL and unary ``-`` on INT64 and
DOUBLE, and ordering of DURATION values. Mixer rejected ``- * / % ^ & << >>`` as unknown functions;
so does this checker.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from mixerhub.attributes import STRING_LIKE, ValueType
from mixerhub.expression import ast, typed
from mixerhub.expression.conversions import go_duration
from mixerhub.expression.errors import ExpressionError
from mixerhub.expression.functions import FUNCTIONS

_BOOL = ValueType.BOOL
_STRING = ValueType.STRING

# Types the ordering operators apply to. Mixer compiled < <= > >= for strings (and the string-like
# types, which are strings at run time), INT64, DOUBLE and TIMESTAMP.
ORDERED = STRING_LIKE | {ValueType.INT64, ValueType.DOUBLE, ValueType.TIMESTAMP, ValueType.DURATION}
# Mixer's ADD compiled for its string, integer and double IL types.
ADDABLE = STRING_LIKE | {ValueType.INT64, ValueType.DOUBLE}
_COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")


def check(node: ast.Node, attributes: Mapping[str, ValueType], source: str) -> typed.Node:
    """The typed tree for ``node``; raises ExpressionError at the first type error."""
    return _Checker(attributes, source).check(node)


def coerce(node: typed.Node, want: ValueType) -> typed.Node | None:
    """``node`` as a ``want``, or None. Only a duration literal converts (to DURATION); it does so
    inside a ``|`` chain or conditional branches too, so ``conditional(c, "1s", "2s")`` can be a
    DURATION."""
    if node.type == want:
        return node
    if want is not ValueType.DURATION:
        return None
    match node:
        case typed.Const(type=ValueType.STRING, value=str(text)):
            value = go_duration(text)
            return None if value is None else typed.Const(ValueType.DURATION, value)
        case typed.Conditional():
            then, otherwise = coerce(node.then, want), coerce(node.otherwise, want)
            if then is None or otherwise is None:
                return None
            return typed.Conditional(want, node.condition, then, otherwise)
        case typed.Default():
            options = [coerce(o, want) for o in node.options]
            if any(o is None for o in options):
                return None
            return typed.Default(want, tuple(o for o in options if o is not None))
    return None


class _Checker:
    def __init__(self, attributes: Mapping[str, ValueType], source: str) -> None:
        self.attributes = attributes
        self.source = source

    def error(self, position: int, reason: str) -> ExpressionError:
        return ExpressionError(self.source, position, reason)

    def check(self, node: ast.Node) -> typed.Node:
        match node:
            case ast.Literal(value=bool(b)):
                return typed.Const(_BOOL, b)
            case ast.Literal(value=int(i)):
                return typed.Const(ValueType.INT64, i)
            case ast.Literal(value=float(f)):
                return typed.Const(ValueType.DOUBLE, f)
            case ast.Literal(value=str(s)):
                return typed.Const(_STRING, s)
            case ast.Name():
                return self.attribute(node)
            case ast.Paren():
                return self.check(node.inner)
            case ast.Select():
                raise self.error(
                    node.field_start,
                    f"a value has no field {node.field}: only attribute names are dotted",
                )
            case ast.Index():
                target = self.check(node.target)
                if target.type is not ValueType.STRING_MAP:
                    raise self.error(node.bracket, f"[] needs a STRING_MAP, not {target.type.name}")
                key = self.expect(self.check(node.key), _STRING, node.key.start, "a map key")
                return typed.Lookup(target, key)
            case ast.Call():
                return self.call(node)
            case ast.Unary():
                return self.unary(node)
            case ast.Binary():
                return self.binary(node)
        raise self.error(0, f"unexpected syntax {node!r}")  # pragma: no cover

    def attribute(self, node: ast.Name) -> typed.Attribute:
        value_type = self.attributes.get(node.name)
        if value_type is None:
            raise self.error(node.start, self.unknown_attribute(node.name))
        if value_type is ValueType.VALUE_TYPE_UNSPECIFIED:
            raise self.error(node.start, f"attribute {node.name} has no value type")
        return typed.Attribute(value_type, node.name)

    def unknown_attribute(self, name: str) -> str:
        head, _, rest = name.rpartition(".")
        while head:
            if head in self.attributes:
                kind = self.attributes[head].name
                return f"unknown attribute {name}: {head} is a {kind} and has no field {rest}"
            head, _, tail = head.rpartition(".")
            rest = f"{tail}.{rest}"
        return f"unknown attribute {name}{_suggest(name, self.attributes)}"

    def expect(self, node: typed.Node, want: ValueType, position: int, what: str) -> typed.Node:
        converted = coerce(node, want)
        if converted is None:
            raise self.error(position, f"{what} must be {want.name}, not {node.type.name}")
        return converted

    def unify(
        self, left: typed.Node, right: typed.Node, position: int, op: str
    ) -> tuple[typed.Node, typed.Node]:
        """Mixer's template-typed arguments: both operands must end up with one type."""
        if left.type == right.type:
            return left, right
        if (converted := coerce(right, left.type)) is not None:
            return left, converted
        if (converted := coerce(left, right.type)) is not None:
            return converted, right
        raise self.error(
            position,
            f"{op} needs operands of one type, got {left.type.name} and {right.type.name}",
        )

    def binary(self, node: ast.Binary) -> typed.Node:
        op, at = node.op, node.op_start
        left, right = self.check(node.left), self.check(node.right)
        if op in ("&&", "||"):
            left = self.expect(left, _BOOL, node.left.start, f"the left operand of {op}")
            right = self.expect(right, _BOOL, node.right.start, f"the right operand of {op}")
            return typed.Logic(op, left, right)
        if op not in ("|", "+", *_COMPARISONS):
            raise self.error(
                at,
                f"operator {op} is not supported; the operators are"
                " || && == != < <= > >= + | ! and unary -",
            )
        left, right = self.unify(left, right, at, op)
        value_type = left.type
        if op == "|":
            options = _options(left) + _options(right)
            return typed.Default(value_type, options)
        if op == "+":
            if value_type not in ADDABLE:
                raise self.error(at, f"+ is not defined for {value_type.name}")
            return typed.Add(value_type, left, right)
        if op in ("==", "!=") and value_type is ValueType.STRING_MAP:
            raise self.error(at, f"{op} is not defined for STRING_MAP")
        if op not in ("==", "!=") and value_type not in ORDERED:
            raise self.error(at, f"{op} is not defined for {value_type.name}")
        return typed.Compare(op, left, right)

    def unary(self, node: ast.Unary) -> typed.Node:
        operand = self.check(node.operand)
        if node.op == "!":
            return typed.Not(self.expect(operand, _BOOL, node.operand.start, "the operand of !"))
        if operand.type not in (ValueType.INT64, ValueType.DOUBLE):
            raise self.error(node.start, f"unary - needs INT64 or DOUBLE, not {operand.type.name}")
        return typed.Negate(operand.type, operand)

    def call(self, node: ast.Call) -> typed.Node:
        name, at = node.name, node.name_start
        if name == "conditional" and node.target is None:
            # An intrinsic in Mixer: (BOOL, T, T) -> T, so it cannot be a table entry.
            if len(node.args) != 3:
                raise self.error(at, f"conditional takes 3 arguments, got {len(node.args)}")
            condition, then, otherwise = (self.check(a) for a in node.args)
            condition = self.expect(
                condition, _BOOL, node.args[0].start, "argument 1 of conditional"
            )
            then, otherwise = self.unify(then, otherwise, node.args[2].start, "conditional")
            return typed.Conditional(then.type, condition, then, otherwise)
        function = FUNCTIONS.get(name)
        if function is None:
            raise self.error(at, f"unknown function {name}{_suggest(name, FUNCTIONS)}")
        if node.target is not None and not function.method:
            raise self.error(at, f"{name} is a function, not a method: write {name}(...)")
        if node.target is None and function.method:
            raise self.error(at, f"{name} is a method: write x.{name}(...)")
        syntax_args = ((node.target,) if node.target is not None else ()) + node.args
        given = len(node.args)
        wanted = len(function.parameters) - (1 if function.method else 0)
        if given != wanted:
            raise self.error(at, f"{name} takes {wanted} argument(s), got {given}")
        args = []
        for i, (arg, want) in enumerate(zip(syntax_args, function.parameters, strict=True)):
            number = i if function.method else i + 1
            what = f"the target of {name}" if number == 0 else f"argument {number} of {name}"
            args.append(self.expect(self.check(arg), want, arg.start, what))
        return typed.Call(function.result, function, tuple(args), at)


def _options(node: typed.Node) -> tuple[typed.Node, ...]:
    # (a | b) | c and a | (b | c) mean the same: flatten to one chain, as Mixer's generateOr does.
    return node.options if isinstance(node, typed.Default) else (node,)


def _suggest(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""
