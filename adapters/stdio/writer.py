"""A line writer that never blocks its caller: a bounded queue drained by one thread.

Writing to stdout or a file can block (a full pipe, a slow disk); report handling must not, so
lines are queued and a dedicated thread writes them. When the queue is full, lines are dropped
and counted rather than held without bound. A batch of lines is queued under one lock and wakes
the thread once: a queue.Queue would take its lock and notify once per line, which on the report
path cost as much as formatting the line.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import IO

_BATCH = 512  # lines per write call at most, so a size-limited file rotates close to its limit


class LineWriter:
    def __init__(
        self,
        open_stream: Callable[[], IO[str]],
        capacity: int,
        on_drop: Callable[[int], None],
        rotate: Callable[[IO[str]], IO[str]] | None = None,
    ) -> None:
        self._lines: collections.deque[str] = collections.deque()
        self._capacity = capacity
        self._ready = threading.Condition(threading.Lock())
        self._stopping = False
        self._open = open_stream
        self._rotate = rotate
        self._on_drop = on_drop
        self._thread = threading.Thread(target=self._run, name="stdio-writer", daemon=True)
        self._thread.start()

    def write(self, lines: list[str]) -> int:
        """Queue lines; returns how many were dropped because the queue was full."""
        with self._ready:
            room = self._capacity - len(self._lines)
            taken = lines if len(lines) <= room else lines[: max(room, 0)]
            if taken:
                self._lines.extend(taken)
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
        lines_queued = self._lines
        try:
            while True:
                with self._ready:
                    while not lines_queued and not self._stopping:
                        self._ready.wait()
                    # What has piled up goes out in one call; a close drains the queue first.
                    n = min(len(lines_queued), _BATCH)
                    lines = [lines_queued.popleft() for _ in range(n)]
                    stop = self._stopping and not lines_queued
                if lines:
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
