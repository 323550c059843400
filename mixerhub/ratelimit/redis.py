"""Counters in Redis, shared by every hub that points at the same server: ``RedisBackend``.

One decision is one round trip: a Lua script (loaded once with SCRIPT LOAD, run by EVALSHA and
loaded again on NOSCRIPT, e.g. after a restart) checks every charge of the request, then charges
them all or none, atomically, with the same semantics as the in-memory backend
(mixerhub.ratelimit.backend, mixerhub.quota.windows): an enforced charge over its limit stops every
charge; a shadow-mode one is reported over but stops nothing. Time is Redis's own TIME, so every
hub agrees on window edges.

- fixed window: one counter per aligned window (``KEY:window``), INCRBY, and PEXPIRE when the
  window's first charge creates it.
- rolling window: a hash of bucket -> count (60 buckets per unit), stale buckets removed.
- token bucket (GCRA): the theoretical arrival time in microseconds, with a PX expiry.

Keys are ``mixerhub:rl:{DOMAIN}:ALGORITHM:UNIT:ENTRIES``: the ``{domain}`` hash tag keeps one
request's keys in one Redis Cluster slot.

A key seen with nothing left is remembered locally until it can fit one hit again, and answers
OVER_LIMIT without Redis. When Redis fails or takes longer than ``timeout`` (15 ms by default,
inside Envoy's 20 ms), the failure policy answers (allow by default, as Envoy's
failure_mode_deny is false), the failure is counted, and after ``backoff`` the next call tries
Redis again (the connection is made again): a decision never waits for a dead server or raises.

One server or a Sentinel's master, over TCP or TLS, is reached through the script connection of
resp.py (every decision made at the same moment in one write); a Cluster and a unix socket
through redis-py, one call per decision. A Sentinel's failovers are followed as they are
announced (sentinel.py), so a master that hangs is left as soon as another one is promoted.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Hashable, Sequence
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from mixerhub.monitoring import REGISTRY, LoopCounter
from mixerhub.ratelimit.backend import Charge, Outcome
from mixerhub.ratelimit.resp import RedisReplyError, ScriptConnection, bulk
from mixerhub.ratelimit.sentinel import SwitchMasterWatch

log = logging.getLogger("mixerhub.ratelimit.redis")

FailurePolicy = Literal["allow", "deny"]
DEFAULT_TIMEOUT = 0.015
DEFAULT_BACKOFF = 0.05
# Under load, how long a decision's write to Redis may wait for others to share it (resp.py).
DEFAULT_BATCH_WAIT = 0.002
_US = 1_000_000
_MAX_CACHED = 100_000
_CONNECT_TIMEOUT = 1.0

FAILURES = Counter(
    "mixerhub_ratelimit_redis_failures",
    "Rate-limit decisions whose Redis call failed or timed out.",
    ["reason"],
    registry=REGISTRY,
)
WRITES = LoopCounter(
    "mixerhub_ratelimit_redis_writes",
    "Writes of decisions to Redis over the hub's script connection: made at once, or after"
    " waiting for others to share them (under load).",
    ["batch"],
    registry=REGISTRY,
)
WITHOUT_REDIS = Counter(
    "mixerhub_ratelimit_redis_local_decisions",
    "Rate-limit decisions made without Redis: from the over-limit cache, or by the failure policy.",
    ["reason"],
    registry=REGISTRY,
)

# ARGV[1]: "now" in microseconds, or "" for Redis's TIME (tests pass a time to reach the edges).
# Then five per key: hits, limit, unit in microseconds, algorithm (f, r, t), enforced (1/0).
# Returns five integers per key: over, charged, remaining, reset (us), retry (us: until one hit
# fits again, when nothing is left).
SCRIPT = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
local n = #KEYS
local floor = math.floor
-- In Redis's Lua a new table costs about 0.3 us (growing one, more), an addition 0.02 us: every
-- table here is made at its final size by a constructor, read by fixed indexes, and no closure
-- is made per call.
-- A counter's state (shared by the charges of one decision that name the same counter):
--   fixed window:  {key:window, 'f', wanted, used, window end, window key is new}
--   rolling:       {key, 'r', wanted, used, bucket, buckets, current bucket, newest, oldest}
--   token bucket:  {key, 't', wanted, theoretical arrival time}
-- items[i] = {state, hits, limit, unit, over, left, reset, retry}, as they were before any charge.
local items = {unpack(KEYS)}
local blocked = false
for i = 1, n do
  local b = 5 * i - 3
  local hits, limit, unit = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local algo = ARGV[b + 3]
  local key = KEYS[i]
  local index
  if algo == 'f' then
    index = floor(now / unit)
    key = key .. ':' .. index
  end
  -- A counter named twice in one decision is one state (rare, and a scan costs less than a hash).
  local s
  for j = 1, i - 1 do
    if items[j][1][1] == key then s = items[j][1] break end
  end
  if s == nil then
    if algo == 'f' then
      local raw = redis.call('GET', key)
      -- new: a window's first write gives its key the expiry (no PEXPIRE on every charge)
      s = {key, 'f', 0, tonumber(raw or '0'), (index + 1) * unit, not raw}
    elseif algo == 'r' then
      local bucket = floor(unit / 60 + 0.5)
      local buckets = math.ceil(unit / bucket)
      index = floor(now / bucket)
      local first = index - buckets + 1
      local flat = redis.call('HGETALL', key)
      local used, newest, oldest = 0, nil, nil
      local stale
      for j = 1, #flat, 2 do
        local bk = tonumber(flat[j])
        if bk < first then
          if stale == nil then stale = {} end
          stale[#stale + 1] = flat[j]
        else
          used = used + tonumber(flat[j + 1])
          if newest == nil or bk > newest then newest = bk end
          if oldest == nil or bk < oldest then oldest = bk end
        end
      end
      if stale then redis.call('HDEL', key, unpack(stale)) end
      s = {key, 'r', 0, used, bucket, buckets, index, newest, oldest}
    else
      local tat = tonumber(redis.call('GET', key) or '0')
      if tat < now then tat = now end
      s = {key, 't', 0, tat}
    end
  end
  local left, reset, retry
  if algo == 't' then
    local tat = s[4]
    if limit == 0 then
      left, reset, retry = 0, 0, unit
    else
      left = floor((now + unit - tat) * limit / unit + 1e-6)
      if left < 0 then left = 0 end
      reset = tat - now
      if left == 0 then
        retry = tat + unit / limit - unit - now
        if retry < 0 then retry = 0 end
      end
    end
  else
    left = limit - s[4]
    if left < 0 then left = 0 end
    if algo == 'f' then
      reset = s[5] - now
      retry = reset
    else
      if s[8] == nil then reset = 0 else reset = (s[8] + s[6]) * s[5] - now end
      if s[9] == nil then retry = unit else retry = (s[9] + s[6]) * s[5] - now end
    end
  end
  if left ~= 0 then retry = 0 end
  local wanted = s[3] + hits
  s[3] = wanted
  local over = wanted > left
  if over and ARGV[b + 4] == '1' then blocked = true end
  items[i] = {s, hits, limit, unit, over, left, reset, retry}
end

local out = {unpack(ARGV)}
out[5 * n + 1] = nil  -- the reply, at its size: five integers per key ({unpack(ARGV)} has 5n+1)
for i = 1, n do
  local it = items[i]
  local s, over = it[1], it[5]
  local o = 5 * i - 4
  if blocked or over then
    out[o] = over and 1 or 0
    out[o + 1] = 0
    out[o + 2] = it[6]
    out[o + 3] = math.ceil(it[7])
    out[o + 4] = math.ceil(it[8])
  else
    local hits, limit, unit = it[2], it[3], it[4]
    local algo = s[2]
    local l, reset
    if algo == 't' then
      local tat = s[4]
      if limit == 0 then l = 0 else
        l = floor((now + unit - tat) * limit / unit + 1e-6)
        if l < 0 then l = 0 end
      end
      if hits > 0 then
        tat = tat + hits * unit / limit
        s[4] = tat
        redis.call('SET', s[1], string.format('%.3f', tat),
                   'PX', math.ceil((tat - now) / 1000) + 1000)
      end
      if limit == 0 then reset = 0 else reset = tat - now end
    else
      l = limit - s[4]
      if l < 0 then l = 0 end
      if algo == 'f' then
        if hits > 0 then
          s[4] = s[4] + hits
          redis.call('INCRBY', s[1], hits)
          if s[6] then
            s[6] = false
            redis.call('PEXPIRE', s[1], math.ceil((s[5] - now) / 1000) + 1000)
          end
        end
        reset = s[5] - now
      else
        if hits > 0 then
          s[4] = s[4] + hits
          s[8] = s[7]
          if s[9] == nil then s[9] = s[7] end
          redis.call('HINCRBY', s[1], s[7], hits)
          redis.call('PEXPIRE', s[1], math.ceil(s[6] * s[5] / 1000) + 1000)
        end
        if s[8] == nil then reset = 0 else reset = (s[8] + s[6]) * s[5] - now end
      end
    end
    out[o] = 0
    out[o + 1] = 1
    out[o + 2] = l - hits
    out[o + 3] = math.ceil(reset)
    out[o + 4] = 0
  end
end
return out
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
_ALGORITHMS = {"fixed_window": "f", "rolling_window": "r", "token_bucket": "t"}
_REDIS_NOW = bulk("")  # ARGV[1] empty: the script reads Redis's TIME


class _Encoded(NamedTuple):
    """A charge's part of an EVALSHA, as RESP, kept while its Charge object is reused (the
    service keeps one per descriptor)."""

    charge: Charge  # held, so that its id cannot name another charge meanwhile
    key: str
    key_bulk: bytes
    args: bytes  # limit, unit, algorithm, enforced: every argument but hits


@functools.lru_cache(maxsize=64)
def _evalsha_head(keys: int) -> bytes:
    """EVALSHA's array header, name, SHA and key count, for a script over ``keys`` keys."""
    return b"*%d\r\n%s%s%s" % (4 + 6 * keys, bulk("EVALSHA"), bulk(SCRIPT_SHA), bulk(keys))


