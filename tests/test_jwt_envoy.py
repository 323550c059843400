"""RequestAuthentication with a real Envoy: tokens from a real OIDC issuer process, judged by the
hub's Check, the verified identity and output headers arriving at the echo upstream.

One issuer, hub and Envoy serve the module (each test applies the configuration it needs); the
key rotation and outage test runs its own, with shorter key set refetch intervals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwk

from mixerhub.bootstrap import Workload
from tests.harness import LOOPBACK, ProcessGroup, Response, http_request, process_group
from tests.oidc_issuer import OidcIssuer, b64url
from tests.stack import (
    IssuerProcess,
    Stack,
    jwks_tuned_hub_command,
    show_logs_on_failure,
    start_issuer,
    start_stack,
    until,
)

WORKLOAD = Workload("web", "shop", {"app": "web", "version": "v1"}, service_account="web")
AUDIENCE = "shop"

POLICIES = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules:
  - issuer: $ISSUER
    $KEYS
    audiences: [shop]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {header: x-jwt-sub, claim: sub}
    - {header: x-jwt-aud, claim: aud}
    forwardOriginalToken: $FORWARD
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: shop}
spec:
  rules:
  - from: [{source: {requestPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/api/*"]}}]
  - from: [{source: {requestPrincipals: ["$ISSUER/root"]}}]
    to: [{operation: {paths: ["/admin/*"]}}]
  - to: [{operation: {notPaths: ["/api/*", "/admin/*"]}}]
"""


def policies(
    issuer: IssuerProcess, *, forward: bool = False, jwks_uri: bool = False, extra: str = ""
) -> dict[str, str]:
    """The issuer's rule (keys by OpenID discovery, or by jwksUri) and a policy that wants a
    request principal on /api/*, the principal ``ISSUER/root`` on /admin/*, nothing elsewhere;
    ``extra`` documents after them."""
    keys = f"jwksUri: {issuer.jwks_uri}" if jwks_uri else "# keys by OpenID discovery"
    text = (
        POLICIES.replace("$ISSUER", issuer.url)
        .replace("$KEYS", keys)
        .replace("$FORWARD", "true" if forward else "false")
    )
    return {"security.yaml": text + (f"---\n{extra}" if extra else "")}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def echoed(response: Response) -> dict[str, str]:
    """The request headers as the upstream received them."""
    assert response.status == 200, response
    headers: dict[str, str] = response.json()["headers"]
    return headers


@dataclass(frozen=True)
class Jwt:
    issuer: IssuerProcess
    stack: Stack


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessGroup, Jwt]]:
    root = tmp_path_factory.mktemp("jwt-envoy")
    with process_group(root / "logs") as group:
        issuer = start_issuer(group)
        stack = start_stack(group, root / "config", policies(issuer), WORKLOAD)
        yield group, Jwt(issuer, stack)


@pytest.fixture
def jwt(request: pytest.FixtureRequest, _shared: tuple[ProcessGroup, Jwt]) -> Jwt:
    """The module's issuer and stack, running the module's configuration."""
    group, shared = _shared
    show_logs_on_failure(request, group)
    shared.stack.apply(policies(shared.issuer))
    return shared


# --- valid tokens ------------------------------------------------------------------------------


def test_a_valid_token_reaches_the_upstream_with_the_output_headers(jwt: Jwt) -> None:
    token = jwt.issuer.token("alice", aud=AUDIENCE)
    # A client's own x-jwt-sub is overwritten: only the hub writes output headers.
    headers = echoed(jwt.stack.get("/api/orders", bearer(token) | {"x-jwt-sub": "mallory"}))
    assert headers["x-jwt-sub"] == "alice"
    assert headers["x-jwt-aud"] == AUDIENCE
    payload = json.loads(base64.urlsafe_b64decode(headers["x-jwt-payload"] + "=="))
    assert (payload["iss"], payload["sub"], payload["aud"]) == (jwt.issuer.url, "alice", AUDIENCE)
    assert headers["x-jwt-payload"] == token.split(".")[1]  # the payload segment, as signed
    assert "authorization" not in headers  # forwardOriginalToken: false
    # The same token again is answered from the verified-token cache, with the same outputs.
    again = echoed(jwt.stack.get("/api/orders", bearer(token)))
    assert {k: again[k] for k in ("x-jwt-sub", "x-jwt-aud", "x-jwt-payload")} == {
        k: headers[k] for k in ("x-jwt-sub", "x-jwt-aud", "x-jwt-payload")
    }
    assert "authorization" not in again
    # The keys came by OpenID discovery: the rule names no jwksUri.
    assert jwt.issuer.fetches().get("discovery", 0) >= 1


