"""The snapshot cache: per node, the resources to serve, versioned and checked for consistency.

As in go-control-plane, the cache knows nothing of gRPC. The ADS servers open a *watch* per
stream and are told when the node's snapshot changes; the hub's controller sets snapshots and
learns through :class:`CacheHooks` which proxies connect.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, Resources
from mixerhub.xds.status import SyncStatus

_TYPE_PREFIX = "type.googleapis.com/"
_HCM = _TYPE_PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


class InconsistentSnapshot(ValueError):
    """A snapshot references routes or endpoints it does not carry; Envoy would warm forever."""

    def __init__(self, missing: Mapping[str, list[str]]) -> None:
        self.missing = {type_url: sorted(names) for type_url, names in missing.items() if names}
        listed = "; ".join(
            f"{type_url.rsplit('.', 1)[-1]}: {', '.join(names)}"
            for type_url, names in self.missing.items()
        )
        super().__init__(f"snapshot references missing resources: {listed}")


def _digest(parts: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        # Length-prefixed, so no two different sequences hash alike.
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class XdsSnapshot:
    """One node's resources, immutable once built; build it with :meth:`from_resources`.

    Versions are content hashes of the deterministic serialization, so a type (or a resource)
    that did not change keeps its version and is never pushed again. Every type of PUSH_ORDER is
    present, empty when the translation produced none: an empty LDS/CDS still has to be sent so
    that Envoy deletes what it had.
    """

    resources: Mapping[str, Mapping[str, Message]]
    packed: Mapping[str, Mapping[str, any_pb2.Any]]
    versions: Mapping[str, str]
    resource_versions: Mapping[str, Mapping[str, str]]

    @classmethod
    def from_resources(cls, resources: Resources, *, check: bool = True) -> XdsSnapshot:
        """Version ``resources``; unless ``check`` is false, raise InconsistentSnapshot when
        they reference routes or endpoints they lack."""
        copies: dict[str, Mapping[str, Message]] = {}
        packed: dict[str, Mapping[str, any_pb2.Any]] = {}
        versions: dict[str, str] = {}
        resource_versions: dict[str, Mapping[str, str]] = {}
        for type_url in dict.fromkeys((*PUSH_ORDER, *resources)):
            by_name = resources.get(type_url, {})
            messages: dict[str, Message] = {}
            anys: dict[str, any_pb2.Any] = {}
            per_resource: dict[str, str] = {}
            for name in sorted(by_name):
                message = by_name[name]
                actual = _TYPE_PREFIX + message.DESCRIPTOR.full_name
                if actual != type_url:
                    raise TypeError(f"resource {name!r} under {type_url} is a {actual}")
                value = message.SerializeToString(deterministic=True)
                # A copy, so a caller mutating its message later cannot change what is served.
                copy = type(message)()
                copy.ParseFromString(value)
                messages[name] = copy
                anys[name] = any_pb2.Any(type_url=type_url, value=value)
                per_resource[name] = _digest(iter((name.encode(), value)))
            copies[type_url] = MappingProxyType(messages)
            packed[type_url] = MappingProxyType(anys)
            resource_versions[type_url] = MappingProxyType(per_resource)
            versions[type_url] = _digest(
                part for name, v in per_resource.items() for part in (name.encode(), v.encode())
            )
        snapshot = cls(
            MappingProxyType(copies),
            MappingProxyType(packed),
            MappingProxyType(versions),
            MappingProxyType(resource_versions),
        )
        if check:
            snapshot.check_consistency()
        return snapshot

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    @functools.cached_property
    def missing_references(self) -> Mapping[str, list[str]]:
        """Route and endpoint names referenced by listeners and clusters but not present.

        Cached: one snapshot is often set for many nodes of one workload."""
        routes = self.resources.get(ROUTE, {})
        endpoints = self.resources.get(ENDPOINT, {})
        missing_routes = sorted(
            {
                name
                for listener in self.resources.get(LISTENER, {}).values()
                for name in _route_names(listener)
                if name not in routes
            }
        )
        missing_endpoints = sorted(
            {
                name
                for cluster in self.resources.get(CLUSTER, {}).values()
                if (name := _eds_name(cluster)) is not None and name not in endpoints
            }
        )
        return {ROUTE: missing_routes, ENDPOINT: missing_endpoints}

    def check_consistency(self) -> None:
        """Raise InconsistentSnapshot naming every missing route and endpoint resource.

        go-control-plane's check; secrets are not checked, since the CA adds them later through
        the same cache.
        """
        missing = self.missing_references
        if any(missing.values()):
            raise InconsistentSnapshot(missing)


def _route_names(listener: Message) -> Iterator[str]:
    """RDS names of every HttpConnectionManager a listener carries."""
    assert isinstance(listener, listener_pb2.Listener)
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    configs = [
        f.typed_config for chain in chains for f in chain.filters if f.HasField("typed_config")
    ]
    if listener.HasField("api_listener"):
        configs.append(listener.api_listener.api_listener)
    for config in configs:
        if config.type_url != _HCM:
            continue
        hcm = hcm_pb2.HttpConnectionManager()
        config.Unpack(hcm)
        if hcm.WhichOneof("route_specifier") == "rds":
            yield hcm.rds.route_config_name


def _eds_name(cluster: Message) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster waits for; None for other clusters."""
    assert isinstance(cluster, cluster_pb2.Cluster)
    if cluster.WhichOneof("cluster_discovery_type") != "type":
        return None
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    name: str = cluster.eds_cluster_config.service_name or cluster.name
    return name


