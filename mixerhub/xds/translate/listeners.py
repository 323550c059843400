"""Listeners (LDS): a Sidecar's ingress and egress entries, with the hub's filters.

Inbound (a Sidecar ``ingress`` entry): a listener on ``bind:port`` (bind defaults to
127.0.0.1) to the ``inbound|PORT||`` cluster, which is the entry's defaultEndpoint. HTTP ports
get the HTTP connection manager with an inline route, the hub's ext_authz and ratelimit filters
when they apply (mixerhub.xds.translate.hub) and the access log to the hub (reporter
"destination"); other protocols a TCP proxy with the TCP access log.

Inbound mTLS follows the port's PeerAuthentication mode (mixerhub.security.peer_authentication),
as istiod's inbound filter chains do:

- DISABLE: one plaintext filter chain.
- STRICT: the tls_inspector listener filter and one filter chain matching
  ``transport_protocol: tls`` whose DownstreamTlsContext requires a client certificate: the
  proxy's own certificate is the SDS secret ``default``, peers are validated against ``ROOTCA``
  (both over ADS, as the client side in mixerhub.xds.translate.clusters), ALPN
  istio-peer-exchange, h2, http/1.1. A plaintext connection matches no chain and is closed.
- PERMISSIVE: the same mTLS chain, and a plaintext one matching ``transport_protocol:
  raw_buffer``.

On an mTLS chain the HTTP connection manager sets x-forwarded-client-cert to the peer's URI SAN
(SANITIZE_SET, so a client cannot forge it), and the hub's ext_authz, which asks for the peer
certificate, gets the SPIFFE identity as ``source.principal``.

Only the server side follows PeerAuthentication: a client uses mTLS when its DestinationRule says
ISTIO_MUTUAL. Istio's auto-mTLS (ISTIO_MUTUAL by default towards workloads with a sidecar) is not
done: the hub does not know which endpoints run an Envoy.

Outbound (a Sidecar ``egress`` entry with a port): a listener on ``bind:port`` whose route
configuration comes over RDS (mixerhub.xds.translate.routes), with envoy.filters.http.fault
for VirtualService faults and the access log named ``mixerhub.outbound`` (reporter "source").
A TCP egress port proxies to the one service it can mean: the one in its hosts with a TCP port
numbered like the listener, else the only service with a TCP port; with none or several, no
listener is made, since nothing but the port tells TCP destinations apart here.
"""

from __future__ import annotations

from typing import Any, Final

from mixerhub.hub_filters import (
    OUTBOUND_ACCESS_LOG_NAME,
    ext_authz_filter,
    http_access_log,
    identity_metadata,
    ratelimit_filter,
    router_filter,
    tcp_access_log,
    workload_rate_limits,
)
from mixerhub.networking.registry import Service
from mixerhub.networking.sidecar import EgressListener, IngressListener
from mixerhub.networking.validation import is_http
from mixerhub.security.peer_authentication import EffectiveMode
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.translate import names
from mixerhub.xds.translate.clusters import ADS, address
from mixerhub.xds.translate.hub import HubCalls
from mixerhub.xds.translate.routes import FAULT, FAULT_TYPE

