"""Istio's WorkloadEntry: one workload outside Kubernetes (an address, its named ports, labels).

ServiceEntries pick WorkloadEntries of their own namespace with ``workloadSelector``; a
ServiceEntry's inline ``endpoints`` have the same shape. Validation follows istiod's
ValidateWorkloadEntry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import Field

from mixerhub.networking import GROUP, SERVICE_PHASE, VERSIONS
from mixerhub.networking.validation import (
    Path,
    SpecErrors,
    host_problem,
    ip_problem,
    label_problems,
    not_supported,
    port_problem,
)
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

UNIX: Final = "unix://"


class WorkloadEntrySpec(Params):
    address: str = ""
    ports: dict[str, int] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    service_account: str = ""
    weight: int | None = None
    network: Any = None
    locality: Any = None


@dataclass(frozen=True)
class WorkloadEntry:
    """A workload's address: a WorkloadEntry, or one of a ServiceEntry's endpoints."""

    name: str  # the WorkloadEntry's name; "" for an inline endpoint
    namespace: str
    address: str  # an IP, a host name (DNS resolution only) or unix:///path
    ports: Mapping[str, int] = field(default_factory=dict)  # port name -> port on the workload
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    weight: int = 0  # 0: Envoy's default weight (1)


def compile_workload(
    spec: WorkloadEntrySpec,
    name: str,
    namespace: str,
    path: Path,
    fail: Callable[[Path, str], None],
    *,
    address_required: bool = True,
    hostname_allowed: bool = True,
) -> WorkloadEntry:
    """Validate a WorkloadEntry spec (a WorkloadEntry's or an endpoint's) and compile it."""
    not_supported(fail, path, {"network": spec.network, "locality": spec.locality})
    address = spec.address
    if not address:
        if address_required:
            fail((*path, "address"), "address must be set")
    elif address.startswith(UNIX):
        if len(address) == len(UNIX) or address[len(UNIX)] != "/":
            fail((*path, "address"), f"{address!r}: a unix address must be an absolute path")
        if spec.ports:
            fail((*path, "ports"), "a unix address has no ports")
    elif ip_problem(address) is not None:
        if not hostname_allowed:
            fail((*path, "address"), f"{address!r} must be an IP address")
        elif host_problem(address, wildcard=False) is not None:
            fail((*path, "address"), f"{address!r} is neither an IP address nor a host name")
    for port_name, number in spec.ports.items():
        problem = port_problem(number)
        if problem:
            fail((*path, "ports", port_name), problem)
    for key, problem in label_problems(spec.labels):
        fail((*path, "labels", key), problem)
    if spec.weight is not None and not 0 <= spec.weight <= 2**32 - 1:
        fail((*path, "weight"), "weight must be 0 to 4294967295")
    return WorkloadEntry(
        name,
        namespace,
        address,
        dict(spec.ports),
        dict(spec.labels),
        spec.service_account,
        spec.weight or 0,
    )


def compile_workload_entry(doc: Document, spec: WorkloadEntrySpec, c: Compilation) -> None:
    if not c.claim("WorkloadEntry", doc):
        return
    fail = SpecErrors(doc, c, ())

    entry = compile_workload(spec, doc.name, doc.namespace, ("spec",), fail)
    if not fail.failed:
        c.workload_entries.append(entry)


WORKLOAD_ENTRY: Final = Kind(
    GROUP, VERSIONS, "WorkloadEntry", WorkloadEntrySpec, SERVICE_PHASE, compile_workload_entry
)
