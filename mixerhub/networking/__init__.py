"""Istio's networking kinds (networking.istio.io): ServiceEntry, WorkloadEntry, VirtualService,
DestinationRule and Sidecar, validated as istiod's webhook does and compiled into the
``Networking`` registry (mixerhub.networking.registry) that the xDS translation reads.

Outside Kubernetes there are no Kubernetes Services: every service is a ServiceEntry, and its
endpoints are the ServiceEntry's own or the WorkloadEntries its workloadSelector picks.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "networking.istio.io"
VERSIONS: Final = ("v1", "v1beta1", "v1alpha3")
# Kinds compile after the security kinds (40); DestinationRules before VirtualServices, whose
# subsets are checked against them.
SERVICE_PHASE: Final = 50
DESTINATION_RULE_PHASE: Final = 55
VIRTUAL_SERVICE_PHASE: Final = 60
