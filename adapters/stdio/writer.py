"""A line writer that never blocks its caller: a bounded queue drained by one thread.

Writing to stdout or a file can block (a full pipe, a slow disk); report handling must not, so
lines are queued and a dedicated thread writes them. When the queue is full, lines are dropped
and counted rather than held without bound.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import IO

_STOP = object()


class LineWriter:
    def __init__(
        self,
        open_stream: Callable[[], IO[str]],
        capacity: int,
        on_drop: Callable[[int], None],
        rotate: Callable[[IO[str]], IO[str]] | None = None,
    ) -> None:
        self._queue: queue.Queue[object] = queue.Queue(capacity)
        self._open = open_stream
        self._rotate = rotate
        self._on_drop = on_drop
        self._thread = threading.Thread(target=self._run, name="stdio-writer", daemon=True)
        self._thread.start()

    def write(self, lines: list[str]) -> int:
        """Queue lines; returns how many were dropped because the queue was full."""
        dropped = 0
        for line in lines:
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                dropped += 1
        if dropped:
            self._on_drop(dropped)
        return dropped

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop. Blocks up to ``timeout``: call it off the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(_STOP, timeout=0.05)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        stream = self._open()
        try:
            while True:
                item = self._queue.get()
                batch = [item]
                while len(batch) < 512:  # write what has piled up in one call
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = _STOP in batch
                lines = [line for line in batch if isinstance(line, str)]
                try:
                    stream = self._emit(stream, lines)
                except (OSError, ValueError):  # a closed or broken stream: count, keep draining
                    self._on_drop(len(lines))
                if stop:
                    return
        finally:
            if self._rotate is not None:  # a file of its own; stdout and stderr stay open
                stream.close()

    def _emit(self, stream: IO[str], lines: list[str]) -> IO[str]:
        if self._rotate is None:
            stream.write("".join(f"{line}\n" for line in lines))
        else:  # a size limit holds line by line, not batch by batch
            for line in lines:
                stream.write(f"{line}\n")
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

    def open(self) -> IO[str]:
        self._opened = time.time()
        return open(self.path, "a", encoding="utf-8")

    def rotate(self, stream: IO[str]) -> IO[str]:
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
