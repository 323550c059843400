"""Istio's ServiceEntry: a service (its hosts and ports) and where its endpoints come from.

Validation follows istiod's ValidateServiceEntry. Hosts are taken as written, as Istio does for
ServiceEntries (only VirtualService and DestinationRule hosts are resolved from short names).
Endpoints are the ServiceEntry's ``endpoints``, or the WorkloadEntries of its namespace that its
``workloadSelector`` picks (joined in mixerhub.networking.registry).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import Field

from mixerhub.networking import GROUP, SERVICE_PHASE, VERSIONS
from mixerhub.networking.validation import (
    Path,
    SpecErrors,
    WorkloadSelector,
    cidr_problem,
    dns_label_problem,
    export_scope,
    export_to_problems,
    host_problem,
    label_problems,
    not_supported,
    port_problem,
    protocol_problem,
)
from mixerhub.networking.workload_entry import (
    UNIX,
    WorkloadEntry,
    WorkloadEntrySpec,
    compile_workload,
)
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

Resolution = Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]
Location = Literal["MESH_EXTERNAL", "MESH_INTERNAL"]


class ServicePortSpec(Params):
    number: int
    protocol: str = ""
    name: str = ""
    target_port: int | None = None


class ServiceEntrySpec(Params):
    hosts: list[str] = Field(default_factory=list)
    addresses: list[str] = Field(default_factory=list)
    ports: list[ServicePortSpec] = Field(default_factory=list)
    location: Location = "MESH_EXTERNAL"
    resolution: Resolution = "NONE"
    endpoints: list[WorkloadEntrySpec] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None
    export_to: list[str] = Field(default_factory=list)
    subject_alt_names: Any = None


@dataclass(frozen=True)
class ServicePort:
    number: int
    protocol: str  # upper case; from the name's prefix or "TCP" when not given
    name: str
    target_port: int | None = None


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    location: Location
    resolution: Resolution
    endpoints: tuple[WorkloadEntry, ...]
    # matchLabels over WorkloadEntries of the namespace; None: the endpoints above are used.
    workload_selector: Mapping[str, str] | None
    export_to: frozenset[str]


def compile_service_entry(doc: Document, spec: ServiceEntrySpec, c: Compilation) -> None:
    if not c.claim("ServiceEntry", doc):
        return
    fail = SpecErrors(doc, c)

    not_supported(fail, (), {"subjectAltNames": spec.subject_alt_names})
    if not spec.hosts:
        fail(("hosts",), "service entry must have at least one host")
    for i, host in enumerate(spec.hosts):
        if host == "*":
            fail(("hosts", i), "invalid host *")
            continue
        problem = host_problem(host)
        if problem:
            fail(("hosts", i), problem)
    for i, address in enumerate(spec.addresses):
        problem = cidr_problem(address)
        if problem:
            fail(("addresses", i), problem)
    for i, problem in export_to_problems(spec.export_to):
        fail(("exportTo", i), problem)

    if not spec.ports:
        fail(("ports",), "service entry must have at least one port")
    ports: list[ServicePort] = []
    numbers: set[int] = set()
    names: set[str] = set()
    for i, p in enumerate(spec.ports):
        problem = port_problem(p.number)
        if problem:
            fail(("ports", i, "number"), problem)
        elif p.number in numbers:
            fail(("ports", i, "number"), f"port number {p.number} is not unique")
        numbers.add(p.number)
        if p.name:
            if dns_label_problem(p.name):
                fail(("ports", i, "name"), f"invalid port name {p.name!r}")
            elif p.name in names:
                fail(("ports", i, "name"), f"port name {p.name!r} is not unique")
            names.add(p.name)
        protocol = p.protocol.upper() or _protocol_from_name(p.name)
        problem = protocol_problem(protocol)
        if problem:
            fail(("ports", i, "protocol"), problem)
        if p.target_port is not None:
            problem = port_problem(p.target_port)
            if problem:
                fail(("ports", i, "targetPort"), problem)
        ports.append(ServicePort(p.number, protocol, p.name, p.target_port))

    selector: dict[str, str] | None = None
    if spec.workload_selector is not None:
        selector = dict(spec.workload_selector.labels)
        for key, problem in label_problems(selector):
            fail(("workloadSelector", "labels", key), problem)
        if spec.endpoints:
            fail(("workloadSelector",), "only one of workloadSelector or endpoints is allowed")

    endpoints = _endpoints(spec, doc, names, fail)
    if spec.resolution == "NONE" and spec.endpoints:
        fail(("endpoints",), "no endpoints should be provided for resolution type none")
    elif spec.resolution == "STATIC" and not spec.endpoints and selector is None:
        fail(("endpoints",), "endpoints must be provided for resolution type static")
    elif spec.resolution in ("DNS", "DNS_ROUND_ROBIN") and not spec.endpoints:
        for i, host in enumerate(spec.hosts):
            if host.startswith("*"):
                fail(
                    ("hosts", i),
                    f"wildcard host {host!r} cannot be resolved by DNS without endpoints",
                )
    if spec.resolution == "DNS_ROUND_ROBIN" and len(spec.endpoints) > 1:
        fail(("endpoints",), "at most one endpoint is allowed for resolution DNS_ROUND_ROBIN")

    if fail.failed:
        return
    c.service_entries.append(
        ServiceEntry(
            doc.name,
            doc.namespace,
            tuple(spec.hosts),
            tuple(spec.addresses),
            tuple(ports),
            spec.location,
            spec.resolution,
            endpoints,
            selector,
            export_scope(spec.export_to, doc.namespace),
        )
    )


def _protocol_from_name(name: str) -> str:
    """Istio's port-name convention (``http-web``, ``grpc``) when no protocol is given; TCP
    otherwise, as Istio treats a port it cannot tell the protocol of."""
    prefix = name.split("-", 1)[0].upper()
    return prefix if protocol_problem(prefix) is None else "TCP"


def _endpoints(
    spec: ServiceEntrySpec,
    doc: Document,
    port_names: set[str],
    fail: Callable[[Path, str], None],
) -> tuple[WorkloadEntry, ...]:
    out: list[WorkloadEntry] = []
    for i, endpoint in enumerate(spec.endpoints):
        path: Path = ("endpoints", i)
        dns = spec.resolution in ("DNS", "DNS_ROUND_ROBIN")
        entry = compile_workload(endpoint, "", doc.namespace, path, fail, hostname_allowed=dns)
        if entry.address.startswith(UNIX) and spec.resolution != "STATIC":
            fail((*path, "address"), "a unix address needs resolution STATIC")
        for name in endpoint.ports:
            if name not in port_names:
                fail((*path, "ports", name), f"port {name!r} is not a port of the service entry")
        out.append(entry)
    return tuple(out)


SERVICE_ENTRY: Final = Kind(
    GROUP, VERSIONS, "ServiceEntry", ServiceEntrySpec, SERVICE_PHASE, compile_service_entry
)
