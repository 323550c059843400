"""Clusters (CDS) and their endpoints (EDS) for the services a proxy reaches.

One cluster per service port, ``outbound|PORT||HOST``, and one per DestinationRule subset,
``outbound|PORT|SUBSET|HOST``, whose endpoints are those the subset's labels select (Istio's
buildOutboundClusters). By the ServiceEntry's resolution:

- STATIC: an EDS cluster; its ClusterLoadAssignment, under the cluster's name, comes over ADS.
- DNS / DNS_ROUND_ROBIN: STRICT_DNS / LOGICAL_DNS with an inline load_assignment.
- NONE (and loadBalancer PASSTHROUGH): ORIGINAL_DST. Nothing captures traffic here, so Envoy
  cannot learn the original destination from the socket: it is read from the
  ``x-envoy-original-dst-host`` header (original_dst_lb_config.use_http_header).

The traffic policy maps as Istio's cluster builder does (applyConnectionPool,
applyOutlierDetection, applyLoadBalancer): circuit-breaker thresholds default to Istio's
(effectively unlimited), and ISTIO_MUTUAL is an UpstreamTlsContext whose certificate
(``default``) and root CA (``ROOTCA``) come over SDS on the same ADS stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from mixerhub.networking.destination_rule import (
    ConnectionPoolSettings,
    DestinationRule,
    OutlierDetection,
    Policy,
)
from mixerhub.networking.registry import Instance, Service
from mixerhub.networking.service_entry import ServicePort
from mixerhub.networking.sidecar import IngressListener
from mixerhub.networking.validation import HTTP2_PROTOCOLS, duration_json, is_http
from mixerhub.xds.translate import names

_TYPE = "type.googleapis.com/"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_TYPE = _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ADS: Final = {"ads": {}, "resource_api_version": "V3"}
CONNECT_TIMEOUT: Final = "10s"  # Istio's mesh default connectTimeout
_UNLIMITED: Final = 4294967295  # Istio's default thresholds: Envoy's own (1024) are too low
_LB_POLICIES: Final = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST"}
_LB_POLICIES["RANDOM"] = "RANDOM"
# Istio's ALPN for ISTIO_MUTUAL: the metadata exchange protocol, then plain Istio mTLS.
_ISTIO_ALPN: Final = ["istio-peer-exchange", "istio"]


def address(host: str, port: int) -> dict[str, Any]:
    if host.startswith("unix://"):
        return {"pipe": {"path": host[len("unix://") :]}}
    return {"socket_address": {"address": host, "port_value": port}}


# Istio's label on workloads that have a sidecar to talk mTLS with, and the endpoint metadata
# auto mTLS matches on (pilot's model.TLSModeLabelName and EnvoyTransportSocketMetadataKey).
TLS_MODE_LABEL: Final = "security.istio.io/tlsMode"
_TRANSPORT_SOCKET_MATCH: Final = "envoy.transport_socket_match"


def load_assignment(name: str, instances: Iterable[Instance]) -> dict[str, Any]:
    """A ClusterLoadAssignment (one locality: the hub knows of no others). An endpoint whose
    workload says it has a sidecar (``security.istio.io/tlsMode: istio``) carries it in its
    metadata, for auto mTLS."""
    endpoints = []
    for i in instances:
        lb_endpoint: dict[str, Any] = {"endpoint": {"address": address(i.address, i.port)}}
        if i.weight:
            lb_endpoint["load_balancing_weight"] = i.weight
        if i.labels.get(TLS_MODE_LABEL) == "istio":
            lb_endpoint["metadata"] = {
                "filter_metadata": {_TRANSPORT_SOCKET_MATCH: {"tlsMode": "istio"}}
            }
        endpoints.append(lb_endpoint)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []}


def _selects(labels: dict[str, str], instance: Instance) -> bool:
    return all(instance.labels.get(k) == v for k, v in labels.items())


class ClusterBuilder:
    """Collects clusters and load assignments; both keyed by name.

    With ``auto_mtls`` (the hub serves certificates), a cluster whose DestinationRule says
    nothing of TLS talks Istio mTLS to the endpoints that have a sidecar and plaintext to the
    others, as Istio's auto mTLS does: by transport socket matches on the endpoints' metadata.
    """

    def __init__(self, auto_mtls: bool = False) -> None:
        self.clusters: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.auto_mtls = auto_mtls

    def service(self, service: Service, rule: DestinationRule | None) -> None:
        for port in service.ports:
            instances = service.instances.get(port.number, ())
            policy = rule.policy(port.number) if rule else Policy()
            self._outbound(service, port, "", instances, policy)
            for subset in rule.subsets if rule else ():
                assert rule is not None
                selected = [i for i in instances if _selects(dict(subset.labels), i)]
                self._outbound(
                    service, port, subset.name, selected, rule.policy(port.number, subset.name)
                )

    def _outbound(
        self,
        service: Service,
        port: ServicePort,
        subset: str,
        instances: Iterable[Instance],
        policy: Policy,
    ) -> None:
        name = names.outbound_cluster(port.number, service.hostname, subset)
        cluster: dict[str, Any] = {"name": name, "connect_timeout": CONNECT_TIMEOUT}
        if service.resolution == "NONE" or policy.load_balancer == "PASSTHROUGH":
            cluster |= {
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {"use_http_header": True},
            }
        elif service.resolution == "STATIC":
            cluster |= {
                "type": "EDS",
                "eds_cluster_config": {"eds_config": ADS, "service_name": name},
            }
            self.endpoints[name] = load_assignment(name, instances)
        else:
            cluster |= {
                "type": "STRICT_DNS" if service.resolution == "DNS" else "LOGICAL_DNS",
                # "localhost" resolves to ::1 first, while local services often listen on
                # IPv4 only.
                "dns_lookup_family": "V4_PREFERRED",
                "load_assignment": load_assignment(name, instances),
            }
        if cluster["type"] != "ORIGINAL_DST":
            cluster["lb_policy"] = _LB_POLICIES.get(policy.load_balancer or "", "ROUND_ROBIN")
        cluster["circuit_breakers"] = _circuit_breakers(policy.connection_pool)
        pool = policy.connection_pool
        if pool is not None and pool.tcp is not None and pool.tcp.connect_timeout is not None:
            cluster["connect_timeout"] = duration_json(pool.tcp.connect_timeout)
        options = _http_options(port, pool)
        if options is not None:
            cluster["typed_extension_protocol_options"] = {_HTTP_OPTIONS: options}
        if policy.outlier_detection is not None:
            _apply_outlier_detection(cluster, policy.outlier_detection)
        if policy.tls is not None and policy.tls.mode == "ISTIO_MUTUAL":
            sni = policy.tls.sni or names.tls_sni(port.number, service.hostname, subset)
            cluster["transport_socket"] = istio_mutual(sni)
        elif policy.tls is None and self.auto_mtls and cluster["type"] != "ORIGINAL_DST":
            sni = names.tls_sni(port.number, service.hostname, subset)
            cluster["transport_socket_matches"] = [
                {"name": "tlsMode-istio", "match": {"tlsMode": "istio"},
                 "transport_socket": istio_mutual(sni)},
                {"name": "tlsMode-disabled", "match": {}, "transport_socket": _RAW_BUFFER},
            ]  # fmt: skip
        self.clusters[name] = cluster

    def inbound(self, ingress: IngressListener) -> str:
        """The cluster of a Sidecar ingress listener: its defaultEndpoint, statically."""
        name = names.inbound_cluster(ingress.port.number)
        host, port = ingress.endpoint
        cluster: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": _circuit_breakers(None),
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(host, port)}}]}],
            },
        }
        if ingress.port.protocol in HTTP2_PROTOCOLS:
            cluster["typed_extension_protocol_options"] = {
                _HTTP_OPTIONS: {
                    "@type": _TYPE + _HTTP_OPTIONS,
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        self.clusters[name] = cluster
        return name


def _circuit_breakers(pool: ConnectionPoolSettings | None) -> dict[str, Any]:
    threshold: dict[str, Any] = {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
        "track_remaining": True,
    }
    if pool is not None and pool.tcp is not None and pool.tcp.max_connections:
        threshold["max_connections"] = pool.tcp.max_connections
    if pool is not None and pool.http is not None:
        h = pool.http
        for key, value in (
            ("max_pending_requests", h.http1_max_pending_requests),
            ("max_requests", h.http2_max_requests),
            ("max_retries", h.max_retries),
        ):
            if value:
                threshold[key] = value
    return {"thresholds": [threshold]}


def _http_options(port: ServicePort, pool: ConnectionPoolSettings | None) -> dict[str, Any] | None:
    """HttpProtocolOptions: HTTP/2 upstream for HTTP2 and gRPC ports (or when told to upgrade),
    and the connection pool's per-connection limits."""
    if not is_http(port.protocol):
        return None
    http = pool.http if pool is not None else None
    tcp = pool.tcp if pool is not None else None
    common: dict[str, Any] = {}
    if http is not None and http.idle_timeout is not None:
        common["idle_timeout"] = duration_json(http.idle_timeout)
    if http is not None and http.max_requests_per_connection:
        common["max_requests_per_connection"] = http.max_requests_per_connection
    if tcp is not None and tcp.max_connection_duration is not None:
        common["max_connection_duration"] = duration_json(tcp.max_connection_duration)
    http2 = port.protocol in HTTP2_PROTOCOLS
    if http is not None and http.h2_upgrade_policy == "UPGRADE":
        http2 = True
    h2_options: dict[str, Any] = {}
    if http is not None and http.max_concurrent_streams:
        h2_options["max_concurrent_streams"] = http.max_concurrent_streams
    if not common and not http2 and not (http is not None and http.use_client_protocol):
        return None
    options: dict[str, Any] = {"@type": _TYPE + _HTTP_OPTIONS}
    if common:
        options["common_http_protocol_options"] = common
    if http is not None and http.use_client_protocol:
        options["use_downstream_protocol_config"] = {
            "http_protocol_options": {},
            "http2_protocol_options": h2_options,
        }
    elif http2:
        options["explicit_http_config"] = {"http2_protocol_options": h2_options}
    else:
        options["explicit_http_config"] = {"http_protocol_options": {}}
    return options


