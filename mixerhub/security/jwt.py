"""JSON Web Tokens: finding them in a request, parsing them, verifying them against a rule.

Parsing is strict and bounded: a token over 64 KiB, a header segment over 8 KiB, anything but
three base64url segments, a header or payload that is not a JSON object, NaN or Infinity in JSON,
``alg: none`` or a ``crit`` header are refused with a short reason that never repeats the token.
Verification follows Envoy's jwt_authn (which Istio configures from a RequestAuthentication):
issuer, then time (``exp``/``nbf`` with 60 s of clock skew), then audiences, then the signature
with a key chosen by ``kid`` and by algorithm; key material in the token's own header (``jwk``,
``jku``, ``x5u``, ``x5c``) is never used.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from joserfc.errors import JoseError
from joserfc.jws import JWSRegistry

from mixerhub.monitoring import LoopCounter
from mixerhub.security.jwks import ALGORITHMS, KeySource, SigningKey

MAX_TOKEN_BYTES = 64 * 1024
MAX_HEADER_BYTES = 8 * 1024
CLOCK_SKEW_SECONDS = 60.0  # Envoy's jwt_authn default (clock_skew_seconds)

# Counted on the event loop in plain ints: a cached token is counted on every Check.
JWT_VERIFICATIONS = LoopCounter(
    "mixerhub_jwt_verifications",
    "JWT authentication: tokens whose signature verified, requests answered from the verified-token"
    " cache, and requests refused.",
    ["result"],
)

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
# RFC 4648 section 5, plus the dot: what Envoy keeps of a header value after the prefix.
_JWT_CHARS = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Token:
    """A parsed, not yet verified, JWS compact token."""

    text: str
    alg: str
    kid: str | None
    claims: Mapping[str, object]
    raw_claims: str  # the payload as JSON text, exactly as signed
    payload_segment: str  # base64url, as in the token (what outputPayloadToHeader forwards)
    signing_input: bytes
    signature: bytes
    issuer: str  # "" when the token has none
    expires: float | None
    not_before: float | None
    audiences: tuple[str, ...]


def parse_token(text: str) -> Token | str:
    """The token, or why it is malformed. Never raises on any input."""
    if len(text) > MAX_TOKEN_BYTES:
        return f"token is larger than {MAX_TOKEN_BYTES // 1024} KiB"
    if not text:
        return "empty token"
    parts = text.split(".")
    if len(parts) == 5:
        return "encrypted tokens (JWE) are not supported"
    if len(parts) != 3:
        return "malformed token: a JWT has three dot-separated parts"
    header_segment, payload_segment, signature_segment = parts
    if len(header_segment) > MAX_HEADER_BYTES:
        return f"token header is larger than {MAX_HEADER_BYTES // 1024} KiB"
    header = _json_segment(header_segment)
    if isinstance(header, str):
        return f"malformed token header: {header}"
    payload_text = _text_segment(payload_segment)
    if payload_text is None:
        return "malformed token payload: not base64url-encoded UTF-8"
    claims = _json_object(payload_text)
    if isinstance(claims, str):
        return f"malformed token payload: {claims}"
    signature = _decode_segment(signature_segment)
    if signature is None:
        return "malformed token signature: not base64url"

    alg = header.get("alg")
    if not isinstance(alg, str):
        return "malformed token header: alg is missing"
    if alg.lower() == "none":
        return "unsigned tokens (alg none) are not accepted"
    if alg not in ALGORITHMS:
        return "unsupported signature algorithm"
    if "crit" in header:
        # RFC 7515 section 4.1.11: extensions a verifier does not understand make the token invalid.
        return "critical header extensions are not supported"
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "malformed token header: kid is not a string"

    times: dict[str, float | None] = {}
    for name in ("exp", "nbf"):
        value = claims.get(name)
        if value is None:
            times[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"malformed token payload: {name} is not a number"
        try:
            times[name] = float(value)
        except OverflowError:
            return f"malformed token payload: {name} is out of range"
    issuer = claims.get("iss")
    return Token(
        text,
        alg,
        kid,
        claims,
        payload_text,
        payload_segment,
        f"{header_segment}.{payload_segment}".encode("ascii"),
        signature,
        issuer if isinstance(issuer, str) else "",
        times["exp"],
        times["nbf"],
        _audiences(claims.get("aud")),
    )


def _decode_segment(segment: str) -> bytes | None:
    if len(segment) % 4 == 1 or not _SEGMENT.fullmatch(segment):
        return None
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None


def _text_segment(segment: str) -> str | None:
    raw = _decode_segment(segment) if segment else None
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _json_segment(segment: str) -> dict[str, object] | str:
    text = _text_segment(segment)
    if text is None:
        return "not base64url-encoded UTF-8"
    return _json_object(text)


def _json_object(text: str) -> dict[str, object] | str:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(value, dict):
        return "not a JSON object"
    return value


def _refuse_constant(name: str) -> object:
    # NaN compares false with everything: an "exp": NaN would never expire.
    raise ValueError(f"{name} is not JSON")


def _audiences(aud: object) -> tuple[str, ...]:
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def sanitize_audience(aud: str) -> str:
    """Audiences compare without an http(s):// scheme or a trailing slash, as Envoy's
    jwt_verify_lib (check_audience.cc) compares them."""
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme) :]
            break
    return aud[:-1] if aud.endswith("/") else aud


def _verify_signature(key: SigningKey, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """One signature check with joserfc's algorithm (the costly step the token cache saves)."""
    try:
        return bool(JWSRegistry.algorithms[alg].verify(signing_input, signature, key.key))
    except (JoseError, ValueError, TypeError):
        return False


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """What one jwtRule checks, precomputed when the configuration compiles."""

    issuer: str
    audiences: frozenset[str]  # sanitized; empty: any audience (Envoy checks none)
    keys: KeySource
    timeout: float

    async def verify(self, token: Token, now: float) -> int | str:
        """The generation of the key set that verified the token, or why it is refused."""
        if token.issuer != self.issuer:
            return "token issuer is not accepted"
        if token.expires is not None and now > token.expires + CLOCK_SKEW_SECONDS:
            return "token has expired"
        if token.not_before is not None and now + CLOCK_SKEW_SECONDS < token.not_before:
            return "token is not yet valid"
        if self.audiences and not any(
            sanitize_audience(a) in self.audiences for a in token.audiences
        ):
            return "token audiences are not allowed"
        keys = await self.keys.get(self.timeout)
        if isinstance(keys, str):
            return keys
        if token.kid is not None and not keys.matches_kid(token.kid):
            # The issuer may have rotated its keys since the set was fetched.
            fresh = await self.keys.refetch(self.timeout)
            if fresh is None or not fresh.matches_kid(token.kid):
                return "no signing key has the token's key id"
            keys = fresh
        candidates = keys.candidates(token.kid, token.alg)
        if not candidates:
            return "the token's algorithm does not match its signing key"
        for key in candidates:
            if _verify_signature(key, token.alg, token.signing_input, token.signature):
                return keys.generation
        return "signature verification failed"


