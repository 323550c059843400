"""fluentd's handler: logentry instances as Fluentd events (Mixer's fluentd.go).

As in Mixer, an event's tag is the instance's name, unless the entry has a variable ``tag``: then
that is the tag, and the instance's name goes into the record as ``name``. The record is the
variables plus ``severity``; durations become whole milliseconds (``integerDuration``) or Go
strings, IP addresses text (Mixer 1.4 did both), timestamps RFC 3339 text. The event's time is
the entry's timestamp with sub-second precision (Mixer set fluent-logger-golang's
SubSecondPrecision); an entry without one gets the time it was handled.

Entries are encoded when they arrive and queued in the hub's BatchSender; each batch goes out as
one Forward message per tag over a connection of the event loop's own. An entry whose encoding
is bigger than ``maxBatchSizeBytes`` is dropped, as Mixer dropped it, and counted.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping, Sequence

from mixerhub.adapter import Env, ExportResult, Handler, InstanceSpec
from mixerhub.attributes import format_go_duration, format_value
from mixerhub.batching import BatchSender
from mixerhub.templates import LogEntryInstance

from . import forward
from .config import FluentdParams

# (tag, the packed [time, record] entry)
Event = tuple[str, bytes]

_MILLISECOND = datetime.timedelta(milliseconds=1)
_ZERO = datetime.timedelta(0)


class FluentdHandler(Handler):
    def __init__(self, params: FluentdParams, env: Env) -> None:
        self.params, self.env = params, env
        host, port = params.host_port
        self._client = forward.ForwardClient(host, port)
        self._max_bytes = params.max_message_bytes
        self._packed = params.mode == "PackedForward"
        self._sender: BatchSender[Event] = BatchSender(
            env.adapter, env.handler, self._send, params.effective_batching
        )

    def handle_logentry(self, instances: Sequence[LogEntryInstance]) -> ExportResult:
        try:
            return self._handle(instances)
        except Exception:  # never into the dispatcher
            self.env.count_error()
            self.env.logger.exception("fluentd: handling %d entries failed", len(instances))
            return ExportResult.FAILURE

    def _handle(self, instances: Sequence[LogEntryInstance]) -> ExportResult:
        events: list[Event] = []
        invalid = too_large = 0
        for instance in instances:
            try:
                tag, at, record = event(instance, self.params.integer_duration)
                entry = forward.pack_entry(at, record)
            except Exception as e:  # a value msgpack cannot carry (an int past 64 bits...)
                invalid += 1
                self.env.logger.debug("fluentd: entry of %s not encoded: %s", instance.name, e)
                continue
            if len(entry) > self._max_bytes:
                too_large += 1
                continue
            events.append((tag, entry))
        if invalid:
            self.env.count_error(invalid)
            self.env.count_dropped("invalid", invalid)
        if too_large:
            self.env.logger.warning(
                "fluentd: %d entries exceed maxBatchSizeBytes (%d); dropped",
                too_large, self._max_bytes,
            )  # fmt: skip
            self.env.count_dropped("too_large", too_large)
        dropped = self._sender.add(events) if events else 0
        return ExportResult.FAILURE if invalid or too_large or dropped else ExportResult.SUCCESS

    async def _send(self, batch: list[Event]) -> None:
        by_tag: dict[str, list[bytes]] = {}
        for tag, entry in batch:
            by_tag.setdefault(tag, []).append(entry)
        await self._client.send(
            [
                message
                for tag, entries in by_tag.items()
                for message in forward.messages(
                    tag, entries, self._max_bytes, packed=self._packed, ack=self.params.require_ack
                )
            ]
        )

    async def close(self) -> None:
        await self._sender.close()
        await self._client.close()


def event(
    instance: LogEntryInstance, integer_duration: bool
) -> tuple[str, datetime.datetime, dict[str, object]]:
    """A log entry as Mixer's fluentd adapter posted it: (tag, time, record)."""
    record = {k: _value(v, integer_duration) for k, v in instance.variables.items()}
    record["severity"] = instance.severity
    tag = instance.name
    if "tag" in record:
        # Mixer took a variable "tag" as the tag; an empty one cannot route, so it is ignored.
        tag = str(record.pop("tag") or "") or instance.name
        record["name"] = instance.name
    return tag, instance.timestamp or datetime.datetime.now(datetime.UTC), record


def _value(value: object, integer_duration: bool) -> object:
    if isinstance(value, datetime.timedelta):
        if not integer_duration:
            return format_go_duration(value)
        # Go's int64(d / time.Millisecond): truncated toward zero.
        return value // _MILLISECOND if value >= _ZERO else -(-value // _MILLISECOND)
    return format_value(value)


def build(params: FluentdParams, instances: Mapping[str, InstanceSpec], env: Env) -> FluentdHandler:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "fluentd sends in the background and must be built inside the hub's event loop"
        ) from None
    return FluentdHandler(params, env)
