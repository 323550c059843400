"""Signing keys for JWT verification: JSON Web Key Sets, fetched, cached and refreshed.

A key set comes inline from the policy (``jwks``), from ``jwksUri``, or from the issuer's OpenID
discovery document (``<issuer>/.well-known/openid-configuration``, its ``jwks_uri``), as istiod's
JwksResolver finds them (istio/istio pilot/pkg/model/jwks_resolver.go).

Remote key sets live in one process-wide ``JwksCache`` keyed by URL, so a configuration reload
keeps every key set it still names. The cache refreshes them in the background (istiod's default
interval is 20 minutes, retried every minute after a failure), refetches one early when a token
names a key id it does not hold (at most once per ``min_refetch_interval`` per URL), and keeps
serving the last good keys while the endpoint is down. Fetching never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from joserfc import jwk
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jws import JWSRegistry
from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY

log = logging.getLogger("mixerhub.security.jwks")

DEFAULT_REFRESH_INTERVAL = 20 * 60.0  # istiod's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL
DEFAULT_RETRY_INTERVAL = 60.0  # istiod's JwtPubKeyRefreshIntervalOnFailure
DEFAULT_MIN_REFETCH_INTERVAL = 30.0
DEFAULT_EVICT_AFTER = 7 * 24 * 3600.0  # istiod's JwtPubKeyEvictionDuration
DEFAULT_FETCH_TIMEOUT = 5.0  # Istio's JWTRule.timeout default
MAX_DOCUMENT_BYTES = 1024 * 1024
OPENID_CONFIGURATION = "/.well-known/openid-configuration"

JWKS_FETCHES = Counter(
    "mixerhub_jwks_fetches",
    "JWKS and OpenID discovery documents fetched, by URI (successful or not).",
    ["uri"],
    registry=REGISTRY,
)
JWKS_FETCH_ERRORS = Counter(
    "mixerhub_jwks_fetch_errors",
    "JWKS and OpenID discovery fetches that failed, by URI; the keys already held are kept.",
    ["uri"],
    registry=REGISTRY,
)

# Signature algorithms by key: asymmetric ones for any key set; HMAC only for an ``oct`` key of
# an inline key set (a remote one never yields a shared secret). "none" is never among them.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "Ed25519",
    "Ed448",
)
SYMMETRIC_ALGORITHMS = ("HS256", "HS384", "HS512")
ALGORITHMS = frozenset(ASYMMETRIC_ALGORITHMS + SYMMETRIC_ALGORITHMS)

_generations = itertools.count(1)


class JwksError(ValueError):
    """A key set document that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None  # as published: a key without "kid" has none (no thumbprint is made up)
    key: jwk.Key
    algorithms: frozenset[str]  # the JWS algorithms this key may verify


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[SigningKey, ...]
    # Changes whenever the keys change: tokens verified under an older set are verified again.
    generation: int = field(default_factory=lambda: next(_generations))

    def matches_kid(self, kid: str) -> bool:
        """Whether a key may have signed a token naming this kid: one with that kid, or one
        without any (Envoy's jwt_verify_lib tries those for every kid)."""
        return any(k.kid is None or k.kid == kid for k in self.keys)

    def candidates(self, kid: str | None, alg: str) -> tuple[SigningKey, ...]:
        """The keys that may verify a token: by kid (as above) and by algorithm."""
        return tuple(
            k
            for k in self.keys
            if (kid is None or k.kid is None or k.kid == kid) and alg in k.algorithms
        )


