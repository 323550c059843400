"""AuthorizationPolicy and Mixer check rules with a real Envoy: what each configuration lets
through, told by the status codes the client gets.

One hub and Envoy serve the module; each test (each row of the policy table) applies its own
configuration and waits until ``/debug/configz`` shows it active before sending requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from mixerhub.bootstrap import Workload
from tests.harness import ProcessGroup, Response, process_group
from tests.stack import ListProvider, Stack, show_logs_on_failure, start_stack, until

# The labels the bootstrap has Envoy send with every Check; selectors are matched against them.
WORKLOAD = Workload("web", "shop", {"app": "web", "version": "v1"}, service_account="web")
POLICY = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
ANY_POLICY = "AuthorizationPolicy"  # what x-mixerhub-denied-by says when no ALLOW matched


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessGroup, Stack]]:
    root = tmp_path_factory.mktemp("policy-envoy")
    with process_group(root / "logs") as group:
        yield group, start_stack(group, root / "config", {}, WORKLOAD)


@pytest.fixture
def stack(request: pytest.FixtureRequest, _shared: tuple[ProcessGroup, Stack]) -> Stack:
    group, shared = _shared
    show_logs_on_failure(request, group)
    return shared


def policies(*documents: str) -> dict[str, str]:
    return {"policies.yaml": "---\n".join(POLICY + d for d in documents)}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    denied_by: str | None = None  # x-mixerhub-denied-by of a 403, when the row pins it


def get(path: str, status: int, denied_by: str | None = None, **headers: str) -> Request:
    return Request(
        "GET", path, status, {k.replace("_", "-"): v for k, v in headers.items()}, denied_by
    )


@dataclass(frozen=True)
class Row:
    documents: tuple[str, ...]
    requests: tuple[Request, ...]
    logged: str = ""  # a line the hub logs for these requests


POLICY_TABLE: dict[str, Row] = {
    "allow-by-path": Row(
        (
            """metadata: {name: public-only, namespace: shop}
spec:
  rules:
  - to: [{operation: {paths: ["/public/*", "/health"]}}]
""",
        ),
        (
            get("/public/a", 200),
            get("/health", 200),
            get("/health?probe=1", 200),  # paths match without the query
            get("/healthz", 403, ANY_POLICY),
            get("/public", 403, ANY_POLICY),
            get("/private", 403, ANY_POLICY),
        ),
    ),
    "allow-by-method": Row(
        (
            """metadata: {name: read-only, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: ["GET", "HEAD"]}}]
""",
        ),
        (
            get("/items", 200),
            Request("HEAD", "/items", 200),
            Request("POST", "/items", 403, denied_by=ANY_POLICY),
            Request("DELETE", "/items/1", 403, denied_by=ANY_POLICY),
        ),
    ),
    "allow-by-header": Row(
        (
            """metadata: {name: teams, namespace: shop}
spec:
  rules:
  - when: [{key: "request.headers[x-team]", values: ["blue", "green-*"]}]
""",
        ),
        (
            get("/", 200, x_team="blue"),
            get("/", 200, x_team="green-2"),
            get("/", 403, ANY_POLICY, x_team="Blue"),  # values are case-sensitive
            get("/", 403, ANY_POLICY, x_team="red"),
            get("/", 403, ANY_POLICY),
        ),
    ),
    "deny-takes-precedence-over-allow": Row(
        (
            """metadata: {name: api, namespace: shop}
spec:
  rules:
  - to: [{operation: {paths: ["/api/*"]}}]
