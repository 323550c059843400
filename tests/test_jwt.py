"""RequestAuthentication: JWT verification against a real OIDC issuer on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwk
from joserfc import jwt as jose_jwt

from mixerhub import registry
from mixerhub.monitoring import REGISTRY
from mixerhub.security import ROOT_NAMESPACE, authentication, jwks
from mixerhub.security import jwt as jwt_module
from mixerhub.security.authentication import Authenticator, AuthnResult
from mixerhub.security.jwt import TokenCache, parse_token
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.workload import WorkloadIdentity
from tests.oidc_issuer import OidcIssuer, b64url

ADAPTERS = registry.default_registry()
WEB = WorkloadIdentity(name="web", namespace="shop", labels={"app": "web", "version": "v1"})
DB = WorkloadIdentity(name="db", namespace="shop", labels={"app": "db"})
ELSEWHERE = WorkloadIdentity(name="web", namespace="other", labels={"app": "web"})


class Clock:
    """A monotonic clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def key_cache(clock: Clock) -> AsyncIterator[jwks.JwksCache]:
    """A fresh process-wide key set cache (refetch at most every 30 s of the test clock)."""
    cache = jwks.JwksCache(
        min_refetch_interval=30, refresh_interval=3600, retry_interval=3600, clock=clock
    )
    previous = jwks.set_default_cache(cache)
    authentication.TOKEN_CACHE.clear()
    yield cache
    await cache.close()
    jwks.set_default_cache(previous)
    authentication.TOKEN_CACHE.clear()


@pytest.fixture
async def issuer(key_cache: jwks.JwksCache) -> AsyncIterator[OidcIssuer]:
    async with OidcIssuer() as i:
        yield i


# --- helpers ---------------------------------------------------------------------------------


def policy(
    *rules: Mapping[str, Any],
    name: str = "jwt",
    namespace: str = "shop",
    selector: Mapping[str, str] | None = None,
    version: str = "v1",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"jwtRules": [dict(r) for r in rules]}
    if selector is not None:
        spec["selector"] = {"matchLabels": dict(selector)}
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def write(folder: Path, *docs: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "policies.yaml"
    path.write_text(yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False))
    return path


def compile_docs(folder: Path, *docs: Mapping[str, Any]) -> Snapshot:
    write(folder, *docs)
    return compile_snapshot(documents.read([folder]), ADAPTERS, build_handlers=False)


def authenticator(folder: Path, *docs: Mapping[str, Any]) -> Authenticator:
    return compile_docs(folder, *docs).authenticator


def errors_of(folder: Path, *docs: Mapping[str, Any]) -> list[str]:
    write(folder, *docs)
    with pytest.raises(Rejected) as e:
        compile_snapshot(documents.read([folder]), ADAPTERS, build_handlers=False)
    return [str(err) for err in e.value.errors]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def rule(issuer: OidcIssuer, **fields: Any) -> dict[str, Any]:
    return {"issuer": issuer.issuer, "jwksUri": issuer.jwks_uri, **fields}


def forge(
    header: Mapping[str, Any], payload: Mapping[str, Any] | str, sign: Callable[[bytes], bytes]
) -> str:
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def assert_refused(result: AuthnResult, reason: str, token: str | None = None) -> None:
    assert result.identity is None
    assert result.error is not None, "the token should have been refused"
    assert reason in result.error, result.error
    assert result.headers_to_set == ()
    if token is not None and len(token) > 8:
        assert token not in result.error


# --- valid tokens ----------------------------------------------------------------------------


async def test_a_valid_rs256_token_gives_the_identity(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer, audiences=["shop"])))
    token = issuer.token("alice", ["shop", "other"], azp="web-app", group={"id": "g1", "n": 2})
    result = await auth.authenticate(WEB, bearer(token), "")
    assert result.error is None
    identity = result.identity
    assert identity is not None
    assert identity.principal == f"{issuer.issuer}/alice"
    assert identity.audiences == ("shop", "other")
    assert identity.presenter == "web-app"
    assert identity.claims["group"] == {"id": "g1", "n": 2}
    assert json.loads(identity.raw_claims)["sub"] == "alice"
    assert result.headers_to_remove == ("authorization",)  # forwardOriginalToken is false
    assert auth.referenced
    assert auth.applies(WEB)


async def test_a_valid_es256_token_gives_the_identity(
    tmp_path: Path, key_cache: jwks.JwksCache
) -> None:
    async with OidcIssuer("ES256") as es:
        auth = authenticator(tmp_path, policy(rule(es)))
        result = await auth.authenticate(WEB, bearer(es.token("bob", "x")), "")
        assert result.error is None
        assert result.identity is not None
        assert result.identity.principal == f"{es.issuer}/bob"
        assert result.identity.audiences == ("x",)
        assert result.identity.presenter == ""


