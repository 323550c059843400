"""The workload a proxy stands in for, as the hub learns it from a call's metadata.

`mixerhub bootstrap` has Envoy send it on every ext_authz and rate-limit call as gRPC initial
metadata (``x-mixerhub-namespace`` ...), and in its node metadata with Istio's keys (NAMESPACE,
WORKLOAD_NAME, LABELS, SERVICE_ACCOUNT) for access-log and xDS streams. Parsing never fails:
metadata comes from the network, so what is malformed is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mixerhub.bootstrap import (
    LABELS_HEADER,
    NAMESPACE_HEADER,
    SERVICE_ACCOUNT_HEADER,
    WORKLOAD_HEADER,
)

_MAX_LABELS = 64


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    name: str = ""
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    # The metadata as received: a hashable key for caches, cheap to compare.
    key: tuple[str, str, str, str] = ("", "", "", "")

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> WorkloadIdentity:
        """From gRPC invocation metadata (what ``context.invocation_metadata()`` returns)."""
        values: dict[str, str] = {}
        for name, value in metadata or ():
            if name in _HEADERS and isinstance(value, str):
                values[name] = value
        key = (
            values.get(WORKLOAD_HEADER, ""),
            values.get(NAMESPACE_HEADER, ""),
            values.get(LABELS_HEADER, ""),
            values.get(SERVICE_ACCOUNT_HEADER, ""),
        )
        return cls(key[0], key[1], parse_labels(key[2]), key[3], key)


_HEADERS = frozenset({WORKLOAD_HEADER, NAMESPACE_HEADER, LABELS_HEADER, SERVICE_ACCOUNT_HEADER})


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> a dict; parts without ``=`` are skipped, and at most 64 are kept."""
    labels: dict[str, str] = {}
    for part in text.split(",")[:_MAX_LABELS]:
        key, sep, value = part.partition("=")
        if sep and key.strip():
            labels[key.strip()] = value.strip()
    return labels
