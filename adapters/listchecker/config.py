"""listchecker's params: Mixer's list adapter config (mixer/adapter/list/config/config.proto)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.types import Duration, Params

from .lists import ListError, parse_entry

EntryType = Literal["STRINGS", "CASE_INSENSITIVE_STRINGS", "IP_ADDRESSES", "REGEX"]
_ENTRY_TYPES: tuple[EntryType, ...] = (
    "STRINGS",
    "CASE_INSENSITIVE_STRINGS",
    "IP_ADDRESSES",
    "REGEX",
)


class ListParams(Params):
    # Where to fetch the list; empty for a list made of the overrides alone.
    provider_url: str = ""
    # Defaults are Mixer's (mixer/adapter/metadata/inventory.go, "listchecker").
    refresh_interval: Duration = datetime.timedelta(seconds=60)
    # How long a fetched list is kept when the provider cannot be reached.
    ttl: Duration = datetime.timedelta(seconds=300)
    # How long, and how many times, a caller may reuse an answer.
    caching_interval: Duration = datetime.timedelta(seconds=300)
    caching_use_count: int = Field(default=10_000, ge=0)
    # Entries consulted first, before the list from the provider.
    overrides: list[str] = Field(default_factory=list)
    entry_type: EntryType = "STRINGS"
    blacklist: bool = False

    @field_validator("entry_type", mode="before")
    @classmethod
    def _enum_number(cls, value: object) -> object:
        # protobuf JSON also spells an enum by its number (IP_ADDRESSES = 2).
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
            return _ENTRY_TYPES[value]
        return value


def validate(params: ListParams, instances: Mapping[str, InstanceSpec]) -> Iterable[FieldError]:
    """Mixer's checks (list.go builder.Validate), each override named by its index."""
    if params.provider_url:
        url = urlsplit(params.provider_url)
        if not url.scheme or not url.netloc:
            yield FieldError("providerUrl", "URL scheme and host cannot be empty")
        elif url.scheme not in ("http", "https"):
            yield FieldError("providerUrl", f"URL scheme must be http or https, not {url.scheme!r}")
        refresh, ttl = params.refresh_interval, params.ttl
        if refresh < datetime.timedelta(seconds=1):
            yield FieldError(
                "refreshInterval",
                f"refresh interval must be at least 1 second, it is {_secs(refresh)}",
            )
        if ttl <= refresh:
            yield FieldError(
                "ttl",
                f"ttl must be > refreshInterval, ttl is {_secs(ttl)}"
                f" and refreshInterval is {_secs(refresh)}",
            )
    for i, entry in enumerate(params.overrides):
        try:
            parse_entry(params.entry_type, entry)
        except ListError as e:
            kind = "ip address" if params.entry_type == "IP_ADDRESSES" else "regex"
            yield FieldError(f"overrides[{i}]", f"could not parse {kind} override {e}")


def _secs(value: datetime.timedelta) -> str:
    return f"{value.total_seconds():g}s"
