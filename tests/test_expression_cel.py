"""The official CEL implementation as an oracle for the subset CEXL shares with it.

Hypothesis builds a typed expression tree, renders it once as CEXL and once as CEL, and both
engines evaluate it against the same generated attribute bag; the values must be equal.

Where the two languages differ, generation stays on the common ground:
- ``matches``: CEXL's receiver is the pattern (Mixer's ``"svc.*".matches(destination.service)``),
  CEL's is the subject, so the two renderings swap the operands.
- ``conditional(c, a, b)`` is CEL's ``c ? a : b``.
- A missing map key reads as "" in CEXL (Mixer's NLookup) but is an error in CEL: maps are only
  indexed with keys every generated map has.
- ``size`` counts UTF-8 bytes in CEXL (Go's len) and code points in CEL: strings are ASCII.
- INT64 overflow wraps in CEXL (Go) and is an error in CEL: integers are small and trees shallow.
- CEXL orders strings, numbers and timestamps but not BOOL; CEL also orders BOOL: no ``<`` on BOOL.
- Operands of one comparison always have one type (CEXL has no heterogeneous equality, nor does
  this CEL build).
- CEXL's ``|``, ``match`` and the network-name functions have no CEL counterpart, nor have CEL's
  ``- * / %`` a CEXL one: neither is generated.
- Regular expressions are RE2 in CEL and Python's re here: only patterns with one meaning in both.
- Doubles are multiples of 1/4 (no NaN or infinity), so every sum is exact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixerhub.attributes import ValueType
from mixerhub.expression import compile_expression

INTS = ("n.one", "n.two")
STRINGS = ("s.one", "s.two")
BOOLS = ("b.one", "b.two")
DOUBLES = ("d.one", "d.two")
MAPS = ("m.one",)
MAP_KEYS = ("a", "b")  # every generated map has these keys

ATTRIBUTES = {
    **dict.fromkeys(INTS, ValueType.INT64),
    **dict.fromkeys(STRINGS, ValueType.STRING),
    **dict.fromkeys(BOOLS, ValueType.BOOL),
    **dict.fromkeys(DOUBLES, ValueType.DOUBLE),
    **dict.fromkeys(MAPS, ValueType.STRING_MAP),
}
CEL_ENV = cel.NewEnv(
    variables={
        **dict.fromkeys(INTS, cel.Type.INT),
        **dict.fromkeys(STRINGS, cel.Type.STRING),
        **dict.fromkeys(BOOLS, cel.Type.BOOL),
        **dict.fromkeys(DOUBLES, cel.Type.DOUBLE),
        **dict.fromkeys(MAPS, cel.Type.Map(cel.Type.STRING, cel.Type.STRING)),
    }
)

# No quotes or backslashes: the two languages' escape sequences are not under test here.
ALPHABET = "abcxyzAB -_./"
# Patterns whose RE2 and Python meanings agree.
PATTERNS = ("a", "^a", "b$", "a.c", "[ab]+", "^$", "x|y", "a*b", "^[a-z]+$", "\\.")


@dataclass(frozen=True)
class Pair:
    """One expression in both languages."""

    cexl: str
    cel: str


def same(text: str) -> Pair:
    return Pair(text, text)


def quote(value: str) -> str:
    # "\\" is a backslash in both Go and CEL string literals.
    return '"' + value.replace("\\", "\\\\") + '"'


def string_literal(value: str) -> Pair:
    return same(quote(value))


def binary(op: str) -> Callable[[tuple[Pair, Pair]], Pair]:
    return lambda p: Pair(f"({p[0].cexl} {op} {p[1].cexl})", f"({p[0].cel} {op} {p[1].cel})")


def conditional(p: tuple[Pair, Pair, Pair]) -> Pair:
    c, a, b = p
    return Pair(f"conditional({c.cexl}, {a.cexl}, {b.cexl})", f"({c.cel} ? {a.cel} : {b.cel})")


def comparisons(operands: st.SearchStrategy[Pair], ops: tuple[str, ...]) -> st.SearchStrategy[Pair]:
    return st.tuples(st.sampled_from(ops), operands, operands).map(
        lambda t: binary(t[0])((t[1], t[2]))
    )


ORDERING = ("==", "!=", "<", "<=", ">", ">=")


@functools.cache
def ints(depth: int) -> st.SearchStrategy[Pair]:
    leaf = st.one_of(
        st.integers(0, 50).map(lambda i: same(str(i))), st.sampled_from(INTS).map(same)
    )
    if depth == 0:
        return leaf
    sub = ints(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, sub).map(binary("+")),
        sub.map(lambda x: Pair(f"(-{x.cexl})", f"(-{x.cel})")),
        strings(depth - 1).map(lambda s: Pair(f"size({s.cexl})", f"size({s.cel})")),
        st.tuples(bools(depth - 1), sub, sub).map(conditional),
    )


@functools.cache
def doubles(depth: int) -> st.SearchStrategy[Pair]:
    leaf = st.one_of(
        st.integers(0, 40).map(lambda k: same(repr(k / 4))), st.sampled_from(DOUBLES).map(same)
    )
    if depth == 0:
        return leaf
    sub = doubles(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, sub).map(binary("+")),
        sub.map(lambda x: Pair(f"(-{x.cexl})", f"(-{x.cel})")),
        st.tuples(bools(depth - 1), sub, sub).map(conditional),
    )


@functools.cache
def strings(depth: int) -> st.SearchStrategy[Pair]:
    leaf = st.one_of(
        st.text(ALPHABET, max_size=5).map(string_literal),
        st.sampled_from(STRINGS).map(same),
        st.tuples(st.sampled_from(MAPS), st.sampled_from(MAP_KEYS)).map(
            lambda t: same(f'{t[0]}["{t[1]}"]')
        ),
    )
    if depth == 0:
        return leaf
    sub = strings(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, sub).map(binary("+")),
        st.tuples(bools(depth - 1), sub, sub).map(conditional),
    )


@functools.cache
def bools(depth: int) -> st.SearchStrategy[Pair]:
    leaf = st.one_of(st.sampled_from(("true", "false")).map(same), st.sampled_from(BOOLS).map(same))
    if depth == 0:
        return leaf
    sub = bools(depth - 1)
    below = depth - 1
    return st.one_of(
        leaf,
        st.tuples(sub, sub).map(binary("&&")),
        st.tuples(sub, sub).map(binary("||")),
        sub.map(lambda x: Pair(f"(!{x.cexl})", f"(!{x.cel})")),
        comparisons(sub, ("==", "!=")),
        comparisons(ints(below), ORDERING),
        comparisons(doubles(below), ORDERING),
        comparisons(strings(below), ORDERING),
        st.tuples(st.sampled_from(("startsWith", "endsWith")), strings(below), strings(below)).map(
            lambda t: Pair(f"{t[1].cexl}.{t[0]}({t[2].cexl})", f"{t[1].cel}.{t[0]}({t[2].cel})")
        ),
        st.tuples(st.sampled_from(PATTERNS), strings(below)).map(
            lambda t: Pair(
                f"{quote(t[0])}.matches({t[1].cexl})", f"{t[1].cel}.matches({quote(t[0])})"
            )
        ),
        st.tuples(sub, sub, sub).map(conditional),
    )


DEPTH = 3
EXPRESSIONS = st.one_of(bools(DEPTH), ints(DEPTH), strings(DEPTH), doubles(DEPTH))

_text = st.text(ALPHABET, max_size=6)
BAGS = st.fixed_dictionaries(
    {
        **dict.fromkeys(INTS, st.integers(-50, 50)),
        **dict.fromkeys(STRINGS, _text),
        **dict.fromkeys(BOOLS, st.booleans()),
        **dict.fromkeys(DOUBLES, st.integers(-40, 40).map(lambda k: k / 4)),
        **dict.fromkeys(
            MAPS,
            st.fixed_dictionaries(dict.fromkeys(MAP_KEYS, _text), optional={"c": _text, "": _text}),
        ),
    }
)


def cel_value(source: str, bag: dict[str, Any]) -> object:
    result = CEL_ENV.compile(source).eval(data=bag)
    assert result.type() != cel.Type.ERROR, f"CEL failed on {source}: {result.value()}"
    return result.value()


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(expression=EXPRESSIONS, bag=BAGS)
def test_agrees_with_cel(expression: Pair, bag: dict[str, Any]) -> None:
    ours = compile_expression(expression.cexl, ATTRIBUTES).evaluate(bag)
    theirs = cel_value(expression.cel, bag)
    assert type(ours) is type(theirs), (expression, bag, ours, theirs)
    assert ours == theirs, (expression, bag)


@settings(max_examples=100, deadline=None, database=None)
@given(expression=EXPRESSIONS)
def test_result_type_agrees_with_cel(expression: Pair) -> None:
    ours = compile_expression(expression.cexl, ATTRIBUTES).result_type
    theirs = CEL_ENV.compile(expression.cel).return_type()
    want = {
        ValueType.BOOL: cel.Type.BOOL,
        ValueType.INT64: cel.Type.INT,
        ValueType.DOUBLE: cel.Type.DOUBLE,
        ValueType.STRING: cel.Type.STRING,
    }[ours]
    assert theirs == want, expression


def test_hand_picked_cases_agree_with_cel() -> None:
    bag = {
        "n.one": 3,
        "n.two": -7,
        "s.one": "abc",
        "s.two": "",
        "b.one": True,
        "b.two": False,
        "d.one": 0.25,
        "d.two": -1.5,
        "m.one": {"a": "x.y", "b": ""},
    }
    for pair in (
        same('s.one.startsWith("a") && m.one["a"].endsWith(".y") && size(s.two) == 0'),
        same("n.one + n.two < 0 || !(b.one == b.two)"),
        same('(s.one + m.one["b"]) >= "abc" && d.one + d.two == -1.25'),
        Pair('"^a.c$".matches(s.one)', 's.one.matches("^a.c$")'),
        Pair("conditional(b.two, n.one, -n.two)", "(b.two ? n.one : -n.two)"),
    ):
        assert compile_expression(pair.cexl, ATTRIBUTES).evaluate(bag) == cel_value(pair.cel, bag)
