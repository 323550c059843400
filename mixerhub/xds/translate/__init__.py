"""Istio's networking configuration translated into one proxy's Envoy resources.

``translate(proxy, snapshot)`` is what istiod's config generators do for a sidecar, with the
conventions a machine without Kubernetes needs: nothing captures traffic, and several Envoys may
share one host.

- The proxy's Sidecar (mixerhub.networking.sidecar, chosen by workloadSelector in its
  namespace, else its namespace's, else istio-system's) says where it listens. Each ``ingress``
  entry is an inbound listener on ``bind:port`` (bind 127.0.0.1 by default) forwarding to its
  defaultEndpoint through the cluster ``inbound|PORT||``. Each ``egress`` entry with a port is an
  outbound listener on ``bind:port`` whose routes (RDS ``PORT``, or ``BIND_PORT`` off the default
  bind) have a virtual host per reachable service: a client reaches a service through its own
  Envoy's egress port, with the service's host name as Host header.
- Reachable services: those the Sidecar's egress ``hosts`` (``ns/host``) name, among those
  exported to the proxy's namespace; without a Sidecar, every exported service, and no
  listeners (nothing says where to listen).
- Clusters (mixerhub.xds.translate.clusters) are named as Istio names them,
  ``outbound|PORT|SUBSET|HOST``; STATIC services have EDS clusters whose ClusterLoadAssignment
  has the same name, DNS ones inline endpoints. With the CA, auto mTLS: a DestinationRule
  without TLS settings means mTLS to endpoints labelled ``security.istio.io/tlsMode: istio``.
- Routes (mixerhub.xds.translate.routes) come from VirtualServices; a service without one gets
  a default route to its cluster. An egress entry imports VirtualServices as it imports
  services: by their namespace and hosts.
- Inbound listeners accept mTLS, plaintext or both as the port's PeerAuthentication says
  (mixerhub.security.peer_authentication; mixerhub.xds.translate.listeners).
- The hub's filters (mixerhub.hub_filters) are on the inbound listeners when they have work
  there (mixerhub.xds.translate.hub); outbound listeners carry only the access log, as the
  source reporter.

Every RDS and EDS name a listener or cluster refers to is in the output, so the cache's
consistency check holds. SDS secrets (``default``, ``ROOTCA``) referred to by ISTIO_MUTUAL
clusters are not made here: they come from the CA.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.message import Message

from mixerhub.networking.registry import Networking, Service
from mixerhub.networking.sidecar import Sidecar
from mixerhub.networking.validation import host_matches, is_http
from mixerhub.snapshot import Snapshot
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources
from mixerhub.xds.translate.clusters import ClusterBuilder
from mixerhub.xds.translate.hub import HubCalls, hub_calls
from mixerhub.xds.translate.listeners import (
    inbound_listener,
    outbound_listener,
    tcp_outbound_listener,
)
from mixerhub.xds.translate.messages import to_message
from mixerhub.xds.translate.routes import RouteBuilder

__all__ = ["HubCalls", "hub_calls", "translate", "translate_data"]


def _in_hosts(service: Service, hosts: Iterable[tuple[str, str]]) -> bool:
    return any(
        namespace != "~"
        and (namespace == "*" or namespace == service.namespace)
        and host_matches(host, service.hostname)
        for namespace, host in hosts
    )


def reachable(networking: Networking, proxy: Proxy, sidecar: Sidecar | None) -> list[Service]:
    """The services a proxy has clusters for: exported to it, and in its Sidecar's egress."""
    services = list(networking.services_for(proxy.namespace))
    if sidecar is None:
        return services
    hosts = [h for egress in sidecar.egress for h in egress.hosts]
    return [s for s in services if _in_hosts(s, hosts)]


def translate_data(
    proxy: Proxy, snapshot: Snapshot, *, certificates: bool = False
) -> dict[str, dict[str, dict[str, Any]]]:
    """The proxy's resources as protobuf JSON, by type URL and name (for tests and debugging).

    ``certificates``: whether the hub serves the proxy its SDS secrets (it has a CA). Without
    them a PERMISSIVE port is plaintext only, since a TLS chain waiting for secrets would hold
    the listener warming; a STRICT one keeps its mTLS chain and refuses every connection."""
    networking = snapshot.networking
    sidecar = networking.sidecar(proxy.namespace, proxy.labels)
    services = reachable(networking, proxy, sidecar)
    calls = hub_calls(proxy, snapshot)

    clusters = ClusterBuilder(auto_mtls=certificates)
    for service in services:
        clusters.service(service, networking.destination_rule(proxy.namespace, service))
    listeners: dict[str, dict[str, Any]] = {}
    routes: dict[str, dict[str, Any]] = {}
    route_builder = RouteBuilder(proxy, networking)
    for ingress in sidecar.ingress if sidecar else ():
        cluster = clusters.inbound(ingress)
        mode = snapshot.peer_authentication.mode(proxy.namespace, proxy.labels, ingress.port.number)
        if mode == "PERMISSIVE" and not certificates:
            mode = "DISABLE"
        listener = inbound_listener(proxy, ingress, cluster, calls, mode)
        listeners[listener["name"]] = listener
    for egress in sidecar.egress if sidecar else ():
        if egress.port is None:
            continue  # Istio's captured catch-all: it only widened the hosts above
        in_hosts = [s for s in services if _in_hosts(s, egress.hosts)]
        if is_http(egress.port.protocol):
            listener, route_name = outbound_listener(egress, calls)
            routes[route_name] = route_builder.route_config(
                route_name, egress.port.number, in_hosts, egress.hosts
            )
        else:
            tcp = tcp_outbound_listener(egress, in_hosts, calls)
            if tcp is None:
                continue
            listener = tcp
        listeners[listener["name"]] = listener
    return {
        LISTENER: listeners,
        ROUTE: routes,
        CLUSTER: clusters.clusters,
        ENDPOINT: clusters.endpoints,
    }


def translate(proxy: Proxy, snapshot: Snapshot, *, certificates: bool = False) -> Resources:
    """The proxy's listeners, routes, clusters and endpoints as xds-protos messages."""
    out: dict[str, dict[str, Message]] = {}
    data = translate_data(proxy, snapshot, certificates=certificates)
    for type_url, resources in data.items():
        out[type_url] = {name: to_message(type_url, data) for name, data in resources.items()}
    return out
