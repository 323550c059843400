"""From the translation's plain data to xds-protos messages.

Resources are built as protobuf JSON (field names as in the v3 protos, ``@type`` on each typed
config) and parsed here. Every module whose message appears under an ``@type`` is imported, so
the default descriptor pool can resolve it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

# Imported for their descriptors only: typed configs are resolved by their @type.
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE

_MESSAGES: dict[str, type[Message]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}


def to_message(type_url: str, data: dict[str, Any]) -> Message:
    """Parse one resource; an unknown field or enum value is a defect of the translation.

    Most resources come out the same for every workload (a service's clusters and endpoints)
    and from one push to the next, and ParseDict is slow pure Python, so a resource's wire
    bytes are remembered by its JSON text: the same data is parsed once, then only decoded.
    """
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return _MESSAGES[type_url].FromString(_wire(type_url, text))


@functools.lru_cache(maxsize=20_000)
def _wire(type_url: str, text: str) -> bytes:
    message = json_format.ParseDict(json.loads(text), _MESSAGES[type_url]())
    wire: bytes = message.SerializeToString(deterministic=True)
    return wire
