"""redisquota's handler: quotas kept in Redis, shared by every hub that uses the same server.

Each allocation is one EVALSHA of a Lua script (scripts.py), keyed as Mixer's redisquota did: the
quota's name, its sorted ``;name=value`` dimensions and, when an override applies, a hash of the
override (so changing an override starts a fresh count). Unlike Mixer's, the key is a Redis
Cluster hash tag, ``{...}``, and every other key of the allocation starts with it, so one
allocation is one slot. ``redisServerUrl`` takes Mixer's ``host:port`` or any URL of
mixerhub.ratelimit.redis.connect, Sentinel and Cluster included.

Redis trouble (down, slow, broken) never raises and never hangs, as with the rate-limit backend:
the answer is an error status within the timeout, counted in mixerhub_adapter_errors_total, and
the check service's failure policy (``--check-fail-open``) decides what the request gets. After a
failure, Redis is left alone for ``backoff`` (every allocation meanwhile fails at once, counted
too), so a dead server costs one timeout, not one per request; then the next call reconnects.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mixerhub import adapter
from mixerhub.adapter import Env, Handler, InstanceSpec, QuotaArgs, QuotaResult
from mixerhub.quota import Clock
from mixerhub.quota.overrides import dimension_text, first_override
from mixerhub.ratelimit.redis import close, connect, parse_url
from mixerhub.templates import QuotaInstance

from .config import Algorithm, Quota, RedisQuotaParams
from .scripts import FIXED_WINDOW, ROLLING_WINDOW

# One allocation must answer well inside the check budget (--check-budget, 150 ms by default).
DEFAULT_TIMEOUT = 0.1
DEFAULT_BACKOFF = 0.05
_US = 1_000_000


@dataclass(frozen=True, slots=True)
class _Limit:
    max_amount: int
    tag: str  # "" for the quota's own limit, else a hash of the override


@dataclass(frozen=True, slots=True)
class _CompiledQuota:
    algorithm: Algorithm
    window_us: int
    bucket_us: int
    default: _Limit
    overrides: tuple[tuple[tuple[tuple[str, str], ...], _Limit], ...]

    def limit(self, dimensions: Mapping[str, object]) -> _Limit:
        """The first override whose dimensions all match, else the quota's own limit."""
        return first_override(self.overrides, dimensions, self.default)


def _compile(q: Quota) -> _CompiledQuota:
    overrides = []
    for o in q.overrides:
        wanted = tuple(sorted(o.dimensions.items()))
        digest = hashlib.sha256(
            json.dumps([wanted, o.max_amount], separators=(",", ":")).encode()
        ).hexdigest()[:16]
        overrides.append((wanted, _Limit(o.max_amount, digest)))
    return _CompiledQuota(
        q.rate_limit_algorithm,
        round(q.valid_duration.total_seconds() * _US),
        round(q.bucket_duration.total_seconds() * _US),
        _Limit(q.max_amount, ""),
        tuple(overrides),
    )


def redis_key(name: str, dimensions: Mapping[str, object], tag: str = "") -> str:
    """Mixer's key in a hash tag: ``{name;dimension=value...}``, dimensions in name order.

    The other keys of an allocation extend this one, so whatever the dimension text holds
    (even a ``}``), their hash tag is the same: Redis Cluster's tag runs from the first ``{``.
    """
    key = name + "".join(f";{k}={dimension_text(dimensions[k])}" for k in sorted(dimensions))
    return f"{{{key};override={tag}}}" if tag else f"{{{key}}}"


def _no_retry() -> Retry:
    # A retry would double the time a down Redis costs each request; the next request retries.
    return Retry(NoBackoff(), 0)


Client = aioredis.Redis | RedisCluster


def connect_client(params: RedisQuotaParams, timeout: float) -> tuple[Client, list[aioredis.Redis]]:
    """The client for redisServerUrl, and the sentinels' clients to close with it."""
    url = params.redis_server_url
    if "://" in url and parse_url(url).kind:
        # Sentinel or Cluster: each pool holds at most connectionPoolSize connections.
        return connect(url, timeout, max_connections=params.connection_pool_size)
    pool = connection_pool(params, timeout)
    return aioredis.Redis(connection_pool=pool, retry=_no_retry()), []


