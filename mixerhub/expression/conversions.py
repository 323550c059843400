"""Text to Mixer's network-name types, and the equality Mixer used for each.

Mixer's externs (mixer/pkg/lang/externs.go) turned a string into IP_ADDRESS, TIMESTAMP, DNS_NAME,
EMAIL_ADDRESS or URI, failing on malformed text, and compared those types with normalizing
equality rather than byte equality (``ip_equal``, ``dnsName_equal``...). Go's own parsers did the
work there (net.ParseIP, time.Parse, x/net/idna, net/mail, net/url); these follow the same rules
closely enough for configuration literals and attribute values, and fail with Mixer's messages.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import unicodedata
from fractions import Fraction
from urllib.parse import SplitResult, urlsplit

from mixerhub.expression.errors import EvaluationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip(text: str) -> IPAddress:
    """net.ParseIP: dotted IPv4 or IPv6 text (no zone, no leading zeros)."""
    try:
        if "%" in text:  # Go's ParseIP has no zones; Python's ip_address would accept fe80::1%eth0.
            raise ValueError(text)
        return ipaddress.ip_address(text)
    except ValueError:
        raise EvaluationError(f"could not convert {text} to IP_ADDRESS") from None


def ip_equal(a: IPAddress, b: IPAddress) -> bool:
    # Go's net.IP.Equal treats an IPv4 address and its IPv4-mapped IPv6 form as equal.
    return _unmapped(a) == _unmapped(b)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)


def timestamp(text: str) -> datetime.datetime:
    """time.Parse(time.RFC3339, text), as UTC. Go accepts fractional seconds there too."""
    m = _RFC3339.fullmatch(text)
    try:
        if m is None:
            raise ValueError(text)
        year, month, day, hour, minute, second, fraction, zone = m.groups()
        offset = datetime.timedelta(0)
        if zone != "Z":
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(text)
            offset = datetime.timedelta(hours=hours, minutes=minutes)
            if zone[0] == "-":
                offset = -offset
        micros = int((fraction or "0").ljust(9, "0")[:6])
        return datetime.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            micros,
            tzinfo=datetime.timezone(offset),
        ).astimezone(datetime.UTC)
    except ValueError:
        raise EvaluationError(
            f"could not convert '{text}' to TIMESTAMP. expected format: '2006-01-02T15:04:05Z07:00'"
        ) from None


_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_NANOS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,  # U+00B5 micro sign
    "μs": 10**3,  # U+03BC Greek mu
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def go_duration(text: str) -> datetime.timedelta | None:
    """Go's time.ParseDuration ("1h30m", "1.5s", "-2ms", "0"), or None when ``text`` is not one.

    Mixer typed a string literal that parses as a duration as DURATION, which is how
    ``response.duration | "0ms"`` type-checks. A timedelta keeps microseconds, not nanoseconds.
    """
    rest, negative = text, False
    if rest[:1] in ("+", "-"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return datetime.timedelta(0)
    if not rest:
        return None
    total, pos = Fraction(0), 0
    while pos < len(rest):
        m = _DURATION_PART.match(rest, pos)
        if m is None or m.group(1) in ("", "."):
            return None
        number = m.group(1)
        total += Fraction(f"0{number}0" if "." in number else number) * _NANOS[m.group(2)]
        pos = m.end()
    nanos = int(total)  # Go truncates below a nanosecond
    if nanos > 2**63 - (0 if negative else 1):
        return None  # Go: "time: invalid duration" (overflows int64 nanoseconds)
    seconds, rest_nanos = divmod(nanos, 10**9)
    value = datetime.timedelta(seconds=seconds, microseconds=rest_nanos / 1000)
    return -value if negative else value


_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def dns_name(text: str) -> str:
    """x/net/idna's ToUnicode with StrictDomainName, ValidateLabels and VerifyDNSLength, which is
    the profile Mixer's dnsName() used: LDH labels of 1..63 octets, at most 253 in all, an optional
    trailing dot; "xn--" labels are decoded."""
    try:
        return _to_unicode(text, strict=True)
    except ValueError as e:
        raise EvaluationError(f"error converting '{text}' to dns name: '{e}'") from None


def dns_name_equal(a: str, b: str) -> bool:
    """dnsName_equal: compare the lookup forms (case-folded, punycode decoded), ignoring a trailing
    dot present on only one side."""
    try:
        x, y = _to_unicode(a, strict=False), _to_unicode(b, strict=False)
    except ValueError as e:
        raise EvaluationError(f"error comparing dns names '{a}' and '{b}': {e}") from None
    if x.endswith(".") != y.endswith("."):
        x, y = x.removesuffix("."), y.removesuffix(".")
    return x == y


def _to_unicode(text: str, *, strict: bool) -> str:
    if not text:
        raise ValueError("empty name")
    trailing = text.endswith(".")
    labels = (text[:-1] if trailing else text).split(".")
    out = []
    ascii_length = 0
    for label in labels:
        if not label:
            raise ValueError("empty label")
        if label[:4].lower() == "xn--":
            try:
                decoded = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                raise ValueError(f"invalid punycode label {label!r}") from None
            ascii_label = label
        else:
            decoded = label
            try:
                ascii_label = label.encode("idna").decode("ascii") if not label.isascii() else label
            except UnicodeError:
                raise ValueError(f"invalid label {label!r}") from None
        if strict:
            if decoded.isascii() and not _LDH_LABEL.fullmatch(decoded):
                raise ValueError(f"label {label!r} is not letters, digits and inner hyphens")
            if len(ascii_label) > 63:
                raise ValueError(f"label {label!r} is longer than 63 octets")
            if label[2:4] == "--" and label[:4].lower() != "xn--":
                raise ValueError(f"label {label!r} has hyphens in the third and fourth positions")
        else:
            decoded = unicodedata.normalize("NFKC", decoded).casefold()
        ascii_length += len(ascii_label) + 1
        out.append(decoded)
    if strict and ascii_length - 1 > 253:
        raise ValueError("name is longer than 253 octets")
    return ".".join(out) + ("." if trailing else "")


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL_PART = re.compile(rf'{_ATOM}(?:\.{_ATOM})*|"(?:[^"\\\r\n]|\\.)*"')


def email(text: str) -> str:
    """email(): net/mail.ParseAddress without a display name, and a domain dnsName() accepts.
    The value is the text as written."""
    _email_parts(text)
    return text


def email_equal(a: str, b: str) -> bool:
    """email_equal: the local parts byte for byte, the domains as DNS names."""
    local_a, domain_a = _email_parts(a)
    local_b, domain_b = _email_parts(b)
    return dns_name_equal(domain_a, domain_b) and local_a == local_b


def _email_parts(text: str) -> tuple[str, str]:
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    elif "<" in address:
        raise EvaluationError(f"error converting '{text}' to e-mail: display names are not allowed")
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local):
        raise EvaluationError(f"error converting '{text}' to e-mail: 'mail: invalid address'")
    try:
        _to_unicode(domain, strict=True)
    except ValueError as e:
        raise EvaluationError(f"error converting '{text}' to e-mail: '{e}'") from None
    return local, domain


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def uri(text: str) -> str:
    """uri(): non-empty text that Go's url.Parse accepts. The value is the text as written."""
    if text == "":
        raise EvaluationError("error converting string to uri: empty string")
    try:
        _split(text)
    except ValueError as e:
        raise EvaluationError(f"error converting string to uri '{text}': '{e}'") from None
    return text


