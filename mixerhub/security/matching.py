"""The value matchers of Istio's AuthorizationPolicy, compiled once when configuration loads.

Every string field of a rule takes Istio's four forms (istio/api security/v1 Rule): exact
``abc``, prefix ``abc*``, suffix ``*abc`` and presence ``*`` (any non-empty value). A list of
them is one matcher: a set lookup and one ``startswith``/``endswith`` over a tuple, so a request
pays no parsing and no regex. Paths may also be Envoy URI templates (``/users/{*}/orders``),
the one place a regex is the matcher. Matchers take whatever a bag holds and answer False for a
value of the wrong type: a request cannot make evaluation raise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final

# A compiled test of one attribute value.
Matcher = Callable[[object], bool]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class StringMatcher:
    """Any of several Istio string patterns; hosts compare case-insensitively (RFC 4343).

    ``*`` is a non-empty value (Istio generates the regex ``.+``), except for what Istio matches
    as an HTTP header (hosts, methods, ``request.headers[...]``): there it is Envoy's
    ``present_match``, which a header sent with an empty value satisfies."""

    __slots__ = ("exact", "header", "ignore_case", "prefixes", "present", "suffixes")

    def __init__(
        self,
        exact: Iterable[str] = (),
        prefixes: Iterable[str] = (),
        suffixes: Iterable[str] = (),
        present: bool = False,
        ignore_case: bool = False,
        header: bool = False,
    ) -> None:
        fold = str.lower if ignore_case else str
        self.exact = frozenset(fold(e) for e in exact)
        self.prefixes = tuple(fold(p) for p in prefixes)
        self.suffixes = tuple(fold(s) for s in suffixes)
        self.present = present
        self.ignore_case = ignore_case
        self.header = header

    @classmethod
    def of(
        cls, patterns: Iterable[str], ignore_case: bool = False, header: bool = False
    ) -> StringMatcher:
        """From patterns as written in a policy. Istio checks ``*`` alone first, then a leading
        ``*`` (suffix), then a trailing one (prefix): ``*abc*`` is the suffix ``abc*``."""
        exact: list[str] = []
        prefixes: list[str] = []
        suffixes: list[str] = []
        present = False
        for p in patterns:
            if p == "*":
                present = True
            elif p.startswith("*"):
                suffixes.append(p[1:])
            elif p.endswith("*"):
                prefixes.append(p[:-1])
            else:
                exact.append(p)
        return cls(exact, prefixes, suffixes, present, ignore_case, header)

    def __call__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        if self.ignore_case:
            value = value.lower()
        return (
            value in self.exact
            or (self.present and (self.header or value != ""))
            or value.startswith(self.prefixes)
            or value.endswith(self.suffixes)
        )

    def __repr__(self) -> str:
        return (
            f"StringMatcher(exact={sorted(self.exact)}, prefixes={list(self.prefixes)},"
            f" suffixes={list(self.suffixes)}, present={self.present})"
        )


class AnyElement:
    """A string matcher over a value that may be a list: a JWT claim such as ``groups`` or
    ``aud`` matches when any of its string elements does (Envoy's ListMatcher ``oneOf``).
    Numbers, booleans and objects never match, as Envoy's string matcher does not."""

    __slots__ = ("match",)

    def __init__(self, match: Matcher) -> None:
        self.match = match

    def __call__(self, value: object) -> bool:
        if isinstance(value, str):
            return self.match(value)
        if isinstance(value, list | tuple):
            return any(isinstance(v, str) and self.match(v) for v in value)
        return False


class CommaSeparated:
    """``request.experimental.inline.headers[...]``: a header whose repeated values Envoy joins
    with commas matches when any one of them does."""

    __slots__ = ("match",)

    def __init__(self, match: Matcher) -> None:
        self.match = match

    def __call__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        return any(self.match(part) for part in value.split(","))


class PatternMatcher:
    """Istio's string forms plus regexes for the patterns that need one: Envoy URI templates in
    paths (``/users/{*}/orders``) and a ``*`` inside a namespace (``team-*-prod``)."""

    __slots__ = ("regexes", "strings")

    def __init__(self, strings: StringMatcher, regexes: tuple[re.Pattern[str], ...]) -> None:
        self.strings = strings
        self.regexes = regexes

    def __call__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        if self.strings(value):
            return True
        return any(r.fullmatch(value) for r in self.regexes)


def namespace_matcher(patterns: Iterable[str]) -> Matcher:
    """Namespaces: Istio turns every ``*`` into ``.*`` (srcNamespaceGenerator), so besides the
    usual forms a ``*`` may stand inside a pattern."""
    plain: list[str] = []
    globs: list[re.Pattern[str]] = []
    for p in patterns:
        if "*" in p.strip("*"):
            globs.append(re.compile(".*".join(re.escape(part) for part in p.split("*"))))
        else:
            plain.append(p)
    strings = StringMatcher.of(plain)
    return PatternMatcher(strings, tuple(globs)) if globs else strings


# Envoy's uri_template: a literal path segment is RFC 3986 pchar; {*} is one segment (one or
# more pchar), {**} any number of characters including '/' (source/extensions/path/
# uri_template_lib/uri_template_internal.cc).
MATCH_ONE: Final = "{*}"
MATCH_ANY: Final = "{**}"
_PCHAR = r"A-Za-z0-9\-._~%!$&'()+,;:@="
_LITERAL = re.compile(f"[{_PCHAR}]+")


def is_path_template(path: str) -> bool:
    return MATCH_ONE in path or MATCH_ANY in path


def path_template_problem(path: str) -> str | None:
    """Why a path is not acceptable to Istio's validation (CheckValidPathTemplate), or None.

    Braces are only allowed as a whole ``{*}`` or ``{**}`` segment; in a template every other
    segment is a pchar literal and nothing follows ``{**}`` but literals."""
    template = is_path_template(path)
    if template and not path.startswith("/"):
        return f"invalid path template {path!r}: a template must start with '/'"
    seen_any = False
    for segment in path.strip("/").split("/"):
        if segment in (MATCH_ONE, MATCH_ANY):
            if seen_any:
                return f"invalid path template {path!r}: {{**}} must be the last operator"
            seen_any = segment == MATCH_ANY
            continue
        if "{" in segment or "}" in segment:
            return (
                f"invalid path {path!r}: '{{' or '}}' outside a supported path template"
                " ({*} or {**} as a whole segment)"
            )
        if template and not _LITERAL.fullmatch(segment):
            return (
                f"invalid path template {path!r}: segment {segment!r} is not a valid literal"
                " (RFC 3986 pchar, no '*')"
            )
    return None


def compile_path_template(path: str) -> re.Pattern[str]:
    """A validated template (see path_template_problem) as the regex Envoy builds from it."""
    parts = []
    for segment in path[1:].split("/"):
        if segment == MATCH_ONE:
            parts.append(f"[{_PCHAR}]+")
        elif segment == MATCH_ANY:
            parts.append(f"[{_PCHAR}/]*")
        else:
            parts.append(re.escape(segment))
    return re.compile("/" + "/".join(parts))


def path_matcher(patterns: Iterable[str]) -> Matcher:
    plain: list[str] = []
    templates: list[re.Pattern[str]] = []
    for p in patterns:
        if is_path_template(p):
            templates.append(compile_path_template(p))
        else:
            plain.append(p)
    strings = StringMatcher.of(plain)
    return PatternMatcher(strings, tuple(templates)) if templates else strings


class RequestPrincipalMatcher:
    """``requestPrincipals`` and ``request.auth.principal``: ``<iss>/<sub>``, split at the last
    '/' (an issuer may be a URL), each half matched on its own as Istio's generator does:
    ``*`` needs a non-empty issuer and subject, ``iss/*`` any subject of that issuer,
    ``*example.com/sub`` an issuer ending in example.com."""

    __slots__ = ("pairs",)

    def __init__(self, patterns: Iterable[str]) -> None:
        self.pairs = tuple(_request_principal(p) for p in patterns)

    def __call__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        iss, sep, sub = value.rpartition("/")
        if not sep:
            iss, sub = value, ""
        return any(i(iss) and s(sub) for i, s in self.pairs)


_ANY: Final = StringMatcher(present=True)


def _request_principal(pattern: str) -> tuple[StringMatcher, StringMatcher]:
    iss, sep, sub = pattern.rpartition("/")
    found = bool(sep)
    if not found:
        iss, sub = pattern, ""
    if pattern == "*":
        return _ANY, _ANY
    if pattern.startswith("*"):
        if found:
            return (_ANY if iss == "*" else StringMatcher(suffixes=[iss[1:]])), StringMatcher(
                exact=[sub]
            )
        return _ANY, StringMatcher(suffixes=[pattern[1:]])
    if pattern.endswith("*"):
        if found:
            return StringMatcher(exact=[iss]), (
                _ANY if sub == "*" else StringMatcher(prefixes=[sub[:-1]])
            )
        return StringMatcher(prefixes=[pattern[:-1]]), _ANY
    return StringMatcher(exact=[iss]), StringMatcher(exact=[sub])


class ServiceAccountMatcher:
    """``serviceAccounts`` and ``source.serviceAccount``: ``<sa>`` (in the policy's namespace) or
    ``<ns>/<sa>``, matched against the peer principal ``<td>/ns/<ns>/sa/<sa>`` the way Istio's
    regex ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?`` does."""

    __slots__ = ("accounts",)

    def __init__(self, values: Iterable[str], namespace: str) -> None:
        accounts = set()
        for v in values:
            ns, sep, sa = v.partition("/")
            accounts.add((ns, sa) if sep else (namespace, v))
        self.accounts = frozenset(accounts)

    def __call__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        parts = value.split("/")
        # A trust domain, then "ns", the namespace, anything, "sa", the account, anything.
        for i in range(1, len(parts) - 1):
            if parts[i] != "ns" or not (i > 1 or parts[0]):
                continue
            ns = parts[i + 1]
            for j in range(i + 2, len(parts) - 1):
                if parts[j] == "sa" and (ns, parts[j + 1]) in self.accounts:
                    return True
        return False


class IPMatcher:
    """IP blocks: single addresses and CIDR ranges, compared as integers under a mask."""

    __slots__ = ("v4", "v6")

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for n in networks:
            entry = (int(n.network_address), int(n.netmask))
            (v4 if n.version == 4 else v6).append(entry)
        self.v4 = tuple(v4)
        self.v6 = tuple(v6)

    def __call__(self, value: object) -> bool:
        if isinstance(value, str):
            try:
                value = ipaddress.ip_address(value)
            except ValueError:
                return False
        if isinstance(value, ipaddress.IPv4Address):
            ranges = self.v4
        elif isinstance(value, ipaddress.IPv6Address):
            ranges = self.v6
        else:
            return False
        address = int(value)
        return any(address & mask == network for network, mask in ranges)


def parse_ip_block(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``203.0.113.4`` or ``203.0.113.0/24`` (host bits may be set, as Go's ParsePrefix allows);
    raises ValueError with Istio's wording."""
    if "/" in text:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError as e:
            raise ValueError(f"bad CIDR range ({text}): {e}") from None
    try:
        return ipaddress.ip_network(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"bad IP address ({text})") from None


class PortMatcher:
    __slots__ = ("ports",)

    def __init__(self, ports: Iterable[int]) -> None:
        self.ports = frozenset(ports)

    def __call__(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value in self.ports


def parse_port(text: str) -> int:
    """A port as Istio reads it (ParseUint, at most 65535); raises ValueError."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ValueError(f"bad port ({text}): a number from 0 to 65535")
    return int(text)


def lookup(value: object, path: tuple[str, ...]) -> object:
    """A nested claim (``request.auth.claims[a][b]``), or None where the path leads nowhere."""
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value
