"""The hub's own metrics, exposed on /metrics beside what the Prometheus adapter exports.

One registry per process: handlers built from configuration register their collectors here too
(``Env.registry``), so a scrape of the hub sees both.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

CONFIG_ERRORS = Counter(
    "mixerhub_config_errors",
    "Configuration loads rejected because they had errors (the last good config stays active).",
    registry=REGISTRY,
)
CONFIG_LOADS = Counter(
    "mixerhub_config_loads",
    "Configuration loads attempted, by result.",
    ["result"],
    registry=REGISTRY,
)
# Named after Prometheus's own prometheus_config_last_reload_* gauges, which alerts already use.
CONFIG_LAST_RELOAD_SUCCESSFUL = Gauge(
    "mixerhub_config_last_reload_successful",
    "1 if the last configuration load succeeded, 0 if it was rejected.",
    registry=REGISTRY,
)
CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP = Gauge(
    "mixerhub_config_last_reload_success_timestamp_seconds",
    "When the active configuration was loaded.",
    registry=REGISTRY,
)
ADAPTER_ERRORS = Counter(
    "mixerhub_adapter_errors",
    "Requests an adapter failed to handle (its result was an error or it raised).",
    ["adapter"],
    registry=REGISTRY,
)
ADAPTER_DROPPED = Counter(
    "mixerhub_adapter_dropped",
    "Items an adapter dropped without delivering them, by reason.",
    ["adapter", "reason"],
    registry=REGISTRY,
)
HANDLERS = Gauge(
    "mixerhub_handlers",
    "Handlers built by the active configuration, by adapter.",
    ["adapter"],
    registry=REGISTRY,
)
XDS_CONNECTED_PROXIES = Gauge(
    "mixerhub_xds_connected_proxies",
    "Open ADS streams (state of the world and delta).",
    registry=REGISTRY,
)
XDS_PUSHES = Counter(
    "mixerhub_xds_pushes",
    "xDS responses sent, by type (LDS, RDS, CDS, EDS, SDS).",
    ["type"],
    registry=REGISTRY,
)
XDS_PUSH_SECONDS = Histogram(
    "mixerhub_xds_push_seconds",
    "From a snapshot being set to a response for it being sent on an open stream.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)
XDS_NACKS = Counter(
    "mixerhub_xds_nacks",
    "xDS responses Envoy rejected, by type (LDS, RDS, CDS, EDS, SDS).",
    ["type"],
    registry=REGISTRY,
)
