"""compile_expression: parse, check, fold constants, and generate one Python function.

The generated function is a single ``return <python expression>`` inside a try block, so the
request path pays only for the operations the expression itself needs: ``bag["a"]`` for an
attribute, ``bag.get("a", _M)`` where a ``|`` default may apply, ``str.startswith`` for a glob.
Mixer compiled to IL for an interpreter (mixer/pkg/lang/compiler); Python's own bytecode plays
that part here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mixerhub.attributes import ValueType
from mixerhub.expression import typed
from mixerhub.expression.check import check, coerce
from mixerhub.expression.errors import EvaluationError, ExpressionError
from mixerhub.expression.fold import fold, nillable
from mixerhub.expression.functions import EQUALITY, Function, compile_regex
from mixerhub.expression.parse import parse

Evaluate = Callable[[Mapping[str, object]], object]


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression. ``evaluate(bag)`` raises only EvaluationError."""

    source: str
    result_type: ValueType
    referenced: frozenset[str]  # the attributes evaluation may read
    evaluate: Evaluate


def compile_expression(
    source: str,
    attributes: Mapping[str, ValueType],
    expected: ValueType | None = None,
) -> Expression:
    """Compile ``source`` against the attribute manifest ``attributes`` (name -> type).

    With ``expected`` (other than VALUE_TYPE_UNSPECIFIED) the result must have that type; Mixer
    required an exact match, converting only duration literals. An empty source is an error: a
    rule's empty match means true, which is for the caller to decide.
    """
    if not source.strip():
        raise ExpressionError(source, 0, "empty expression")
    try:
        tree = check(parse(source), attributes, source)
        if expected is not None and expected is not ValueType.VALUE_TYPE_UNSPECIFIED:
            converted = coerce(tree, expected)
            if converted is None:
                raise ExpressionError(
                    source, 0, f"expression has type {tree.type.name}, want {expected.name}"
                )
            tree = converted
        tree = fold(tree, source)
        generator = Generator(source)
        python = generator.function(tree)
        code = compile(python, f"<expression {source[:60]!r}>", "exec")
    except (RecursionError, SyntaxError, MemoryError):
        # Python's own parser limits nesting too (200 parentheses); Mixer's configs stay far below.
        raise ExpressionError(source, 0, "expression is nested too deeply") from None
    namespace = generator.namespace
    exec(code, namespace)
    return Expression(
        source=source,
        result_type=tree.type,
        referenced=frozenset(_attribute_names(tree)),
        evaluate=namespace["_expr"],
    )


def inline_code(
    generator: Generator,
    source: str,
    attributes: Mapping[str, ValueType],
    expected: ValueType | None,
) -> tuple[str, frozenset[str]] | None:
    """``source`` as one Python expression in ``generator``'s terms, compiled as
    compile_expression compiles it, with the attributes it reads; None when it cannot be (the
    caller calls the compiled function instead). The code raises KeyError for a missing
    attribute and EvaluationError or another exception when evaluation fails."""
    try:
        generator.source = source
        tree = check(parse(source), attributes, source)
        if expected is not None and expected is not ValueType.VALUE_TYPE_UNSPECIFIED:
            converted = coerce(tree, expected)
            if converted is None:
                return None
            tree = converted
        tree = fold(tree, source)
        return generator.strict(tree), frozenset(_attribute_names(tree))
    except (ExpressionError, RecursionError):
        return None


def _attribute_names(node: typed.Node) -> Iterator[str]:
    match node:
        case typed.Attribute():
            yield node.name
        case typed.Const():
            pass
        case typed.Lookup():
            yield from _attribute_names(node.map)
            yield from _attribute_names(node.key)
        case typed.Default():
            for option in node.options:
                yield from _attribute_names(option)
        case typed.Call():
            for arg in node.args:
                yield from _attribute_names(arg)
        case typed.Compare() | typed.Logic() | typed.Add():
            yield from _attribute_names(node.left)
            yield from _attribute_names(node.right)
        case typed.Not() | typed.Negate():
            yield from _attribute_names(node.operand)
        case typed.Conditional():
            yield from _attribute_names(node.condition)
            yield from _attribute_names(node.then)
            yield from _attribute_names(node.otherwise)


def _chain(node: typed.Node, op: str) -> Iterator[typed.Node]:
    """The operands of a run of one associative operator (&&, || or +)."""
    if (isinstance(node, typed.Logic) and node.op == op) or (
        isinstance(node, typed.Add) and op == "+"
    ):
        yield from _chain(node.left, op)
        yield from _chain(node.right, op)
    else:
        yield node


def _lookup_failed(error: KeyError) -> EvaluationError:
    name = error.args[0] if error.args else "?"
    return EvaluationError(f'lookup failed: "{name}"')


def _evaluation_failed(error: Exception) -> EvaluationError:
    return EvaluationError(f"evaluation failed: {type(error).__name__}: {error}")