def test_the_access_token_parameter_is_read_too_and_stays_in_the_path(jwt: Jwt) -> None:
    token = jwt.issuer.token("alice", aud=AUDIENCE)
    response = jwt.stack.get(f"/api/orders?access_token={token}")
    assert echoed(response)["x-jwt-sub"] == "alice"
    assert response.json()["path"] == f"/api/orders?access_token={token}"


def test_forged_output_headers_are_removed_from_requests_without_a_token(jwt: Jwt) -> None:
    forged = {"x-jwt-sub": "root", "x-jwt-payload": b64url({"sub": "root"}), "x-other": "kept"}
    headers = echoed(jwt.stack.get("/open", forged))
    assert "x-jwt-sub" not in headers
    assert "x-jwt-payload" not in headers
    assert headers["x-other"] == "kept"


def test_forward_original_token_keeps_the_authorization_header(jwt: Jwt) -> None:
    jwt.stack.apply(policies(jwt.issuer, forward=True))
    token = jwt.issuer.token("alice", aud=AUDIENCE)
    headers = echoed(jwt.stack.get("/api/orders", bearer(token)))
    assert headers["authorization"] == f"Bearer {token}"
    assert headers["x-jwt-sub"] == "alice"


def test_request_principals_decide_per_path(jwt: Jwt) -> None:
    alice, root = (jwt.issuer.token(sub, aud=AUDIENCE) for sub in ("alice", "root"))
    # No token is no identity, not an error: the policy decides, 403 where it wants a principal.
    denied = jwt.stack.get("/api/orders")
    assert denied.status == 403, denied
    assert denied.headers["x-mixerhub-denied-by"] == "AuthorizationPolicy"
    assert "www-authenticate" not in denied.headers
    assert denied.json()["error"].startswith("RBAC: access denied")
    assert jwt.stack.get("/open").status == 200
    assert jwt.stack.get("/open/deeper", {"x-any": "thing"}).status == 200
    # Any principal for /api/*; only ISSUER/root for /admin/*.
    assert jwt.stack.get("/api/orders", bearer(alice)).status == 200
    assert jwt.stack.get("/admin/users", bearer(alice)).status == 403
    assert echoed(jwt.stack.get("/admin/users", bearer(root)))["x-jwt-sub"] == "root"
    assert jwt.stack.get("/admin/users").status == 403


