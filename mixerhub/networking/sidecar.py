"""Istio's Sidecar: which ports a proxy listens on and which services it may reach.

Validation follows istiod's ValidateSidecar. Outside Kubernetes nothing captures traffic, so
here a Sidecar is what says where each Envoy listens (mixerhub.xds.translate): an ``ingress``
entry is an inbound listener on ``bind:port`` forwarding to ``defaultEndpoint``; an ``egress``
entry with a port is an outbound listener on ``bind:port`` for the services its ``hosts``
(``namespace/host``) name. An egress entry without a port only widens which services get
clusters (it would be Istio's captured catch-all listener). ``captureMode`` is accepted and
has no effect, since there is no capture to choose.

A proxy's Sidecar is the one of its namespace whose workloadSelector matches its labels, else
its namespace's Sidecar without a selector, else the root namespace's (istio-system).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import Field

from mixerhub.networking import GROUP, SERVICE_PHASE, VERSIONS
from mixerhub.networking.validation import (
    Path,
    SpecErrors,
    WorkloadSelector,
    dns_label_problem,
    host_problem,
    ip_problem,
    label_problems,
    not_supported,
    port_problem,
    protocol_problem,
)
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

DEFAULT_BIND: Final = "127.0.0.1"
CaptureMode = Literal["DEFAULT", "IPTABLES", "NONE"]
# Istio's allowed defaultEndpoint hosts: the loopback or "the instance IP" (which is the
# loopback here, as the workload runs beside its Envoy).
_ENDPOINT_HOSTS = {"127.0.0.1": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::1]": "::1", "[::]": "::1"}
_UNIX = "unix://"


class SidecarPortSpec(Params):
    number: int = 0
    protocol: str = ""
    name: str = ""
    target_port: Any = None


class IngressListenerSpec(Params):
    port: SidecarPortSpec | None = None
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    default_endpoint: str = ""
    tls: Any = None
    connection_pool: Any = None


class EgressListenerSpec(Params):
    port: SidecarPortSpec | None = None
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    hosts: list[str] = Field(default_factory=list)


class SidecarSpec(Params):
    workload_selector: WorkloadSelector | None = None
    ingress: list[IngressListenerSpec] = Field(default_factory=list)
    egress: list[EgressListenerSpec] = Field(default_factory=list)
    outbound_traffic_policy: Any = None
    inbound_connection_pool: Any = None


@dataclass(frozen=True)
class SidecarPort:
    number: int
    protocol: str  # upper case
    name: str


@dataclass(frozen=True)
class IngressListener:
    port: SidecarPort
    bind: str
    # (address, port) of the workload, or (unix:///path, 0).
    endpoint: tuple[str, int]


@dataclass(frozen=True)
class EgressListener:
    port: SidecarPort | None
    bind: str
    # (namespace, host): namespace "*" for any, a name, or "~" for none; host may be a wildcard.
    hosts: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sidecar:
    name: str
    namespace: str
    workload_selector: Mapping[str, str] | None  # None: every workload of the namespace
    ingress: tuple[IngressListener, ...]
    egress: tuple[EgressListener, ...]


def compile_sidecar(doc: Document, spec: SidecarSpec, c: Compilation) -> None:
    if not c.claim("Sidecar", doc):
        return
    fail = SpecErrors(doc, c)

    not_supported(
        fail,
        (),
        {
            "outboundTrafficPolicy": spec.outbound_traffic_policy,
            "inboundConnectionPool": spec.inbound_connection_pool,
        },
    )
    if not spec.ingress and not spec.egress:
        fail((), "sidecar: empty configuration provided")
    selector: dict[str, str] | None = None
    if spec.workload_selector is not None:
        selector = dict(spec.workload_selector.labels)
        if not selector:
            fail(("workloadSelector", "labels"), "sidecar: workloadSelector must have labels")
        for key, problem in label_problems(selector):
            fail(("workloadSelector", "labels", key), problem)
    else:
        for other in c.sidecars:
            if other.namespace == doc.namespace and other.workload_selector is None:
                fail(
                    ("workloadSelector",),
                    f"namespace {doc.namespace} already has a Sidecar without workloadSelector"
                    f" ({other.name}): only one may apply to the namespace",
                )

    listening: set[tuple[str, int]] = set()

    def port(p: SidecarPortSpec, bind: str, path: Path) -> SidecarPort:
        not_supported(fail, path, {"targetPort": p.target_port})
        problem = port_problem(p.number)
        if problem:
            fail((*path, "number"), problem)
        elif (bind, p.number) in listening:
            fail((*path, "number"), f"sidecar: ports on address {bind} must be unique")
        listening.add((bind, p.number))
        protocol = p.protocol.upper()
        if not protocol:
            fail((*path, "protocol"), "protocol is required")
        else:
            problem = protocol_problem(protocol)
            if problem:
                fail((*path, "protocol"), problem)
        if p.name and dns_label_problem(p.name):
            fail((*path, "name"), f"invalid port name {p.name!r}")
        return SidecarPort(p.number, protocol, p.name)

    def bind_address(bind: str, path: Path) -> str:
        if bind and ip_problem(bind):
            fail(path, f"sidecar: bind {bind!r} must be an IP address")
        return bind or DEFAULT_BIND

    ingress: list[IngressListener] = []
    for i, spec_in in enumerate(spec.ingress):
        at: Path = ("ingress", i)
        not_supported(fail, at, {"tls": spec_in.tls, "connectionPool": spec_in.connection_pool})
        bind = bind_address(spec_in.bind, (*at, "bind"))
        if spec_in.port is None:
            fail((*at, "port"), "sidecar: ingress listener must have a port")
            continue
        p = port(spec_in.port, bind, (*at, "port"))
        endpoint = _endpoint(spec_in.default_endpoint)
        if endpoint is None:
            fail(
                (*at, "defaultEndpoint"),
                f"sidecar: invalid defaultEndpoint {spec_in.default_endpoint!r}: use"
                " 127.0.0.1:PORT, 0.0.0.0:PORT or unix:///path",
            )
            continue
        ingress.append(IngressListener(p, bind, endpoint))

    egress: list[EgressListener] = []
    for i, spec_out in enumerate(spec.egress):
        at = ("egress", i)
        bind = bind_address(spec_out.bind, (*at, "bind"))
        if spec_out.port is None and i != len(spec.egress) - 1:
            fail(
                (*at, "port"),
                "sidecar: the egress listener with empty port should be the last listener"
                " in the list",
            )
        p_out = None if spec_out.port is None else port(spec_out.port, bind, (*at, "port"))
        if not spec_out.hosts:
            fail((*at, "hosts"), "sidecar: egress listener must contain at least one host")
        hosts: list[tuple[str, str]] = []
        for j, entry in enumerate(spec_out.hosts):
            namespace, slash, host = entry.partition("/")
            if not slash or not namespace:
                fail((*at, "hosts", j), f"{entry!r}: must be of the form namespace/dnsName")
                continue
            if namespace not in (".", "*", "~") and dns_label_problem(namespace):
                fail((*at, "hosts", j), f"{entry!r}: invalid namespace {namespace!r}")
            host_error = host_problem(host)
            if host_error:
                fail((*at, "hosts", j), host_error)
            hosts.append((doc.namespace if namespace == "." else namespace, host))
        egress.append(EgressListener(p_out, bind, tuple(hosts)))

    if not fail.failed:
        c.sidecars.append(Sidecar(doc.name, doc.namespace, selector, tuple(ingress), tuple(egress)))


def _endpoint(text: str) -> tuple[str, int] | None:
    if text.startswith(_UNIX):
        path = text[len(_UNIX) :]
        return (text, 0) if path.startswith("/") and len(path) > 1 else None
    host, sep, port = text.rpartition(":")
    address = _ENDPOINT_HOSTS.get(host)
    if not sep or address is None or not port.isdigit() or port_problem(int(port)):
        return None
    return address, int(port)


SIDECAR: Final = Kind(GROUP, VERSIONS, "Sidecar", SidecarSpec, SERVICE_PHASE, compile_sidecar)
