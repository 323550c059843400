"""redisquota: quotas and rate limits shared through Redis (Mixer's redisquota adapter)."""

from mixerhub.adapter import AdapterInfo

from .config import Algorithm, Override, Quota, RedisQuotaParams, validate
from .handler import RedisQuotaHandler, build

INFO = AdapterInfo(
    name="redisquota",
    description="Redis-based quotas (fixed and rolling windows shared by several hubs)",
    templates=("quota",),
    params=RedisQuotaParams,
    build=build,
    validate=validate,
)

__all__ = ["INFO", "Algorithm", "Override", "Quota", "RedisQuotaHandler", "RedisQuotaParams"]