class _Missing:
    """The sentinel ``bag.get(name, _M)`` returns for an absent attribute or key."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()

_INT64 = ValueType.INT64
_WRAP = "((({}) + 9223372036854775808) & 18446744073709551615) - 9223372036854775808"


class Generator:
    """Typed tree to the text of ``def _expr(bag)``; helpers and non-literal constants go into
    ``namespace``, the generated function's globals. A subclass may read attributes from
    somewhere other than ``bag`` (see ``attribute`` and ``attribute_present``)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.namespace: dict[str, Any] = {
            "_M": MISSING,
            "_EvaluationError": EvaluationError,
            "_lookup_failed": _lookup_failed,
            "_evaluation_failed": _evaluation_failed,
        }
        self.temps = 0
        self.constants = 0

    def function(self, tree: typed.Node) -> str:
        return (
            "def _expr(bag):\n"
            "    try:\n"
            f"        return {self.strict(tree)}\n"
            "    except KeyError as e:\n"
            "        raise _lookup_failed(e) from None\n"
            "    except _EvaluationError:\n"
            "        raise\n"
            "    except Exception as e:\n"
            "        raise _evaluation_failed(e) from e\n"
        )

    def temp(self) -> str:
        self.temps += 1
        return f"_t{self.temps}"

    def constant(self, value: object) -> str:
        if isinstance(value, bool | int | str) or (
            isinstance(value, float) and math.isfinite(value)
        ):
            return repr(value)
        self.constants += 1
        name = f"_c{self.constants}"
        self.namespace[name] = value
        return name

    def helper(self, function: Callable[..., object], name: str) -> str:
        self.namespace[name] = function
        return name

    def attribute(self, name: str) -> str:
        """Code reading attribute ``name``, raising KeyError when it is absent."""
        return f"bag[{name!r}]"

    def attribute_present(self, name: str, out: str) -> str:
        """A condition true when attribute ``name`` is present, having stored it in ``out``."""
        return f"({out} := bag.get({name!r}, _M)) is not _M"

    def strict(self, node: typed.Node) -> str:
        """Code that evaluates ``node``, raising KeyError for a missing attribute."""
        match node:
            case typed.Const():
                return self.constant(node.value)
            case typed.Attribute():
                return self.attribute(node.name)
            case typed.Lookup():
                # Mixer's NLookup: a missing key reads as "".
                return f"{self.strict(node.map)}.get({self.strict(node.key)}, '')"
            case typed.Default():
                code = self.strict(node.options[-1])
                for option in reversed(node.options[:-1]):
                    out = self.temp()
                    present = self.present(option, out)
                    code = (
                        self.strict(option)
                        if present is None
                        else f"({out} if {present} else {code})"
                    )
                return code
            case typed.Call():
                return self.call(node)
            case typed.Compare():
                return self.compare(node)
            case typed.Logic():
                # a || b || c as one flat `or`: the same short-circuit order, and long chains stay
                # within the nesting Python's parser allows.
                word = " and " if node.op == "&&" else " or "
                return f"({word.join(self.strict(n) for n in _chain(node, node.op))})"
            case typed.Not():
                return f"(not {self.strict(node.operand)})"
            case typed.Negate():
                code = f"(-{self.strict(node.operand)})"
                return f"({_WRAP.format(code)})" if node.type is _INT64 else code
            case typed.Add():
                # Flat too; wrapping an INT64 sum once at the end equals wrapping each step.
                code = " + ".join(self.strict(n) for n in _chain(node, "+"))
                return f"({_WRAP.format(code)})" if node.type is _INT64 else f"({code})"
            case typed.Conditional():
                return (
                    f"({self.strict(node.then)} if {self.strict(node.condition)}"
                    f" else {self.strict(node.otherwise)})"
                )
        raise AssertionError(f"unexpected node {node!r}")  # pragma: no cover

    def present(self, node: typed.Node, out: str) -> str | None:
        """A condition that is true when ``node`` is present, having stored its value in ``out``;
        None when ``node`` cannot be absent (see fold.nillable)."""
        match node:
            case typed.Attribute():
                return self.attribute_present(node.name, out)
            case typed.Lookup():
                # Mixer's TLookup: the map and the key may each be absent, and so may the entry.
                conditions: list[str | None] = []
                if nillable(node.map):
                    map_code = self.temp()
                    conditions.append(self.present(node.map, map_code))
                else:
                    map_code = self.strict(node.map)
                if nillable(node.key):
                    key_code = self.temp()
                    conditions.append(self.present(node.key, key_code))
                else:
                    key_code = self.strict(node.key)
                conditions.append(f"({out} := {map_code}.get({key_code}, _M)) is not _M")
                return "(" + " and ".join(c for c in conditions if c) + ")"
            case typed.Default() if nillable(node):
                return "(" + " or ".join(self.present(o, out) or "" for o in node.options) + ")"
        return None

    def compare(self, node: typed.Compare) -> str:
        left, right = self.strict(node.left), self.strict(node.right)
        equal = EQUALITY.get(node.left.type)
        if node.op in ("==", "!=") and equal is not None:
            name = f"_{node.left.type.name.lower()}_equal"
            code = f"{self.helper(equal, name)}({left}, {right})"
            return code if node.op == "==" else f"(not {code})"
        return f"({left} {node.op} {right})"

    def call(self, node: typed.Call) -> str:
        function: Function = node.function
        args = node.args
        match function.name:
            case "match" if isinstance(pattern := args[1], typed.Const):
                # The glob is known now: a prefix or suffix test, or plain equality.
                value, glob = self.strict(args[0]), str(pattern.value)
                if glob.endswith("*"):
                    return f"{value}.startswith({glob[:-1]!r})"
                if glob.startswith("*"):
                    return f"{value}.endswith({glob[1:]!r})"
                return f"({value} == {glob!r})"
            case "matches" if isinstance(pattern := args[0], typed.Const):
                try:
                    regex = compile_regex(str(pattern.value))
                except EvaluationError as e:
                    raise ExpressionError(self.source, node.position, str(e)) from None
                return f"({self.constant(regex)}.search({self.strict(args[1])}) is not None)"
            case "startsWith":
                return f"{self.strict(args[0])}.startswith({self.strict(args[1])})"
            case "endsWith":
                return f"{self.strict(args[0])}.endswith({self.strict(args[1])})"
            case "toLower":
                return f"{self.strict(args[0])}.lower()"
            case "size":
                return f"len({self.strict(args[0])}.encode())"
        name = self.helper(function.impl, f"_fn_{function.name}")
        return f"{name}({', '.join(self.strict(a) for a in args)})"