def redis_key(charge: Charge, prefix: str = "mixerhub:rl") -> str:
    """The key of a charge: the domain as a hash tag, then the algorithm, unit and entries."""
    return _redis_key(charge.key, charge.algorithm, charge.unit_seconds, prefix)


# Decisions repeat their descriptors (a workload, a client address...): the JSON of their
# entries is made once per distinct key rather than once per decision.
@functools.lru_cache(maxsize=65_536)
def _redis_key(key: Hashable, algorithm: str, unit_seconds: int, prefix: str) -> str:
    domain, rest = "", key
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str):
        domain, rest = key
    entries = json.dumps(rest, separators=(",", ":"), ensure_ascii=False, default=str)
    # An empty tag would hash the whole key: "_" keeps an empty domain's keys in one slot.
    return f"{prefix}:{{{domain or '_'}}}:{algorithm}:{unit_seconds}:{entries}"


Client = aioredis.Redis | RedisCluster


def connect(
    url: str, timeout: float = DEFAULT_TIMEOUT, *, max_connections: int = 256
) -> tuple[Client, list[aioredis.Redis]]:
    """A client whose every call gives up after ``timeout``, from one of these URLs:

    - ``redis://[[user]:password@]host:port[/db]``, ``rediss://`` (TLS), ``unix://path``;
    - ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``: the master
      of ``service`` as the sentinels name it (followed across failovers; the credentials are the
      master's);
    - ``redis+cluster://[[user]:password@]host:port[,host:port...]``: a Redis Cluster (the
      ``{domain}`` hash tag keeps one decision's keys in one slot).

    The ``rediss+`` forms use TLS. redis-py's own retries are off: a failed call is answered by
    the failure policy and the next one reconnects. Returns the client and the other clients
    it uses (the sentinels'), to close with it. ``max_connections`` bounds each pool (per node
    for a Cluster). Also the connection of adapters/redisquota.
    """
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    u = parse_url(url)
    if u.kind == "":
        client: aioredis.Redis = aioredis.Redis.from_url(
            url, max_connections=max_connections, **common
        )
        return client, []
    auth: dict[str, Any] = {"username": u.username, "password": u.password}
    if u.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in u.hosts],
            ssl=u.tls,
            max_connections=max_connections,
            **auth,
            **common,
        )
        return cluster, []
    ssl: dict[str, Any] = {"ssl": True} if u.tls else {}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(u.hosts),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, **ssl},
        **common,
    )
    master: aioredis.Redis = sentinel.master_for(
        u.service, db=u.db, max_connections=max_connections, **auth, **ssl
    )
    return master, list(sentinel.sentinels)