class CacheHooks:
    """What the cache tells its owner; override what you need, the rest does nothing.

    Called on the event loop of the stream, synchronously: start a task for slow work.
    """

    def on_stream_open(self, proxy: Proxy) -> None:
        """A stream for ``proxy`` opened; if its node has no snapshot, the stream waits for one
        (the controller may compute it now)."""

    def on_stream_closed(self, proxy: Proxy) -> None:
        """A stream for ``proxy`` ended, cleanly or not."""

    def on_snapshot_set(self, node_id: str, snapshot: XdsSnapshot) -> None:
        """A snapshot passed the consistency check and is now served to ``node_id``."""


@dataclass(frozen=True)
class _Entry:
    snapshot: XdsSnapshot
    set_at: float  # time.monotonic(), for the push latency


@dataclass(eq=False)
class Watch:
    """One stream's interest in its node's snapshot; ``notify`` is called on every change."""

    proxy: Proxy
    notify: Callable[[], None]
    opened_at: float = field(default_factory=time.monotonic)
    _cache: SnapshotCache | None = None

    def snapshot(self) -> tuple[XdsSnapshot, float] | None:
        """The node's snapshot and when it was set, or None while there is none."""
        if self._cache is None:
            return None
        entry = self._cache._entries.get(self.proxy.node_id)
        return None if entry is None else (entry.snapshot, entry.set_at)

    def close(self) -> None:
        if self._cache is not None:
            self._cache._close(self)
            self._cache = None


class SnapshotCache:
    """Snapshots by node id and the streams watching them.

    Not thread-safe: use it from the event loop that runs the ADS service (watches are woken
    synchronously from set_snapshot)."""

    def __init__(self, hooks: CacheHooks | None = None) -> None:
        self.hooks = hooks if hooks is not None else CacheHooks()
        self.status = SyncStatus()
        self._entries: dict[str, _Entry] = {}
        self._watches: dict[str, list[Watch]] = {}

    def set_snapshot(self, node_id: str, snapshot: XdsSnapshot | Resources) -> XdsSnapshot:
        """Serve ``snapshot`` to ``node_id`` from now on; raise InconsistentSnapshot (and keep
        the previous one) if it references routes or endpoints it lacks."""
        if not isinstance(snapshot, XdsSnapshot):
            snapshot = XdsSnapshot.from_resources(snapshot)
        snapshot.check_consistency()
        self._entries[node_id] = _Entry(snapshot, time.monotonic())
        self.hooks.on_snapshot_set(node_id, snapshot)
        for watch in list(self._watches.get(node_id, ())):
            watch.notify()
        return snapshot

    def get_snapshot(self, node_id: str) -> XdsSnapshot | None:
        entry = self._entries.get(node_id)
        return None if entry is None else entry.snapshot

    def clear_snapshot(self, node_id: str) -> None:
        """Forget ``node_id``'s snapshot; its open streams keep what they were sent and wait."""
        self._entries.pop(node_id, None)

    def node_ids(self) -> list[str]:
        """Nodes with a snapshot."""
        return sorted(self._entries)

    def proxies(self) -> dict[str, Proxy]:
        """The connected nodes, by node id, as their most recent stream described them."""
        return {node_id: watches[-1].proxy for node_id, watches in self._watches.items()}

    def watch(self, proxy: Proxy, notify: Callable[[], None]) -> Watch:
        """Register a stream for ``proxy``; close the returned Watch when the stream ends."""
        watch = Watch(proxy, notify, _cache=self)
        self._watches.setdefault(proxy.node_id, []).append(watch)
        self.status.open(proxy.node_id)
        self.hooks.on_stream_open(proxy)
        return watch

    def _close(self, watch: Watch) -> None:
        node_id = watch.proxy.node_id
        watches = self._watches.get(node_id, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._watches.pop(node_id, None)
            self.status.forget(node_id)
        self.hooks.on_stream_closed(watch.proxy)