async def test_a_request_without_a_token_passes_without_identity(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    result = await auth.authenticate(WEB, {"authorization": "Basic dXNlcjpwdw=="}, "a=1")
    assert result == AuthnResult(None, None, (), ())
    assert issuer.fetches["jwks"] == 0  # nothing to verify, nothing fetched


async def test_the_access_token_query_parameter_is_a_default_location(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    result = await auth.authenticate(WEB, {}, f"x=1&access_token={issuer.token('carol')}")
    assert result.identity is not None
    assert result.identity.principal.endswith("/carol")
    assert result.headers_to_remove == ()  # a query parameter stays, as in Envoy


async def test_a_custom_header_with_a_prefix(tmp_path: Path, issuer: OidcIssuer) -> None:
    located = rule(issuer, fromHeaders=[{"name": "X-Jwt-Assertion", "prefix": "Token "}])
    auth = authenticator(tmp_path, policy(located))
    token = issuer.token("dave")
    result = await auth.authenticate(WEB, {"x-jwt-assertion": f"Token {token}"}, "")
    assert result.identity is not None
    assert result.identity.principal.endswith("/dave")
    assert result.headers_to_remove == ("x-jwt-assertion",)
    # Without the prefix the header holds no token; the default locations are not read at all.
    assert await auth.authenticate(WEB, {"x-jwt-assertion": token}, "") == AuthnResult(
        None, None, (), ()
    )
    assert (await auth.authenticate(WEB, bearer(token), f"access_token={token}")).identity is None


async def test_a_custom_query_parameter_and_a_cookie(tmp_path: Path, issuer: OidcIssuer) -> None:
    located = rule(issuer, fromParams=["jwt"], fromCookies=["session"])
    auth = authenticator(tmp_path, policy(located))
    token = issuer.token("erin")
    by_param = await auth.authenticate(WEB, {}, f"a=b&jwt={token}")
    assert by_param.identity is not None
    by_cookie = await auth.authenticate(WEB, {"cookie": f"theme=dark; session={token}; x=y"}, "")
    assert by_cookie.identity is not None
    assert by_cookie.identity.principal.endswith("/erin")
    bad_cookie = await auth.authenticate(WEB, {"cookie": "session=not.a.token"}, "")
    assert_refused(bad_cookie, "malformed")


async def test_payload_and_claims_are_output_to_headers(tmp_path: Path, issuer: OidcIssuer) -> None:
    outputs = rule(
        issuer,
        outputPayloadToHeader="X-Jwt-Payload",
        outputClaimToHeaders=[
            {"header": "x-group", "claim": "group.id"},
            {"header": "x-level", "claim": "group.level"},
            {"header": "x-admin", "claim": "admin"},
            {"header": "x-roles", "claim": "roles"},
            {"header": "x-missing", "claim": "group.nothing"},
            {"header": "x-evil", "claim": "evil"},
        ],
    )
    auth = authenticator(tmp_path, policy(outputs))
    token = issuer.token(
        "frank", group={"id": "g7", "level": 3}, admin=True, roles=["a", "b"], evil="a\r\nb: c"
    )
    result = await auth.authenticate(WEB, {**bearer(token), "x-group": "forged"}, "")
    headers = dict(result.headers_to_set)
    assert headers["x-jwt-payload"] == token.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(headers["x-jwt-payload"] + "==")) == json.loads(
        result.identity.raw_claims  # type: ignore[union-attr]
    )
    assert headers["x-group"] == "g7"
    assert headers["x-level"] == "3"
    assert headers["x-admin"] == "true"
    assert json.loads(base64.b64decode(headers["x-roles"])) == ["a", "b"]
    assert "x-missing" not in headers
    assert "x-evil" not in headers
    # A client cannot forge what the rule outputs: headers it did not set are removed.
    assert set(result.headers_to_remove) == {"x-missing", "x-evil", "authorization"}
    without_token = await auth.authenticate(WEB, {"x-group": "forged"}, "")
    assert without_token.identity is None
    assert without_token.error is None
    assert "x-group" in without_token.headers_to_remove
    assert "x-jwt-payload" in without_token.headers_to_remove


async def test_forward_original_token_keeps_the_header(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer, forwardOriginalToken=True)))
    result = await auth.authenticate(WEB, bearer(issuer.token()), "")
    assert result.identity is not None
    assert result.headers_to_remove == ()


async def test_space_delimited_claims_are_lists_and_sub_makes_the_principal(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer, spaceDelimitedClaims=["perms"])))
    token = issuer.token(None, scope="read write", perms="a  b", other="x y")
    result = await auth.authenticate(WEB, bearer(token), "")
    identity = result.identity
    assert identity is not None
    assert identity.principal == ""  # no sub, no request principal
    assert identity.claims["scope"] == ["read", "write"]
    assert identity.claims["perms"] == ["a", "b"]
    assert identity.claims["other"] == "x y"
    assert json.loads(identity.raw_claims)["scope"] == "read write"


# --- attacks ---------------------------------------------------------------------------------


