"""The live configuration: files watched, compiled and swapped in whole.

A changed file is re-read and compiled; a good result replaces the active snapshot atomically
(one reference assignment, so a request sees either the old or the new configuration). A bad
one is logged, counted and kept for /debug/configz, and the last good snapshot stays active.
Handlers the new snapshot no longer uses are closed after a grace period, once the requests
that started on the old snapshot are done with them.

Files are polled (stat, then read only on change): a config folder is a handful of files, a stat
of each per second costs nothing, and polling works the same on every filesystem, including the
symlink swaps that Kubernetes ConfigMap volumes do.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mixerhub import monitoring
from mixerhub.adapter import Handler
from mixerhub.registry import Registry
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.store.errors import ConfigError

log = logging.getLogger("mixerhub.config")

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class RejectedLoad:
    """The last configuration that did not compile, for /debug/configz."""

    at: datetime.datetime
    digest: str
    errors: tuple[ConfigError, ...]


class ConfigStore:
    def __init__(
        self,
        paths: Sequence[str],
        registry: Registry,
        *,
        poll_interval: float = 0.5,
        close_grace: float = 5.0,
    ) -> None:
        self.paths = list(paths)
        self.registry = registry
        self.poll_interval = poll_interval
        self.close_grace = close_grace
        self.snapshot: Snapshot | None = None
        self.rejected: RejectedLoad | None = None
        self._fingerprint: Fingerprint | None = None
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call ``listener`` with every snapshot that becomes active."""
        self._listeners.append(listener)

    async def load(self) -> bool:
        """Read and compile now. True when a new snapshot became active."""
        async with self._lock:
            fingerprint = await asyncio.to_thread(_fingerprint, self.paths)
            self._fingerprint = fingerprint
            source = await asyncio.to_thread(documents.read, self.paths)
            if self.snapshot is not None and source.digest == self.snapshot.version:
                self.rejected = None  # back to what is active: the bad change is gone
                return False
            if self.rejected is not None and source.digest == self.rejected.digest:
                return False  # the same bad bytes again: already reported
            try:
                snapshot = compile_snapshot(source, self.registry, previous=self.snapshot)
            except Rejected as e:
                self._reject(source.digest, e)
                await _close_all(e.unused)
                return False
            self._activate(snapshot)
            return True

    async def run(self) -> None:
        """Poll the files until cancelled, loading whenever they change."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                fingerprint = await asyncio.to_thread(_fingerprint, self.paths)
                if fingerprint != self._fingerprint:
                    # Editors and `kubectl cp` write in steps; let the writes settle first.
                    await asyncio.sleep(min(0.1, self.poll_interval))
                    await self.load()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad load
                log.exception("configuration reload failed")

    async def close(self) -> None:
        """Close every handler (flushing what adapters queued) and wait for pending closes."""
        if self._closing:
            for task in list(self._closing):
                task.cancel()
        if self.snapshot is not None:
            await _close_all([h.handler for h in self.snapshot.handlers.values() if h.handler])

    def _activate(self, snapshot: Snapshot) -> None:
        old = self.snapshot
        self.snapshot = snapshot
        self.rejected = None
        monitoring.CONFIG_LOADS.labels("success").inc()
        monitoring.CONFIG_LAST_RELOAD_SUCCESSFUL.set(1)
        monitoring.CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP.set(snapshot.loaded_at.timestamp())
        monitoring.HANDLERS.clear()
        for h in snapshot.handlers.values():
            if h.handler is not None:
                monitoring.HANDLERS.labels(h.adapter.name).inc()
        log.info(
            "configuration %s active: %d rules, %d instances, %d handlers from %d files",
            snapshot.version,
            len(snapshot.rules),
            len(snapshot.instances),
            len(snapshot.handlers),
            len(snapshot.files),
        )
        if old is not None:
            kept = {id(h.handler) for h in snapshot.handlers.values()}
            retired = [
                h.handler
                for h in old.handlers.values()
                if h.handler is not None and id(h.handler) not in kept
            ]
            if retired:
                task = asyncio.create_task(self._retire(retired))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        for listener in self._listeners:
            listener(snapshot)

    def _reject(self, digest: str, e: Rejected) -> None:
        self.rejected = RejectedLoad(datetime.datetime.now(datetime.UTC), digest, tuple(e.errors))
        monitoring.CONFIG_ERRORS.inc()
        monitoring.CONFIG_LOADS.labels("rejected").inc()
        monitoring.CONFIG_LAST_RELOAD_SUCCESSFUL.set(0)
        kept = "keeping the last good configuration" if self.snapshot else "no configuration active"
        log.error(
            "configuration rejected (%d errors; %s):\n  %s",
            len(e.errors),
            kept,
            "\n  ".join(str(err) for err in e.errors),
        )

    async def _retire(self, handlers: list[Handler]) -> None:
        await asyncio.sleep(self.close_grace)
        await _close_all(handlers)


async def _close_all(handlers: Sequence[Handler], timeout: float = 10.0) -> None:
    async def close(h: Handler) -> None:
        try:
            await asyncio.wait_for(h.close(), timeout)
        except Exception:  # one adapter's failure to flush must not stop the others
            log.exception("closing handler %r failed", h)

    await asyncio.gather(*(close(h) for h in handlers))


def _fingerprint(paths: Sequence[str]) -> Fingerprint:
    files, _ = documents.config_files(paths)
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        out.append((f, st.st_mtime_ns, st.st_size))
    return tuple(out)
