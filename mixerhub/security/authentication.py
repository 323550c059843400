"""RequestAuthentication (security.istio.io v1 and v1beta1): JWT authentication of end users.

The kind compiles every policy into rules whose token locations, audiences, key sources and
outputs are fixed at load time; the snapshot's ``Authenticator`` then answers, per request, who
the end user is, or that the token presented is not acceptable (a 401).

What a request gets follows what Istio configures Envoy's jwt_authn filter with
(istio/istio pilot/pkg/security/authn/policy_applier.go, convertToEnvoyJwtConfig):

- The rules of every policy that selects the workload (its namespace's, and the root
  namespace's, mesh-wide) are merged and ordered by issuer.
- Each rule reads the token locations it names, or ``Authorization: Bearer`` and
  ``?access_token=``. A rule *succeeds* when it found tokens and every one of them verifies
  against it (Envoy: "if a request has multiple tokens, all of them must be valid").
- The first rule, by issuer, that succeeds gives the identity (Istio: with tokens in several
  locations "the output principal is nondeterministic"; here it is the first issuer). A token in
  another rule's location is then not looked at: Istio's requirement is
  ``any(rule) or all(rule or missing)``, which lets one good rule pass.
- No rule succeeds: if no rule found any token, the request goes on without an identity;
  otherwise it is refused (401). A token whose issuer no rule reading that location accepts is
  refused too (Envoy's JwtUnknownIssuer, envoyproxy/envoy#15194).
- The headers rules output (outputPayloadToHeader, outputClaimToHeaders) are removed from every
  request first, so a client cannot forge them (Envoy's extractor sanitizes them); a token found
  in a header is removed unless forwardOriginalToken. Tokens in query parameters and cookies stay
  where they are, as in Envoy.
- A CORS preflight (OPTIONS with Origin and Access-Control-Request-Method, read from the
  ``:method`` pseudo-header) is never authenticated: Istio sets Envoy's bypass_cors_preflight.
- ``claims`` holds the payload with the space-delimited claims (``scope``, ``permission`` and
  spaceDelimitedClaims) split into lists, as Istio has Envoy normalize them for authorization;
  ``raw_claims`` is the payload exactly as signed.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
import re
import time
import types
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from mixerhub.security import ROOT_NAMESPACE
from mixerhub.security.jwks import (
    DEFAULT_FETCH_TIMEOUT,
    InlineKeys,
    JwksError,
    KeySource,
    RemoteKeys,
    default_cache,
    discovery_url,
    http_url_problem,
    parse_jwks,
)
from mixerhub.security.jwt import (
    DEFAULT_LOCATIONS,
    JWT_VERIFICATIONS,
    RequestTokens,
    Token,
    TokenCache,
    TokenLocation,
    TokenVerifier,
    parse_token,
    sanitize_audience,
)
from mixerhub.store.errors import join_path
from mixerhub.store.kinds import Kind
from mixerhub.types import Duration, Params
from mixerhub.workload import WorkloadIdentity

if TYPE_CHECKING:
    from mixerhub.store.compilation import Compilation
    from mixerhub.store.documents import Document

log = logging.getLogger("mixerhub.security.authentication")

GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")
# Istio's default (pilot/pkg/security/authn/policy_applier.go): claims split on spaces.
DEFAULT_SPACE_DELIMITED_CLAIMS = ("scope", "permission")

# RFC 9110 section 5.1: a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# --- the spec (istio/api security/v1 request_authentication.proto, jwt.proto) -----------------


class WorkloadSelector(Params):
    match_labels: dict[str, str] = Field(default_factory=dict)


class JwtHeader(Params):
    name: str
    prefix: str = ""


class ClaimToHeader(Params):
    header: str
    claim: str


class JwtRule(Params):
    issuer: str
    audiences: list[str] = Field(default_factory=list)
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: list[JwtHeader] = Field(default_factory=list)
    from_params: list[str] = Field(default_factory=list)
    from_cookies: list[str] = Field(default_factory=list)
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: list[ClaimToHeader] = Field(default_factory=list)
    timeout: Duration | None = None
    space_delimited_claims: list[str] = Field(default_factory=list)


class RequestAuthenticationSpec(Params):
    selector: WorkloadSelector | None = None
    jwt_rules: list[JwtRule] = Field(default_factory=list)
    # Gateway API attachment: accepted by the schema so the error can say what to use instead.
    target_ref: dict[str, Any] | None = None
    target_refs: list[dict[str, Any]] | None = None


# --- what the check service reads --------------------------------------------------------------


# Labelled once: a labels() lookup per request is measurable on the Check path.
_CACHED = JWT_VERIFICATIONS.labels("cached")
_REJECTED = JWT_VERIFICATIONS.labels("rejected")
_VERIFIED = JWT_VERIFICATIONS.labels("verified")


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    principal: str  # f"{iss}/{sub}"; "" when the token has no sub
    audiences: tuple[str, ...]
    presenter: str  # azp claim or ""
    claims: Mapping[str, object]  # the verified payload (nested values kept); read-only
    raw_claims: str  # the payload as JSON text


@dataclass(frozen=True, slots=True)
class AuthnResult:
    identity: RequestIdentity | None  # None: no token (allowed, no identity) or failure
    error: str | None  # a token was present but is not acceptable -> 401; never echoes the token
    headers_to_set: tuple[tuple[str, str], ...]  # outputPayloadToHeader, outputClaimToHeaders
    headers_to_remove: tuple[str, ...]  # forged output headers; the token header unless forwarded


NO_AUTHENTICATION = AuthnResult(None, None, (), ())


@dataclass(frozen=True, slots=True)
class CompiledJwtRule:
    policy: str  # name.namespace, for logs
    issuer: str
    verifier: TokenVerifier
    locations: tuple[TokenLocation, ...]
    payload_header: str  # "" when the payload is not forwarded
    claim_headers: tuple[tuple[str, tuple[str, ...]], ...]  # (header, claim path)
    forward: bool
    space_delimited: frozenset[str]
    scope: Hashable  # what verified-token cache entries of this rule are keyed by

    def output_headers(self) -> tuple[str, ...]:
        names = (self.payload_header,) if self.payload_header else ()
        return names + tuple(h for h, _ in self.claim_headers)


@dataclass(frozen=True, slots=True)
class RequestAuthenticationPolicy:
    name: str
    namespace: str
    selector: Mapping[str, str] | None  # None or empty: every workload in scope
    rules: tuple[CompiledJwtRule, ...]

    def selects(self, workload: WorkloadIdentity, root_namespace: str) -> bool:
        """Istio's getConfigsForWorkload: the workload's namespace or the root namespace, and
        the selector's labels a subset of the workload's."""
        if self.namespace not in (workload.namespace, root_namespace):
            return False
        labels = workload.labels
        return not self.selector or all(labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True, slots=True)
class _Plan:
    """The rules one workload gets, in issuer order, and the output headers to sanitize."""

    rules: tuple[CompiledJwtRule, ...]
    sanitize: tuple[str, ...]
    # What of a request its rules read: the headers (cookie included when a rule reads
    # cookies) and whether the query string. A request equal in these reads the same tokens.
    inputs: tuple[str, ...] = ()
    reads_query: bool = False


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: RequestIdentity
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Remembered:
    """A repeated request's result, good while its token's entry in the verified-token cache
    would be: until it expires, while the rule's key set is the same generation and the cache
    has not been cleared. Checking is a few compares, with no lookup in the cache itself."""

    plan: _Plan
    keys: KeySource
    generation: int | None
    until: float
    epoch: int
    result: AuthnResult


# Process-wide, like the key sets: a configuration reload keeps the tokens verified so far.
TOKEN_CACHE: TokenCache[_Verified] = TokenCache()

_ISSUER_NOT_ACCEPTED = "token issuer is not accepted"
_MAX_PLANS = 4096
_MAX_RESULTS = 10_000


class Authenticator:
    """Every RequestAuthentication of one snapshot, ready for requests."""

    def __init__(
        self,
        policies: Iterable[RequestAuthenticationPolicy] = (),
        *,
        root_namespace: str = ROOT_NAMESPACE,
        token_cache: TokenCache[_Verified] | None = None,
    ) -> None:
        self.policies = tuple(policies)
        self.root_namespace = root_namespace
        self.cache = TOKEN_CACHE if token_cache is None else token_cache
        # Whether any policy exists at all: without one the check service skips authentication.
        self.referenced = bool(self.policies)
        self._plans: dict[tuple[str, frozenset[tuple[str, str]]], _Plan] = {}
        self._last: tuple[WorkloadIdentity, _Plan] | None = None
        self._results: dict[tuple[object, ...], _Remembered] = {}

    def applies(self, workload: WorkloadIdentity) -> bool:
        """Whether any JWT rule applies to the workload."""
        return bool(self.referenced and self._plan(workload).rules)

    def known(
        self, workload: WorkloadIdentity, headers: Mapping[str, str], query: str
    ) -> AuthnResult | None:
        """``authenticate``'s answer when it needs nothing awaited (no rule applies, a CORS
        preflight, a repeated request whose token is still good); None when it does."""
        last = self._last  # _plan's own first step, without the call
        plan = last[1] if last is not None and last[0] is workload else self._plan(workload)
        if not plan.rules:
            return NO_AUTHENTICATION
        if headers.get(":method") == "OPTIONS" and _is_cors_preflight(headers):
            # Istio sets Envoy's bypass_cors_preflight: a preflight carries no credentials.
            return AuthnResult(None, None, (), plan.sanitize)
        # A repeated request (same token in the same places): the result made last time, while
        # its token is still valid in the token cache (unexpired, its key set unchanged).
        inputs = plan.inputs
        if len(inputs) == 1:  # most plans read one header: no map() nor unpacking
            key: tuple[object, ...] = (
                id(plan), query if plan.reads_query else None, headers.get(inputs[0])
            )  # fmt: skip
        else:
            key = (id(plan), query if plan.reads_query else None, *map(headers.get, inputs))
        remembered = self._results.get(key)
        if (
            remembered is not None
            and remembered.plan is plan
            and self.cache.clock() < remembered.until
            and remembered.generation == remembered.keys.generation
            and remembered.epoch == self.cache.epoch
        ):
            _CACHED.value += 1
            return remembered.result
        return None

    async def authenticate(
        self, workload: WorkloadIdentity, headers: Mapping[str, str], query: str
    ) -> AuthnResult:
        """The request's end-user identity. ``headers`` have lower-case names (as in Envoy's
        CheckRequest); ``query`` is the raw query string of the path. Never raises."""
        known = self.known(workload, headers, query)
        if known is not None:
            return known
        plan = self._plan(workload)
        inputs = (id(plan), query if plan.reads_query else None, *map(headers.get, plan.inputs))
        tokens = RequestTokens(headers, query)
        found: list[tuple[CompiledJwtRule, tuple[tuple[TokenLocation, str], ...]]] = []
        for rule in plan.rules:
            here = tuple((loc, t) for loc in rule.locations if (t := tokens.find(loc)) is not None)
            if here:
                found.append((rule, here))
        if not found:
            return AuthnResult(None, None, (), plan.sanitize)

        # A repeated token: every token of a rule already verified, no parsing at all.
        for rule, here in found:
            generation = rule.verifier.keys.generation
            hits = [
                hit
                for _, token in here
                if (hit := self.cache.get(rule.scope, token, generation)) is not None
            ]
            if len(hits) == len(here):
                _CACHED.inc()
                return self._remember(inputs, plan, rule, here, _success(plan, rule, here, hits[0]))

        now = time.time()
        parsed: dict[str, Token | str] = {}
        failures: list[str] = []
        for rule, here in found:
            first: _Verified | None = None
            for _, token in here:
                outcome = await self._verify(rule, token, parsed, now)
                if isinstance(outcome, str):
                    failures.append(outcome)
                    first = None
                    break
                first = first or outcome
            if first is not None:
                return self._remember(inputs, plan, rule, here, _success(plan, rule, here, first))
        _REJECTED.inc()
        reason = next((f for f in failures if f != _ISSUER_NOT_ACCEPTED), _ISSUER_NOT_ACCEPTED)
        return AuthnResult(None, reason, (), ())

    async def prefetch(self) -> None:
        """Fetch the remote key sets of every rule not fetched yet (call when the snapshot
        becomes active, so the first requests do not wait for them)."""
        sources: dict[str, tuple[KeySource, float]] = {}
        for policy in self.policies:
            for rule in policy.rules:
                keys = rule.verifier.keys
                if isinstance(keys, RemoteKeys):
                    sources.setdefault(keys.identity, (keys, rule.verifier.timeout))
        await asyncio.gather(*(keys.get(timeout) for keys, timeout in sources.values()))

    async def _verify(
        self, rule: CompiledJwtRule, token: str, parsed: dict[str, Token | str], now: float
    ) -> _Verified | str:
        hit = self.cache.get(rule.scope, token, rule.verifier.keys.generation)
        if hit is not None:
            return hit
        parsed_token = parsed.get(token)
        if parsed_token is None:
            parsed_token = parsed[token] = parse_token(token)
        if isinstance(parsed_token, str):
            return parsed_token
        try:
            outcome = await rule.verifier.verify(parsed_token, now)
        except Exception:  # a defect here must cost one request a 401, never the process
            log.exception("verifying a token for %s failed", rule.policy)
            return "token verification failed"
        if isinstance(outcome, str):
            return outcome
        _VERIFIED.inc()
        verified = _verified(rule, parsed_token)
        self.cache.put(rule.scope, token, outcome, parsed_token.expires, verified)
        return verified

    def _remember(
        self,
        inputs: tuple[object, ...],
        plan: _Plan,
        rule: CompiledJwtRule,
        found: tuple[tuple[TokenLocation, str], ...],
        result: AuthnResult,
    ) -> AuthnResult:
        if len(found) == 1:  # one token: its validity is the result's
            until = self.cache.until(rule.scope, found[0][1])
            if until is not None:
                if len(self._results) >= _MAX_RESULTS:
                    self._results.clear()
                keys = rule.verifier.keys
                self._results[inputs] = _Remembered(
                    plan, keys, keys.generation, until, self.cache.epoch, result
                )
        return result

    def _plan(self, workload: WorkloadIdentity) -> _Plan:
        # The check service hands in the same WorkloadIdentity object for a repeated caller
        # (and asks twice per request): that one object needs no key built.
        last = self._last
        if last is not None and last[0] is workload:
            return last[1]
        key = (workload.namespace, frozenset(workload.labels.items()))
        plan = self._plans.get(key)
        if plan is not None:
            self._last = (workload, plan)
        else:
            rules = sorted(
                (
                    rule
                    for p in self.policies
                    if p.selects(workload, self.root_namespace)
                    for rule in p.rules
                ),
                key=lambda r: r.issuer,
            )
            sanitize = tuple(dict.fromkeys(h for r in rules for h in r.output_headers()))
            locations = [loc for r in rules for loc in r.locations]
            inputs = tuple(
                dict.fromkeys(
                    loc.name if loc.kind == "header" else "cookie"
                    for loc in locations
                    if loc.kind != "param"
                )
            )
            reads_query = any(loc.kind == "param" for loc in locations)
            plan = _Plan(tuple(rules), sanitize, inputs, reads_query)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
            self._last = (workload, plan)
        return plan


def _is_cors_preflight(headers: Mapping[str, str]) -> bool:
    return (
        headers.get(":method") == "OPTIONS"
        and bool(headers.get("origin"))
        and bool(headers.get("access-control-request-method"))
    )


def _success(
    plan: _Plan,
    rule: CompiledJwtRule,
    found: tuple[tuple[TokenLocation, str], ...],
    verified: _Verified,
) -> AuthnResult:
    setting = {name for name, _ in verified.headers}
    remove = [h for h in plan.sanitize if h not in setting]
    if not rule.forward:
        remove += [
            loc.name
            for loc, _ in found
            if loc.kind == "header" and loc.name not in setting and loc.name not in remove
        ]
    return AuthnResult(verified.identity, None, verified.headers, tuple(remove))


def _verified(rule: CompiledJwtRule, token: Token) -> _Verified:
    claims = dict(token.claims)
    for name in rule.space_delimited:
        value = claims.get(name)
        if isinstance(value, str):
            claims[name] = value.split()
    sub = claims.get("sub")
    azp = claims.get("azp")
    identity = RequestIdentity(
        f"{token.issuer}/{sub}" if isinstance(sub, str) and sub else "",
        token.audiences,
        azp if isinstance(azp, str) else "",
        types.MappingProxyType(claims),
        token.raw_claims,
    )
    headers: list[tuple[str, str]] = []
    if rule.payload_header:
        headers.append((rule.payload_header, token.payload_segment))
    for header, path in rule.claim_headers:
        value = claim_header_value(token.claims, path)
        if value is not None:
            headers.append((header, value))
    return _Verified(identity, tuple(headers))


def claim_header_value(claims: Mapping[str, object], path: tuple[str, ...]) -> str | None:
    """A claim as a header value, as Envoy's claim_to_headers writes it: strings as they are,
    numbers (whole ones without a decimal point) and booleans as text, objects and lists as
    base64-encoded JSON. None when the claim is absent, null, empty or not a safe header value."""
    value: object = claims
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    text: str
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        text = str(int(value)) if value.is_integer() else f"{value:.6g}"
    elif isinstance(value, dict | list):
        text = base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()
    else:
        return None
    if not text or any(c in text for c in "\r\n\0"):
        return None
    return text


# --- compiling ---------------------------------------------------------------------------------


def compile_request_authentication(
    doc: Document, spec: RequestAuthenticationSpec, c: Compilation
) -> None:
    if not c.claim("requestauthentication", doc):
        return
    failed = False

    def fail(path: str, reason: str) -> None:
        nonlocal failed
        failed = True
        c.error(doc, path, reason)

    if spec.target_ref is not None or spec.target_refs is not None:
        field = "spec.targetRef" if spec.target_ref is not None else "spec.targetRefs"
        fail(field, "not supported: the hub selects workloads with spec.selector")
    rules: list[CompiledJwtRule] = []
    issuers: dict[str, int] = {}
    policy = f"{doc.name}.{doc.namespace}"
    for i, rule in enumerate(spec.jwt_rules):
        path = ("spec", "jwtRules", i)
        if rule.issuer in issuers:
            fail(
                join_path(*path, "issuer"),
                f"issuer {rule.issuer!r} is already in jwtRules[{issuers[rule.issuer]}]",
            )
        issuers.setdefault(rule.issuer, i)
        compiled = _compile_rule(policy, rule, path, fail)  # its own errors, duplicate or not
        if compiled is not None:
            rules.append(compiled)
    if failed:
        return
    selector = dict(spec.selector.match_labels) if spec.selector else None
    c.request_authentications.append(
        RequestAuthenticationPolicy(doc.name, doc.namespace, selector or None, tuple(rules))
    )


def _compile_rule(
    policy: str,
    rule: JwtRule,
    path: tuple[str | int, ...],
    fail: Callable[[str, str], None],
) -> CompiledJwtRule | None:
    problems = 0

    def problem(field: str | tuple[str | int, ...], reason: str) -> None:
        nonlocal problems
        problems += 1
        parts = field if isinstance(field, tuple) else (field,)
        fail(join_path(*path, *parts), reason)

    if not rule.issuer:
        problem("issuer", "must not be empty")
    for j, aud in enumerate(rule.audiences):
        if not aud:
            problem(("audiences", j), "must not be empty")

    keys: KeySource | None = None
    timeout = rule.timeout.total_seconds() if rule.timeout is not None else DEFAULT_FETCH_TIMEOUT
    if rule.timeout is not None and timeout <= 0:
        problem("timeout", "must be more than 0s")
    if rule.jwks:
        # Istio: "only one of jwksUri and jwks should be used"; the inline set is the one used.
        try:
            keys = _inline_keys(rule.jwks)
        except JwksError as e:
            problem("jwks", f"invalid JWKS: {e}")
    elif rule.jwks_uri:
        why = http_url_problem(rule.jwks_uri)
        if why:
            problem("jwksUri", why)
        else:
            keys = default_cache().source(rule.jwks_uri, timeout=timeout)
    elif rule.issuer:
        if http_url_problem(rule.issuer):
            problem(
                "jwksUri",
                "required (or jwks) when the issuer is not an http(s) URL:"
                " OpenID discovery needs one",
            )
        else:
            keys = default_cache().source(
                discovery_url(rule.issuer), discovery=True, timeout=timeout
            )

    locations: list[TokenLocation] = []
    for j, source in enumerate(rule.from_headers):
        if not _HEADER_NAME.fullmatch(source.name):
            problem(("fromHeaders", j, "name"), _header_name_problem(source.name))
        locations.append(TokenLocation("header", source.name.lower(), source.prefix))
    for j, param in enumerate(rule.from_params):
        if not param:
            problem(("fromParams", j), "must not be empty")
        locations.append(TokenLocation("param", param))
    for j, cookie in enumerate(rule.from_cookies):
        if not cookie:
            problem(("fromCookies", j), "must not be empty")
        locations.append(TokenLocation("cookie", cookie))

    outputs: dict[str, str] = {}
    payload_header = rule.output_payload_to_header.lower()
    if payload_header:
        if not _HEADER_NAME.fullmatch(payload_header):
            problem("outputPayloadToHeader", _header_name_problem(payload_header))
        outputs[payload_header] = "outputPayloadToHeader"
    claim_headers: list[tuple[str, tuple[str, ...]]] = []
    for j, entry in enumerate(rule.output_claim_to_headers):
        header = entry.header.lower()
        if not _HEADER_NAME.fullmatch(header):
            problem(("outputClaimToHeaders", j, "header"), _header_name_problem(entry.header))
        elif header in outputs:
            problem(
                ("outputClaimToHeaders", j, "header"),
                f"header {header!r} is already written by {outputs[header]}",
            )
        outputs.setdefault(header, f"outputClaimToHeaders[{j}]")
        claim_path = tuple(entry.claim.split("."))
        if not entry.claim or not all(claim_path):
            problem(
                ("outputClaimToHeaders", j, "claim"),
                "must be a claim name, nested claims separated by dots (a.b)",
            )
        claim_headers.append((header, claim_path))
    for j, name in enumerate(rule.space_delimited_claims):
        if not name:
            problem(("spaceDelimitedClaims", j), "must not be empty")

    if problems or keys is None:
        return None
    audiences = frozenset(sanitize_audience(a) for a in rule.audiences)
    space_delimited = frozenset((*DEFAULT_SPACE_DELIMITED_CLAIMS, *rule.space_delimited_claims))
    scope = (
        rule.issuer,
        tuple(sorted(audiences)),
        keys.identity,
        payload_header,
        tuple(claim_headers),
        tuple(sorted(space_delimited)),
    )
    return CompiledJwtRule(
        policy,
        rule.issuer,
        TokenVerifier(rule.issuer, audiences, keys, timeout),
        tuple(locations) or DEFAULT_LOCATIONS,
        payload_header,
        tuple(claim_headers),
        rule.forward_original_token,
        space_delimited,
        scope,
    )


@functools.lru_cache(maxsize=256)
def _inline_keys(document: str) -> InlineKeys:
    # One parse per distinct document: a reload keeps the key set, and the tokens it verified.
    return InlineKeys(parse_jwks(document, allow_symmetric=True, strict=True))


def _header_name_problem(name: str) -> str:
    if not name:
        return "must not be empty"
    return f"{name!r} is not a valid HTTP header name"


REQUEST_AUTHENTICATION = Kind(
    GROUP,
    VERSIONS,
    "RequestAuthentication",
    RequestAuthenticationSpec,
    40,
    compile_request_authentication,
)
