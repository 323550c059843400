"""Incremental ADS: DeltaAggregatedResources, resources sent one by one with their own versions.

Per the xDS protocol's incremental variant: the first request of a type may carry
initial_resource_versions (what Envoy kept from a previous stream), and an empty subscription on
it, or the name "*", means wildcard. A response carries only resources whose version differs
from what Envoy has, and names of what was deleted in removed_resources. Envoy ACKs a nonce or
NACKs it with error_detail; the resources a NACKed response carried count as sent, so a rejected
version is never sent again, only a newer one.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from mixerhub.xds.cache import Watch
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import in_push_order
from mixerhub.xds.status import SyncStatus
from mixerhub.xds.stream import record_nack, record_push

log = logging.getLogger(__name__)

WILDCARD_NAME = "*"


@dataclass
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    known: dict[str, str] = field(default_factory=dict)  # what Envoy has: name -> version
    nonce: str = ""  # of the last response
    nonce_version: str = ""  # the type's version in that response
    responded: bool = False


class DeltaStream:
    def __init__(self, proxy: Proxy, watch: Watch, status: SyncStatus) -> None:
        self.proxy = proxy
        self.watch = watch
        self.status = status
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        type_url = request.type_url
        state = self._types.get(type_url)
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if state is None:
            state = self._types[type_url] = _TypeState(
                wildcard=not subscribe, known=dict(request.initial_resource_versions)
            )
        nonce = request.response_nonce
        if nonce and nonce == state.nonce:
            if request.HasField("error_detail"):
                self._nack(type_url, state, request.error_detail.message)
            else:
                self.status.record_ack(self.proxy.node_id, type_url, state.nonce_version)
        elif nonce:
            # Stale: an answer to a response that a newer one superseded. Any subscription
            # change it carries still counts.
            log.debug("%s: stale nonce %s for %s", self.proxy.node_id, nonce, type_url)
        if WILDCARD_NAME in subscribe:
            state.wildcard = True
        if WILDCARD_NAME in unsubscribe:
            state.wildcard = False
        state.names |= subscribe - {WILDCARD_NAME}
        state.names -= unsubscribe
        for name in unsubscribe:
            # Envoy dropped it: a later subscription must send it again.
            state.known.pop(name, None)
        response = self._respond(type_url, state)
        return [] if response is None else [response]

    def on_change(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        responses = []
        for type_url in in_push_order(self._types):
            if (response := self._respond(type_url, self._types[type_url])) is not None:
                responses.append(response)
        return responses

    def _nack(self, type_url: str, state: _TypeState, error: str) -> None:
        self.status.record_nack(
            self.proxy.node_id, type_url, state.nonce_version, state.nonce, error
        )
        record_nack(type_url)
        log.warning(
            "%s rejected %s version %s: %s",
            self.proxy.node_id, type_url, state.nonce_version, error,
        )  # fmt: skip

    def _respond(
        self, type_url: str, state: _TypeState
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        current = self.watch.snapshot()
        if current is None:
            return None  # the stream waits until the node has a snapshot
        snapshot, set_at = current
        versions = snapshot.resource_versions.get(type_url, {})
        packed = snapshot.packed.get(type_url, {})

        def wanted(name: str) -> bool:
            return state.wildcard or name in state.names

        changed = [n for n in sorted(versions) if wanted(n) and state.known.get(n) != versions[n]]
        removed = [n for n in sorted(state.known) if n not in versions and wanted(n)]
        # A wildcard subscription is answered even when empty: Envoy's initialization waits for
        # the first LDS and CDS response.
        if not changed and not removed and (state.responded or not state.wildcard):
            return None
        for name in changed:
            state.known[name] = versions[name]
        for name in removed:
            del state.known[name]
        state.responded = True
        state.nonce = str(next(self._nonces))
        state.nonce_version = snapshot.version(type_url)
        self.status.record_sent(self.proxy.node_id, type_url, state.nonce_version, state.nonce)
        record_push(type_url, self.watch, set_at)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=state.nonce_version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[
                discovery_pb2.Resource(name=n, version=versions[n], resource=packed[n])
                for n in changed
            ],
            removed_resources=removed,
        )
