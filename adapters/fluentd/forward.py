"""Fluentd's Forward protocol (v1), the client side, on asyncio streams.

Events are encoded with fluent-logger's ``EventTime`` (msgpack ext type 0: seconds and
nanoseconds, so entries keep sub-second precision) and msgpack. Each entry ``[time, record]`` is
packed once, when it is queued; a message is then put together from the packed entries without
packing them again: Forward mode ``[tag, [entry, ...], option]`` is an array header followed by
the entries, PackedForward ``[tag, bin(entry...), option]`` wraps them in one bin.

With acknowledgements, every message carries a random ``chunk`` id in its option and a send
succeeds only when the server has answered ``{"ack": chunk}`` for each; otherwise a message that
dies with its connection is gone unnoticed. The spec:
https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import msgpack
from fluent.sender import EventTime

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def event_time(at: datetime.datetime) -> object:
    """A timestamp as the Forward protocol's EventTime, exact to the microsecond."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.UTC)
    delta = at - _EPOCH
    return EventTime(delta.days * 86_400 + delta.seconds, delta.microseconds * 1000)


def pack_entry(at: datetime.datetime, record: Mapping[str, object]) -> bytes:
    """One Entry, ``[EventTime, record]``, as msgpack."""
    return _packb([event_time(at), record])


@dataclass(frozen=True, slots=True)
class Message:
    data: bytes
    chunk: str  # the id the server acknowledges; "" when no acknowledgement is asked


def messages(
    tag: str, entries: Sequence[bytes], max_bytes: int, *, packed: bool, ack: bool
) -> list[Message]:
    """One tag's entries as Forward (or PackedForward) messages of at most ``max_bytes`` of
    entries each (an entry bigger than that goes alone)."""
    return [_message(tag, group, packed, ack) for group in _groups(entries, max_bytes)]


def _groups(entries: Sequence[bytes], max_bytes: int) -> Iterator[Sequence[bytes]]:
    start, size = 0, 0
    for i, entry in enumerate(entries):
        if size and size + len(entry) > max_bytes:
            yield entries[start:i]
            start, size = i, 0
        size += len(entry)
    if start < len(entries):
        yield entries[start:]


def _message(tag: str, entries: Sequence[bytes], packed: bool, ack: bool) -> Message:
    packer = msgpack.Packer(use_bin_type=True)
    option: dict[str, object] = {"size": len(entries)}
    chunk = ""
    if ack:
        chunk = base64.b64encode(os.urandom(16)).decode("ascii")
        option["chunk"] = chunk
    joined = b"".join(entries)
    body = _packb(joined) if packed else packer.pack_array_header(len(entries)) + joined
    data: bytes = packer.pack_array_header(3) + _packb(tag) + body + _packb(option)
    return Message(data, chunk)


def _packb(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


class ForwardClient:
    """One connection to a Fluentd in_forward, opened when needed and dropped on any failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, batch: Sequence[Message]) -> None:
        """Write the messages; with chunk ids, wait until each is acknowledged. Raises on any
        failure, leaving the connection closed so that the next send opens a new one."""
        try:
            reader, writer = await self._connection()
            writer.write(b"".join(m.data for m in batch))
            await writer.drain()
            pending = {m.chunk for m in batch if m.chunk}
            if pending:
                await _acknowledged(reader, pending)
        except BaseException:  # a timeout's cancellation too: the stream is in an unknown state
            self._abort()
            raise

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            # Reset by a server already gone: closed all the same.
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = self._reader, self._writer
        # A server that closed the connection since the last send: writing would seem to work.
        if reader is not None and writer is not None:
            if not (writer.is_closing() or reader.at_eof()):
                return reader, writer
            self._abort()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._reader, self._writer = reader, writer
        return reader, writer

    def _abort(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.transport.abort()


async def _acknowledged(reader: asyncio.StreamReader, pending: set[str]) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    while pending:
        data = await reader.read(65_536)
        if not data:
            raise ConnectionError(
                f"connection closed with {len(pending)} message(s) unacknowledged"
            )
        unpacker.feed(data)
        for response in unpacker:
            if isinstance(response, dict):
                pending.discard(response.get("ack"))
