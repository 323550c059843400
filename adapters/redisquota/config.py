"""redisquota's params: Mixer's redisquota config (mixer/adapter/redisquota/config/config.proto)."""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable, Mapping

from pydantic import Field, field_validator

from mixerhub.adapter import FieldError, InstanceSpec
from mixerhub.ratelimit.redis import parse_url
from mixerhub.types import Duration, Params


def _text(value: object) -> object:
    # `code: 200` in YAML means the text a dimension compares against (map<string, string>).
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


class Algorithm(enum.StrEnum):
    # FIXED_WINDOW can admit up to twice the rate across a window's edge; ROLLING_WINDOW cannot,
    # at the price of a sorted set of buckets per key.
    FIXED_WINDOW = "FIXED_WINDOW"
    ROLLING_WINDOW = "ROLLING_WINDOW"


class Override(Params):
    """A limit for the instances whose dimensions all equal these (by their text)."""

    dimensions: dict[str, str] = Field(default_factory=dict)
    max_amount: int = 0

    @field_validator("dimensions", mode="before")
    @classmethod
    def _dimension_text(cls, value: object) -> object:
        if isinstance(value, Mapping):
            return {k: _text(v) for k, v in value.items()}
        return value


class Quota(Params):
    """One quota, named as the instance it serves (``requestcountquota.instance.istio-system``)."""

    name: str = ""
    max_amount: int = 0
    valid_duration: Duration = datetime.timedelta(0)
    # The rolling window's granularity: ignored by FIXED_WINDOW.
    bucket_duration: Duration = datetime.timedelta(0)
    rate_limit_algorithm: Algorithm = Algorithm.FIXED_WINDOW
    # The first override whose dimensions all match wins.
    overrides: list[Override] = Field(default_factory=list)


class RedisQuotaParams(Params):
    quotas: list[Quota] = Field(default_factory=list)
    # host:port (Mixer's form), a redis:// / rediss:// / unix:// URL, or a Sentinel or Cluster
    # one: redis+sentinel://host:port[,host:port...]/service, redis+cluster://host:port[,...].
    redis_server_url: str = ""
    connection_pool_size: int = 10


def validate(
    params: RedisQuotaParams, instances: Mapping[str, InstanceSpec]
) -> Iterable[FieldError]:
    """Mixer's checks (redisquota.go Validate), plus instances that have no quota."""
    zero = datetime.timedelta(0)
    if not params.redis_server_url:
        yield FieldError("redisServerUrl", "redis server url should not be empty")
    elif "://" in params.redis_server_url:
        try:
            parse_url(params.redis_server_url)
        except ValueError as e:
            yield FieldError("redisServerUrl", str(e))
    if params.connection_pool_size <= 0:
        yield FieldError(
            "connectionPoolSize",
            f"redis connection pool size of {params.connection_pool_size} is invalid, must be > 0",
        )
    first: dict[str, int] = {}
    for i, q in enumerate(params.quotas):
        at = f"quotas[{i}]"
        if not q.name:
            yield FieldError(f"{at}.name", "quota name should not be empty")
        elif q.name in first:
            yield FieldError(
                f"{at}.name", f"duplicate quota {q.name!r} (first at quotas[{first[q.name]}])"
            )
        else:
            first[q.name] = i
        if q.max_amount <= 0:
            yield FieldError(f"{at}.maxAmount", "maxAmount must be > 0")
        if q.valid_duration <= zero:
            yield FieldError(f"{at}.validDuration", "validDuration must be > 0")
        if q.rate_limit_algorithm is Algorithm.ROLLING_WINDOW:
            if q.bucket_duration <= zero:
                yield FieldError(
                    f"{at}.bucketDuration", "bucketDuration must be > 0 for ROLLING_WINDOW"
                )
            elif q.valid_duration <= q.bucket_duration:
                yield FieldError(
                    f"{at}.validDuration",
                    "validDuration must be > bucketDuration for ROLLING_WINDOW",
                )
        for j, o in enumerate(q.overrides):
            if o.max_amount <= 0:
                yield FieldError(f"{at}.overrides[{j}].maxAmount", "maxAmount must be > 0")
            if not o.dimensions:
                yield FieldError(
                    f"{at}.overrides[{j}].dimensions", "dimensions should not be empty"
                )
    # As memquota: a handler that would receive an instance with no quota is refused.
    for name in instances:
        if name not in first:
            yield FieldError(
                "quotas",
                f"did not find limit defined for quota {name}"
                " (a quota's name is the full name of the instance it serves)",
            )
