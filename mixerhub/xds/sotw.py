"""State-of-the-world ADS: StreamAggregatedResources, one independent state per type URL.

The protocol (envoy api/envoy/service/discovery/v3/discovery.proto and the xDS protocol doc):
every response carries a version and a nonce; Envoy answers with the nonce and either the new
version (ACK) or error_detail (NACK); a request carrying an older nonce is stale and ignored. LDS
and CDS are wildcard and every response is the full set; RDS, EDS and SDS answer the names
Envoy subscribed to.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2

from mixerhub.xds.cache import Watch
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import WILDCARD, in_push_order
from mixerhub.xds.status import SyncStatus
from mixerhub.xds.stream import record_nack, record_push

log = logging.getLogger(__name__)


@dataclass
class _TypeState:
    names: frozenset[str] = frozenset()  # the subscription (unused for wildcard types)
    nonce: str = ""  # of the last response; only a request carrying it is current
    sent: tuple[str, frozenset[str]] | None = None  # version and subscription last answered
    rejected: str | None = None  # the version Envoy NACKed: never sent again


class SotwStream:
    def __init__(self, proxy: Proxy, watch: Watch, status: SyncStatus) -> None:
        self.proxy = proxy
        self.watch = watch
        self.status = status
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest
    ) -> list[discovery_pb2.DiscoveryResponse]:
        type_url = request.type_url
        state = self._types.setdefault(type_url, _TypeState())
        nonce = request.response_nonce
        if nonce and nonce != state.nonce:
            log.debug("%s: stale nonce %s for %s ignored", self.proxy.node_id, nonce, type_url)
            return []
        if nonce and state.sent is not None:
            if request.HasField("error_detail"):
                self._nack(type_url, state, request.error_detail.message)
            else:
                self.status.record_ack(self.proxy.node_id, type_url, request.version_info)
        if type_url not in WILDCARD:
            state.names = frozenset(request.resource_names)
        response = self._respond(type_url, state)
        return [] if response is None else [response]

    def on_change(self) -> list[discovery_pb2.DiscoveryResponse]:
        responses = []
        for type_url in in_push_order(self._types):
            if (response := self._respond(type_url, self._types[type_url])) is not None:
                responses.append(response)
        return responses

    def _nack(self, type_url: str, state: _TypeState, error: str) -> None:
        assert state.sent is not None
        state.rejected = state.sent[0]
        self.status.record_nack(self.proxy.node_id, type_url, state.rejected, state.nonce, error)
        record_nack(type_url)
        log.warning(
            "%s rejected %s version %s: %s", self.proxy.node_id, type_url, state.rejected, error
        )

    def _respond(self, type_url: str, state: _TypeState) -> discovery_pb2.DiscoveryResponse | None:
        current = self.watch.snapshot()
        if current is None:
            return None  # the stream waits until the node has a snapshot
        snapshot, set_at = current
        version = snapshot.version(type_url)
        if version == state.rejected:
            return None
        if (version, state.names) == state.sent:
            return None
        packed = snapshot.packed.get(type_url, {})
        if type_url in WILDCARD:
            resources = list(packed.values())
        else:
            # Only what exists of what was asked: a name not there yet comes with the version
            # that adds it (Envoy keeps warming until then).
            resources = [packed[name] for name in sorted(state.names) if name in packed]
            if not resources:
                return None
        state.sent = (version, state.names)
        state.nonce = str(next(self._nonces))
        self.status.record_sent(self.proxy.node_id, type_url, version, state.nonce)
        record_push(type_url, self.watch, set_at)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=state.nonce, resources=resources
        )
