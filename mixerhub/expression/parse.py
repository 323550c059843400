"""Text to syntax tree (mixerhub.expression.ast), with Go's lexical rules for literals.

The grammar is grammar.lark; the LALR parser is built once, at import.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from mixerhub.expression.ast import (
    Binary,
    Call,
    Index,
    Literal,
    Name,
    Node,
    Paren,
    Select,
    Unary,
)
from mixerhub.expression.errors import ExpressionError

_PARSER = Lark(
    Path(__file__).with_name("grammar.lark").read_text(encoding="utf-8"),
    parser="lalr",
    lexer="contextual",
    maybe_placeholders=True,
)

# Terminals a syntax error can name; "an operand" stands for every way an operand can start.
_OPERAND_STARTS = frozenset({"NAME", "INT", "FLOAT", "STRING", "RAW_STRING", "CHAR"})


@functools.lru_cache(maxsize=4096)
def parse(source: str) -> Node:
    """Parse ``source``; raises ExpressionError with the offending position. Cached (trees are
    immutable): a configuration repeats its expressions, every reload parses them again, and
    generated code (report rules, access-log dispatch) compiles them once more."""
    try:
        tree = _PARSER.parse(source)
    except UnexpectedInput as e:
        raise _syntax_error(source, e) from None
    return _Builder(source).node(tree)


def _syntax_error(source: str, e: UnexpectedInput) -> ExpressionError:
    if isinstance(e, UnexpectedToken):
        token = e.token
        if token.type == "$END":
            return ExpressionError(
                source, len(source), f"unexpected end of expression{_expected(e.expected)}"
            )
        return ExpressionError(
            source, token.start_pos or 0, f"unexpected {str(token)!r}{_expected(e.expected)}"
        )
    if isinstance(e, UnexpectedCharacters):
        pos = e.pos_in_stream or 0
        char = source[pos]
        if char in "\"'`":
            return ExpressionError(source, pos, "unterminated or malformed literal")
        return ExpressionError(source, pos, f"unexpected character {char!r}")
    return ExpressionError(source, getattr(e, "pos_in_stream", 0) or 0, "syntax error")


def _expected(terminals: set[str]) -> str:
    if terminals & _OPERAND_STARTS:
        return "; expected an operand"
    shown = sorted(repr(_PARSER.get_terminal(t).pattern.value) for t in terminals if t != "$END")
    if not shown or len(shown) > 4:
        return ""
    return f"; expected {' or '.join(shown)}"


class _Builder:
    """Lark's parse tree to ast nodes, flattening selector chains into attribute names."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, position: int, reason: str) -> ExpressionError:
        return ExpressionError(self.source, position, reason)

    def node(self, tree: Tree[Token] | Token) -> Node:
        if isinstance(tree, Token):  # pragma: no cover - every terminal is wrapped by a rule
            raise self.error(tree.start_pos or 0, f"unexpected {str(tree)!r}")
        kids = tree.children
        match tree.data:
            case "binary":
                left, op, right = kids
                assert isinstance(op, Token)
                lhs = self.node(_tree(left))
                return Binary(lhs.start, str(op), _pos(op), lhs, self.node(_tree(right)))
            case "unary":
                op, operand = kids
                assert isinstance(op, Token)
                return Unary(_pos(op), str(op), self.node(_tree(operand)))
            case "select":
                base, _dot, field = kids
                assert isinstance(field, Token)
                inner = self.node(_tree(base))
                if isinstance(inner, Name):
                    # Mixer's flattenSelectors: a.b.c is the single attribute "a.b.c".
                    return Name(inner.start, f"{inner.name}.{field}", _pos(field))
                return Select(inner.start, inner, str(field), _pos(field))
            case "call":
                callee, _lpar, arguments, _rpar = kids
                args = () if arguments is None else self.arguments(arguments)
                return self.call(self.node(_tree(callee)), args)
            case "index":
                target, bracket, key, _rsqb = kids
                assert isinstance(bracket, Token)
                inner = self.node(_tree(target))
                return Index(inner.start, inner, self.node(_tree(key)), _pos(bracket))
            case "paren":
                lpar, inner_tree, _rpar = kids
                assert isinstance(lpar, Token)
                return Paren(_pos(lpar), self.node(_tree(inner_tree)))
            case "name":
                token = _token(kids[0])
                # Mixer lowercased identifiers before comparing with true/false, so TRUE works.
                if token.lower() in ("true", "false"):
                    return Literal(_pos(token), token.lower() == "true")
                return Name(_pos(token), str(token), _pos(token))
            case "int":
                token = _token(kids[0])
                value = int(token, 10)
                if value > 2**63 - 1:
                    raise self.error(_pos(token), f"integer literal {token} overflows INT64")
                return Literal(_pos(token), value)
            case "float":
                token = _token(kids[0])
                return Literal(_pos(token), float(token))
            case "string":
                token = _token(kids[0])
                return Literal(_pos(token), self.unquote(token, '"'))
            case "raw_string":
                token = _token(kids[0])
                # Go drops carriage returns from raw strings.
                return Literal(_pos(token), token[1:-1].replace("\r", ""))
            case "char":
                token = _token(kids[0])
                rune = self.unquote(token, "'")
                if len(rune) != 1:
                    raise self.error(_pos(token), "a rune literal holds exactly one character")
                return Literal(_pos(token), rune)
        raise self.error(0, f"unexpected syntax {tree.data}")  # pragma: no cover

    def arguments(self, tree: Tree[Token] | Token) -> tuple[Node, ...]:
        assert isinstance(tree, Tree)
        return tuple(self.node(k) for k in tree.children if isinstance(k, Tree))

    def call(self, callee: Node, args: tuple[Node, ...]) -> Call:
        if isinstance(callee, Name):
            # a.b.c.startsWith(x): the last segment is the method, the rest the attribute.
            target_name, dot, method = callee.name.rpartition(".")
            if not dot:
                return Call(callee.start, method, callee.start, None, args)
            target = Name(callee.start, target_name, callee.start)
            return Call(callee.start, method, callee.last_start, target, args)
        if isinstance(callee, Select):
            return Call(callee.start, callee.field, callee.field_start, callee.base, args)
        raise self.error(callee.start, "only functions and methods can be called")

    def unquote(self, token: Token, quote: str) -> str:
        """Decode a Go interpreted string or rune literal (the Go spec's escape sequences)."""
        start = _pos(token)
        body = str(token)[1:-1]
        out = bytearray()
        i = 0
        while i < len(body):
            ch = body[i]
            if ch != "\\":
                out += ch.encode()
                i += 1
                continue
            escape = body[i + 1]
            where = start + 1 + i
            if escape in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[escape]
                i += 2
            elif escape == quote:
                out += quote.encode()
                i += 2
            elif escape in "01234567":
                digits = body[i + 1 : i + 4]
                if not _OCTAL.fullmatch(digits) or int(digits, 8) > 255:
                    raise self.error(where, "invalid octal escape: want three digits up to \\377")
                out += _byte_or_rune(int(digits, 8), quote)
                i += 4
            elif escape in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[escape]
                digits = body[i + 2 : i + 2 + width]
                if not _HEX.fullmatch(digits) or len(digits) != width:
                    raise self.error(where, f"invalid \\{escape} escape: want {width} hex digits")
                code = int(digits, 16)
                if escape == "x":
                    out += _byte_or_rune(code, quote)
                else:
                    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                        raise self.error(
                            where, f"escape \\{escape}{digits} is not a valid code point"
                        )
                    out += chr(code).encode()
                i += 2 + width
            else:
                raise self.error(where, f"unknown escape sequence \\{escape}")
        try:
            return out.decode()
        except UnicodeDecodeError:
            raise self.error(start, "string literal is not valid UTF-8") from None


_SIMPLE_ESCAPES = {
    "a": b"\a",
    "b": b"\b",
    "f": b"\f",
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "v": b"\v",
    "\\": b"\\",
}
_OCTAL = re.compile(r"[0-7]{3}")
_HEX = re.compile(r"[0-9a-fA-F]*")


def _byte_or_rune(code: int, quote: str) -> bytes:
    # In a Go string \xff is one byte; in a rune literal it is the code point U+00FF.
    return bytes([code]) if quote == '"' else chr(code).encode()


def _tree(child: Tree[Token] | Token | None) -> Tree[Token] | Token:
    assert child is not None
    return child


def _token(child: Tree[Token] | Token | None) -> Token:
    assert isinstance(child, Token)
    return child


def _pos(token: Token) -> int:
    return token.start_pos or 0