def connection_pool(params: RedisQuotaParams, timeout: float) -> aioredis.BlockingConnectionPool:
    """At most connectionPoolSize connections; a request waits for one no longer than timeout."""
    options: dict[str, Any] = {
        "max_connections": params.connection_pool_size,
        "timeout": timeout,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _no_retry(),
    }
    url = params.redis_server_url
    if "://" in url:
        pool: aioredis.BlockingConnectionPool = aioredis.BlockingConnectionPool.from_url(
            url, **options
        )
        return pool
    host, _, port = url.rpartition(":")
    if not host:  # "redis-host" alone: Redis's port
        host, port = url, "6379"
    return aioredis.BlockingConnectionPool(host=host.strip("[]"), port=int(port), **options)


class RedisQuotaHandler(Handler):
    def __init__(
        self,
        params: RedisQuotaParams,
        env: Env,
        clock: Clock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.env = env
        self._clock = clock  # wall-clock seconds: hubs sharing a Redis must agree on it
        self._timeout = timeout
        self.backoff = backoff
        self._down_until = 0.0  # time.monotonic() before which Redis is not tried
        self._quotas = {q.name: _compile(q) for q in params.quotas}
        self._client, self._also_close = connect_client(params, timeout)
        self._scripts = {
            Algorithm.FIXED_WINDOW: self._client.register_script(FIXED_WINDOW),
            Algorithm.ROLLING_WINDOW: self._client.register_script(ROLLING_WINDOW),
        }

    async def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> QuotaResult:
        quota = self._quotas.get(instance.name)
        if quota is None:  # validation makes this unreachable for configured instances
            self.env.count_error()
            return QuotaResult(
                0, 0.0, adapter.NOT_FOUND, f"redisquota has no quota named {instance.name!r}"
            )
        if args.amount <= 0:  # Mixer's redisquota never released: nothing to give back
            return QuotaResult(0)
        if time.monotonic() < self._down_until:
            return self._failed(
                adapter.UNAVAILABLE, instance, "redis unavailable: backing off after a failure"
            )
        lim = quota.limit(instance.dimensions)
        key = redis_key(instance.name, instance.dimensions, lim.tag)
        keys = [key, f"{key};dedup={args.deduplication_id}"]
        if quota.algorithm is Algorithm.ROLLING_WINDOW:
            keys.append(f"{key};data")
        argv = [
            lim.max_amount,
            quota.window_us,
            quota.bucket_us,
            1 if args.best_effort else 0,
            args.amount,
            int(self._clock() * _US),
            args.deduplication_id,
        ]
        script = self._scripts[quota.algorithm]
        try:
            async with asyncio.timeout(self._timeout * 2):
                granted, valid_us = await script(keys=keys, args=argv)
        except (TimeoutError, RedisTimeoutError) as e:
            return self._down(adapter.DEADLINE_EXCEEDED, instance, f"timed out: {e}")
        except RedisConnectionError as e:
            return self._down(adapter.UNAVAILABLE, instance, f"redis unavailable: {e}")
        except Exception as e:  # RedisError, a Cluster's own errors, a bad reply: never raised
            return self._failed(adapter.INTERNAL, instance, f"redis failed: {e!r}")
        return QuotaResult(int(granted), int(valid_us) / _US)

    def _down(self, status: int, instance: QuotaInstance, reason: str) -> QuotaResult:
        self._down_until = time.monotonic() + self.backoff
        return self._failed(status, instance, reason)

    def _failed(self, status: int, instance: QuotaInstance, reason: str) -> QuotaResult:
        self.env.count_error()
        self.env.logger.warning("redisquota: %s: %s", instance.name, reason)
        return QuotaResult(0, 0.0, status, f"redisquota: {reason}")

    async def close(self) -> None:
        await close(self._client, self._also_close)
        if isinstance(self._client, aioredis.Redis):
            await self._client.connection_pool.disconnect()


def build(
    params: RedisQuotaParams, instances: Mapping[str, InstanceSpec], env: Env
) -> RedisQuotaHandler:
    return RedisQuotaHandler(params, env)