async def close(client: Client, also_close: Sequence[aioredis.Redis] = ()) -> None:
    """Close ``client`` and the clients ``connect`` returned with it."""
    await client.aclose()
    if isinstance(client, RedisCluster):
        # RedisCluster.aclose() does nothing while the client waits to be initialized again,
        # as it does after a node failed: its nodes' connections are closed here.
        await client.nodes_manager.aclose("nodes_cache")
        await client.nodes_manager.aclose("startup_nodes")
    for other in also_close:
        await other.aclose()


class RedisURL(NamedTuple):
    kind: Literal["", "sentinel", "cluster"]  # "": one server, redis-py's own URL
    tls: bool = False
    username: str | None = None
    password: str | None = None
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0


def parse_url(url: str) -> RedisURL:
    """What ``connect`` reads from a URL; ValueError when it cannot."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("redis", "rediss", "unix") and sep:
        return RedisURL("")
    base, _, kind = scheme.partition("+")
    if not sep or base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(
            f"unsupported Redis URL {describe(url)!r}: expected redis://, rediss://, "
            "redis+sentinel:// or redis+cluster://"
        )
    netloc, _, path = rest.partition("/")
    username, password, hosts = _hosts(netloc, 26379 if kind == "sentinel" else 6379)
    tls = base == "rediss"
    if kind == "cluster":
        if path.strip("/"):
            raise ValueError("a Redis Cluster URL takes no database or path")
        return RedisURL("cluster", tls, username, password, hosts)
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(
            "a Sentinel URL names its service: redis+sentinel://host:port/service[/db]"
        )
    db = int(parts[1]) if len(parts) == 2 else 0
    return RedisURL("sentinel", tls, username, password, hosts, parts[0], db)


def _hosts(
    netloc: str, default_port: int
) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    credentials, at, where = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts: list[tuple[str, int]] = []
    for part in where.split(","):
        host, colon, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"no host in {part!r}")
        hosts.append((host.strip("[]"), int(port) if colon else default_port))
    return username, password, tuple(hosts)


def _script_connection(
    client: Client, timeout: float, batch_wait: float
) -> tuple[ScriptConnection | None, SwitchMasterWatch | None]:
    """A ScriptConnection to the server ``client`` talks to, when that is one server or a
    Sentinel's master, over TCP or TLS (None for a Cluster or a unix socket); for a Sentinel's
    master, the watch that drops the connection when the sentinels switch masters."""
    if not isinstance(client, aioredis.Redis):
        return None, None
    pool = client.connection_pool
    kw = pool.connection_kwargs
    cls = pool.connection_class
    locate = None
    watch = None
    if isinstance(pool, SentinelConnectionPool):
        manager, service = pool.sentinel_manager, pool.service_name

        def switched(host: str, port: int) -> None:
            connection.drop(f"the Sentinel switched the master to {host}:{port}")

        sentinel_watch = watch = SwitchMasterWatch(manager.sentinels, service, switched)

        async def locate() -> tuple[str, int]:
            sentinel_watch.start()  # on the loop, once: before the first connection
            host, port = await manager.discover_master(service)
            return str(host), int(port)
    elif cls not in (aioredis.Connection, aioredis.SSLConnection):
        return None, None  # a unix socket
    tls = None
    if issubclass(cls, aioredis.SSLConnection):
        # redis-py's own reading of the URL's ssl_* settings, made into a context as it would.
        tls = cls(**kw).ssl_context.get()
    connection = ScriptConnection(
        kw.get("host", "localhost"),
        int(kw.get("port", 6379)),
        db=int(kw.get("db", 0) or 0),
        username=kw.get("username"),
        password=kw.get("password"),
        # A connection may take longer than a decision may wait (a Sentinel's answer, a TLS
        # handshake, SCRIPT LOAD): decisions stop waiting at ``timeout``, connecting goes on.
        connect_timeout=max(timeout, _CONNECT_TIMEOUT),
        on_connect=(("SCRIPT", "LOAD", SCRIPT),),
        tls=tls,
        locate=locate,
        batch_wait=batch_wait,
        writes_at_once=WRITES.labels("at_once"),
        writes_waited=WRITES.labels("waited"),
    )
    return connection, watch


class RedisBackend:
    """The Backend protocol over Redis: one EVALSHA per decision (on one server, pipelined with
    the decisions made at the same time), a local over-limit cache."""

    def __init__(
        self,
        client: Client,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        failure: FailurePolicy = "allow",
        backoff: float = DEFAULT_BACKOFF,
        prefix: str = "mixerhub:rl",
        clock: Any = time.monotonic,
        also_close: Sequence[aioredis.Redis] = (),
        batch_wait: float = DEFAULT_BATCH_WAIT,
    ) -> None:
        if failure not in ("allow", "deny"):
            raise ValueError(f"failure policy must be allow or deny, got {failure!r}")
        self.client = client
        self._also_close = list(also_close)
        self.timeout = timeout
        self.failure: FailurePolicy = failure
        self.backoff = backoff
        self.prefix = prefix
        self._clock = clock
        # One server or a Sentinel's master, over TCP or TLS: the script runs over a connection
        # of our own (resp.py), pipelined, and under load batched for up to ``batch_wait``
        # seconds. A Cluster keeps redis-py, one call per decision.
        self._script, self._watch = _script_connection(client, timeout, batch_wait)
        self._loaded = False
        self._down_until = 0.0
        # Redis key -> monotonic time until which nothing fits (enforced keys only).
        self._over: OrderedDict[str, float] = OrderedDict()
        self._encoded: dict[int, _Encoded] = {}  # by id(charge)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        failure: FailurePolicy = "allow",
        batch_wait: float = DEFAULT_BATCH_WAIT,
    ) -> RedisBackend:
        client, others = connect(url, timeout)
        return cls(
            client, timeout=timeout, failure=failure, also_close=others, batch_wait=batch_wait
        )

    async def aclose(self) -> None:
        if self._watch is not None:
            await self._watch.aclose()
        if self._script is not None:
            await self._script.aclose()
        await close(self.client, self._also_close)

    async def take_at(self, charges: Sequence[Charge], now: float) -> Sequence[Outcome]:
        """Test hook: decide as if Redis's clock said ``now`` (seconds); the cache is bypassed."""
        return await self.take(charges, now)

    async def take(self, charges: Sequence[Charge], now: float | None = None) -> Sequence[Outcome]:
        # One coroutine from here to the reply's future (see _run): a decision's every layer
        # is resumed when Redis answers.
        if not charges:
            return []
        encoded = [self._encoding(c) for c in charges]
        local = self._clock()
        if now is None and self._over:
            cached = self._cached(charges, encoded, local)
            if cached is not None:
                WITHOUT_REDIS.labels("cache").inc()
                return cached
        if local < self._down_until:
            WITHOUT_REDIS.labels("failure_policy").inc()
            return self._policy(charges)
        try:
            try:
                raw = await self._run(encoded, now)
            except RedisReplyError as err:
                if self._script is None or not str(err).startswith("NOSCRIPT"):
                    raise
                # Redis lost the script (SCRIPT FLUSH): loaded again, and the call run again.
                resp = self._evalsha(encoded, now)
                raw = await asyncio.wait_for(self._reload(resp), self.timeout)
        except Exception as e:
            reason = "timeout" if isinstance(e, TimeoutError) else "error"
            FAILURES.labels(reason).inc()
            WITHOUT_REDIS.labels("failure_policy").inc()
            self._down_until = self._clock() + self.backoff
            log.warning("Redis %s (%s); answering %s", reason, e or type(e).__name__, self.failure)
            return self._policy(charges)
        outcomes: list[Outcome] = []
        b = 0
        for c in charges:
            # Five integers per charge: over, charged, remaining, reset (µs), retry (µs).
            over, remaining = raw[b], raw[b + 2]
            outcomes.append(
                Outcome(over != 0, raw[b + 1] != 0, max(0, remaining), raw[b + 3] / _US)
            )
            if over and c.enforced and remaining <= 0 and raw[b + 4] > 0 and now is None:
                self._remember(encoded[b // 5].key, local + raw[b + 4] / _US)
            b += 5
        return outcomes

    def _encoding(self, c: Charge) -> _Encoded:
        e = self._encoded.get(id(c))
        if e is None or e.charge is not c:
            key = redis_key(c, self.prefix)
            fixed = (
                c.limit,
                c.unit_seconds * _US,
                _ALGORITHMS[c.algorithm],
                1 if c.enforced else 0,
            )
            e = _Encoded(c, key, bulk(key), b"".join(map(bulk, fixed)))
            if len(self._encoded) >= _MAX_CACHED:
                self._encoded.clear()
            self._encoded[id(c)] = e
        return e

    def _run(self, encoded: list[_Encoded], now: float | None) -> Awaitable[list[Any]]:
        """The script's reply. On the script connection, the reply's own future: no coroutine
        of ours in between (unless the connection is still to be made)."""
        if self._script is None:
            keys = [e.key for e in encoded]
            return asyncio.wait_for(
                self._run_by_client(keys, self._args(encoded, now)), self.timeout
            )
        return self._script.send(self._evalsha(encoded, now), self.timeout)

    @staticmethod
    def _evalsha(encoded: list[_Encoded], now: float | None) -> bytes:
        parts = [_evalsha_head(len(encoded)), *(e.key_bulk for e in encoded)]
        parts.append(_REDIS_NOW if now is None else bulk(str(round(now * _US))))
        for e in encoded:
            parts += (bulk(e.charge.hits), e.args)
        return b"".join(parts)

    async def _reload(self, resp: bytes) -> Any:
        """Load the script and run the call again."""
        assert self._script is not None
        await self._script.call("SCRIPT", "LOAD", SCRIPT)
        return await self._script.send(resp, self.timeout)

    @staticmethod
    def _args(encoded: list[_Encoded], now: float | None) -> list[str | int]:
        args: list[str | int] = ["" if now is None else str(round(now * _US))]
        for e in encoded:
            c = e.charge
            args += [
                c.hits,
                c.limit,
                c.unit_seconds * _US,
                _ALGORITHMS[c.algorithm],
                int(c.enforced),
            ]
        return args

    async def _run_by_client(self, keys: list[str], args: list[str | int]) -> list[Any]:
        if not self._loaded:
            await self.client.script_load(SCRIPT)
            self._loaded = True
        try:
            result = await self.client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(SCRIPT)
            result = await self.client.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
        return list(result)

    def _cached(
        self, charges: Sequence[Charge], encoded: list[_Encoded], now: float
    ) -> list[Outcome] | None:
        hit = False
        overs: list[float | None] = []
        for c, e in zip(charges, encoded, strict=True):
            until = self._over.get(e.key) if c.enforced and c.hits > 0 else None
            if until is not None and until <= now:
                del self._over[e.key]
                until = None
            overs.append(until)
            hit = hit or until is not None
        if not hit:
            return None
        return [
            Outcome(True, False, 0, until - now)
            if until is not None
            else Outcome(False, False, c.limit, 0.0)
            for c, until in zip(charges, overs, strict=True)
        ]

    def _remember(self, key: str, until: float) -> None:
        self._over[key] = until
        self._over.move_to_end(key)
        while len(self._over) > _MAX_CACHED:
            self._over.popitem(last=False)

    def _policy(self, charges: Sequence[Charge]) -> list[Outcome]:
        deny = self.failure == "deny"
        return [
            Outcome(True, False, 0, 0.0)
            if deny and c.enforced
            else Outcome(False, False, c.limit, 0.0)
            for c in charges
        ]


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"