""",
            """metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/api/admin/*"]}}]
""",
        ),
        (
            get("/api/users", 200),
            get("/api/admin/keys", 403, "AuthorizationPolicy/no-admin.shop"),
            get("/other", 403, ANY_POLICY),
        ),
    ),
    "allow-nothing": Row(
        ("metadata: {name: allow-nothing, namespace: shop}\nspec: {}\n",),
        (
            get("/", 403, ANY_POLICY),
            Request("POST", "/api/orders", 403, denied_by=ANY_POLICY),
        ),
    ),
    "selector-matches-the-workload": Row(
        (
            """metadata: {name: web-v1, namespace: shop}
spec:
  selector: {matchLabels: {app: web, version: v1}}
  rules:
  - to: [{operation: {paths: ["/v1/*"]}}]
""",
        ),
        (get("/v1/page", 200), get("/v2/page", 403, ANY_POLICY)),
    ),
    "selector-does-not-match-the-workload": Row(
        (
            # version v2: one label differs, so the policy is not the workload's.
            """metadata: {name: allow-nothing-v2, namespace: shop}
spec:
  selector: {matchLabels: {app: web, version: v2}}
""",
            """metadata: {name: allow-nothing-db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
""",
        ),
        (get("/", 200), get("/v2/page", 200)),
    ),
    "another-namespace-does-not-apply": Row(
        (
            "metadata: {name: allow-nothing, namespace: other}\nspec: {}\n",
            """metadata: {name: block, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/blocked"]}}]
""",
        ),
        (get("/anything", 200), get("/blocked", 403, "AuthorizationPolicy/block.shop")),
    ),
    "the-root-namespace-is-mesh-wide": Row(
        ("metadata: {name: allow-nothing, namespace: istio-system}\nspec: {}\n",),
        (get("/", 403, ANY_POLICY), get("/public/a", 403, ANY_POLICY)),
    ),
    "when-condition-on-a-header": Row(
        (
            """metadata: {name: admins-only, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
    when: [{key: "request.headers[x-role]", notValues: ["admin"]}]
""",
        ),
        (
            get("/admin/users", 200, x_role="admin"),
            get("/admin/users", 403, "AuthorizationPolicy/admins-only.shop", x_role="user"),
            # A missing header is not "admin": a notValues condition holds, as in Istio.
            get("/admin/users", 403, "AuthorizationPolicy/admins-only.shop"),
            get("/shop", 200, x_role="user"),
        ),
    ),
    "dry-run-is-not-enforced": Row(
        (
            """metadata:
  name: deny-everything
  namespace: shop
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{}]
""",
            """metadata:
  name: allow-nothing
  namespace: shop
  annotations: {istio.io/dry-run: "true"}
spec: {}
""",
        ),
        (get("/", 200), Request("POST", "/api/orders", 200)),
        logged="dry-run DENY deny-everything.shop: matched",
    ),
    "audit-changes-nothing": Row(
        (
            """metadata: {name: audit-all, namespace: shop}
spec:
  action: AUDIT
  rules: [{}]
""",
        ),
        (get("/", 200), Request("DELETE", "/x", 200)),
    ),
}


def send(stack: Stack, request: Request) -> Response:
    return stack.request(request.method, request.path, dict(request.headers))


@pytest.mark.parametrize("row", POLICY_TABLE)
def test_authorization_policy_table(stack: Stack, row: str) -> None:
    case = POLICY_TABLE[row]
    stack.apply(policies(*case.documents))
    for request in case.requests:
        response = send(stack, request)
        assert response.status == request.status, (request, response)
        if request.status == 200:
            if request.method != "HEAD":
                assert response.json()["path"] == request.path  # the upstream answered
            continue
        denied_by = response.headers["x-mixerhub-denied-by"]
        assert denied_by.startswith("AuthorizationPolicy"), (request, response)
        if request.denied_by is not None:
            assert denied_by == request.denied_by, (request, response)
        if request.method != "HEAD":
            assert response.json()["error"].startswith("RBAC: access denied"), response
    if case.logged:
        assert case.logged in stack.hub.log()


# Paths that Istio's default normalization (meshConfig.pathNormalization BASE: Envoy's
# normalize_path) turns into /api/admin/keys before policies are evaluated and before the request
# goes upstream (istio.io/latest/docs/reference/config/security/normalization).
DENIED_ONCE_NORMALIZED = (
    "/api/users/../admin/keys",
    "/api/./admin/keys",
    "/api/users/%2E%2E/admin/keys",
    "/api/%61dmin/keys",
    "/api\\admin\\keys",
)


def test_paths_are_normalized_before_a_policy_decides(stack: Stack) -> None:
    stack.apply(policies(*POLICY_TABLE["deny-takes-precedence-over-allow"].documents))
    assert stack.get("/api/admin/keys").status == 403
    statuses = {path: stack.get(path).status for path in DENIED_ONCE_NORMALIZED}
    assert statuses == dict.fromkeys(DENIED_ONCE_NORMALIZED, 403)
    # Normalized, a path is allowed as what it means, and goes upstream as such.
    allowed = stack.get("/other/../api/users")
    assert allowed.status == 200, allowed
    assert allowed.json()["path"] == "/api/users"


# --- Mixer's check rules -----------------------------------------------------------------------

WHITELIST = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: members, namespace: shop}
spec:
  compiledAdapter: listchecker
  params:
    providerUrl: $URL
    refreshInterval: 1s
    ttl: 60s
    cachingInterval: 1s
    blacklist: false
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: user, namespace: shop}
spec:
  compiledTemplate: listentry
  params:
    value: request.headers["x-user"]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: members-only, namespace: shop}
spec:
  match: request.url_path.startsWith("/members")
  actions: [{handler: members, instances: [user]}]
"""


def test_a_listchecker_whitelist_follows_its_provider(stack: Stack) -> None:
    def member(user: str) -> Response:
        return stack.get("/members/area", {"x-user": user})

    with ListProvider(["alice", "bob"]) as provider:
        try:
            stack.apply({"whitelist.yaml": WHITELIST.replace("$URL", provider.url)})
            until(lambda: provider.requests, lambda n: n > 0)
            assert member("alice").status == 200
            denied = member("carol")
            assert denied.status == 403, denied
            assert denied.headers["x-mixerhub-denied-by"] == (
                "members-only.rule.shop/members.handler.shop"
            )
            assert denied.json()["error"] == "carol is not whitelisted"
            assert stack.get("/elsewhere", {"x-user": "carol"}).status == 200  # no rule matches

            # The provider's list changes; the hub refreshes it every second and its answers
            # are cached for a second at most.
            provider.entries = ["alice", "carol"]
            assert until(lambda: member("carol").status, lambda s: s == 200) == 200
            assert until(lambda: member("bob").status, lambda s: s == 403) == 403
            assert member("alice").status == 200
        finally:
            stack.apply({})  # before the provider goes, so the hub stops fetching from it


QUOTA = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quota, namespace: shop}
spec:
  compiledAdapter: memquota
  params:
    quotas:
    - name: requestcount.instance.shop
      maxAmount: 100
      validDuration: $WINDOW
      overrides:
      - dimensions: {destination: web}
        maxAmount: $N
        validDuration: $WINDOW
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: shop}
spec:
  compiledTemplate: quota
  params:
    dimensions:
      destination: destination.workload.name | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: limit-orders, namespace: shop}
spec:
  match: request.url_path.startsWith("/orders")
  actions: [{handler: quota, instances: [requestcount]}]
"""


def test_a_memquota_quota_lets_n_requests_through_per_window(stack: Stack) -> None:
    n, window = 3, 3.0
    stack.apply({"quota.yaml": QUOTA.replace("$N", str(n)).replace("$WINDOW", f"{window:g}s")})
    started = time.monotonic()
    # Identical requests: a cached decision would let the next one through uncounted.
    statuses = [stack.get("/orders").status for _ in range(n)]
    assert statuses == [200] * n
    over = stack.get("/orders")
    assert over.status == 429, over
    assert over.headers["x-mixerhub-denied-by"] == "limit-orders.rule.shop/quota.handler.shop"
    assert json.loads(over.body)["deniedBy"] == "limit-orders.rule.shop/quota.handler.shop"
    assert stack.request("POST", "/orders/new").status == 429
    assert stack.get("/catalog").status == 200  # not charged: the rule does not match
    assert time.monotonic() - started < window, "too slow to see the quota within its window"
    # A rolling window: once the first requests are older than it, requests pass again.
    assert until(lambda: stack.get("/orders").status, lambda s: s == 200) == 200
    assert time.monotonic() - started >= window - 0.5
