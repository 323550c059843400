"""From configuration snapshots to per-proxy xDS snapshots: debounced, translated once per identity.

The config store hands every new snapshot to :meth:`Pusher.activate`. Like istiod, changes are
debounced: a push starts once no change has arrived for ``quiet`` seconds, or ``max_delay``
after the first pending change, whichever comes first. A push translates the configuration once
per distinct workload identity (proxies of one workload get the same resources, whatever their
node ids) and sets each connected node's snapshot in the cache; the cache's content versions
make an unchanged type a no-op, so only the proxies a change concerns receive anything.

A proxy that connects is translated at once, without waiting for a debounce.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY
from mixerhub.snapshot import Snapshot
from mixerhub.xds.cache import CacheHooks, InconsistentSnapshot, SnapshotCache, XdsSnapshot
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import SECRET, Resources
from mixerhub.xds.secrets import SecretIssuer, WorkloadSecrets

log = logging.getLogger("mixerhub.xds")

TRANSLATION_ERRORS = Counter(
    "mixerhub_xds_translation_errors_total",
    "Proxies whose configuration could not be produced; they keep what they had.",
    ["reason"],
    registry=REGISTRY,
)

Translate = Callable[[Proxy, Snapshot], Resources]


def identity(proxy: Proxy) -> Hashable:
    """What the translation depends on: everything but the node id and cluster."""
    return (proxy.namespace, proxy.workload, tuple(sorted(proxy.labels.items())),
            proxy.service_account)  # fmt: skip


@dataclass
class _Workload:
    """One workload's share of a push: its translation, its secrets, the snapshot of both."""

    resources: Resources | None  # None: the translation failed
    secrets: WorkloadSecrets | None = None
    snapshot: XdsSnapshot | None = None


class Pusher(CacheHooks):
    def __init__(
        self,
        cache: SnapshotCache,
        translate: Translate,
        *,
        quiet: float = 0.1,
        max_delay: float = 10.0,
        secrets: SecretIssuer | None = None,
    ) -> None:
        self.cache = cache
        self.translate = translate
        self.quiet, self.max_delay = quiet, max_delay
        # Without a CA the hub serves no secrets (clusters asking for ISTIO_MUTUAL then wait).
        self.secrets = secrets
        if secrets is not None:
            secrets.on_renewal = self.push_all
        self._config: Snapshot | None = None
        # The current configuration's workloads by identity: proxies of one workload share
        # one XdsSnapshot, whether they connected before the push or after it.
        self._workloads: dict[Hashable, _Workload] = {}
        self._workloads_from: Snapshot | None = None
        self._pending_since: float | None = None
        self._last_change = 0.0
        self._debounce: asyncio.Task[None] | None = None

    # The config store's subscriber.
    def activate(self, config: Snapshot) -> None:
        self._config = config
        now = time.monotonic()
        self._last_change = now
        if self._pending_since is None:
            self._pending_since = now
        if self._debounce is None or self._debounce.done():
            self._debounce = asyncio.get_running_loop().create_task(self._debounced())

    # The cache's stream hooks.
    def on_stream_open(self, proxy: Proxy) -> None:
        if self._config is not None:
            self._push(self._current(self._config), proxy, self._config)

    def on_stream_closed(self, proxy: Proxy) -> None:
        if proxy.node_id not in self.cache.proxies():  # its last stream: forget the node
            self.cache.clear_snapshot(proxy.node_id)

    async def _debounced(self) -> None:
        while True:
            assert self._pending_since is not None
            now = time.monotonic()
            due = min(self._last_change + self.quiet, self._pending_since + self.max_delay)
            if now >= due:
                break
            await asyncio.sleep(due - now)
        self._pending_since = None
        self.push_all()

    def push_all(self) -> None:
        """Every connected proxy's snapshot from the current configuration and certificates."""
        config = self._config
        if config is None:
            return
        started = time.perf_counter()
        workloads = self._current(config)
        proxies = self.cache.proxies()
        for proxy in proxies.values():
            self._push(workloads, proxy, config)
        if self.secrets is not None:
            self.secrets.forget({identity(p) for p in proxies.values()})
        log.debug(
            "pushed config %s to %d proxies (%d workloads) in %.1f ms",
            config.version, len(proxies), len(workloads),
            (time.perf_counter() - started) * 1000,
        )  # fmt: skip

    def _current(self, config: Snapshot) -> dict[Hashable, _Workload]:
        if self._workloads_from is not config:
            self._workloads, self._workloads_from = {}, config
        return self._workloads

    def _push(self, workloads: dict[Hashable, _Workload], proxy: Proxy, config: Snapshot) -> None:
        key = identity(proxy)
        workload = workloads.get(key)
        if workload is None:
            workload = workloads[key] = _Workload(self._translate(proxy, config))
        if workload.resources is None:
            return  # the proxy keeps what it had
        secrets = self.secrets.secrets(key, proxy) if self.secrets is not None else None
        if workload.snapshot is None or workload.secrets is not secrets:
            resources = dict(workload.resources)
            if secrets is not None:
                resources[SECRET] = secrets.resources
            try:
                workload.snapshot = XdsSnapshot.from_resources(resources)
            except InconsistentSnapshot as e:
                TRANSLATION_ERRORS.labels("inconsistent").inc()
                log.error("%s: not pushed, the snapshot is inconsistent: %s", proxy.node_id, e)
                workload.resources = None
                return
            workload.secrets = secrets
        self.cache.set_snapshot(proxy.node_id, workload.snapshot)

    def _translate(self, proxy: Proxy, config: Snapshot) -> Resources | None:
        try:
            return self.translate(proxy, config)
        except Exception:  # a translation bug must not stop the other proxies' pushes
            TRANSLATION_ERRORS.labels("error").inc()
            log.exception("%s: translating its configuration failed", proxy.node_id)
        return None

    async def close(self) -> None:
        if self._debounce is not None:
            self._debounce.cancel()
        if self.secrets is not None:
            self.secrets.close()
