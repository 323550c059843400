"""statsd: metric instances as StatsD counters, gauges and timers over UDP (Mixer's statsd)."""

from mixerhub.adapter import AdapterInfo

from .config import MetricInfo, StatsdParams, validate
from .handler import StatsdHandler, build

INFO = AdapterInfo(
    name="statsd",
    description="Produces statsd metrics",
    templates=("metric",),
    params=StatsdParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "MetricInfo", "StatsdHandler", "StatsdParams"]
