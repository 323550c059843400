"""StatsD lines, and datagrams packed from them.

The line format is etsy/statsd's (docs/metric_types.md), as Mixer's client (cactus/go-statsd-client)
wrote it: ``name:value|c`` for counters, ``|g`` gauges, ``|ms`` timers, ``|@0.500000`` after a
sampled value. Lines are joined with newlines into datagrams of at most ``limit`` bytes; a line
is never split (one longer than the limit travels alone).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator

from .names import decimal_text

_MS = datetime.timedelta(milliseconds=1)


def rate_suffix(rate: float) -> str:
    # cactus wrote the rate with six decimals (strconv.FormatFloat(rate, 'f', 6, 32)).
    return f"|@{rate:.6f}" if rate < 1 else ""


def counter(name: str, value: object, suffix: str) -> str | None:
    if type(value) is not int:
        return None
    return f"{name}:{value}|c{suffix}"


def gauge(name: str, value: object, suffix: str) -> str | None:
    if type(value) is not int:
        return None
    if value < 0:
        # A signed gauge value is a change to the gauge, not a value (etsy/statsd's
        # metric_types.md): set it to 0 first, in the same datagram, as that document says.
        return f"{name}:0|g{suffix}\n{name}:{value}|g{suffix}"
    return f"{name}:{value}|g{suffix}"


def timer(name: str, value: object, suffix: str) -> str | None:
    """A DISTRIBUTION: durations in milliseconds (cactus's TimingDuration), INT64s as they are."""
    if isinstance(value, datetime.timedelta):
        return f"{name}:{decimal_text(value / _MS)}|ms{suffix}"
    if type(value) is not int:
        return None
    return f"{name}:{value}|ms{suffix}"


def pack(items: Iterable[str], limit: int) -> Iterator[tuple[bytes, int]]:
    """(datagram, how many items it holds): items joined by newlines, at most ``limit`` bytes."""
    held: list[bytes] = []
    size = 0
    for item in items:
        data = item.encode()
        if held and size + 1 + len(data) > limit:
            yield b"\n".join(held), len(held)
            held, size = [], 0
        size += len(data) + (1 if held else 0)
        held.append(data)
    if held:
        yield b"\n".join(held), len(held)