async def test_alg_none_is_refused(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    claims = {"iss": issuer.issuer, "sub": "mallory", "exp": time.time() + 600}
    for alg in ("none", "None", "NONE"):
        token = f"{b64url({'alg': alg, 'typ': 'JWT'})}.{b64url(claims)}."
        assert_refused(await auth.authenticate(WEB, bearer(token), ""), "alg none", token)


async def test_hmac_signed_with_the_public_key_is_refused(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    """Algorithm confusion: HS256 with the issuer's RSA public key as the shared secret."""
    auth = authenticator(tmp_path, policy(rule(issuer)))
    public = issuer.current.key.get_op_key("verify")
    assert isinstance(public, rsa.RSAPublicKey)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": issuer.issuer, "sub": "mallory", "exp": int(time.time()) + 600}
    for secret in (pem, pem.strip(), json.dumps(issuer.jwks()["keys"][0]).encode()):

        def sign(message: bytes, secret: bytes = secret) -> bytes:
            return hmac.new(secret, message, hashlib.sha256).digest()

        for kid in (issuer.current.kid, None):
            header = {"alg": "HS256", **({"kid": kid} if kid else {})}
            token = forge(header, claims, sign)
            result = await auth.authenticate(WEB, bearer(token), "")
            assert_refused(result, "algorithm does not match", token)


async def test_expired_and_not_yet_valid_tokens_are_refused_beyond_the_skew(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    now = int(time.time())
    expired = issuer.token(exp_in=-120)
    assert_refused(await auth.authenticate(WEB, bearer(expired), ""), "expired", expired)
    within_skew = issuer.token(exp_in=-30)
    assert (await auth.authenticate(WEB, bearer(within_skew), "")).identity is not None
    early = issuer.token(nbf=now + 300)
    assert_refused(await auth.authenticate(WEB, bearer(early), ""), "not yet valid", early)
    almost = issuer.token(nbf=now + 30)
    assert (await auth.authenticate(WEB, bearer(almost), "")).identity is not None


async def test_a_wrong_issuer_is_refused(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    token = issuer.token(iss="https://evil.example")
    assert_refused(await auth.authenticate(WEB, bearer(token), ""), "issuer is not accepted", token)


async def test_audiences_must_match_when_configured(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer, audiences=["https://shop.example/", "api"])))
    for aud in ("other", ["other", "more"], None):
        token = issuer.token(aud=aud)
        assert_refused(await auth.authenticate(WEB, bearer(token), ""), "audiences", token)
    # Compared as Envoy compares them: without the scheme and the trailing slash.
    for aud in ("shop.example", "http://shop.example", ["x", "api"]):
        assert (await auth.authenticate(WEB, bearer(issuer.token(aud=aud)), "")).identity


async def test_an_unknown_kid_is_refused(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    assert (await auth.authenticate(WEB, bearer(issuer.token()), "")).identity
    token = issuer.token(header={"kid": "no-such-key"})
    result = await auth.authenticate(WEB, bearer(token), "")
    assert_refused(result, "no signing key has the token's key id", token)


async def test_tokens_signed_with_a_foreign_key_are_refused(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    foreign = jwk.RSAKey.generate_key(2048)
    claims = {"iss": issuer.issuer, "sub": "mallory", "exp": int(time.time()) + 600}
    # A known kid, a missing kid, and the attacker's key embedded in the header (never used).
    for header in (
        {"alg": "RS256", "kid": issuer.current.kid},
        {"alg": "RS256"},
        {"alg": "RS256", "jwk": foreign.as_dict(private=False)},
    ):
        token = jose_jwt.encode(header, claims, foreign, algorithms=["RS256"])
        result = await auth.authenticate(WEB, bearer(token), "")
        assert_refused(result, "signature verification failed", token)


async def test_a_token_without_kid_verifies_with_a_matching_key(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    issuer.rotate()  # two keys published: the token names neither
    auth = authenticator(tmp_path, policy(rule(issuer)))
    token = issuer.token("gina", header={"kid": None}, key=issuer.keys[0])
    assert "kid" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    result = await auth.authenticate(WEB, bearer(token), "")
    assert result.identity is not None
    assert result.identity.principal.endswith("/gina")


async def test_a_key_without_kid_may_verify_any_kid(tmp_path: Path, issuer: OidcIssuer) -> None:
    """As Envoy's jwt_verify_lib: a published key without kid is tried whatever the token names."""
    published = issuer.current.key.as_dict(private=False)
    del published["kid"]
    inline = {"issuer": issuer.issuer, "jwks": json.dumps({"keys": [published]})}
    auth = authenticator(tmp_path, policy(inline))
    result = await auth.authenticate(WEB, bearer(issuer.token("uma")), "")
    assert result.identity is not None
    foreign = OidcIssuer()  # never started: only its key signs
    forged = foreign.token(iss=issuer.issuer)
    assert_refused(await auth.authenticate(WEB, bearer(forged), ""), "signature", forged)


async def test_a_cors_preflight_is_not_authenticated(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer, outputPayloadToHeader="x-payload")))
    preflight = {
        ":method": "OPTIONS",
        "origin": "https://shop.example",
        "access-control-request-method": "POST",
        "authorization": "Bearer whatever",
    }
    assert await auth.authenticate(WEB, preflight, "") == AuthnResult(
        None, None, (), ("x-payload",)
    )
    assert_refused(await auth.authenticate(WEB, {**preflight, ":method": "GET"}, ""), "malformed")


async def test_a_tampered_payload_is_refused(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    head, _, signature = issuer.token("alice").split(".")
    claims = {"iss": issuer.issuer, "sub": "admin", "exp": int(time.time()) + 600}
    token = f"{head}.{b64url(claims)}.{signature}"
    assert_refused(await auth.authenticate(WEB, bearer(token), ""), "signature", token)


async def test_oversized_tokens_are_refused_before_parsing(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    token = issuer.token(padding="x" * 70_000)
    assert_refused(await auth.authenticate(WEB, bearer(token), ""), "larger than 64 KiB", token)
    header = {"alg": "RS256", "kid": issuer.current.kid, "x": "y" * 9000}
    huge_header = issuer.token(header=header)
    result = await auth.authenticate(WEB, bearer(huge_header), "")
    assert_refused(result, "header is larger than 8 KiB", huge_header)


def _segments(header: Any, payload: Any) -> str:
    def encode(part: Any) -> str:
        if isinstance(part, bytes):
            return base64.urlsafe_b64encode(part).rstrip(b"=").decode()
        return b64url(part if isinstance(part, str | dict) else json.dumps(part))

    return f"{encode(header)}.{encode(payload)}.c2lnbmF0dXJl"


MALFORMED = [
    ("garbage", "three dot-separated parts"),
    ("a.b", "three dot-separated parts"),
    ("a.b.c.d", "three dot-separated parts"),
    ("a.b.c.d.e", "JWE"),
    ("!!!.e30.c2ln", "not base64url"),
    (b64url({"alg": "RS256"}) + ".e30.abcde", "signature: not base64url"),
    ("eyJ.e30.c2ln", "header"),
    (_segments([1], {"sub": "x"}), "header: not a JSON object"),
    (_segments("{not json", {"sub": "x"}), "header: not JSON"),
    (_segments({"alg": "RS256"}, [1, 2]), "payload: not a JSON object"),
    (_segments({"alg": "RS256"}, b"\xff\xfe\xfd"), "payload: not base64url-encoded UTF-8"),
    (_segments({"alg": "RS256"}, '{"iss": "x", "exp": NaN}'), "payload: not JSON"),
    (_segments({"alg": "RS256"}, "[" * 20000 + "]" * 20000), "payload: not JSON"),
    (_segments({"typ": "JWT"}, {"sub": "x"}), "alg is missing"),
    (_segments({"alg": "XS256"}, {"sub": "x"}), "unsupported signature algorithm"),
    (_segments({"alg": "RS256", "crit": ["exp"]}, {"sub": "x"}), "critical header"),
    (_segments({"alg": "RS256", "kid": 7}, {"sub": "x"}), "kid is not a string"),
    (_segments({"alg": "RS256"}, '{"exp": 1' + "0" * 400 + "}"), "exp is out of range"),
    (_segments({"alg": "RS256"}, {"exp": "tomorrow"}), "exp is not a number"),
    (_segments({"alg": "RS256"}, {"nbf": True}), "nbf is not a number"),
]


@pytest.mark.parametrize(("token", "reason"), MALFORMED, ids=[r for _, r in MALFORMED])
async def test_malformed_tokens_get_a_clear_error(
    tmp_path: Path, issuer: OidcIssuer, token: str, reason: str
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    assert_refused(await auth.authenticate(WEB, bearer(token), ""), reason, token)


async def test_an_empty_bearer_token_is_refused(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    assert_refused(await auth.authenticate(WEB, {"authorization": "Bearer "}, ""), "empty token")
    assert_refused(await auth.authenticate(WEB, {}, "access_token="), "empty token")


@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-]{0,40}(\.[A-Za-z0-9_\-=+/]{0,40}){2}"))
def test_parsing_never_raises(text: str) -> None:
    result = parse_token(text)
    assert isinstance(result, str) or result.text == text


# --- key sets --------------------------------------------------------------------------------


async def test_openid_discovery_finds_the_key_set(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy({"issuer": issuer.issuer + "/"}))
    # The issuer claim must match the configuration exactly; discovery trims the slash.
    token = issuer.token("hank", iss=issuer.issuer + "/")
    result = await auth.authenticate(WEB, bearer(token), "")
    assert result.identity is not None
    assert issuer.fetches == {"discovery": 1, "jwks": 1}
    assert (
        await auth.authenticate(WEB, bearer(issuer.token("ivy", iss=issuer.issuer + "/")), "")
    ).identity
    assert issuer.fetches == {"discovery": 1, "jwks": 1}  # held, not fetched again


async def test_rotated_keys_are_fetched_for_an_unknown_kid_at_a_limited_rate(
    tmp_path: Path, issuer: OidcIssuer, clock: Clock
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    assert (await auth.authenticate(WEB, bearer(issuer.token()), "")).identity
    assert issuer.fetches["jwks"] == 1

    issuer.rotate()
    clock.advance(31)
    rotated = issuer.token("jack")
    result = await auth.authenticate(WEB, bearer(rotated), "")
    assert result.identity is not None
    assert result.identity.principal.endswith("/jack")
    assert issuer.fetches["jwks"] == 2

    issuer.rotate()
    again = issuer.token("kim")
    for _ in range(5):  # within 30 s of the last fetch: refused, and the issuer is left alone
        assert_refused(await auth.authenticate(WEB, bearer(again), ""), "key id", again)
    assert issuer.fetches["jwks"] == 2
    clock.advance(31)
    assert (await auth.authenticate(WEB, bearer(again), "")).identity is not None
    assert issuer.fetches["jwks"] == 3


@pytest.mark.parametrize("outage", ["503", "refused"])
async def test_keys_are_kept_while_the_endpoint_is_down(
    tmp_path: Path, issuer: OidcIssuer, clock: Clock, outage: str
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    assert (await auth.authenticate(WEB, bearer(issuer.token()), "")).identity
    errors = REGISTRY.get_sample_value("mixerhub_jwks_fetch_errors_total", {"uri": issuer.jwks_uri})
    if outage == "503":
        issuer.fail(503)
    else:
        await issuer.refuse()
    clock.advance(31)
    unknown = issuer.token(header={"kid": "rotated"})  # forces a fetch, which fails
    assert_refused(await auth.authenticate(WEB, bearer(unknown), ""), "key id")
    after = REGISTRY.get_sample_value("mixerhub_jwks_fetch_errors_total", {"uri": issuer.jwks_uri})
    assert (after or 0) == (errors or 0) + 1
    result = await auth.authenticate(WEB, bearer(issuer.token("lee")), "")
    assert result.identity is not None
    assert result.identity.principal.endswith("/lee")
    assert key_status(issuer)["keys"] == 1


def key_status(issuer: OidcIssuer) -> Mapping[str, object]:
    return jwks.default_cache().status()[issuer.jwks_uri]


@pytest.mark.parametrize(("outage", "reason"), [("503", "HTTP 503"), ("refused", "cannot connect")])
async def test_keys_never_fetched_and_unavailable_give_a_clear_error(
    tmp_path: Path, issuer: OidcIssuer, clock: Clock, outage: str, reason: str
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    if outage == "503":
        issuer.fail(503)
    else:
        await issuer.refuse()
    token = issuer.token()
    result = await auth.authenticate(WEB, bearer(token), "")
    assert_refused(result, "signing keys are unavailable", token)
    assert reason in (result.error or "")
    # Every request does not hammer the issuer: the next attempt waits for the refetch interval.
    assert_refused(await auth.authenticate(WEB, bearer(token), ""), reason)
    issuer.recover()
    await issuer.listen()
    clock.advance(31)
    assert (await auth.authenticate(WEB, bearer(token), "")).identity is not None


async def test_a_fetch_slower_than_the_rule_timeout_fails_fast(
    tmp_path: Path, key_cache: jwks.JwksCache
) -> None:
    import asyncio

    from aiohttp import web

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks.json", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        auth = authenticator(
            tmp_path,
            policy(
                {
                    "issuer": "slow",
                    "jwksUri": f"http://127.0.0.1:{port}/jwks.json",
                    "timeout": "50ms",
                }
            ),
        )
        async with OidcIssuer() as other:
            token = other.token(iss="slow")
            started = time.monotonic()
            result = await auth.authenticate(WEB, bearer(token), "")
            assert time.monotonic() - started < 1
            assert_refused(result, "signing keys")
    finally:
        release.set()
        await runner.cleanup()


async def test_key_sets_are_refreshed_in_the_background(tmp_path: Path) -> None:
    import asyncio

    cache = jwks.JwksCache(refresh_interval=0.05, retry_interval=0.05, min_refetch_interval=0)
    previous = jwks.set_default_cache(cache)
    try:
        async with OidcIssuer() as issuer:
            auth = authenticator(tmp_path, policy(rule(issuer)))
            assert (await auth.authenticate(WEB, bearer(issuer.token()), "")).identity
            for _ in range(200):
                if issuer.fetches["jwks"] >= 3:
                    break
                await asyncio.sleep(0.01)
            assert issuer.fetches["jwks"] >= 3
            uri = issuer.jwks_uri
            before = (
                REGISTRY.get_sample_value("mixerhub_jwks_fetch_errors_total", {"uri": uri}) or 0
            )
            issuer.fail(503)
            for _ in range(200):
                now = REGISTRY.get_sample_value("mixerhub_jwks_fetch_errors_total", {"uri": uri})
                if (now or 0) > before:
                    break
                await asyncio.sleep(0.01)
            assert (
                REGISTRY.get_sample_value("mixerhub_jwks_fetch_errors_total", {"uri": uri}) or 0
            ) > before
            assert cache.status()[uri]["lastError"] == "HTTP 503"
            authentication.TOKEN_CACHE.clear()
            assert (await auth.authenticate(WEB, bearer(issuer.token("max")), "")).identity
    finally:
        await cache.close()
        jwks.set_default_cache(previous)
        authentication.TOKEN_CACHE.clear()


async def test_a_reload_keeps_the_key_sets(tmp_path: Path, issuer: OidcIssuer) -> None:
    first = authenticator(tmp_path, policy(rule(issuer)))
    assert (await first.authenticate(WEB, bearer(issuer.token()), "")).identity
    second = authenticator(tmp_path, policy(rule(issuer)), policy(rule(issuer), name="again"))
    assert (await second.authenticate(WEB, bearer(issuer.token("nina")), "")).identity
    assert issuer.fetches["jwks"] == 1


async def test_prefetch_fetches_every_key_set_once(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(
        tmp_path, policy(rule(issuer)), policy({"issuer": issuer.issuer}, name="d")
    )
    await auth.prefetch()
    assert issuer.fetches == {"jwks": 2, "discovery": 1}  # the URI, and discovery's (the same)
    await auth.prefetch()
    assert issuer.fetches == {"jwks": 2, "discovery": 1}


async def test_an_inline_key_set_needs_no_fetch(tmp_path: Path, issuer: OidcIssuer) -> None:
    inline = {
        "issuer": issuer.issuer,
        "jwks": json.dumps(issuer.jwks()),
        "jwksUri": "http://127.0.0.1:1/x",
    }
    auth = authenticator(tmp_path, policy(inline))
    assert (await auth.authenticate(WEB, bearer(issuer.token()), "")).identity
    assert issuer.fetches == {}


async def test_hmac_is_accepted_only_with_an_inline_oct_key(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    secret = jwk.OctKey.generate_key(256, parameters={"kid": "shared"})
    claims = {"iss": issuer.issuer, "sub": "olga", "exp": int(time.time()) + 600}
    token = jose_jwt.encode({"alg": "HS256", "kid": "shared"}, claims, secret, algorithms=["HS256"])
    inline = {"issuer": issuer.issuer, "jwks": json.dumps({"keys": [secret.as_dict(private=True)]})}
    auth = authenticator(tmp_path, policy(inline))
    result = await auth.authenticate(WEB, bearer(token), "")
    assert result.identity is not None
    assert result.identity.principal.endswith("/olga")
    # The same secret published at a jwksUri is ignored: a remote key set has no shared secrets.
    issuer.extra_jwks.append(secret.as_dict(private=True))
    remote = authenticator(tmp_path / "remote", policy(rule(issuer)))
    assert_refused(await remote.authenticate(WEB, bearer(token), ""), "key id", token)


# --- which policies apply --------------------------------------------------------------------


async def test_selectors_and_the_root_namespace_scope_policies(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    async with OidcIssuer() as mesh:
        auth = authenticator(
            tmp_path,
            policy(rule(issuer), selector={"app": "web"}),
            policy(rule(mesh), name="mesh", namespace=ROOT_NAMESPACE),
        )
        for workload in (WEB, DB, ELSEWHERE):
            assert auth.applies(workload)
        web_token, mesh_token = issuer.token(), mesh.token()
        assert (await auth.authenticate(WEB, bearer(web_token), "")).identity
        assert (await auth.authenticate(WEB, bearer(mesh_token), "")).identity
        assert_refused(await auth.authenticate(DB, bearer(web_token), ""), "issuer")
        assert (await auth.authenticate(DB, bearer(mesh_token), "")).identity
        assert_refused(await auth.authenticate(ELSEWHERE, bearer(web_token), ""), "issuer")

    local = authenticator(tmp_path / "local", policy(rule(issuer), selector={"app": "web"}))
    assert local.applies(WEB)
    assert not local.applies(DB)
    assert not local.applies(ELSEWHERE)
    assert await local.authenticate(DB, bearer("anything"), "") == AuthnResult(None, None, (), ())
    root_selected = authenticator(
        tmp_path / "root", policy(rule(issuer), namespace=ROOT_NAMESPACE, selector={"app": "web"})
    )
    assert root_selected.applies(WEB)
    assert root_selected.applies(ELSEWHERE)
    assert not root_selected.applies(DB)


async def test_no_policy_means_nothing_to_do(tmp_path: Path) -> None:
    snapshot = compile_docs(tmp_path, policy(name="empty"))
    assert snapshot.authenticator.referenced
    assert not snapshot.authenticator.applies(WEB)
    (tmp_path / "none").mkdir()
    nothing = compile_snapshot(documents.read([tmp_path / "none"]), ADAPTERS, build_handlers=False)
    assert not nothing.authenticator.referenced
    assert not nothing.authenticator.applies(WEB)


async def test_rules_of_several_issuers_share_the_default_locations(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    async with OidcIssuer() as second, OidcIssuer() as third:
        auth = authenticator(tmp_path, policy(rule(issuer), rule(second)))
        for source in (issuer, second):
            result = await auth.authenticate(WEB, bearer(source.token("pat")), "")
            assert result.identity is not None
            assert result.identity.principal == f"{source.issuer}/pat"
        foreign = third.token()
        assert_refused(await auth.authenticate(WEB, bearer(foreign), ""), "issuer is not accepted")
        # The issuer's own failure wins over the other rule's "not my issuer".
        expired = second.token(exp_in=-600)
        assert_refused(await auth.authenticate(WEB, bearer(expired), ""), "expired")


async def test_every_token_a_rule_finds_must_be_valid(tmp_path: Path, issuer: OidcIssuer) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    good = issuer.token()
    result = await auth.authenticate(WEB, bearer(good), "access_token=forged.token.here")
    assert_refused(result, "malformed")
    both_good = await auth.authenticate(WEB, bearer(good), f"access_token={issuer.token('q')}")
    assert both_good.identity is not None


async def test_one_rule_succeeding_is_enough_as_in_istio(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    """Istio's requirement is any(rule) or all(rule or missing): a valid token for one rule
    passes even when another rule's own location holds a bad one."""
    async with OidcIssuer() as partner:
        own = rule(partner, fromHeaders=[{"name": "x-partner-jwt"}])
        auth = authenticator(tmp_path, policy(rule(issuer), own))
        headers = {**bearer(issuer.token("ray")), "x-partner-jwt": "garbage"}
        result = await auth.authenticate(WEB, headers, "")
        assert result.identity is not None
        assert result.identity.principal.endswith("/ray")
        assert_refused(await auth.authenticate(WEB, {"x-partner-jwt": "garbage"}, ""), "malformed")


# --- the verified-token cache ----------------------------------------------------------------


async def test_a_repeated_token_costs_no_signature_check(
    tmp_path: Path, issuer: OidcIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = jwt_module._verify_signature

    def counting(*args: Any) -> bool:
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(jwt_module, "_verify_signature", counting)
    auth = authenticator(tmp_path, policy(rule(issuer)))
    token = issuer.token("sam")
    first = await auth.authenticate(WEB, bearer(token), "")
    assert first.identity is not None
    assert calls == ["RS256"]
    for _ in range(3):
        again = await auth.authenticate(WEB, bearer(token), "")
        assert again == first
    assert calls == ["RS256"]
    # A reload with the same rule keeps the verified tokens; another token is checked.
    reloaded = authenticator(tmp_path, policy(rule(issuer)))
    assert (await reloaded.authenticate(WEB, bearer(token), "")).identity == first.identity
    assert calls == ["RS256"]
    assert (await reloaded.authenticate(WEB, bearer(issuer.token("tom")), "")).identity
    assert calls == ["RS256", "RS256"]
    # A rule with other audiences is another scope: verified on its own terms.
    other = authenticator(tmp_path, policy(rule(issuer, audiences=["x"])))
    assert_refused(await other.authenticate(WEB, bearer(token), ""), "audiences")


def test_the_token_cache_expires_entries_and_stays_bounded() -> None:
    now = [100.0]
    cache: TokenCache[str] = TokenCache(max_entries=2, max_ttl=300, clock=lambda: now[0])
    cache.put("rule", "t1", 1, expires=100.0 + 10, value="one")  # good until exp + 60 s skew
    cache.put("rule", "t2", 1, expires=None, value="two")  # no exp: the 300 s cap
    assert cache.get("rule", "t1", 1) == "one"
    assert cache.get("rule", "t1", 2) is None  # the key set changed since
    cache.put("rule", "t1", 1, expires=110.0, value="one")
    now[0] = 171.0
    assert cache.get("rule", "t1", 1) is None
    assert cache.get("rule", "t2", 1) == "two"
    now[0] = 401.0
    assert cache.get("rule", "t2", 1) is None
    for i in range(5):
        cache.put("rule", f"n{i}", 1, expires=None, value=str(i))
    assert len(cache) == 2
    assert cache.get("rule", "n4", 1) == "4"
    assert cache.get("rule", "n0", 1) is None
    cache.put("rule", "old", 1, expires=now[0] - 3600, value="x")  # already expired: not kept
    assert cache.get("rule", "old", 1) is None


# --- configuration errors --------------------------------------------------------------------

CONFIG_ERRORS: list[tuple[dict[str, Any], str]] = [
    (
        {"issuer": "a", "jwks": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'},
        "spec.jwtRules[0].jwks: invalid JWKS: keys[0]: cannot load the oct key",
    ),
    (
        {"issuer": "a", "jwks": '{"keys": [{"kty": "oct", "k": "MDEyMzQ1Njc4OWFiY2RlZg"}]}'},
        "keys[0]: an HMAC key (kty oct) must have at least 256 bits",
    ),
    ({"jwksUri": "http://idp/jwks"}, "spec.jwtRules[0].issuer: required field is missing"),
    ({"issuer": "", "jwksUri": "http://idp/k"}, "spec.jwtRules[0].issuer: must not be empty"),
    (
        {"issuer": "a", "jwksUri": "ftp://idp/jwks"},
        "spec.jwtRules[0].jwksUri: must be an http or https URL",
    ),
    ({"issuer": "a", "jwksUri": "http:///jwks"}, "spec.jwtRules[0].jwksUri: must name a host"),
    (
        {"issuer": "a@example.com"},
        "spec.jwtRules[0].jwksUri: required (or jwks) when the issuer is not",
    ),
    ({"issuer": "a", "jwks": "{not json"}, "spec.jwtRules[0].jwks: invalid JWKS: not valid JSON"),
    (
        {"issuer": "a", "jwks": '{"keys": []}'},
        "spec.jwtRules[0].jwks: invalid JWKS: no usable signing key",
    ),
    (
        {"issuer": "a", "jwks": '{"keys": [{"kty": "RSA", "n": "AQAB"}]}'},
        "spec.jwtRules[0].jwks: invalid JWKS: keys[0]: cannot load",
    ),
    (
        {
            "issuer": "a",
            "jwks": '{"keys": [{"kty": "EC", "crv": "P-256", "x": "1", "y": "2", "use": "enc"}]}',
        },
        "keys[0]: key use 'enc' is not for signatures",
    ),
    (
        {"issuer": "a", "jwks": "[1]"},
        'spec.jwtRules[0].jwks: invalid JWKS: a JWKS is a JSON object with a "keys" list',
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "audiences": ["ok", ""]},
        "spec.jwtRules[0].audiences[1]: must not be empty",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "fromHeaders": [{"name": "bad header"}]},
        "spec.jwtRules[0].fromHeaders[0].name: 'bad header' is not a valid HTTP header name",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "fromHeaders": [{"prefix": "Bearer "}]},
        "spec.jwtRules[0].fromHeaders[0].name: required field is missing",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "fromParams": [""]},
        "spec.jwtRules[0].fromParams[0]: must not be empty",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "fromCookies": [""]},
        "spec.jwtRules[0].fromCookies[0]: must not be empty",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "outputPayloadToHeader": "x:y"},
        "spec.jwtRules[0].outputPayloadToHeader: 'x:y' is not a valid HTTP header name",
    ),
    (
        {
            "issuer": "a",
            "jwksUri": "http://i/k",
            "outputClaimToHeaders": [
                {"header": "x-a", "claim": "a"},
                {"header": "X-A", "claim": "b"},
            ],
        },
        "spec.jwtRules[0].outputClaimToHeaders[1].header:"
        " header 'x-a' is already written by outputClaimToHeaders[0]",
    ),
    (
        {
            "issuer": "a",
            "jwksUri": "http://i/k",
            "outputClaimToHeaders": [{"header": "x-a", "claim": "a..b"}],
        },
        "spec.jwtRules[0].outputClaimToHeaders[0].claim: must be a claim name",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "timeout": "soon"},
        "spec.jwtRules[0].timeout: invalid duration 'soon'",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "timeout": "0s"},
        "spec.jwtRules[0].timeout: must be more than 0s",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "forwardOriginalToken": "perhaps"},
        "spec.jwtRules[0].forwardOriginalToken: Input should be a valid boolean",
    ),
    (
        {"issuer": "a", "jwksUri": "http://i/k", "jwksURI": "x"},
        "spec.jwtRules[0].jwksURI: unknown field",
    ),
]


@pytest.mark.parametrize(("bad_rule", "expected"), CONFIG_ERRORS)
def test_rule_errors_have_field_paths(
    tmp_path: Path, bad_rule: dict[str, Any], expected: str, key_cache: jwks.JwksCache
) -> None:
    errors = errors_of(tmp_path, policy(bad_rule))
    assert any(expected in e for e in errors), errors
    assert all(
        e.startswith(f"{tmp_path / 'policies.yaml'}: document 1 (RequestAuthentication/jwt): ")
        for e in errors
    )


def test_policy_level_errors(tmp_path: Path, key_cache: jwks.JwksCache) -> None:
    duplicate = policy(
        {"issuer": "a", "jwksUri": "http://i/k"}, {"issuer": "a", "jwksUri": "ftp://j"}
    )
    targeted = policy({"issuer": "b", "jwksUri": "http://i/k"}, name="gw")
    targeted["spec"]["targetRef"] = {"kind": "Gateway", "name": "gw"}
    selector = policy(name="sel")
    selector["spec"]["selector"] = {"matchLabels": {"app": 1}}
    old = policy(name="old", version="v1alpha1")
    twice = [policy(name="same"), policy(name="same")]
    errors = errors_of(tmp_path, duplicate, targeted, selector, old, *twice)
    assert any(
        "spec.jwtRules[1].issuer: issuer 'a' is already in jwtRules[0]" in e for e in errors
    ), errors
    assert any("spec.jwtRules[1].jwksUri: must be an http or https URL" in e for e in errors)
    assert any("(RequestAuthentication/gw): spec.targetRef: not supported" in e for e in errors), (
        errors
    )
    assert any(
        "(RequestAuthentication/sel): spec.selector.matchLabels.app: Input should be a valid string"
        in e
        for e in errors
    ), errors
    assert any(
        "apiVersion: unsupported version 'v1alpha1' of RequestAuthentication" in e for e in errors
    ), errors
    assert any("metadata.name: duplicate requestauthentication 'same'" in e for e in errors), errors


def test_v1beta1_and_snake_case_fields_are_accepted(
    tmp_path: Path, key_cache: jwks.JwksCache
) -> None:
    beta = policy(
        {"issuer": "a", "jwks_uri": "https://idp.example/keys", "forward_original_token": True},
        version="v1beta1",
    )
    snapshot = compile_docs(tmp_path, beta)
    (compiled,) = snapshot.authenticator.policies
    assert compiled.rules[0].forward
    assert compiled.rules[0].issuer == "a"


def test_the_hot_path_reads_no_configuration(tmp_path: Path, key_cache: jwks.JwksCache) -> None:
    """Everything from the spec is compiled: locations, lower-cased headers, sanitized audiences."""
    spec = {
        "issuer": "https://idp.example",
        "audiences": ["https://shop.example/"],
        "fromHeaders": [{"name": "X-Token", "prefix": "JWT "}],
        "outputClaimToHeaders": [{"header": "X-Sub", "claim": "a.b"}],
        "timeout": "1.5s",
    }
    (compiled,) = compile_docs(tmp_path, policy(spec)).authenticator.policies
    (r,) = compiled.rules
    assert [(loc.kind, loc.name, loc.prefix) for loc in r.locations] == [
        ("header", "x-token", "JWT ")
    ]
    assert r.claim_headers == (("x-sub", ("a", "b")),)
    assert r.verifier.audiences == frozenset({"shop.example"})
    assert r.verifier.timeout == 1.5
    assert isinstance(r.verifier.keys, jwks.RemoteKeys)
    assert r.verifier.keys.discovery
    assert r.verifier.keys.url == "https://idp.example/.well-known/openid-configuration"


async def test_a_remembered_result_ends_with_its_tokens_cache_entry(
    tmp_path: Path, issuer: OidcIssuer, clock: Clock
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    auth.cache = TokenCache(max_ttl=60, clock=clock)  # an entry is good for 60 s of this clock
    token = issuer.token("alice", ["shop"])
    first = await auth.authenticate(WEB, bearer(token), "")
    assert first.identity is not None
    clock.advance(59)
    assert await auth.authenticate(WEB, bearer(token), "") is first
    clock.advance(1)  # the entry is no longer good: verified afresh, and remembered again
    again = await auth.authenticate(WEB, bearer(token), "")
    assert again is not first
    assert again.identity == first.identity
    assert await auth.authenticate(WEB, bearer(token), "") is again


async def test_a_repeated_request_gets_its_result_again_while_the_token_is_good(
    tmp_path: Path, issuer: OidcIssuer
) -> None:
    auth = authenticator(tmp_path, policy(rule(issuer)))
    token = issuer.token("alice", ["shop"])
    first = await auth.authenticate(WEB, bearer(token), "")
    assert first.identity is not None
    # Same token in the same place: the very result, with no extraction or verification.
    assert await auth.authenticate(WEB, bearer(token), "") is first
    other = await auth.authenticate(WEB, bearer(issuer.token("bob", ["shop"])), "")
    assert other.identity is not None
    assert other.identity.principal.endswith("/bob")
    # Once the token cache no longer vouches for the token (expired, or its keys changed), the
    # result is made afresh rather than served from memory.
    authentication.TOKEN_CACHE.clear()
    again = await auth.authenticate(WEB, bearer(token), "")
    assert again is not first
    assert again.identity == first.identity
