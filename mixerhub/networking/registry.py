"""The compiled networking configuration of a snapshot: services with their endpoints, and the
routing, policies and sidecars that apply to a proxy.

Lookups follow istiod's precedence (pilot/pkg/model/push_context.go): a proxy sees what is
exported to its namespace; of several resources for one host, its own namespace's wins, then the
service's namespace, then the root namespace's; an exact host wins over a wildcard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mixerhub.networking.destination_rule import DestinationRule
from mixerhub.networking.service_entry import Resolution, ServiceEntry, ServicePort
from mixerhub.networking.sidecar import Sidecar
from mixerhub.networking.validation import host_matches, visible
from mixerhub.networking.virtual_service import VirtualService
from mixerhub.networking.workload_entry import WorkloadEntry
from mixerhub.security import ROOT_NAMESPACE


@dataclass(frozen=True)
class Instance:
    """One endpoint of one service port (Istio's ServiceInstance)."""

    address: str  # an IP, a host name (DNS resolution) or unix:///path
    port: int  # 0 for a unix address
    labels: Mapping[str, str]
    weight: int  # 0: Envoy's default
    service_account: str


@dataclass(frozen=True)
class Service:
    """One host of one ServiceEntry (Istio makes a service per host, too)."""

    hostname: str
    namespace: str
    entry: str  # the ServiceEntry's name
    ports: tuple[ServicePort, ...]
    resolution: Resolution
    export_to: frozenset[str]
    # Service port number -> its endpoints.
    instances: Mapping[int, tuple[Instance, ...]]

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.number == number), None)


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _instances(
    entry: ServiceEntry, host: str, workloads: Iterable[WorkloadEntry]
) -> dict[int, tuple[Instance, ...]]:
    if entry.workload_selector is not None:
        selector = entry.workload_selector
        endpoints: Iterable[WorkloadEntry] = [
            w for w in workloads if w.namespace == entry.namespace and _selects(selector, w.labels)
        ]
    elif entry.endpoints:
        endpoints = entry.endpoints
    elif entry.resolution in ("DNS", "DNS_ROUND_ROBIN"):
        # A DNS ServiceEntry without endpoints resolves its own host.
        endpoints = [WorkloadEntry("", entry.namespace, host)]
    else:
        endpoints = []
    out: dict[int, tuple[Instance, ...]] = {}
    for port in entry.ports:
        found: list[Instance] = []
        for w in endpoints:
            unix = w.address.startswith("unix://")
            number = 0 if unix else w.ports.get(port.name) or port.target_port or port.number
            found.append(Instance(w.address, number, w.labels, w.weight, w.service_account))
        out[port.number] = tuple(found)
    return out


def _precedence(namespace: str, own: str, service_namespace: str) -> int:
    if namespace == own:
        return 0
    if namespace == service_namespace:
        return 1
    return 2 if namespace == ROOT_NAMESPACE else 3


def _imported(vs: VirtualService, egress_hosts: Iterable[tuple[str, str]]) -> bool:
    return any(
        ns != "~"
        and (ns == "*" or ns == vs.namespace)
        and any(host_matches(dns, h) or host_matches(h, dns) for h in vs.hosts)
        for ns, dns in egress_hosts
    )


def _specificity(pattern: str, host: str) -> int:
    # Exact first; then the longest wildcard.
    return 0 if pattern == host else 1_000 - len(pattern)


@dataclass(frozen=True)
class Networking:
    """Every networking resource of a snapshot, compiled; ``build`` joins services with their
    endpoints. Immutable: a snapshot's registry never changes under a translation."""

    services: tuple[Service, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    sidecars: tuple[Sidecar, ...] = ()

    @classmethod
    def build(
        cls,
        service_entries: Iterable[ServiceEntry] = (),
        workload_entries: Iterable[WorkloadEntry] = (),
        virtual_services: Iterable[VirtualService] = (),
        destination_rules: Iterable[DestinationRule] = (),
        sidecars: Iterable[Sidecar] = (),
    ) -> Networking:
        workloads = tuple(workload_entries)
        services = [
            Service(
                host,
                e.namespace,
                e.name,
                e.ports,
                e.resolution,
                e.export_to,
                _instances(e, host, workloads),
            )
            for e in service_entries
            for host in e.hosts
        ]

        def key(r: VirtualService | DestinationRule | Sidecar) -> tuple[str, str]:
            return (r.namespace, r.name)

        return cls(
            tuple(sorted(services, key=lambda s: (s.hostname, s.namespace, s.entry))),
            workloads,
            tuple(sorted(virtual_services, key=key)),
            tuple(sorted(destination_rules, key=key)),
            tuple(sorted(sidecars, key=key)),
        )

    def __repr__(self) -> str:
        return (
            f"Networking({len(self.services)} services, {len(self.virtual_services)} virtual"
            f" services, {len(self.destination_rules)} destination rules,"
            f" {len(self.sidecars)} sidecars)"
        )

    def sidecar(self, namespace: str, labels: Mapping[str, str]) -> Sidecar | None:
        """The Sidecar of a workload: selected by labels in its namespace, else its
        namespace's default, else the root namespace's default."""
        own = [s for s in self.sidecars if s.namespace == namespace]
        for s in own:
            if s.workload_selector and _selects(s.workload_selector, labels):
                return s
        for candidates in (own, [s for s in self.sidecars if s.namespace == ROOT_NAMESPACE]):
            for s in candidates:
                if s.workload_selector is None:
                    return s
        return None

    def services_for(self, namespace: str) -> tuple[Service, ...]:
        """The services a proxy in the namespace sees, one per host: its own namespace's
        ServiceEntry for a host first."""
        chosen: dict[str, Service] = {}
        for s in self.services:
            if not visible(s.export_to, namespace) and s.namespace != namespace:
                continue
            first = chosen.get(s.hostname)
            if first is None or (s.namespace == namespace and first.namespace != namespace):
                chosen[s.hostname] = s
        return tuple(chosen.values())

    def destination_rule(self, namespace: str, service: Service) -> DestinationRule | None:
        """The DestinationRule a proxy in the namespace applies to traffic for the service."""
        candidates = [
            r
            for r in self.destination_rules
            if host_matches(r.host, service.hostname)
            and (visible(r.export_to, namespace) or r.namespace == namespace)
        ]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda r: (
                _precedence(r.namespace, namespace, service.namespace),
                _specificity(r.host, service.hostname),
            ),
        )

    def virtual_service(
        self,
        namespace: str,
        hostname: str,
        egress_hosts: Iterable[tuple[str, str]] | None = None,
    ) -> VirtualService | None:
        """The VirtualService routing a host for sidecars in the namespace. With
        ``egress_hosts`` (a Sidecar egress listener's ``namespace/dnsName`` entries), only
        those the entries import, as Istio selects them: the VirtualService's namespace matches
        an entry's, and one of its hosts the entry's dnsName."""
        imports = None if egress_hosts is None else list(egress_hosts)
        best: tuple[tuple[int, int], VirtualService] | None = None
        for vs in self.virtual_services:
            if not vs.mesh or not (visible(vs.export_to, namespace) or vs.namespace == namespace):
                continue
            if imports is not None and not _imported(vs, imports):
                continue
            for pattern in vs.hosts:
                if not host_matches(pattern, hostname):
                    continue
                rank = (_specificity(pattern, hostname), _precedence(vs.namespace, namespace, ""))
                if best is None or rank < best[0]:
                    best = (rank, vs)
        return None if best is None else best[1]