_TYPE = "type.googleapis.com/"
HCM: Final = "envoy.filters.network.http_connection_manager"
HCM_TYPE: Final = (
    _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
TCP_PROXY: Final = "envoy.filters.network.tcp_proxy"
TCP_PROXY_TYPE: Final = _TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_INSPECTOR: Final = "envoy.filters.listener.tls_inspector"
TLS_INSPECTOR_TYPE: Final = (
    _TYPE + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
_DOWNSTREAM_TLS_TYPE = _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
# Istio's inbound ALPN: the metadata exchange protocol, then HTTP.
_INBOUND_ALPN: Final = ["istio-peer-exchange", "h2", "http/1.1"]


def _listener(name: str, bind: str, port: int, network_filter: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": address(bind, port),
        "filter_chains": [{"filters": [network_filter]}],
    }


def inbound_tls() -> dict[str, Any]:
    """The server side of ISTIO_MUTUAL: a client certificate from the mesh's CA is required."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS_TYPE,
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": _INBOUND_ALPN,
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


def _inbound(
    name: str,
    bind: str,
    port: int,
    mode: EffectiveMode,
    plaintext: dict[str, Any],
    mtls: dict[str, Any],
) -> dict[str, Any]:
    """An inbound listener whose filter chains follow the port's mTLS mode."""
    if mode == "DISABLE":
        return _listener(name, bind, port, plaintext)
    chains: list[dict[str, Any]] = [
        {
            "filter_chain_match": {"transport_protocol": "tls"},
            "filters": [mtls],
            "transport_socket": inbound_tls(),
        }
    ]
    if mode == "PERMISSIVE":
        chains.append(
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [plaintext]}
        )
    return {
        "name": name,
        "address": address(bind, port),
        "listener_filters": [
            {"name": TLS_INSPECTOR, "typed_config": {"@type": TLS_INSPECTOR_TYPE}}
        ],
        "filter_chains": chains,
    }


def _tcp_proxy(stat_prefix: str, cluster: str, calls: HubCalls, log_name: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": TCP_PROXY_TYPE,
        "stat_prefix": stat_prefix,
        "cluster": cluster,
    }
    if calls.report:
        config["access_log"] = [tcp_access_log(log_name)]
    return {"name": TCP_PROXY, "typed_config": config}


def inbound_listener(
    proxy: Proxy,
    ingress: IngressListener,
    cluster: str,
    calls: HubCalls,
    mode: EffectiveMode = "DISABLE",
) -> dict[str, Any]:
    port = ingress.port.number
    name = names.listener(ingress.bind, port)
    stat_prefix = f"inbound_{port}"
    if not is_http(ingress.port.protocol):
        tcp = _tcp_proxy(stat_prefix, cluster, calls, "mixerhub")
        return _inbound(name, ingress.bind, port, mode, tcp, tcp)
    identity = identity_metadata(
        proxy.workload, proxy.namespace, proxy.labels, proxy.service_account
    )
    route: dict[str, Any] = {"cluster": cluster, "timeout": "0s"}
    filters = []
    if calls.check:
        filters.append(ext_authz_filter(identity))
    if calls.rate_limit_domain is not None:
        filters.append(ratelimit_filter(calls.rate_limit_domain, identity))
        route["rate_limits"] = workload_rate_limits(proxy.workload)
    filters.append(router_filter())
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "generate_request_id": True,
        # The peer's own address, not X-Forwarded-For, is what remote_address descriptors and
        # policies see, so a client cannot dodge them by sending the header.
        "use_remote_address": True,
        # Istio's default path normalization: /a/../b is /b for policies and routes alike.
        "normalize_path": True,
        "route_config": {
            "name": names.inbound_cluster(port),
            "virtual_hosts": [
                {
                    "name": names.inbound_cluster(port),
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": route}],
                }
            ],
        },
        "http_filters": filters,
    }
    if calls.report:
        hcm["access_log"] = [http_access_log()]
    # Istio's inbound HCM on mTLS: the peer's identity reaches the application, and only the
    # identity Envoy verified, whatever header the client sent.
    mtls_hcm = hcm | {
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True},
    }
    return _inbound(
        name,
        ingress.bind,
        port,
        mode,
        {"name": HCM, "typed_config": hcm},
        {"name": HCM, "typed_config": mtls_hcm},
    )


def outbound_listener(egress: EgressListener, calls: HubCalls) -> tuple[dict[str, Any], str]:
    """An HTTP egress listener and the name of the route configuration it asks for."""
    assert egress.port is not None
    port = egress.port.number
    route_name = names.route_config(egress.bind, port)
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": f"outbound_{egress.bind}_{port}",
        "codec_type": "AUTO",
        "generate_request_id": True,
        "normalize_path": True,
        "rds": {"config_source": ADS, "route_config_name": route_name},
        "http_filters": [{"name": FAULT, "typed_config": {"@type": FAULT_TYPE}}, router_filter()],
    }
    if calls.report:
        hcm["access_log"] = [http_access_log(OUTBOUND_ACCESS_LOG_NAME)]
    name = names.listener(egress.bind, port)
    return _listener(name, egress.bind, port, {"name": HCM, "typed_config": hcm}), route_name


def tcp_outbound_listener(
    egress: EgressListener, services: list[Service], calls: HubCalls
) -> dict[str, Any] | None:
    assert egress.port is not None
    port = egress.port.number
    candidates = [(s, p) for s in services for p in s.ports if not is_http(p.protocol)]
    same_port = [(s, p) for s, p in candidates if p.number == port]
    chosen = same_port if len(same_port) == 1 else candidates
    if len(chosen) != 1:
        return None
    service, service_port = chosen[0]
    cluster = names.outbound_cluster(service_port.number, service.hostname)
    prefix = f"outbound_{egress.bind}_{port}"
    proxy = _tcp_proxy(prefix, cluster, calls, OUTBOUND_ACCESS_LOG_NAME)
    return _listener(names.listener(egress.bind, port), egress.bind, port, proxy)
