"""fluentd: logentry instances to a Fluentd daemon over the Forward protocol (Mixer's fluentd)."""

from mixerhub.adapter import AdapterInfo

from .config import FluentdParams, validate
from .handler import FluentdHandler, build

INFO = AdapterInfo(
    name="fluentd",
    description="Sends logentries to a fluentd instance",
    templates=("logentry",),
    params=FluentdParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "FluentdHandler", "FluentdParams"]
