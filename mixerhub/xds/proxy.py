"""A proxy as the control plane knows it: its node id and the workload it stands in for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Proxy:
    node_id: str
    cluster: str = ""
    namespace: str = "default"
    workload: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"

    @classmethod
    def from_node(cls, node: Any) -> Proxy:
        """From an envoy.config.core.v3.Node with Istio's metadata keys (NAMESPACE, WORKLOAD_NAME,
        LABELS, SERVICE_ACCOUNT), as `mixerhub bootstrap --ads` writes them. Never fails:
        metadata comes from the network, so what is missing or malformed is left at its default."""
        fields = node.metadata.fields

        def text(key: str, default: str = "") -> str:
            value = fields.get(key)
            if value is None or value.WhichOneof("kind") != "string_value":
                return default
            return str(value.string_value) or default

        labels: dict[str, str] = {}
        value = fields.get("LABELS")
        if value is not None and value.WhichOneof("kind") == "struct_value":
            labels = {
                k: v.string_value
                for k, v in value.struct_value.fields.items()
                if v.WhichOneof("kind") == "string_value"
            }
        return cls(
            node_id=node.id,
            cluster=node.cluster,
            namespace=text("NAMESPACE", "default"),
            workload=text("WORKLOAD_NAME"),
            labels=labels,
            service_account=text("SERVICE_ACCOUNT", "default"),
        )
