"""Checks and field types shared by the networking kinds, after istiod's pkg/config/validation.

Each check returns the problem as text (None when the value is good), so a compile step can
record it at the field's path and go on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Final

from pydantic import BeforeValidator, Field

from mixerhub.store.errors import join_path
from mixerhub.types import Params

if TYPE_CHECKING:
    from mixerhub.store.compilation import Compilation
    from mixerhub.store.documents import Document

Path = tuple[str | int, ...]


class SpecErrors:
    """A document's errors, each reported at its path under ``prefix``; every kind's compile
    step reports through one, and stores the resource only when ``failed`` stayed false."""

    def __init__(self, doc: Document, c: Compilation, prefix: Path = ("spec",)) -> None:
        self.doc, self.c, self.prefix = doc, c, prefix
        self.failed = False

    def __call__(self, path: Path, reason: str) -> None:
        self.failed = True
        self.c.error(self.doc, join_path(*self.prefix, *path), reason)


DNS_SUFFIX: Final = "svc.cluster.local"

_LABEL = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
_LOWER_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-z]+")
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9}
_UNIT_NS["h"] = 3600 * 10**9
_MS = 1_000_000

# Istio's protocol names (protocol.Parse), upper-cased, by how Envoy handles them here.
HTTP_PROTOCOLS: Final = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
HTTP2_PROTOCOLS: Final = frozenset({"HTTP2", "GRPC"})
TCP_PROTOCOLS: Final = frozenset({"TCP", "TLS", "HTTPS", "MONGO", "REDIS", "MYSQL"})
UNSUPPORTED_PROTOCOLS: Final = frozenset({"UDP", "HTTP_PROXY"})


def _duration(value: object) -> object:
    """A Go duration ("1.5s", "5m", "100ms", as Istio's examples write them) or protobuf's
    JSON form ("1.5s") to nanoseconds."""
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for m in _GO_DURATION.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNIT_NS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"{value!r} is not a duration (e.g. 1.5s, 100ms, 5m)")
        return round(total)
    raise ValueError(f"{value!r} is not a duration (e.g. 1.5s, 100ms, 5m)")


# Nanoseconds.
Duration = Annotated[int, BeforeValidator(_duration)]


def duration_json(nanoseconds: int) -> str:
    """Protobuf JSON's form of a google.protobuf.Duration."""
    seconds, nanos = divmod(nanoseconds, 10**9)
    return f"{seconds}.{nanos:09d}s" if nanos else f"{seconds}s"


def duration_problem(nanoseconds: int, minimum: int = _MS) -> str | None:
    """Istio's ValidateDuration: at least 1ms, in whole milliseconds."""
    if nanoseconds < minimum:
        return "duration must be at least 1ms"
    if nanoseconds % _MS:
        return "only durations to ms precision are supported"
    return None


class Percent(Params):
    value: float = 0.0


class WorkloadSelector(Params):
    labels: dict[str, str] = Field(default_factory=dict)


class PortSelector(Params):
    number: int = 0


def dns_label_problem(label: str) -> str | None:
    if len(label) > 63 or not _LABEL.fullmatch(label):
        return f"{label!r} is not a valid DNS label"
    return None


def host_problem(host: str, *, wildcard: bool = True) -> str | None:
    """Istio's ValidateWildcardDomain: DNS labels, only the first of which may start with '*'."""
    if not host:
        return "domain name must not be empty"
    if len(host) > 255:
        return f"domain name {host!r} is too long"
    first, *rest = host.split(".")
    if first.startswith("*"):
        if not wildcard:
            return f"wildcard host {host!r} is not allowed here"
        first = first[1:]
        if not first and not rest:
            return None
        if not first:
            first = rest.pop(0) if rest else ""
    for label in (first, *rest):
        if dns_label_problem(label) is not None:
            return f"{host!r} is not a valid host: {label!r} is not a DNS label"
    return None


def fqdn_problem(host: str) -> str | None:
    return host_problem(host, wildcard=False)


def resolve_host(host: str, namespace: str) -> str:
    """Istio's ResolveShortnameToFQDN: a name without a dot is a service of the config's own
    namespace; wildcards and dotted names are taken as given."""
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}.{DNS_SUFFIX}"


