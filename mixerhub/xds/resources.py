"""xDS resource types and what the translation hands the cache.

A proxy's configuration is ``Resources``: per type URL, the resources by name, as protobuf
messages from xds-protos. The translation produces it; the snapshot cache versions and serves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.message import Message

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Make before break: what is referenced arrives before what references it.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)


def in_push_order(type_urls: Iterable[str]) -> list[str]:
    """The types in PUSH_ORDER first (make before break: clusters and endpoints before the
    listeners and routes using them), then any other in the order given."""
    given = list(type_urls)
    return [*(t for t in PUSH_ORDER if t in given), *(t for t in given if t not in PUSH_ORDER)]


# Wildcard types: every response is the full set, and a name missing from it is deleted.
WILDCARD = frozenset({LISTENER, CLUSTER})

SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS"}

Resources = Mapping[str, Mapping[str, Message]]
