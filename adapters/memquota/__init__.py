"""memquota: quotas and rate limits kept in this process's memory (Mixer's memquota adapter)."""

from mixerhub.adapter import AdapterInfo

from .config import MemQuotaParams, Override, Quota, validate
from .handler import MemQuotaHandler, build

INFO = AdapterInfo(
    name="memquota",
    description="Volatile memory-based quota tracking",
    templates=("quota",),
    params=MemQuotaParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "MemQuotaHandler", "MemQuotaParams", "Override", "Quota"]
