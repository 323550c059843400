"""A line writer that never blocks its caller: a bounded queue drained by one thread.

Writing to stdout or a file can block (a full pipe, a slow disk); report handling must not, so
lines are queued and a dedicated thread writes them. When the queue is full, lines are dropped
and counted rather than held without bound. Lines are bytes (orjson's output, never decoded and
encoded again) and a handler's batch is queued whole, under one lock. Every wakeup of the thread
and every Python step it takes competes with the event loop for the GIL, so it is woken only when
the queue stops being empty (or gets half full), then lingers a moment for more lines to arrive
and writes all of them with one call: a few writes a second under load, instead of one per batch.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any

Stream = IO[bytes]


def binary(stream: IO[str] | IO[bytes]) -> Stream:
    """The byte stream below a text stream such as sys.stdout; what the text layer holds is
    flushed first, so lines written either way keep their order."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        return buffer  # type: ignore[no-any-return]
    if isinstance(stream, io.TextIOBase):
        return _Encoding(stream)  # type: ignore[return-value]  # io.StringIO, for one
    return stream  # type: ignore[return-value]


class _Encoding:
    """Bytes written to a text stream that has no byte stream below it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return int(self._stream.write(data.decode("utf-8")))

    def flush(self) -> None:
        self._stream.flush()


class LineWriter:
    def __init__(
        self,
        open_stream: Callable[[], Stream],
        capacity: int,
        on_drop: Callable[[int], None],
        rotate: Callable[[Stream], Stream] | None = None,
        linger: float = 0.05,
    ) -> None:
        self._batches: list[list[bytes]] = []
        self._linger = linger
        self._queued = 0  # lines in _batches
        self._capacity = capacity
        self._ready = threading.Condition(threading.Lock())
        self._stopping = False
        self._open = open_stream
        self._rotate = rotate
        self._on_drop = on_drop
        self._thread = threading.Thread(target=self._run, name="stdio-writer", daemon=True)
        self._thread.start()

    def write(self, lines: list[bytes]) -> int:
        """Queue lines (without their newlines); returns how many were dropped because the
        queue was full."""
        with self._ready:
            room = self._capacity - self._queued
            taken = lines if len(lines) <= room else lines[: max(room, 0)]
            if taken:
                before = self._queued
                self._batches.append(taken)
                self._queued += len(taken)
                if not before or (before < self._capacity // 2 <= self._queued):
                    self._ready.notify()
        dropped = len(lines) - len(taken)
        if dropped:
            self._on_drop(dropped)
        return dropped

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop. Blocks up to ``timeout``: call it off the event loop."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        stream = self._open()
        try:
            while True:
                with self._ready:
                    while not self._batches and not self._stopping:
                        self._ready.wait()
                    if not self._stopping and self._queued < self._capacity // 2:
                        self._ready.wait(self._linger)  # more lines, same write
                    # Everything queued goes out now; a close drains the queue first.
                    batches, self._batches, self._queued = self._batches, [], 0
                    stop = self._stopping
                if batches:
                    try:
                        stream = self._emit(stream, batches)
                    except (OSError, ValueError):  # a closed or broken stream: count, keep going
                        self._on_drop(sum(len(b) for b in batches))
                if stop:
                    return
        finally:
            if self._rotate is not None:  # a file of its own; stdout and stderr stay open
                stream.close()

    def _emit(self, stream: Stream, batches: list[list[bytes]]) -> Stream:
        if self._rotate is None:
            lines = batches[0] if len(batches) == 1 else [x for b in batches for x in b]
            stream.write(b"\n".join(lines) + b"\n")
        else:  # a size limit holds line by line, not batch by batch
            for batch in batches:
                for line in batch:
                    stream.write(line + b"\n")
                    stream = self._rotate(stream)
        stream.flush()
        return stream


class RotatingFile:
    """A file rotated by size or age into ``path.1`` ... ``path.N`` (newest first)."""

    def __init__(self, path: str, max_bytes: int, max_age: float, max_files: int) -> None:
        self.path, self.max_bytes, self.max_age, self.max_files = (
            path,
            max_bytes,
            max_age,
            max_files,
        )
        self._opened = 0.0

    def open(self) -> Stream:
        self._opened = time.time()
        return open(self.path, "ab")

    def rotate(self, stream: Stream) -> Stream:
        too_big = self.max_bytes and stream.tell() >= self.max_bytes
        too_old = self.max_age and time.time() - self._opened >= self.max_age
        if not (too_big or too_old):
            return stream
        stream.close()
        if self.max_files:
            for n in range(self.max_files - 1, 0, -1):
                src = f"{self.path}.{n}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        return self.open()
