"""dogstatsd: metric instances sent to a Datadog agent over DogStatsD (Mixer's datadog adapter).

Registered as ``dogstatsd``, the name Istio 1.4 gave it (mixer/adapter/metadata/inventory.go), so
that handlers written with ``compiledAdapter: dogstatsd`` or ``kind: dogstatsd`` load unchanged.
"""

from mixerhub.adapter import AdapterInfo

from .config import DogStatsdParams, MetricInfo, validate
from .handler import DogStatsdHandler, build

INFO = AdapterInfo(
    name="dogstatsd",
    description="Produces dogstatsd metrics for a Datadog agent (the datadog adapter)",
    templates=("metric",),
    params=DogStatsdParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "DogStatsdHandler", "DogStatsdParams", "MetricInfo"]
