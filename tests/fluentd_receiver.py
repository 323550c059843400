"""A Fluentd in_forward stand-in on 127.0.0.1 that decodes the real wire format.

It speaks the Forward protocol v1 (https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1)
as a server: msgpack arrays in Message, Forward, PackedForward and CompressedPackedForward modes,
times as integers or EventTime (ext type 0: big-endian uint32 seconds and nanoseconds), and an
``{"ack": chunk}`` answer for every message whose option carries a ``chunk``. It records each
event and each message, and anything that breaks the spec in ``problems``. A test can stop it
(every connection is closed, nothing listens) and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack


@dataclass(frozen=True, slots=True)
class EventTime:
    seconds: int
    nanoseconds: int


@dataclass(frozen=True, slots=True)
class Event:
    tag: str
    time: EventTime | int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    mode: str  # Message | Forward | PackedForward | CompressedPackedForward
    tag: str
    events: int
    option: dict[str, Any] = field(default_factory=dict)


def _ext(code: int, data: bytes) -> object:
    if code == 0 and len(data) == 8:
        seconds, nanoseconds = struct.unpack(">II", data)
        return EventTime(seconds, nanoseconds)
    return msgpack.ExtType(code, data)


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, ext_hook=_ext, strict_map_key=False)


class FluentdReceiver:
    def __init__(self) -> None:
        self.port = 0
        self.events: list[Event] = []
        self.messages: list[Message] = []
        self.problems: list[str] = []
        self.connections = 0
        self.ack = True  # False: never answer acks (a server that takes data and says nothing)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def records(self) -> list[dict[str, Any]]:
        return [e.record for e in self.events]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a Fluentd that goes down."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        unpacker = _unpacker()
        try:
            while data := await reader.read(65_536):
                unpacker.feed(data)
                for request in unpacker:
                    chunk = self._request(request)
                    if chunk is not None and self.ack:
                        writer.write(msgpack.packb({"ack": chunk}))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    def _request(self, request: object) -> str | None:
        """Record one request; returns the chunk to acknowledge, if any."""
        if request is None:  # a heartbeat
            return None
        if not isinstance(request, list) or len(request) not in (2, 3, 4):
            self.problems.append(f"not a Forward protocol request: {request!r:.200}")
            return None
        tag, second = request[0], request[1]
        if not isinstance(tag, str):
            self.problems.append(f"tag is not a string: {tag!r}")
            return None
        if isinstance(second, list):  # Forward
            mode, entries, rest = "Forward", list(self._entries(tag, second)), request[2:]
        elif isinstance(second, bytes | str):  # PackedForward, maybe compressed
            option = request[2] if len(request) == 3 and isinstance(request[2], dict) else {}
            raw = second.encode() if isinstance(second, str) else second
            mode = "PackedForward"
            if option.get("compressed") == "gzip":
                mode, raw = "CompressedPackedForward", gzip.decompress(raw)
            unpacker = _unpacker()
            unpacker.feed(raw)
            entries, rest = list(self._entries(tag, list(unpacker))), request[2:]
        else:  # Message: [tag, time, record(, option)]
            if len(request) < 3:
                self.problems.append(f"a Message without a record: {request!r:.200}")
                return None
            mode, rest = "Message", request[3:]
            entries = list(self._entries(tag, [[second, request[2]]]))
        option = rest[0] if rest else {}
        if len(rest) > 1 or not isinstance(option, dict):
            self.problems.append(f"{mode}: bad option {rest!r:.200}")
            option = {}
        if "size" in option and option["size"] != len(entries):
            self.problems.append(f"{mode}: option size {option['size']} for {len(entries)} events")
        self.events += entries
        self.messages.append(Message(mode, tag, len(entries), dict(option)))
        chunk = option.get("chunk")
        return chunk if isinstance(chunk, str) else None

    def _entries(self, tag: str, entries: list[Any]) -> Iterator[Event]:
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2):
                self.problems.append(f"not an Entry [time, record]: {entry!r:.200}")
                continue
            time, record = entry
            if not isinstance(time, int | EventTime) or isinstance(time, bool):
                self.problems.append(f"time is neither an integer nor an EventTime: {time!r}")
            if not (isinstance(record, dict) and all(isinstance(k, str) for k in record)):
                self.problems.append(f"record is not a map of string keys: {record!r:.200}")
                continue
            yield Event(tag, time, record)