CLAIM_CONDITION = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-claims, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/claims/*"]}}]
    when: [{key: "request.auth.claims[sub]", notValues: ["root"]}]
"""


def test_a_claim_condition_is_decided_for_each_token(jwt: Jwt) -> None:
    jwt.stack.apply(policies(jwt.issuer, extra=CLAIM_CONDITION))
    alice, root = (jwt.issuer.token(sub, aud=AUDIENCE) for sub in ("alice", "root"))
    # Alternating tokens on one path: a decision cached for one must not answer the other.
    statuses = [
        jwt.stack.get("/claims/report", bearer(token) if token else None).status
        for token in (alice, root, alice, root, None, root)
    ]
    assert statuses == [403, 200, 403, 200, 403, 200]
    denied = jwt.stack.get("/claims/report", bearer(alice))
    assert denied.headers["x-mixerhub-denied-by"] == "AuthorizationPolicy/root-claims.shop"


# --- bad tokens --------------------------------------------------------------------------------


def _alg_none(issuer: IssuerProcess) -> str:
    claims = {"iss": issuer.url, "sub": "root", "aud": AUDIENCE, "exp": int(time.time()) + 600}
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims)}."


def _foreign_key(issuer: IssuerProcess) -> str:
    """The right issuer and kid, signed by a key the issuer never published."""
    impostor = OidcIssuer(port=issuer.port)
    assert impostor.issuer == issuer.url
    return impostor.token("root", aud=AUDIENCE)


def _wrong_issuer(issuer: IssuerProcess) -> str:
    return OidcIssuer(port=issuer.port).token("root", aud=AUDIENCE, iss="https://evil.example")


def _hmac_with_the_public_key(issuer: IssuerProcess) -> str:
    """Algorithm confusion: HS256 with the issuer's published RSA key as the shared secret."""
    published = http_request(LOOPBACK, issuer.port, "GET", "/jwks.json").json()["keys"][0]
    public = jwk.RSAKey.import_key(published).get_op_key("verify")
    secret = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": issuer.url, "sub": "root", "aud": AUDIENCE, "exp": int(time.time()) + 600}
    signing_input = f"{b64url({'alg': 'HS256', 'kid': published['kid']})}.{b64url(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


BAD_TOKENS: dict[str, tuple[Callable[[IssuerProcess], str], str]] = {
    # Beyond the 60 s of clock skew allowed.
    "expired": (lambda i: i.token("alice", aud=AUDIENCE, exp_in=-3600), "token has expired"),
    "wrong-issuer": (_wrong_issuer, "token issuer is not accepted"),
    "wrong-audience": (lambda i: i.token("alice", aud="bank"), "token audiences are not allowed"),
    "garbage": (
        lambda i: "garbage",
        "malformed token: a JWT has three dot-separated parts",
    ),
    "alg-none": (_alg_none, "unsigned tokens (alg none) are not accepted"),
    "foreign-key": (_foreign_key, "signature verification failed"),
    "hmac-with-the-public-key": (
        _hmac_with_the_public_key,
        "the token's algorithm does not match its signing key",
    ),
}


@pytest.mark.parametrize("case", BAD_TOKENS)
@pytest.mark.parametrize("path", ["/api/orders", "/open"])
def test_a_bad_token_gets_401_with_a_bearer_challenge(jwt: Jwt, case: str, path: str) -> None:
    make, reason = BAD_TOKENS[case]
    token = make(jwt.issuer)
    response = jwt.stack.get(path, bearer(token))
    assert response.status == 401, response
    assert response.headers["www-authenticate"] == (
        f'Bearer error="invalid_token", error_description="{reason}"'
    )
    assert response.headers["x-mixerhub-denied-by"] == "RequestAuthentication"
    assert response.json() == {
        "error": f"Jwt verification fails: {reason}",
        "deniedBy": "RequestAuthentication",
    }
    assert token not in response.body.decode()


# --- keys that change ---------------------------------------------------------------------------


def test_rotated_keys_are_fetched_for_an_unknown_kid_and_kept_while_the_issuer_is_down(
    processes: ProcessGroup, tmp_path: Path
) -> None:
    """The hub refetches a key set at most every 30 s for an unknown kid and retries a failed
    fetch after 60 s; this hub (the same CLI) waits 0.5 s and never retries on its own, so the
    test sees exactly the fetches its tokens cause."""
    issuer = start_issuer(processes)
    stack = start_stack(
        processes,
        tmp_path / "config",
        policies(issuer, jwks_uri=True),
        WORKLOAD,
        hub_command=jwks_tuned_hub_command(min_refetch_interval=0.5, retry_interval=3600),
    )

    def status(token: str) -> Response:
        return stack.get("/api/orders", bearer(token))

    first = issuer.token("alice", aud=AUDIENCE)
    assert status(first).status == 200

    # Rotation: a token signed with the new key names a kid the hub does not hold yet.
    fetched = issuer.fetches()["jwks"]
    assert issuer.rotate() == "key-2"
    rotated = issuer.token("bob", aud=AUDIENCE)
    response = until(lambda: status(rotated), lambda r: r.status == 200)
    assert response.status == 200, response
    assert issuer.fetches()["jwks"] > fetched
    assert status(first).status == 200  # the old key is still published

    # Outage: the key set endpoint answers 503, and meanwhile the issuer rotates again.
    unseen = issuer.token("carol", aud=AUDIENCE)  # signed with key-2, never presented yet
    issuer.fail(503)
    assert issuer.rotate() == "key-3"
    during = issuer.token("dave", aud=AUDIENCE)
    fetched = issuer.fetches()["jwks"]
    response = until(lambda: status(during), lambda r: issuer.fetches()["jwks"] > fetched)
    assert issuer.fetches()["jwks"] > fetched, "the hub never tried to fetch during the outage"
    assert response.status == 401, response
    assert "no signing key has the token's key id" in response.headers["www-authenticate"]
    assert f"fetching {issuer.jwks_uri} failed: HTTP 503; keeping the keys held" in stack.hub.log()
    # The keys held still verify tokens, including one never verified before.
    assert status(unseen).status == 200
    assert status(first).status == 200

    # Recovery: the next fetch succeeds and the key rotated during the outage verifies.
    issuer.recover()
    response = until(lambda: status(during), lambda r: r.status == 200)
    assert echoed(response)["x-jwt-sub"] == "dave"
    metrics = stack.hub.get("/metrics").body.decode()
    assert f'mixerhub_jwks_fetch_errors_total{{uri="{issuer.jwks_uri}"}}' in metrics
