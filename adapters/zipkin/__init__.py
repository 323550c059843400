"""zipkin: tracespan instances to a Zipkin collector as v2 JSON spans (Mixer's zipkin adapter)."""

from mixerhub.adapter import AdapterInfo

from .config import ZipkinParams, validate
from .handler import ZipkinHandler, build

INFO = AdapterInfo(
    name="zipkin",
    description="Publishes traces to Zipkin",
    templates=("tracespan",),
    params=ZipkinParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "ZipkinHandler", "ZipkinParams"]