# --- where tokens are -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenLocation:
    kind: Literal["header", "param", "cookie"]
    name: str  # header names lower-cased, as Envoy's CheckRequest gives them
    prefix: str = ""


# JWTRule: with no location configured, "Authorization: Bearer <token>" then ?access_token=.
DEFAULT_LOCATIONS = (
    TokenLocation("header", "authorization", "Bearer "),
    TokenLocation("param", "access_token"),
)


class RequestTokens:
    """The tokens one request carries, read lazily per location (as Envoy's extractor reads).

    A header with a prefix holds a token when the prefix occurs in its value; what follows it, up
    to the first character a JWT cannot contain, is the token. Query parameters are
    percent-decoded; cookies come from the ``cookie`` header. The first occurrence counts.
    """

    __slots__ = ("_cookies", "_found", "_headers", "_params", "_query")

    def __init__(self, headers: Mapping[str, str], query: str) -> None:
        self._headers, self._query = headers, query
        self._params: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None
        self._found: dict[TokenLocation, str | None] = {}

    def find(self, location: TokenLocation) -> str | None:
        try:
            return self._found[location]
        except KeyError:
            token = self._found[location] = self._read(location)
            return token

    def _read(self, location: TokenLocation) -> str | None:
        if location.kind == "header":
            value = self._headers.get(location.name)
            if value is None or not location.prefix:
                return value
            at = value.find(location.prefix)
            if at < 0:
                return None
            match = _JWT_CHARS.search(value, at + len(location.prefix))
            return match.group() if match else value[at + len(location.prefix) :]
        if location.kind == "param":
            if self._params is None:
                self._params = _first_values(self._query.split("&"), decode=True)
            return self._params.get(location.name)
        if self._cookies is None:
            self._cookies = _first_values(self._headers.get("cookie", "").split(";"), decode=False)
        value = self._cookies.get(location.name)
        if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        return value


def _first_values(pairs: list[str], *, decode: bool) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs:
        name, _, value = pair.strip().partition("=")
        if decode:
            name, value = urllib.parse.unquote(name), urllib.parse.unquote(value)
        if name:
            values.setdefault(name, value)
    return values


# --- the verified-token cache ---------------------------------------------------------------

V = TypeVar("V")


class TokenCache(Generic[V]):
    """Verified tokens, so a repeated token costs no signature check: a bounded LRU keyed by the
    rule (its scope) and the token text, each entry good until the token expires (with the clock
    skew), for at most ``max_ttl`` seconds, and only while the rule's key set is unchanged."""

    def __init__(
        self,
        max_entries: int = 10_000,
        max_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries, self.max_ttl, self.clock = max_entries, max_ttl, clock
        self._entries: OrderedDict[tuple[Hashable, str], tuple[int | None, float, V]] = (
            OrderedDict()
        )
        # Counts clear()s: what was learned from the cache holds only while this is unchanged.
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, scope: Hashable, token: str, generation: int | None) -> V | None:
        key = (scope, token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        held_generation, until, value = entry
        if held_generation != generation or self.clock() >= until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def until(self, scope: Hashable, token: str) -> float | None:
        """When the token's entry stops being good (by the cache's clock), if there is one."""
        entry = self._entries.get((scope, token))
        return None if entry is None else entry[1]

    def put(
        self, scope: Hashable, token: str, generation: int | None, expires: float | None, value: V
    ) -> None:
        now = self.clock()
        until = now + self.max_ttl
        if expires is not None and math.isfinite(expires):
            until = min(until, expires + CLOCK_SKEW_SECONDS)
        if until <= now:
            return
        key = (scope, token)
        self._entries[key] = (generation, until, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
        self.epoch += 1