def _apply_outlier_detection(cluster: dict[str, Any], o: OutlierDetection) -> None:
    # Istio turns off what the user did not ask for: Envoy's defaults eject on 5 5xx.
    out: dict[str, Any] = {
        "enforcing_consecutive_5xx": 0,
        "enforcing_consecutive_gateway_failure": 0,
        "enforcing_success_rate": 0,
    }
    errors = o.consecutive_5xx_errors if o.consecutive_5xx_errors is not None else None
    if errors is None and o.consecutive_errors is not None:
        errors = o.consecutive_errors
    if errors:
        out["consecutive_5xx"] = errors
        out["enforcing_consecutive_5xx"] = 100
    if o.consecutive_gateway_errors:
        out["consecutive_gateway_failure"] = o.consecutive_gateway_errors
        out["enforcing_consecutive_gateway_failure"] = 100
    if o.split_external_local_origin_errors:
        out["split_external_local_origin_errors"] = True
        if o.consecutive_local_origin_failures:
            out["consecutive_local_origin_failure"] = o.consecutive_local_origin_failures
            out["enforcing_consecutive_local_origin_failure"] = 100
    if o.interval is not None:
        out["interval"] = duration_json(o.interval)
    if o.base_ejection_time is not None:
        out["base_ejection_time"] = duration_json(o.base_ejection_time)
    if o.max_ejection_percent is not None:
        out["max_ejection_percent"] = o.max_ejection_percent
    cluster["outlier_detection"] = out
    if o.min_health_percent is not None:
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": o.min_health_percent}}


_RAW_BUFFER: Final = {
    "name": "envoy.transport_sockets.raw_buffer",
    "typed_config": {"@type": _TYPE + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
}


def istio_mutual(sni: str) -> dict[str, Any]:
    """Istio's mTLS to an upstream sidecar, with the secrets istio-agent would serve."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS_TYPE,
            "sni": sni,
            "common_tls_context": {
                "alpn_protocols": _ISTIO_ALPN,
                "tls_certificate_sds_secret_configs": [
                    {"name": names.SDS_CERTIFICATE, "sds_config": ADS}
                ],
                "validation_context_sds_secret_config": {
                    "name": names.SDS_ROOT_CA,
                    "sds_config": ADS,
                },
            },
        },
    }
