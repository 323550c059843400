"""Resource names, as istiod names them where Istio has a name for the thing.

- Outbound clusters: ``outbound|PORT|SUBSET|HOST`` (the EDS service name is the same).
- Inbound clusters: ``inbound|PORT||`` (Istio 1.10's form), PORT being the Sidecar ingress port.
- Listeners: ``BIND_PORT``, as Istio names the listeners a Sidecar declares.
- Outbound route configurations (RDS): ``PORT`` for an egress listener on the default bind
  address, ``BIND_PORT`` otherwise, so two egress listeners never share one.
- Virtual hosts: ``HOST:PORT``.
"""

from __future__ import annotations

from typing import Final

from mixerhub.networking.sidecar import DEFAULT_BIND

SDS_CERTIFICATE: Final = "default"  # the workload's certificate and key, as istio-agent names it
SDS_ROOT_CA: Final = "ROOTCA"  # the mesh's root certificate


def outbound_cluster(port: int, host: str, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


def listener(bind: str, port: int) -> str:
    return f"{bind}_{port}"


def route_config(bind: str, port: int) -> str:
    return str(port) if bind == DEFAULT_BIND else f"{bind}_{port}"


def virtual_host(host: str, port: int) -> str:
    return f"{host}:{port}"


def tls_sni(port: int, host: str, subset: str) -> str:
    """Istio's SNI for ISTIO_MUTUAL: the cluster name with ``_.`` separators."""
    return f"outbound_.{port}_.{subset}_.{host}"
