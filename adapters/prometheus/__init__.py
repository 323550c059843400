"""prometheus: metric instances as Prometheus counters, gauges and histograms on /metrics."""

from mixerhub.adapter import AdapterInfo

from .config import MetricInfo, PrometheusParams, validate
from .handler import PrometheusHandler, build

INFO = AdapterInfo(
    name="prometheus",
    description="Publishes prometheus metrics",
    templates=("metric",),
    params=PrometheusParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "MetricInfo", "PrometheusHandler", "PrometheusParams"]
