"""The Envoy filters that put the hub in a request's path, as plain v3 config data.

Envoy calls the hub, over the hub's single gRPC port (the static cluster ``HUB_CLUSTER``), three
ways: ``envoy.filters.http.ext_authz`` (Check), ``envoy.filters.http.ratelimit``
(ShouldRateLimit) and the gRPC access loggers (StreamAccessLogs). Both the static bootstrap
(mixerhub.bootstrap) and the xDS translation (mixerhub.xds.translate) build them here, so a
proxy configured either way calls the hub the same way.

Check and ShouldRateLimit requests do not carry the node, so those calls name the workload in
their gRPC initial metadata (``x-mixerhub-*``, read back by mixerhub.workload).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

HUB_CLUSTER: Final = "mixerhub"
ACCESS_LOG_NAME: Final = "mixerhub"
# mixerhub.access_log_attributes reports as the source (Istio's reporter="source") when the log
# name ends in "outbound".
OUTBOUND_ACCESS_LOG_NAME: Final = "mixerhub.outbound"
DEFAULT_RATELIMIT_DOMAIN: Final = "mixerhub"

# gRPC initial metadata on every Check and ShouldRateLimit call: who is asking.
WORKLOAD_HEADER: Final = "x-mixerhub-workload"
NAMESPACE_HEADER: Final = "x-mixerhub-namespace"
LABELS_HEADER: Final = "x-mixerhub-labels"
SERVICE_ACCOUNT_HEADER: Final = "x-mixerhub-service-account"

# Trace context Envoy does not log on its own (request_id is already a field of the entry).
# What the access log carries beyond its fields: gRPC is told from plain HTTP by content-type,
# and Istio's access log reads x-forwarded-for and x-api-key.
LOGGED_HEADERS: Final = ("content-type", "x-forwarded-for", "x-api-key", "x-client-trace-id")
TRACE_HEADERS: Final = (
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "traceparent",
)

EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"
RATELIMIT: Final = "envoy.filters.http.ratelimit"
ROUTER: Final = "envoy.filters.http.router"
HTTP_GRPC_ACCESS_LOG: Final = "envoy.access_loggers.http_grpc"
TCP_GRPC_ACCESS_LOG: Final = "envoy.access_loggers.tcp_grpc"

_TYPE = "type.googleapis.com/"
EXT_AUTHZ_TYPE: Final = _TYPE + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
RATELIMIT_TYPE: Final = _TYPE + "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
ROUTER_TYPE: Final = _TYPE + "envoy.extensions.filters.http.router.v3.Router"
HTTP_GRPC_LOG_TYPE: Final = (
    _TYPE + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
)
TCP_GRPC_LOG_TYPE: Final = _TYPE + "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig"


def labels_header(labels: Mapping[str, str]) -> str:
    """The labels as one header value: ``k=v,k2=v2``, sorted by key."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))


def identity_metadata(
    workload: str, namespace: str, labels: Mapping[str, str], service_account: str
) -> list[dict[str, str]]:
    """The gRPC initial metadata naming the workload, for ext_authz and rate-limit calls."""
    return [
        {"key": WORKLOAD_HEADER, "value": workload},
        {"key": NAMESPACE_HEADER, "value": namespace},
        {"key": LABELS_HEADER, "value": labels_header(labels)},
        {"key": SERVICE_ACCOUNT_HEADER, "value": service_account},
    ]


def hub_service(
    timeout: str | None = None, initial_metadata: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """An envoy.config.core.v3.GrpcService calling the hub's static cluster."""
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": HUB_CLUSTER}}
    if timeout is not None:
        service["timeout"] = timeout
    if initial_metadata is not None:
        # Copied: one list shared by two filters would be a YAML alias in a rendered bootstrap.
        service["initial_metadata"] = [dict(m) for m in initial_metadata]
    return service


def ext_authz_filter(identity: list[dict[str, str]]) -> dict[str, Any]:
    """Check every request with the hub; fail closed, as Mixer's policy check did."""
    return {
        "name": EXT_AUTHZ,
        "typed_config": {
            "@type": EXT_AUTHZ_TYPE,
            "grpc_service": hub_service(timeout="0.2s", initial_metadata=identity),
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "include_peer_certificate": True,
        },
    }


def ratelimit_filter(domain: str, identity: list[dict[str, str]]) -> dict[str, Any]:
    """Ask the hub's ShouldRateLimit; fail open, as envoyproxy/ratelimit's users expect."""
    return {
        "name": RATELIMIT,
        "typed_config": {
            "@type": RATELIMIT_TYPE,
            "domain": domain,
            "timeout": "0.020s",
            "failure_mode_deny": False,
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "grpc_service": hub_service(initial_metadata=identity),
                "transport_api_version": "V3",
            },
        },
    }


def workload_rate_limits(workload: str) -> list[dict[str, Any]]:
    """A route's rate_limits: descriptors for the workload alone, and for the workload per
    client address (skipped by Envoy when the address is unknown)."""

    def key() -> dict[str, Any]:
        # A fresh dict each time: a shared one would be a YAML alias in a rendered bootstrap.
        return {"generic_key": {"descriptor_key": "workload", "descriptor_value": workload}}

    return [{"actions": [key()]}, {"actions": [key(), {"remote_address": {}}]}]


def router_filter() -> dict[str, Any]:
    return {"name": ROUTER, "typed_config": {"@type": ROUTER_TYPE}}


def _common_log_config(log_name: str) -> dict[str, Any]:
    return {
        "log_name": log_name,
        "grpc_service": hub_service(),
        "transport_api_version": "V3",
        "buffer_flush_interval": "1s",
        # Four times Envoy's default (16 KiB): a message carries ~200 entries rather than ~50,
        # and the hub's cost per message (gRPC, the generated dispatch's setup) is spread
        # over more of them. Entries still leave within the flush interval.
        "buffer_size_bytes": 65536,
    }


def http_access_log(log_name: str = ACCESS_LOG_NAME) -> dict[str, Any]:
    """The HTTP connection manager's access log to the hub (Mixer's report)."""
    return {
        "name": HTTP_GRPC_ACCESS_LOG,
        "typed_config": {
            "@type": HTTP_GRPC_LOG_TYPE,
            "common_config": _common_log_config(log_name),
            "additional_request_headers_to_log": [*TRACE_HEADERS, *LOGGED_HEADERS],
            "additional_response_headers_to_log": ["content-type", "grpc-status"],
            "additional_response_trailers_to_log": ["grpc-status", "grpc-message"],
        },
    }


def tcp_access_log(log_name: str = ACCESS_LOG_NAME) -> dict[str, Any]:
    """A TCP proxy's access log to the hub: one entry per connection, when it closes."""
    return {
        "name": TCP_GRPC_ACCESS_LOG,
        "typed_config": {
            "@type": TCP_GRPC_LOG_TYPE,
            "common_config": _common_log_config(log_name),
        },
    }
