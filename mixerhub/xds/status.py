"""What each connected proxy was sent, acknowledged and rejected, per type.

The ADS servers record here; :func:`syncz` turns it into plain data for ``/debug/syncz``, with
istioctl proxy-status's per-type state (SYNCED / NOT SENT / STALE) plus NACKED when the last
response was rejected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mixerhub.xds.resources import PUSH_ORDER, SHORT_NAMES

if TYPE_CHECKING:
    from mixerhub.xds.cache import SnapshotCache

SYNCED = "SYNCED"
NOT_SENT = "NOT SENT"
STALE = "STALE"
NACKED = "NACKED"


@dataclass
class Nack:
    version: str  # the version Envoy rejected
    nonce: str
    error: str  # Envoy's error_detail.message
    at: float  # time.time()


@dataclass
class TypeStatus:
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float | None = None
    acked_version: str = ""
    acked_at: float | None = None
    last_nack: Nack | None = None
    sent: int = 0
    acked: int = 0
    nacked: int = 0

    @property
    def state(self) -> str:
        if self.sent_at is None:
            return NOT_SENT
        if self.last_nack is not None and self.last_nack.nonce == self.sent_nonce:
            return NACKED
        return SYNCED if self.acked_version == self.sent_version else STALE

    def to_json(self) -> dict[str, Any]:
        nack = self.last_nack
        return {
            "state": self.state,
            "sent": self.sent_version or None,
            "nonce": self.sent_nonce or None,
            "sent_at": self.sent_at,
            "acked": self.acked_version or None,
            "acked_at": self.acked_at,
            "nacked": None if nack is None else nack.version,
            "error": None if nack is None else nack.error,
            "nacked_at": None if nack is None else nack.at,
            "counts": {"sent": self.sent, "acked": self.acked, "nacked": self.nacked},
        }


@dataclass
class NodeStatus:
    types: dict[str, TypeStatus] = field(default_factory=dict)

    def of(self, type_url: str) -> TypeStatus:
        return self.types.setdefault(type_url, TypeStatus())


class SyncStatus:
    """Per node id, per type URL; a node's record lives while it has a stream open."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeStatus] = {}

    def open(self, node_id: str) -> None:
        self.nodes.setdefault(node_id, NodeStatus())

    def forget(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)

    def of(self, node_id: str, type_url: str) -> TypeStatus:
        return self.nodes.setdefault(node_id, NodeStatus()).of(type_url)

    def record_sent(self, node_id: str, type_url: str, version: str, nonce: str) -> None:
        status = self.of(node_id, type_url)
        status.sent_version, status.sent_nonce, status.sent_at = version, nonce, time.time()
        status.sent += 1

    def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        status = self.of(node_id, type_url)
        status.acked_version, status.acked_at = version, time.time()
        status.acked += 1

    def record_nack(
        self, node_id: str, type_url: str, version: str, nonce: str, error: str
    ) -> None:
        status = self.of(node_id, type_url)
        status.last_nack = Nack(version, nonce, error, time.time())
        status.nacked += 1

    def state(self, node_id: str, type_url: str) -> str:
        node = self.nodes.get(node_id)
        if node is None or type_url not in node.types:
            return NOT_SENT
        return node.types[type_url].state


def syncz(cache: SnapshotCache) -> list[dict[str, Any]]:
    """Every connected proxy with its identity and per-type sync state, as JSON-able data."""
    out: list[dict[str, Any]] = []
    for node_id, proxy in sorted(cache.proxies().items()):
        node = cache.status.nodes.get(node_id, NodeStatus())
        snapshot = cache.get_snapshot(node_id)
        types: dict[str, Any] = {}
        for type_url in PUSH_ORDER:
            entry = node.types.get(type_url, TypeStatus()).to_json()
            entry["snapshot"] = None if snapshot is None else snapshot.version(type_url)
            types[SHORT_NAMES[type_url]] = entry
        out.append(
            {
                "node_id": node_id,
                "proxy": {
                    "cluster": proxy.cluster,
                    "namespace": proxy.namespace,
                    "workload": proxy.workload,
                    "labels": dict(proxy.labels),
                    "service_account": proxy.service_account,
                },
                "types": types,
            }
        )
    return out