def parse_jwks(document: str | bytes, *, allow_symmetric: bool, strict: bool) -> KeySet:
    """A key set from a JWKS document (RFC 7517). ``strict`` (an inline key set, checked when the
    configuration loads) refuses any key that does not load; otherwise such keys are skipped, as
    RFC 7517 section 5 asks for keys of unknown types. Either way at least one signing key."""
    try:
        data = json.loads(document, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise JwksError(f"not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('a JWKS is a JSON object with a "keys" list')
    keys: list[SigningKey] = []
    for i, entry in enumerate(data["keys"]):
        try:
            keys.append(_signing_key(entry, allow_symmetric))
        except JwksError as e:
            if strict:
                raise JwksError(f"keys[{i}]: {e}") from None
            log.debug("skipping key %d of a key set: %s", i, e)
    if not keys:
        raise JwksError("no usable signing key in the key set")
    return KeySet(tuple(keys))


def _signing_key(entry: object, allow_symmetric: bool) -> SigningKey:
    if not isinstance(entry, dict):
        raise JwksError("a key is a JSON object")
    kty = entry.get("kty")
    if kty == "oct" and not allow_symmetric:
        raise JwksError("a shared secret (kty oct) is only accepted in an inline jwks")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwksError("kid must be a string")
    use = entry.get("use")
    if use is not None and use != "sig":
        raise JwksError(f"key use {use!r} is not for signatures")
    try:
        with warnings.catch_warnings():
            # joserfc warns of weak keys; here a weak key is refused.
            warnings.simplefilter("error", SecurityWarning)
            key = jwk.JWKRegistry.import_key(entry)
    except (JoseError, ValueError, TypeError, KeyError, SecurityWarning) as e:
        why = str(e) or type(e).__name__
        raise JwksError(f"cannot load the {kty or 'untyped'} key: {why}") from None
    names = ASYMMETRIC_ALGORITHMS + (SYMMETRIC_ALGORITHMS if allow_symmetric else ())
    algorithms = frozenset(name for name in names if _fits(name, key))
    if isinstance(key, jwk.OctKey):
        # RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
        algorithms = frozenset(a for a in algorithms if len(key.raw_value) * 8 >= int(a[2:]))
        if not algorithms:
            raise JwksError("an HMAC key (kty oct) must have at least 256 bits")
    if not algorithms:
        alg = entry.get("alg")
        raise JwksError(f"no supported signature algorithm for this key (alg {alg!r})")
    return SigningKey(kid, key, algorithms)


def _fits(alg: str, key: jwk.Key) -> bool:
    """Whether joserfc's algorithm accepts the key: type, curve, "alg" and "use" all agree."""
    try:
        JWSRegistry.algorithms[alg].check_key(key)
    except (JoseError, ValueError):
        return False
    return True


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def discovery_url(issuer: str) -> str:
    """Where OpenID discovery finds the issuer's configuration (istiod trims a trailing slash)."""
    return issuer.rstrip("/") + OPENID_CONFIGURATION


def http_url_problem(url: str) -> str | None:
    """Why a URL cannot be fetched as a key set, or None when it is a usable http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not parts.hostname:
        return "must name a host"
    return None


class InlineKeys:
    """An inline ``jwks``: parsed when the configuration loads, never fetched."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys
        self.identity = f"inline:{keys.generation}"

    @property
    def generation(self) -> int | None:
        return self.keys.generation

    async def get(self, timeout: float) -> KeySet | str:
        return self.keys

    async def refetch(self, timeout: float) -> KeySet | None:
        return None


class RemoteKeys:
    """A key set fetched from a URL (or found by discovery), held by a ``JwksCache``."""

    def __init__(self, cache: JwksCache, url: str, discovery: bool) -> None:
        self.cache, self.url, self.discovery = cache, url, discovery
        self.identity = f"{'discovery' if discovery else 'jwks'}:{url}"

    @property
    def generation(self) -> int | None:
        return self.cache.generation(self.url)

    async def get(self, timeout: float) -> KeySet | str:
        return await self.cache.get(self.url, self.discovery, timeout)

    async def refetch(self, timeout: float) -> KeySet | None:
        return await self.cache.refetch(self.url, self.discovery, timeout)


KeySource = InlineKeys | RemoteKeys


@dataclass
class _Entry:
    url: str
    discovery: bool
    timeout: float
    keys: KeySet | None = None
    digest: bytes = b""
    fetched_at: float | None = None  # last success
    attempted_at: float | None = None  # last attempt, successful or not
    error: str = ""
    used_at: float = 0.0
    task: asyncio.Task[None] | None = None


class JwksCache:
    """Remote key sets by URL, shared by every snapshot of the process.

    Close it (``await cache.close()``) when done: it holds an aiohttp session and a refresh task.
    """

    def __init__(
        self,
        *,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        min_refetch_interval: float = DEFAULT_MIN_REFETCH_INTERVAL,
        evict_after: float = DEFAULT_EVICT_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh_interval = refresh_interval
        self.retry_interval = retry_interval
        self.min_refetch_interval = min_refetch_interval
        self.evict_after = evict_after
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False

    def source(self, url: str, *, discovery: bool = False, timeout: float) -> RemoteKeys:
        """Register a key set to hold (when the configuration compiles); nothing is fetched yet."""
        entry = self._entries.get(url)
        if entry is None:
            self._entries[url] = _Entry(url, discovery, timeout, used_at=self._clock())
        else:
            entry.timeout = max(entry.timeout, timeout)
        return RemoteKeys(self, url, discovery)

    def generation(self, url: str) -> int | None:
        """The generation of the keys held for the URL; None when none are."""
        entry = self._entries.get(url)
        return entry.keys.generation if entry is not None and entry.keys is not None else None

    def status(self) -> Mapping[str, Mapping[str, object]]:
        """Per URL: whether keys are held, how many, and the last error (for /debug pages)."""
        now = self._clock()
        return {
            url: {
                "keys": len(e.keys.keys) if e.keys else 0,
                "ageSeconds": round(now - e.fetched_at, 3) if e.fetched_at is not None else None,
                "lastError": e.error,
            }
            for url, e in self._entries.items()
        }

    async def get(self, url: str, discovery: bool, timeout: float) -> KeySet | str:
        """The keys held for the URL, fetching them first if they never were. A string says why
        there are none: never fetched and the fetch failed, or did not finish within timeout."""
        entry = self._entry(url, discovery, timeout)
        entry.used_at = self._clock()
        self._start_refresher()
        if entry.keys is not None:
            return entry.keys  # possibly stale: the refresher updates them, requests never wait
        if entry.task is None and self._may_fetch(entry):
            self._fetch_soon(entry)
        if entry.task is not None:
            await self._wait(entry.task, timeout)
        if entry.keys is not None:
            return entry.keys
        if entry.task is not None:
            return "signing keys could not be fetched in time"
        return f"signing keys are unavailable ({entry.error or 'not fetched yet'})"

    async def refetch(self, url: str, discovery: bool, timeout: float) -> KeySet | None:
        """Fetch again now, for a token naming a key id the set lacks (the issuer may have rotated
        its keys); at most once per ``min_refetch_interval``. None when not fetched again."""
        entry = self._entry(url, discovery, timeout)
        if entry.task is None:
            if not self._may_fetch(entry):
                return None
            self._fetch_soon(entry)
        assert entry.task is not None
        await self._wait(entry.task, timeout)
        return entry.keys

    async def prefetch(self, urls: Iterable[tuple[str, bool, float]]) -> None:
        """Fetch key sets never fetched yet, all at once (a new configuration's issuers)."""
        await asyncio.gather(*(self.get(url, d, timeout) for url, d, timeout in urls))

    async def close(self) -> None:
        """Stop refreshing, cancel fetches in flight and close the HTTP session. Keys stay."""
        self._closed = True
        tasks = [t for t in (self._refresher, *(e.task for e in self._entries.values())) if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._refresher = None
        for e in self._entries.values():
            e.task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._closed = False

    # --- internals ------------------------------------------------------------------------------

    def _entry(self, url: str, discovery: bool, timeout: float) -> _Entry:
        entry = self._entries.get(url)
        if entry is None:  # evicted while a snapshot still names it
            entry = self._entries[url] = _Entry(url, discovery, timeout, used_at=self._clock())
        return entry

    def _may_fetch(self, entry: _Entry) -> bool:
        return (
            entry.attempted_at is None
            or self._clock() - entry.attempted_at >= self.min_refetch_interval
        )

    def _fetch_soon(self, entry: _Entry) -> None:
        entry.attempted_at = self._clock()
        entry.task = asyncio.get_running_loop().create_task(self._fetch(entry))

    @staticmethod
    async def _wait(task: asyncio.Task[None], timeout: float) -> None:
        # Shielded: a request that stops waiting leaves the fetch to finish for the next ones.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)

    async def _fetch(self, entry: _Entry) -> None:
        try:
            uri = entry.url
            try:
                async with asyncio.timeout(entry.timeout):
                    if entry.discovery:
                        configuration = json.loads(await self._get(uri))
                        jwks_uri = (
                            configuration.get("jwks_uri")
                            if isinstance(configuration, dict)
                            else None
                        )
                        if not isinstance(jwks_uri, str) or http_url_problem(jwks_uri):
                            raise JwksError("the discovery document has no http(s) jwks_uri")
                        uri = jwks_uri
                    body = await self._get(uri)
                keys = parse_jwks(body, allow_symmetric=False, strict=False)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, RecursionError) as e:
                entry.error = _describe(e)
                JWKS_FETCH_ERRORS.labels(uri).inc()
                log.warning(
                    "fetching %s failed: %s%s",
                    uri,
                    entry.error,
                    "; keeping the keys held" if entry.keys else "",
                )
                return
            digest = hashlib.sha256(body).digest()
            if digest != entry.digest:
                if entry.keys is not None:
                    log.info("key set at %s changed", uri)
                entry.keys, entry.digest = keys, digest
            entry.fetched_at, entry.error = self._clock(), ""
        finally:
            entry.task = None

    async def _get(self, url: str) -> bytes:
        JWKS_FETCHES.labels(url).inc()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"accept": "application/json"}, raise_for_status=False
            )
        async with self._session.get(url, allow_redirects=True) as response:
            body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise JwksError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
            if not 200 <= response.status < 300:
                raise JwksError(f"HTTP {response.status}")
            return body

    def _start_refresher(self) -> None:
        if self._refresher is None and not self._closed:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        tick = max(0.01, min(1.0, self.refresh_interval / 4, self.retry_interval / 4))
        while True:
            await asyncio.sleep(tick)
            try:
                self._refresh_due()
            except Exception:  # the refresher must outlive any one bad entry
                log.exception("key set refresh failed")

    def _refresh_due(self) -> None:
        now = self._clock()
        for url, entry in list(self._entries.items()):
            if entry.task is not None:
                continue
            if now - entry.used_at > self.evict_after:
                del self._entries[url]
            elif self._due(entry, now):
                self._fetch_soon(entry)

    def _due(self, entry: _Entry, now: float) -> bool:
        if entry.attempted_at is None:
            return True
        if entry.error:  # failed last time: retried sooner, keys or not
            return now - entry.attempted_at >= self.retry_interval
        return entry.fetched_at is not None and now - entry.fetched_at >= self.refresh_interval


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, json.JSONDecodeError):
        return "the response is not JSON"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "cannot connect"
    text = str(e)
    return text if text else type(e).__name__


_default: JwksCache | None = None


def default_cache() -> JwksCache:
    """The process-wide cache every compiled RequestAuthentication uses."""
    global _default
    if _default is None:
        _default = JwksCache()
    return _default


def set_default_cache(cache: JwksCache) -> JwksCache:
    """Replace the process-wide cache (to configure intervals, or in tests); returns the old one,
    which the caller closes. Snapshots compiled before keep the cache they were compiled with."""
    global _default
    previous = default_cache()
    _default = cache
    return previous
