"""The lists a listchecker consults, and the provider's formats (Mixer's mixer/adapter/list).

Provider formats, as Mixer read them:

- STRINGS, CASE_INSENSITIVE_STRINGS and REGEX: one entry per line, empty lines skipped
  (stringList.go, regexList.go). A line's trailing ``\\r`` is dropped too, so that a list served
  with CRLF line ends means what it says (Mixer kept the ``\\r``).
- IP_ADDRESSES: a YAML document ``whitelist: [10.0.0.1, 10.1.0.0/16, ...]`` (ipList.go's
  listPayload, read through ghodss/yaml and so matching the key case-insensitively), whatever the
  ``blacklist`` setting. An address without a prefix length is that one address.

REGEX entries are Python regular expressions, searched anywhere in the value as Go's
``MatchString`` did; RE2-only syntax (``\\pL``) is refused when the list is loaded.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ListError(Exception):
    """A provider's list that cannot be read: the previous list stays in use."""


@dataclass(frozen=True, slots=True)
class Subject:
    """A listentry value as the lists see it: its text and, if it is one, the IP address."""

    text: str
    ip: IPAddress | None = None


def _normal(ip: IPAddress) -> IPAddress:
    # Go's net.IP prints and matches an IPv4-mapped IPv6 address as the IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def subject(value: object, entry_type: str) -> Subject | str:
    """The value to look up, or why it cannot be looked up (list.go HandleListEntry)."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip = _normal(value)
        return Subject(str(ip), ip)
    if not isinstance(value, str):
        return f"{value} is not a valid string or IP address"
    if entry_type != "IP_ADDRESSES":
        return Subject(value)
    try:
        return Subject(value, _normal(ipaddress.ip_address(value)))
    except ValueError:
        return f"{value} is not a valid IP address"


class Matcher:
    """One list, built once and only read afterwards."""

    size = 0

    def contains(self, s: Subject) -> bool:
        raise NotImplementedError


class _Strings(Matcher):
    def __init__(self, entries: Iterable[str], fold: bool) -> None:
        self._fold = fold
        # Mixer upper-cased both sides for CASE_INSENSITIVE_STRINGS (strings.ToUpper).
        self._entries = frozenset(e.upper() if fold else e for e in entries if e)
        self.size = len(self._entries)

    def contains(self, s: Subject) -> bool:
        return (s.text.upper() if self._fold else s.text) in self._entries


class _Networks(Matcher):
    """Networks grouped by IP version and prefix length: a lookup masks the address once per
    distinct prefix length and probes a set, however long the list."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        by_prefix: dict[tuple[int, int], set[int]] = {}
        for n in networks:
            by_prefix.setdefault((n.version, n.prefixlen), set()).add(int(n.network_address))
            self.size += 1
        self._groups = tuple(
            (version, _mask(version, prefix), frozenset(addrs))
            for (version, prefix), addrs in sorted(by_prefix.items())
        )

    def contains(self, s: Subject) -> bool:
        if s.ip is None:
            return False
        version, address = s.ip.version, int(s.ip)
        return any(v == version and address & mask in addrs for v, mask, addrs in self._groups)


def _mask(version: int, prefix: int) -> int:
    bits = 32 if version == 4 else 128
    return ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)


class _Patterns(Matcher):
    def __init__(self, patterns: Iterable[re.Pattern[str]]) -> None:
        self._patterns = tuple(patterns)
        self.size = len(self._patterns)

    def contains(self, s: Subject) -> bool:
        return any(p.search(s.text) for p in self._patterns)


Entry = str | IPNetwork | re.Pattern[str]


def parse_entry(entry_type: str, entry: str) -> Entry:
    """One entry of a list, parsed; ListError says ``"<entry>: <reason>"`` for a bad one."""
    if entry_type == "IP_ADDRESSES":
        try:
            return ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as e:
            raise ListError(f"{entry}: {e}") from None
    if entry_type == "REGEX":
        try:
            return re.compile(entry)
        except re.error as e:
            raise ListError(f"{entry}: {e}") from None
    return entry


def build(entry_type: str, entries: Iterable[str]) -> Matcher:
    """A list of ``entry_type`` from its entries; ListError names the first bad one."""
    parsed: list[Entry] = []
    for entry in entries:
        try:
            parsed.append(parse_entry(entry_type, entry))
        except ListError as e:
            raise ListError(f"could not parse list entry {e}") from None
    if entry_type == "IP_ADDRESSES":
        return _Networks(p for p in parsed if not isinstance(p, str | re.Pattern))
    if entry_type == "REGEX":
        return _Patterns(p for p in parsed if isinstance(p, re.Pattern))
    return _Strings(
        (p for p in parsed if isinstance(p, str)), entry_type == "CASE_INSENSITIVE_STRINGS"
    )


def provider_entries(entry_type: str, body: bytes) -> list[str]:
    """The entries of a provider's response, in the format Mixer read for ``entry_type``."""
    if entry_type == "IP_ADDRESSES":
        try:
            doc = yaml.safe_load(body) if body.strip() else None
        except yaml.YAMLError as e:
            raise ListError(f"could not unmarshal data from list: {e}") from e
        if doc is None:
            return []
        if not isinstance(doc, dict):
            raise ListError(
                "could not unmarshal data from list: expected a mapping with a whitelist key,"
                f" got a {type(doc).__name__}"
            )
        listed = next((v for k, v in doc.items() if str(k).lower() == "whitelist"), None)
        if listed is None:
            return []
        if not isinstance(listed, list) or not all(isinstance(e, str) for e in listed):
            raise ListError(
                "could not unmarshal data from list: whitelist must be a list of strings"
            )
        return listed
    text = body.decode("utf-8", errors="replace")
    return [line.removesuffix("\r") for line in text.split("\n") if line.removesuffix("\r")]
