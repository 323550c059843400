"""stdio's handler: logentry and metric instances as JSON or text lines (Mixer's stdio format)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import orjson

from mixerhub.adapter import Env, ExportResult, Handler, InstanceSpec
from mixerhub.attributes import format_go_duration, format_value
from mixerhub.bag import KnownIPv4Address, KnownIPv6Address
from mixerhub.templates import LogEntryInstance, MetricInstance

from .config import Level, StdioParams
from .writer import LineWriter, RotatingFile, Stream, binary

# orjson writes timestamps in RFC 3339 itself (UTC as "Z"); format_value handles the rest
# (durations in Go's notation, IPs as text) without a pass over every value first.
_JSON = orjson.OPT_UTC_Z
# Keys that are not text (a map value with integer keys) take orjson's slower path: only retried
# with it when a line has one.
_JSON_ANY_KEYS = orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
# The values every access-log line has that orjson does not know, by exact type: a dict lookup
# instead of format_value's chain of isinstance checks. format_value does the same for them.
_BY_TYPE: Mapping[type, Callable[[Any], object]] = {
    datetime.timedelta: format_go_duration,
    ipaddress.IPv4Address: str,
    ipaddress.IPv6Address: str,
    # What Envoy's addresses parse to: their text is kept (mixerhub.bag.parse_ip), and read
    # in C rather than by a Python __str__ (two addresses a line).
    KnownIPv4Address: operator.attrgetter("_text"),
    KnownIPv6Address: operator.attrgetter("_text"),
}


def _default(value: object) -> object:
    convert = _BY_TYPE.get(type(value))
    return convert(value) if convert is not None else format_value(value)


def _dumps(record: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(record, default=_default, option=_JSON)
    except orjson.JSONEncodeError:
        return orjson.dumps(record, default=_default, option=_JSON_ANY_KEYS)


# The start and the end of a line's head, by level and instance name.
_HEADS: dict[tuple[str, str], tuple[bytes, bytes]] = {}

_RANK: Mapping[str, int] = {"INFO": 0, "WARNING": 1, "ERROR": 2}
_NAME: Mapping[str, str] = {"INFO": "info", "WARNING": "warn", "ERROR": "error"}


class StdioHandler(Handler):
    def __init__(self, params: StdioParams, env: Env) -> None:
        self.params, self.env = params, env
        self._min_rank = _RANK[params.output_level]
        self._metric_level = params.metric_level
        # Mixer looked severities up exactly; a case-insensitive fallback keeps "Info" (what
        # Istio's own accesslog instance says) from silently meaning the default level.
        self._levels = dict(params.severity_levels)
        self._levels_folded = {k.lower(): v for k, v in params.severity_levels.items()}
        open_stream, rotate = self._stream()
        self._writer = LineWriter(open_stream, params.queue_size, self._dropped, rotate)

    def _stream(self) -> tuple[Callable[[], Stream], Callable[[Stream], Stream] | None]:
        p = self.params
        if p.output_path:
            f = RotatingFile(
                p.output_path,
                p.max_megabytes_before_rotation * 1024 * 1024,
                p.max_days_before_rotation * 86400.0,
                p.max_rotated_files,
            )
            return f.open, f.rotate
        stream: IO[str] = sys.stdout if p.log_stream == "STDOUT" else sys.stderr
        return (lambda: binary(stream)), None

    def _dropped(self, n: int) -> None:
        self.env.count_dropped("queue_full", n)

    def handle_logentry(self, instances: Sequence[LogEntryInstance]) -> ExportResult:
        lines = []
        # A batch's entries usually share one severity: its level is looked up once per run.
        severity: str | None = None
        level: Level = "INFO"
        shown = True
        for i in instances:
            if i.severity != severity:
                severity = i.severity
                level = self._level(severity)
                shown = _RANK[level] >= self._min_rank
            if shown:
                lines.append(self._line(level, i.timestamp, i.name, i.variables))
        return self._write(lines)

    def handle_metric(self, instances: Sequence[MetricInstance]) -> ExportResult:
        if _RANK[self._metric_level] < self._min_rank:
            return ExportResult.SUCCESS
        lines = []
        for i in instances:
            fields = {"value": i.value, **i.dimensions}
            lines.append(self._line(self._metric_level, None, i.name, fields))
        return self._write(lines)

    def _level(self, severity: str) -> Level:
        return self._levels.get(severity) or self._levels_folded.get(severity.lower(), "INFO")

    def _line(
        self, level: Level, at: datetime.datetime | None, instance: str, fields: dict[str, Any]
    ) -> bytes:
        when = at or datetime.datetime.now(datetime.UTC)
        try:  # _dumps, without a call of its own per line
            body = orjson.dumps(fields, default=_default, option=_JSON)
        except orjson.JSONEncodeError:
            body = orjson.dumps(fields, default=_default, option=_JSON_ANY_KEYS)
        if not self.params.output_as_json:
            return b"%s\t%s\t%s\t%s" % (
                str(format_value(when)).encode(),
                _NAME[level].encode(),
                instance.encode(),
                body,
            )
        # Mixer's line is {"level", "time", "instance", then the fields}: written as a head
        # before the fields' own JSON, rather than by copying every field into a new dict.
        head = _HEADS.get((level, instance))
        if head is None:
            if len(_HEADS) >= 1024:
                _HEADS.clear()
            head = _HEADS[level, instance] = (
                b'{"level":%s,"time":' % orjson.dumps(_NAME[level]),
                b',"instance":%s' % orjson.dumps(instance),
            )
        time_text = orjson.dumps(when, option=_JSON)
        if body == b"{}":
            return b"%s%s%s}" % (head[0], time_text, head[1])
        return b"%s%s%s,%s" % (head[0], time_text, head[1], body[1:])

    def _write(self, lines: list[bytes]) -> ExportResult:
        if not lines:
            return ExportResult.SUCCESS
        return ExportResult.FAILURE if self._writer.write(lines) else ExportResult.SUCCESS

    async def close(self) -> None:
        await asyncio.to_thread(self._writer.close)


def build(params: StdioParams, instances: Mapping[str, InstanceSpec], env: Env) -> StdioHandler:
    return StdioHandler(params, env)