def host_matches(pattern: str, host: str) -> bool:
    """Whether a (possibly wildcard) host pattern covers a host: ``*.a.com`` covers
    ``b.a.com`` and ``c.b.a.com``; ``*`` covers every host."""
    if pattern == "*" or pattern == host:
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return False


def hosts_overlap(a: str, b: str) -> bool:
    return host_matches(a, b) or host_matches(b, a)


def ip_problem(address: str) -> str | None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    return None


def cidr_problem(address: str) -> str | None:
    try:
        ipaddress.ip_network(address, strict=False)
    except ValueError:
        return f"{address!r} is neither an IP address nor a CIDR range"
    return None


def port_problem(number: int) -> str | None:
    if not 1 <= number <= 65535:
        return f"port number {number} must be in the range 1..65535"
    return None


def protocol_problem(protocol: str) -> str | None:
    upper = protocol.upper()
    if upper in HTTP_PROTOCOLS or upper in TCP_PROTOCOLS:
        return None
    if upper in UNSUPPORTED_PROTOCOLS:
        return f"protocol {protocol} is not supported by mixerhub"
    known = ", ".join(sorted(HTTP_PROTOCOLS | TCP_PROTOCOLS))
    return f"unrecognized protocol {protocol!r} (one of {known})"


def is_http(protocol: str) -> bool:
    return protocol.upper() in HTTP_PROTOCOLS


def label_problems(labels: dict[str, str]) -> Iterable[tuple[str, str]]:
    """(key, problem) for each bad label (Kubernetes' qualified names and label values)."""
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if prefix and host_problem(prefix, wildcard=False):
            yield key, f"label key {key!r} has an invalid prefix"
        elif not name or len(name) > 63 or not _QUALIFIED.fullmatch(name):
            yield key, f"invalid label key {key!r}"
        elif value and (len(value) > 63 or not _QUALIFIED.fullmatch(value)):
            yield key, f"invalid label value {value!r}"


def header_name_problem(name: str) -> str | None:
    """Istio's ValidateHTTPHeaderName and its lower-case rule for header matches."""
    if not name:
        return "header name must not be empty"
    if name.lower() != name:
        return f"header name {name!r} must be lower case"
    if not _HEADER_NAME.fullmatch(name):
        return f"invalid header name {name!r}"
    return None


# RE2, Envoy's regex engine, has no look-around and no backreferences.
_NOT_RE2 = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\(\?P=")


def regex_problem(pattern: str) -> str | None:
    if not pattern:
        return "regex must not be empty"
    if _NOT_RE2.search(pattern):
        return f"regex {pattern!r} uses look-around or backreferences, which RE2 does not support"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"regex {pattern!r} does not compile: {e}"
    return None


def export_to_problems(export_to: list[str]) -> Iterable[tuple[int, str]]:
    """Istio's ValidateExportTo: ".", "*", "~" or namespace names, each once; "~" alone."""
    seen: set[str] = set()
    for i, ns in enumerate(export_to):
        if ns in seen:
            yield i, f"duplicate entry {ns!r} in exportTo"
        seen.add(ns)
        if ns not in (".", "*", "~") and (len(ns) > 63 or not _LOWER_LABEL.fullmatch(ns)):
            yield i, f"invalid namespace {ns!r} in exportTo"
    if "~" in seen and len(seen) > 1:
        yield export_to.index("~"), "exportTo '~' (none) must be the only entry"


def export_scope(export_to: list[str], namespace: str) -> frozenset[str]:
    """The namespaces a resource is visible to ("*" for all); default: every namespace."""
    if not export_to:
        return frozenset({"*"})
    return frozenset(namespace if ns == "." else ns for ns in export_to if ns != "~")


def visible(scope: frozenset[str], namespace: str) -> bool:
    return "*" in scope or namespace in scope


def not_supported(
    fail: Callable[[tuple[str | int, ...], str], None],
    path: tuple[str | int, ...],
    fields: dict[str, object],
) -> None:
    """Record an error for each field Istio has that mixerhub does not implement: a config
    that relies on one must not silently behave differently."""
    for name, value in fields.items():
        if value is not None:
            fail((*path, name), "not supported by mixerhub")