def uri_equal(a: str, b: str) -> bool:
    """uri_equal: schemes case-insensitively; for http(s) the host as a DNS name and the port;
    everything else as written."""
    try:
        x, y = _split(a), _split(b)
    except ValueError as e:
        raise EvaluationError(f"error comparing uris '{a}' and '{b}': {e}") from None
    if x.scheme.lower() != y.scheme.lower():
        return False
    if x.scheme.lower() in ("http", "https"):
        if not dns_name_equal(x.hostname or "", y.hostname or "") or x.port != y.port:
            return False
        user_x, user_y = x.netloc.rpartition("@")[0], y.netloc.rpartition("@")[0]
        return (user_x, x.path, x.query, x.fragment) == (user_y, y.path, y.query, y.fragment)
    return (x.netloc, x.path, x.query, x.fragment) == (y.netloc, y.path, y.query, y.fragment)


def _split(text: str) -> SplitResult:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("net/url: invalid control character in URL")
    if _BAD_ESCAPE.search(text):
        raise ValueError("invalid URL escape")
    if text.startswith(":"):
        raise ValueError("missing protocol scheme")
    if not _SCHEME.match(text) and ":" in text.split("/", 1)[0]:
        raise ValueError("first path segment in URL cannot contain colon")
    parts = urlsplit(text)
    _ = parts.port  # raises ValueError for a port that is not a number
    return parts
