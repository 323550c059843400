"""Istio's AuthorizationPolicy, case by case as the Istio docs tell it.

Each case is a policy set (short YAML: ``name``, optional ``namespace`` and ``annotations``, the
rest is the spec), a request (the attributes the check service puts in the bag) and the decision.
Cases are grouped by the section of istio.io's AuthorizationPolicy reference or security concepts
they illustrate; the config errors at the end go through compile_snapshot as a user's files do.
"""

from __future__ import annotations

import functools
import ipaddress
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from mixerhub import registry
from mixerhub.security import ROOT_NAMESPACE
from mixerhub.security.authorization import AuthzDecision, PolicySet
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.workload import WorkloadIdentity

REGISTRY = registry.default_registry()

HTTPBIN = WorkloadIdentity("httpbin", "foo", {"app": "httpbin", "version": "v1"})
HTTPBIN_V2 = WorkloadIdentity("httpbin-v2", "foo", {"app": "httpbin", "version": "v2"})
PRODUCTPAGE = WorkloadIdentity("productpage", "foo", {"app": "productpage"})
RATINGS_BAR = WorkloadIdentity("ratings", "bar", {"app": "ratings", "version": "v1"})
GATEWAY = WorkloadIdentity("ingress", ROOT_NAMESPACE, {"app": "istio-ingressgateway"})

SLEEP = "cluster.local/ns/default/sa/sleep"
SLEEP_FOO = "cluster.local/ns/foo/sa/sleep"
DEV = "cluster.local/ns/dev/sa/builder"
TEST_NS = "cluster.local/ns/test/sa/runner"
GOOGLE = {"iss": "https://accounts.google.com", "sub": "user-1", "aud": ["web", "mobile"]}
EXAMPLE_JWT = {"iss": "example.com", "sub": "sub-1"}


# --- building policy sets and requests -----------------------------------------------------


def to_documents(text: str) -> str:
    """The short form of a case's policies as full Kubernetes-style YAML documents."""
    items = yaml.safe_load(textwrap.dedent(text)) or []
    docs = []
    for item in items:
        spec = dict(item)
        metadata = {"name": spec.pop("name"), "namespace": spec.pop("namespace", "foo")}
        if "annotations" in spec:
            metadata["annotations"] = spec.pop("annotations")
        api_version = spec.pop("apiVersion", "security.istio.io/v1")
        docs.append(
            {
                "apiVersion": api_version,
                "kind": "AuthorizationPolicy",
                "metadata": metadata,
                "spec": spec,
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def compile_text(text: str) -> Any:
    docs, errors = documents.parse("policies.yaml", text)
    source = documents.Source(tuple(docs), tuple(errors), ("policies.yaml",), "test")
    return compile_snapshot(source, REGISTRY, build_handlers=False, base_attributes={})


@functools.cache
def policy_set(text: str) -> PolicySet:
    authorization: PolicySet = compile_text(to_documents(text)).authorization
    return authorization


def errors_of(text: str) -> list[str]:
    with pytest.raises(Rejected) as e:
        compile_text(to_documents(text))
    return [f"{err.path}: {err.reason}" for err in e.value.errors]


def request(
    *,
    principal: str | None = None,
    ip: str | None = "10.1.2.3",
    remote: str | None = None,
    host: str | None = "httpbin.foo",
    method: str | None = "GET",
    path: str | None = "/",
    port: int | None = 8000,
    dest_ip: str | None = "10.0.0.9",
    headers: Mapping[str, str] | None = None,
    jwt: Mapping[str, Any] | None = None,
    sni: str | None = None,
    protocol: str | None = None,
) -> dict[str, object]:
    """Attributes as the check service derives them: the namespace from the peer principal,
    the request principal, audiences and presenter from the JWT payload."""
    bag: dict[str, object] = {}
    if principal is not None:
        bag["source.principal"] = principal
        parts = principal.split("/")
        if "ns" in parts[:-1]:
            bag["source.namespace"] = parts[parts.index("ns") + 1]
    if ip is not None:
        bag["source.ip"] = ipaddress.ip_address(ip)
    if (remote or ip) is not None:
        bag["remote.ip"] = ipaddress.ip_address(remote or ip or "")
    if dest_ip is not None:
        bag["destination.ip"] = ipaddress.ip_address(dest_ip)
    for name, value in (
        ("request.host", host),
        ("request.method", method),
        ("request.url_path", path),
        ("destination.port", port),
        ("connection.requested_server_name", sni),
        ("context.protocol", protocol),
    ):
        if value is not None:
            bag[name] = value
    bag["request.headers"] = {k.lower(): v for k, v in (headers or {}).items()}
    if jwt is not None:
        bag["request.auth.claims"] = dict(jwt)
        if "iss" in jwt and "sub" in jwt:
            bag["request.auth.principal"] = f"{jwt['iss']}/{jwt['sub']}"
        if "aud" in jwt:
            bag["request.auth.audiences"] = jwt["aud"]
        if "azp" in jwt:
            bag["request.auth.presenter"] = jwt["azp"]
    return bag


@dataclass(frozen=True)
class Expect:
    allowed: bool
    by: str = ""  # the policy that decided ("" for a default decision)
    custom: tuple[str, ...] = ()
    audit: tuple[str, ...] = ()
    dry_run: tuple[tuple[str, str, bool], ...] = ()
    reason: str = ""  # a part of the reason, when the case is about it
    workload: WorkloadIdentity = field(default=HTTPBIN)


def case(
    name: str,
    policies: str,
    bag: Mapping[str, object],
    allowed: bool,
    by: str = "",
    **more: Any,
) -> Any:
    return pytest.param(policies, bag, Expect(allowed, by, **more), id=name)


def check(policies: str, bag: Mapping[str, object], expect: Expect) -> AuthzDecision:
    decision = policy_set(policies).evaluate(expect.workload, bag)
    assert decision.allowed is expect.allowed, decision
    assert decision.policy == expect.by, decision
    if expect.by:
        assert decision.action in ("ALLOW", "DENY"), decision
        assert expect.by in decision.reason
    assert decision.custom == expect.custom, decision
    assert decision.audit == expect.audit, decision
    assert decision.dry_run == expect.dry_run, decision
    assert expect.reason in decision.reason, decision
    return decision


GET = request()
POST = request(method="POST")


# --- Policy scope and the default: allow-nothing, allow-all, deny-all ----------------------

ALLOW_NOTHING = """
- name: allow-nothing
"""
ALLOW_NOTHING_HTTPBIN = """
- name: allow-nothing
  selector: {matchLabels: {app: httpbin}}
"""
ALLOW_ALL = """
- name: allow-all
  rules: [{}]
"""
DENY_ALL = """
- name: deny-all
  action: DENY
  rules: [{}]
"""

SCOPE = [
    case("no policy: allowed", "[]", GET, True, reason="no authorization policy applies"),
    case(
        "a policy of another namespace does not apply",
        "- {name: allow-nothing, namespace: bar}",
        GET,
        True,
        reason="no authorization policy applies",
    ),
    case("allow-nothing denies everything", ALLOW_NOTHING, GET, False, reason="no ALLOW policy"),
    case("allow-nothing denies mTLS traffic too", ALLOW_NOTHING, request(principal=SLEEP), False),
    case("allow-nothing with rules: [] too", "- {name: none, rules: []}", GET, False),
    case(
        "allow-nothing by selector: selected workload denied",
        ALLOW_NOTHING_HTTPBIN,
        GET,
        False,
    ),
    case(
        "allow-nothing by selector: other workloads untouched",
        ALLOW_NOTHING_HTTPBIN,
        GET,
        True,
        workload=PRODUCTPAGE,
        reason="no authorization policy applies",
    ),
    case("allow-all: rules [{}] allows every request", ALLOW_ALL, POST, True, "allow-all.foo"),
    case(
        "allow-all beside allow-nothing: any ALLOW match allows",
        ALLOW_NOTHING + ALLOW_ALL,
        GET,
        True,
        "allow-all.foo",
    ),
    case("deny-all: rules [{}] denies every request", DENY_ALL, GET, False, "deny-all.foo"),
    case("deny-all wins over allow-all", ALLOW_ALL + DENY_ALL, GET, False, "deny-all.foo"),
    case(
        "an AUDIT policy alone does not make ALLOW semantics apply",
        "- {name: audit-all, action: AUDIT, rules: [{}]}",
        GET,
        True,
        audit=("audit-all.foo",),
        reason="no ALLOW policy applies",
    ),
    case(
        "an AUDIT policy without rules never matches",
        "- {name: audit-none, action: AUDIT}",
        GET,
        True,
    ),
    case(
        "v1beta1 is read as v1",
        "- {name: allow-all, apiVersion: security.istio.io/v1beta1, rules: [{}]}",
        GET,
        True,
        "allow-all.foo",
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), SCOPE)
def test_scope_and_defaults(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- The reference's first example, rule by rule -------------------------------------------

HTTPBIN_EXAMPLE = """
- name: httpbin
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    - source: {namespaces: ["test"]}
    to:
    - operation: {methods: ["GET"], paths: ["/info*"]}
    - operation: {methods: ["POST"], paths: ["/data"]}
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"""

RULES = [
    case(
        "GET /info/x from sleep with a Google JWT",
        HTTPBIN_EXAMPLE,
        request(principal=SLEEP, path="/info/x", jwt=GOOGLE),
        True,
        "httpbin.foo",
    ),
    case(
        "POST /data from namespace test with a Google JWT",
        HTTPBIN_EXAMPLE,
        request(principal=TEST_NS, method="POST", path="/data", jwt=GOOGLE),
        True,
        "httpbin.foo",
    ),
    case(
        "the prefix /info* matches /info itself",
        HTTPBIN_EXAMPLE,
        request(principal=SLEEP, path="/info", jwt=GOOGLE),
        True,
        "httpbin.foo",
    ),
    case(
        "operations are ANDed inside: POST /info is neither operation",
        HTTPBIN_EXAMPLE,
        request(principal=SLEEP, method="POST", path="/info", jwt=GOOGLE),
        False,
    ),
    case(
        "no source matches: namespace dev",
        HTTPBIN_EXAMPLE,
        request(principal=DEV, path="/info", jwt=GOOGLE),
        False,
    ),
    case(
        "the when condition fails without a JWT",
        HTTPBIN_EXAMPLE,
        request(principal=SLEEP, path="/info"),
        False,
    ),
    case(
        "the when condition fails for another issuer",
        HTTPBIN_EXAMPLE,
        request(principal=SLEEP, path="/info", jwt=EXAMPLE_JWT),
        False,
    ),
    case(
        "a plaintext request has no principal and no namespace",
        HTTPBIN_EXAMPLE,
        request(path="/info", jwt=GOOGLE),
        False,
    ),
    case(
        "a rule with only to: any source",
        "- {name: r, rules: [{to: [{operation: {methods: [GET]}}]}]}",
        request(),
        True,
        "r.foo",
    ),
    case(
        "a rule with only when: every condition must hold",
        """
        - name: r
          rules:
          - when:
            - {key: "request.headers[x-a]", values: ["1"]}
            - {key: "request.headers[x-b]", values: ["2"]}
        """,
        request(headers={"x-a": "1"}),
        False,
    ),
    case(
        "rules are ORed: the second rule matches",
        """
        - name: r
          rules:
          - to: [{operation: {methods: [POST]}}]
          - to: [{operation: {paths: ["/"]}}]
        """,
        GET,
        True,
        "r.foo",
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), RULES)
def test_rules_sources_operations_conditions(
    policies: str, bag: Mapping[str, object], expect: Expect
) -> None:
    check(policies, bag, expect)


# --- Source: principals, requestPrincipals, namespaces, serviceAccounts --------------------


def allow_from(**source: Any) -> str:
    return yaml.safe_dump([{"name": "allow", "rules": [{"from": [{"source": source}]}]}])


def deny_from(**source: Any) -> str:
    return yaml.safe_dump(
        [{"name": "deny", "action": "DENY", "rules": [{"from": [{"source": source}]}]}]
    )


IDENTITIES = [
    case(
        "principals: exact",
        allow_from(principals=[SLEEP]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case("principals: another", allow_from(principals=[SLEEP]), request(principal=DEV), False),
    case(
        "principals: prefix",
        allow_from(principals=["cluster.local/ns/default/*"]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "principals: suffix",
        allow_from(principals=["*/sa/sleep"]),
        request(principal=SLEEP_FOO),
        True,
        "allow.foo",
    ),
    case(
        "principals: * needs mTLS (allowed)",
        allow_from(principals=["*"]),
        request(principal=DEV),
        True,
        "allow.foo",
    ),
    case("principals: * needs mTLS (plaintext denied)", allow_from(principals=["*"]), GET, False),
    case(
        "principals: values are ORed",
        allow_from(principals=[DEV, SLEEP]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "principals: spiffe:// is not part of a principal",
        allow_from(principals=["spiffe://" + SLEEP]),
        request(principal=SLEEP),
        False,
    ),
    case(
        "notPrincipals: another principal passes",
        allow_from(notPrincipals=[DEV]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "notPrincipals: the excluded one fails",
        allow_from(notPrincipals=[DEV]),
        request(principal=DEV),
        False,
    ),
    case(
        "notPrincipals: plaintext has no principal, so it is not excluded",
        allow_from(notPrincipals=[DEV]),
        GET,
        True,
        "allow.foo",
    ),
    case(
        "DENY notPrincipals [*] denies plaintext",
        deny_from(notPrincipals=["*"]),
        GET,
        False,
        "deny.foo",
    ),
    case(
        "DENY notPrincipals [*] lets mTLS through",
        deny_from(notPrincipals=["*"]),
        request(principal=SLEEP),
        True,
    ),
    case(
        "DENY principals [*] does not deny plaintext",
        deny_from(principals=["*"]),
        GET,
        True,
    ),
    case(
        "principals and notPrincipals together",
        allow_from(principals=["cluster.local/ns/default/*"], notPrincipals=[SLEEP]),
        request(principal=SLEEP),
        False,
    ),
    # requestPrincipals: <iss>/<sub>, split at the last '/'
    case(
        "requestPrincipals: exact iss/sub",
        allow_from(requestPrincipals=["example.com/sub-1"]),
        request(jwt=EXAMPLE_JWT),
        True,
        "allow.foo",
    ),
    case(
        "requestPrincipals: * needs a JWT (present)",
        allow_from(requestPrincipals=["*"]),
        request(jwt=EXAMPLE_JWT),
        True,
        "allow.foo",
    ),
    case(
        "requestPrincipals: * needs a JWT (absent)",
        allow_from(requestPrincipals=["*"]),
        GET,
        False,
    ),
    case(
        "requestPrincipals: any subject of an issuer",
        allow_from(requestPrincipals=["https://accounts.google.com/*"]),
        request(jwt=GOOGLE),
        True,
        "allow.foo",
    ),
    case(
        "requestPrincipals: a subject from any issuer",
        allow_from(requestPrincipals=["*/user-1"]),
        request(jwt=GOOGLE),
        True,
        "allow.foo",
    ),
    case(
        "requestPrincipals: an issuer suffix with its subject",
        allow_from(requestPrincipals=["*google.com/user-1"]),
        request(jwt=GOOGLE),
        True,
        "allow.foo",
    ),
    case(
        "requestPrincipals: iss/sub* is a subject prefix of that exact issuer",
        allow_from(requestPrincipals=["https://accounts.google.com/user*"]),
        request(jwt=GOOGLE),
        True,
        "allow.foo",
    ),
    case(
        "requestPrincipals: the issuer is everything before the last '/'",
        allow_from(requestPrincipals=["https://accounts.google.com/*"]),
        request(jwt={"iss": "https://accounts.google.com/tenant", "sub": "x"}),
        False,
    ),
    case(
        "DENY notRequestPrincipals [*]: a request without JWT is denied",
        deny_from(notRequestPrincipals=["*"]),
        GET,
        False,
        "deny.foo",
    ),
    case(
        "DENY notRequestPrincipals [*]: a request with a JWT passes",
        deny_from(notRequestPrincipals=["*"]),
        request(jwt=EXAMPLE_JWT),
        True,
    ),
    case(
        "ALLOW notRequestPrincipals: no JWT is not excluded",
        allow_from(notRequestPrincipals=["example.com/sub-1"]),
        GET,
        True,
        "allow.foo",
    ),
    # namespaces come from the peer certificate
    case(
        "namespaces: exact",
        allow_from(namespaces=["default"]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "namespaces: prefix",
        allow_from(namespaces=["def*"]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case("namespaces: another", allow_from(namespaces=["prod"]), request(principal=SLEEP), False),
    case("namespaces: need mTLS", allow_from(namespaces=["default"]), GET, False),
    case(
        "namespaces: a * inside is a glob",
        allow_from(namespaces=["team-*-prod"]),
        request(principal="cluster.local/ns/team-a-prod/sa/api"),
        True,
        "allow.foo",
    ),
    case(
        "namespaces: a glob is whole",
        allow_from(namespaces=["team-*-prod"]),
        request(principal="cluster.local/ns/team-a-prod-2/sa/api"),
        False,
    ),
    case(
        "notNamespaces: excluded",
        allow_from(notNamespaces=["dev"]),
        request(principal=DEV),
        False,
    ),
    case(
        "DENY notNamespaces [foo]: plaintext is denied too",
        deny_from(notNamespaces=["foo"]),
        GET,
        False,
        "deny.foo",
    ),
    case(
        "DENY notNamespaces [foo]: foo itself passes",
        deny_from(notNamespaces=["foo"]),
        request(principal=SLEEP_FOO),
        True,
    ),
    case(
        "source fields are ANDed: principal and namespace",
        allow_from(principals=["*/sa/sleep"], namespaces=["foo"]),
        request(principal=SLEEP),
        False,
    ),
    # serviceAccounts: <sa> in the policy's namespace, or <ns>/<sa>
    case(
        "serviceAccounts: a name is in the policy's namespace",
        allow_from(serviceAccounts=["sleep"]),
        request(principal=SLEEP_FOO),
        True,
        "allow.foo",
    ),
    case(
        "serviceAccounts: not in another namespace",
        allow_from(serviceAccounts=["sleep"]),
        request(principal=SLEEP),
        False,
    ),
    case(
        "serviceAccounts: namespace/name",
        allow_from(serviceAccounts=["default/sleep"]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "notServiceAccounts",
        allow_from(notServiceAccounts=["default/sleep"]),
        request(principal=SLEEP),
        False,
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), IDENTITIES)
def test_source_identities(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- Source: ipBlocks and remoteIpBlocks ---------------------------------------------------

ADDRESSES = [
    case("ipBlocks: a single IP", allow_from(ipBlocks=["10.1.2.3"]), GET, True, "allow.foo"),
    case("ipBlocks: a CIDR", allow_from(ipBlocks=["10.1.0.0/16"]), GET, True, "allow.foo"),
    case("ipBlocks: outside the CIDR", allow_from(ipBlocks=["10.2.0.0/16"]), GET, False),
    case(
        "ipBlocks: host bits in a CIDR are ignored",
        allow_from(ipBlocks=["10.1.9.9/16"]),
        GET,
        True,
        "allow.foo",
    ),
    case(
        "ipBlocks: IPv6",
        allow_from(ipBlocks=["2001:db8::/32"]),
        request(ip="2001:db8::7"),
        True,
        "allow.foo",
    ),
    case("ipBlocks: an IPv4 request and an IPv6 block", allow_from(ipBlocks=["::/0"]), GET, False),
    case(
        "ipBlocks: no source address", allow_from(ipBlocks=["0.0.0.0/0"]), request(ip=None), False
    ),
    case(
        "notIpBlocks: excluded",
        allow_from(notIpBlocks=["10.1.2.3"]),
        GET,
        False,
    ),
    case(
        "ipBlocks with notIpBlocks: a hole in a range",
        allow_from(ipBlocks=["10.1.0.0/16"], notIpBlocks=["10.1.2.0/24"]),
        request(ip="10.1.3.4"),
        True,
        "allow.foo",
    ),
    case(
        "remoteIpBlocks read remote.ip, not source.ip",
        allow_from(remoteIpBlocks=["203.0.113.0/24"]),
        request(ip="10.1.2.3", remote="203.0.113.7"),
        True,
        "allow.foo",
    ),
    case(
        "ipBlocks read source.ip, not remote.ip",
        allow_from(ipBlocks=["203.0.113.0/24"]),
        request(ip="10.1.2.3", remote="203.0.113.7"),
        False,
    ),
    case(
        "DENY notRemoteIpBlocks: everyone outside the office",
        deny_from(notRemoteIpBlocks=["203.0.113.0/24"]),
        request(remote="198.51.100.1"),
        False,
        "deny.foo",
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), ADDRESSES)
def test_source_addresses(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- Operation: hosts, ports, methods, paths -----------------------------------------------


def allow_to(**operation: Any) -> str:
    return yaml.safe_dump([{"name": "allow", "rules": [{"to": [{"operation": operation}]}]}])


def deny_to(**operation: Any) -> str:
    return yaml.safe_dump(
        [{"name": "deny", "action": "DENY", "rules": [{"to": [{"operation": operation}]}]}]
    )


OPERATIONS = [
    case("hosts: exact", allow_to(hosts=["httpbin.foo"]), GET, True, "allow.foo"),
    case(
        "hosts: case-insensitive",
        allow_to(hosts=["HTTPBIN.foo"]),
        request(host="httpbin.FOO"),
        True,
        "allow.foo",
    ),
    case(
        "hosts: exact does not match the host with a port",
        allow_to(hosts=["example.com"]),
        request(host="example.com:8080"),
        False,
    ),
    case(
        "hosts: the best practice [host, host:*] matches both",
        allow_to(hosts=["example.com", "example.com:*"]),
        request(host="example.com:8080"),
        True,
        "allow.foo",
    ),
    case(
        "hosts: suffix *.example.com",
        allow_to(hosts=["*.example.com"]),
        request(host="api.Example.com"),
        True,
        "allow.foo",
    ),
    case(
        "notHosts: case-insensitive too",
        deny_to(notHosts=["httpbin.foo"]),
        request(host="HTTPBIN.FOO"),
        True,
    ),
    case(
        "notHosts: another host is denied",
        deny_to(notHosts=["httpbin.foo"]),
        request(host="evil"),
        False,
        "deny.foo",
    ),
    case("ports: match", allow_to(ports=["8000"]), GET, True, "allow.foo"),
    case("ports: another port", allow_to(ports=["9000"]), GET, False),
    case("ports: written as YAML numbers", allow_to(ports=[8000]), GET, True, "allow.foo"),
    case("notPorts", allow_to(notPorts=["8000"]), GET, False),
    case("methods: exact", allow_to(methods=["GET", "HEAD"]), GET, True, "allow.foo"),
    case("methods: case-sensitive", allow_to(methods=["get"]), GET, False),
    case("notMethods", allow_to(notMethods=["DELETE"]), GET, True, "allow.foo"),
    case("paths: exact", allow_to(paths=["/headers"]), request(path="/headers"), True, "allow.foo"),
    case("paths: exact is exact", allow_to(paths=["/headers"]), request(path="/headers/x"), False),
    case("paths: prefix", allow_to(paths=["/api/*"]), request(path="/api/v1/x"), True, "allow.foo"),
    case(
        "paths: suffix",
        allow_to(paths=["*/review"]),
        request(path="/books/1/review"),
        True,
        "allow.foo",
    ),
    case("paths: case-sensitive", allow_to(paths=["/Admin"]), request(path="/admin"), False),
    case("notPaths: prefix", allow_to(notPaths=["/admin*"]), request(path="/admin/users"), False),
    case(
        "the Operation example: *.example.com, GET or HEAD, not /admin",
        allow_to(hosts=["*.example.com"], methods=["GET", "HEAD"], notPaths=["/admin*"]),
        request(host="www.example.com", method="HEAD", path="/index.html"),
        True,
        "allow.foo",
    ),
    case(
        "paths: {*} is one segment",
        allow_to(paths=["/users/{*}/orders"]),
        request(path="/users/42/orders"),
        True,
        "allow.foo",
    ),
    case(
        "paths: {*} does not cross a '/'",
        allow_to(paths=["/foo/{*}"]),
        request(path="/foo/bar/baz"),
        False,
    ),
    case("paths: {*} is not empty", allow_to(paths=["/foo/{*}"]), request(path="/foo/"), False),
    case(
        "paths: {**} spans segments",
        allow_to(paths=["/foo/{**}"]),
        request(path="/foo/bar/baz.txt"),
        True,
        "allow.foo",
    ),
    case(
        "paths: {*} then {**}",
        allow_to(paths=["/foo/{*}/bar/{**}"]),
        request(path="/foo/buzz/bar/baz"),
        True,
        "allow.foo",
    ),
    case(
        "paths: a template's literals are exact",
        allow_to(paths=["/foo/{*}/bar"]),
        request(path="/foo/x/barn"),
        False,
    ),
    case(
        "operation fields are ANDed",
        allow_to(methods=["GET"], paths=["/admin"]),
        request(path="/"),
        False,
    ),
    case(
        "the reference's DENY: POST on port 8080",
        deny_to(methods=["POST"], ports=["8080"]),
        request(method="POST", port=8080),
        False,
        "deny.foo",
    ),
    case(
        "the reference's DENY: a GET on 8080 passes",
        deny_to(methods=["POST"], ports=["8080"]),
        request(port=8080),
        True,
    ),
    case(
        "notPaths with no path: ALLOW holds (nothing to exclude)",
        allow_to(notPaths=["/admin*"]),
        request(path=None),
        True,
        "allow.foo",
    ),
    case(
        "paths with no path: no match",
        allow_to(paths=["*"]),
        request(path=None),
        False,
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), OPERATIONS)
def test_operations(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- Conditions: every `when` key --------------------------------------------------------


def allow_when(
    key: str, values: list[Any] | None = None, not_values: list[Any] | None = None
) -> str:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return yaml.safe_dump([{"name": "allow", "rules": [{"when": [condition]}]}])


def deny_when(
    key: str, values: list[Any] | None = None, not_values: list[Any] | None = None
) -> str:
    return allow_when(key, values, not_values).replace(
        "- name: allow\n", "- name: deny\n  action: DENY\n"
    )


NESTED = {"iss": "example.com", "sub": "s", "team": {"name": "payments", "tags": ["a", "b"]}}

CONDITIONS = [
    case(
        "request.headers: the name is case-insensitive",
        allow_when("request.headers[User-Agent]", ["curl/*"]),
        request(headers={"user-agent": "curl/8.0"}),
        True,
        "allow.foo",
    ),
    case(
        "request.headers: * is presence",
        allow_when("request.headers[x-token]", ["*"]),
        request(headers={"x-token": "abc"}),
        True,
        "allow.foo",
    ),
    case(
        "request.headers: * does not match a missing header",
        allow_when("request.headers[x-token]", ["*"]),
        GET,
        False,
    ),
    case(
        "request.headers: * is Envoy's present_match, an empty value is present",
        allow_when("request.headers[x-token]", ["*"]),
        request(headers={"x-token": ""}),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.claims: * is a non-empty value",
        allow_when("request.auth.claims[team]", ["*"]),
        request(jwt={**EXAMPLE_JWT, "team": ""}),
        False,
    ),
    case(
        "request.headers notValues, header missing: an ALLOW holds",
        allow_when("request.headers[x-env]", not_values=["prod"]),
        GET,
        True,
        "allow.foo",
    ),
    case(
        "request.headers notValues, header missing: a DENY denies",
        deny_when("request.headers[x-env]", not_values=["prod"]),
        GET,
        False,
        "deny.foo",
    ),
    case(
        "request.headers notValues, header matches: the DENY does not",
        deny_when("request.headers[x-env]", not_values=["prod"]),
        request(headers={"x-env": "prod"}),
        True,
    ),
    case(
        "request.experimental.inline.headers: any comma-separated value",
        allow_when("request.experimental.inline.headers[x-groups]", ["admin"]),
        request(headers={"x-groups": "dev,admin"}),
        True,
        "allow.foo",
    ),
    case("source.ip", allow_when("source.ip", ["10.1.0.0/16"]), GET, True, "allow.foo"),
    case(
        "remote.ip",
        allow_when("remote.ip", ["203.0.113.7"]),
        request(remote="203.0.113.7"),
        True,
        "allow.foo",
    ),
    case(
        "source.namespace",
        allow_when("source.namespace", ["default"]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "source.principal",
        allow_when("source.principal", [SLEEP]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "source.serviceAccount",
        allow_when("source.serviceAccount", ["default/sleep"]),
        request(principal=SLEEP),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.principal",
        allow_when("request.auth.principal", ["example.com/sub-1"]),
        request(jwt=EXAMPLE_JWT),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.audiences: any of a list",
        allow_when("request.auth.audiences", ["mobile"]),
        request(jwt=GOOGLE),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.audiences: a single string",
        allow_when("request.auth.audiences", ["web"]),
        request(jwt={**EXAMPLE_JWT, "aud": "web"}),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.audiences: none of them",
        allow_when("request.auth.audiences", ["admin"]),
        request(jwt=GOOGLE),
        False,
    ),
    case(
        "request.auth.presenter",
        allow_when("request.auth.presenter", ["frontend"]),
        request(jwt={**EXAMPLE_JWT, "azp": "frontend"}),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.claims[groups]: any element of a list claim",
        allow_when("request.auth.claims[groups]", ["group1"]),
        request(jwt={**EXAMPLE_JWT, "groups": ["group0", "group1"]}),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.claims[groups]: prefix over a list",
        allow_when("request.auth.claims[groups]", ["eng-*"]),
        request(jwt={**EXAMPLE_JWT, "groups": ["sales", "eng-infra"]}),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.claims: nested [a][b]",
        allow_when("request.auth.claims[team][name]", ["payments"]),
        request(jwt=NESTED),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.claims: nested list",
        allow_when("request.auth.claims[team][tags]", ["b"]),
        request(jwt=NESTED),
        True,
        "allow.foo",
    ),
    case(
        "request.auth.claims: a path that leads nowhere",
        allow_when("request.auth.claims[team][name][first]", ["p"]),
        request(jwt=NESTED),
        False,
    ),
    case(
        "request.auth.claims: a non-string claim never matches",
        allow_when("request.auth.claims[admin]", ["true"]),
        request(jwt={**EXAMPLE_JWT, "admin": True}),
        False,
    ),
    case(
        "request.auth.claims notValues: no JWT, a DENY denies",
        deny_when("request.auth.claims[iss]", not_values=["example.com"]),
        GET,
        False,
        "deny.foo",
    ),
    case(
        "destination.ip",
        allow_when("destination.ip", ["10.0.0.0/24"]),
        GET,
        True,
        "allow.foo",
    ),
    case("destination.port", allow_when("destination.port", ["8000"]), GET, True, "allow.foo"),
    case("destination.port: another", allow_when("destination.port", [9000]), GET, False),
    case(
        "connection.sni",
        allow_when("connection.sni", ["*.example.com"]),
        request(sni="www.example.com"),
        True,
        "allow.foo",
    ),
    case("connection.sni: no SNI", allow_when("connection.sni", ["*"]), GET, False),
    case(
        "values and notValues together",
        allow_when("request.headers[x-v]", ["v*"], ["v2"]),
        request(headers={"x-v": "v2"}),
        False,
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), CONDITIONS)
def test_conditions(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- Selector and the root namespace -----------------------------------------------------

MESH_V1 = f"""
- name: allow-nothing-v1
  namespace: {ROOT_NAMESPACE}
  selector: {{matchLabels: {{version: v1}}}}
"""
MESH_DENY = f"""
- name: deny-dev
  namespace: {ROOT_NAMESPACE}
  action: DENY
  rules: [{{from: [{{source: {{namespaces: [dev]}}}}]}}]
"""

SELECTION = [
    case(
        "a root-namespace selector selects in every namespace",
        MESH_V1,
        GET,
        False,
        workload=RATINGS_BAR,
    ),
    case(
        "a root-namespace selector: workloads without the label",
        MESH_V1,
        GET,
        True,
        workload=HTTPBIN_V2,
    ),
    case(
        "a root-namespace policy without selector is mesh-wide",
        MESH_DENY,
        request(principal=DEV),
        False,
        "deny-dev.istio-system",
        workload=RATINGS_BAR,
    ),
    case(
        "a root-namespace policy covers the root namespace's own workloads",
        MESH_DENY,
        request(principal=DEV),
        False,
        "deny-dev.istio-system",
        workload=GATEWAY,
    ),
    case(
        "a namespace policy does not reach other namespaces",
        "- {name: deny-all, action: DENY, rules: [{}]}",
        GET,
        True,
        workload=RATINGS_BAR,
    ),
    case(
        "every matchLabels pair must be on the workload",
        "- {name: r, selector: {matchLabels: {app: httpbin, version: v2}}}",
        GET,
        True,
        workload=HTTPBIN,
    ),
    case(
        "every matchLabels pair on the workload",
        "- {name: r, selector: {matchLabels: {app: httpbin, version: v2}}}",
        GET,
        False,
        workload=HTTPBIN_V2,
    ),
    case(
        "an empty selector selects every workload",
        "- {name: r, selector: {}}",
        GET,
        False,
        workload=PRODUCTPAGE,
    ),
    case(
        "mesh DENY and namespace ALLOW combine",
        MESH_DENY + ALLOW_ALL,
        request(principal=SLEEP),
        True,
        "allow-all.foo",
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), SELECTION)
def test_selector_and_root_namespace(
    policies: str, bag: Mapping[str, object], expect: Expect
) -> None:
    check(policies, bag, expect)


# --- Evaluation order: CUSTOM, DENY, ALLOW; AUDIT; dry-run; several policies ---------------

DENY_POST_FROM_DEV = """
- name: deny-dev-post
  action: DENY
  rules:
  - from: [{source: {namespaces: [dev]}}]
    to: [{operation: {methods: [POST]}}]
"""
ALLOW_GET = """
- name: allow-get
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
AUDIT_PROFILE = """
- name: audit-profile
  action: AUDIT
  rules: [{to: [{operation: {methods: [GET], paths: ["/user/profile/*"]}}]}]
"""
DRY_DENY_HEADERS = """
- name: dry-run-example
  annotations: {istio.io/dry-run: "true"}
  action: DENY
  rules: [{to: [{operation: {paths: ["/headers"]}}]}]
"""
DRY_ALLOW_GET = """
- name: dry-allow
  annotations: {istio.io/dry-run: "true"}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""
EXT_AUTHZ_ADMIN = """
- name: ext-authz
  action: CUSTOM
  provider: {name: my-custom-authz}
  rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
"""
EXT_AUTHZ_ALL = """
- name: ext-authz-2
  action: CUSTOM
  provider: {name: my-custom-authz}
  rules: [{}]
"""
OPA_AUTHZ = """
- name: other-authz
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ["/opa"]}}]}]
"""

ORDER = [
    case(
        "DENY is evaluated before ALLOW",
        DENY_POST_FROM_DEV + ALLOW_ALL,
        request(principal=DEV, method="POST"),
        False,
        "deny-dev-post.foo",
    ),
    case(
        "a DENY that does not match leaves ALLOW to decide",
        DENY_POST_FROM_DEV + ALLOW_ALL,
        request(principal=DEV),
        True,
        "allow-all.foo",
    ),
    case(
        "a DENY alone does not make ALLOW semantics apply",
        DENY_POST_FROM_DEV,
        request(principal=SLEEP, method="POST"),
        True,
        reason="no ALLOW policy applies",
    ),
    case(
        "no ALLOW matches: denied",
        DENY_POST_FROM_DEV + ALLOW_GET,
        request(principal=SLEEP, method="PUT"),
        False,
        reason="no ALLOW policy matched",
    ),
    case(
        "several ALLOW policies: any one allows",
        ALLOW_GET + "- {name: allow-put, rules: [{to: [{operation: {methods: [PUT]}}]}]}",
        request(method="PUT"),
        True,
        "allow-put.foo",
    ),
    case(
        "several DENY policies: the root namespace's are reported first",
        MESH_DENY + "- {name: deny-all, action: DENY, rules: [{}]}",
        request(principal=DEV),
        False,
        "deny-dev.istio-system",
    ),
    case(
        "AUDIT: a matching request is marked, the decision is unchanged",
        AUDIT_PROFILE + ALLOW_GET,
        request(path="/user/profile/1"),
        True,
        "allow-get.foo",
        audit=("audit-profile.foo",),
    ),
    case(
        "AUDIT does not rescue a denied request",
        AUDIT_PROFILE + DENY_ALL,
        request(path="/user/profile/1"),
        False,
        "deny-all.foo",
        audit=("audit-profile.foo",),
    ),
    case(
        "AUDIT: a request it does not match is not marked",
        AUDIT_PROFILE,
        request(path="/other"),
        True,
    ),
    case(
        "dry-run DENY: matches, is reported, does not deny",
        DRY_DENY_HEADERS,
        request(path="/headers"),
        True,
        dry_run=(("dry-run-example.foo", "DENY", True),),
    ),
    case(
        "dry-run DENY: a request it does not match",
        DRY_DENY_HEADERS,
        request(path="/ip"),
        True,
        dry_run=(("dry-run-example.foo", "DENY", False),),
    ),
    case(
        "dry-run ALLOW alone: no enforced ALLOW applies, so allowed",
        DRY_ALLOW_GET,
        POST,
        True,
        dry_run=(("dry-allow.foo", "ALLOW", False),),
        reason="no ALLOW policy applies",
    ),
    case(
        "dry-run ALLOW beside an enforced one: only the enforced one decides",
        DRY_ALLOW_GET + "- {name: allow-post, rules: [{to: [{operation: {methods: [POST]}}]}]}",
        GET,
        False,
        dry_run=(("dry-allow.foo", "ALLOW", True),),
    ),
    case(
        "dry-run: false enforces",
        DRY_DENY_HEADERS.replace('"true"', '"false"'),
        request(path="/headers"),
        False,
        "dry-run-example.foo",
    ),
    case(
        "CUSTOM: a matching request names its provider",
        EXT_AUTHZ_ADMIN,
        request(path="/admin/users"),
        True,
        custom=("my-custom-authz",),
    ),
    case(
        "CUSTOM: a request it does not match",
        EXT_AUTHZ_ADMIN,
        request(path="/public"),
        True,
    ),
    case(
        "CUSTOM is reported even when a DENY then denies",
        EXT_AUTHZ_ADMIN + DENY_ALL,
        request(path="/admin/users"),
        False,
        "deny-all.foo",
        custom=("my-custom-authz",),
    ),
    case(
        "CUSTOM: one provider named by two policies is asked once",
        EXT_AUTHZ_ADMIN + EXT_AUTHZ_ALL,
        request(path="/admin/users"),
        True,
        custom=("my-custom-authz",),
    ),
    case(
        "CUSTOM: two providers for one workload turn the CUSTOM rules into DENY",
        EXT_AUTHZ_ADMIN + OPA_AUTHZ,
        request(path="/admin/users"),
        False,
        "ext-authz.foo",
        reason="more than one provider",
    ),
    case(
        "CUSTOM with two providers: what no rule matches is not denied",
        EXT_AUTHZ_ADMIN + OPA_AUTHZ,
        request(path="/public"),
        True,
    ),
    case(
        "everything at once",
        EXT_AUTHZ_ADMIN + AUDIT_PROFILE + DRY_DENY_HEADERS + DENY_POST_FROM_DEV + ALLOW_GET,
        request(principal=SLEEP, path="/headers"),
        True,
        "allow-get.foo",
        dry_run=(("dry-run-example.foo", "DENY", True),),
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), ORDER)
def test_evaluation_order(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- TCP traffic: HTTP-only fields ------------------------------------------------------

TCP = [
    case(
        "the reference's warning: DENY POST on 8080 denies all TCP on 8080",
        deny_to(methods=["POST"], ports=["8080"]),
        request(port=8080, method=None, path=None, host=None, protocol="tcp"),
        False,
        "deny.foo",
    ),
    case(
        "...and leaves other TCP ports alone",
        deny_to(methods=["POST"], ports=["8080"]),
        request(port=9000, method=None, path=None, host=None, protocol="tcp"),
        True,
    ),
    case(
        "an ALLOW rule with an HTTP-only field does not apply to TCP",
        allow_to(paths=["*"], ports=["8000"]),
        request(method=None, path=None, host=None, protocol="tcp"),
        False,
    ),
    case(
        "an ALLOW rule of TCP fields applies to TCP",
        allow_to(ports=["8000"]),
        request(method=None, path=None, host=None, protocol="tcp"),
        True,
        "allow.foo",
    ),
    case(
        "a DENY on a JWT claim denies all TCP",
        deny_when("request.auth.claims[iss]", ["example.com"]),
        request(method=None, path=None, host=None, protocol="tcp"),
        False,
        "deny.foo",
    ),
    case(
        "over HTTP the same DENY needs the claim",
        deny_when("request.auth.claims[iss]", ["example.com"]),
        GET,
        True,
    ),
]


@pytest.mark.parametrize(("policies", "bag", "expect"), TCP)
def test_tcp_traffic(policies: str, bag: Mapping[str, object], expect: Expect) -> None:
    check(policies, bag, expect)


# --- The PolicySet's own surface ----------------------------------------------------------


def test_applies_tells_which_workloads_have_policies() -> None:
    policies = policy_set(ALLOW_NOTHING_HTTPBIN + DRY_ALLOW_GET.replace("dry-allow", "d"))
    assert policies.applies(HTTPBIN)
    assert policies.applies(PRODUCTPAGE)  # the dry-run policy selects every workload
    assert not policy_set(ALLOW_NOTHING_HTTPBIN).applies(PRODUCTPAGE)
    assert not PolicySet().applies(HTTPBIN)
    assert PolicySet().evaluate(HTTPBIN, {}).allowed


def test_referenced_lists_what_evaluation_may_read() -> None:
    assert policy_set(HTTPBIN_EXAMPLE).referenced == {
        "source.principal",
        "source.namespace",
        "request.method",
        "request.url_path",
        "request.auth.claims",
        "context.protocol",  # HTTP-only fields read differently for TCP
    }
    assert policy_set(allow_from(ipBlocks=["10.0.0.0/8"])).referenced == {"source.ip"}
    assert policy_set(ALLOW_ALL).referenced == frozenset()


def test_an_empty_bag_never_raises() -> None:
    everything = (
        HTTPBIN_EXAMPLE
        + MESH_DENY
        + AUDIT_PROFILE
        + DRY_DENY_HEADERS
        + EXT_AUTHZ_ADMIN
        + allow_when("request.auth.claims[a][b]", ["x"]).replace("name: allow", "name: claims")
        + allow_from(ipBlocks=["10.0.0.0/8"], notRemoteIpBlocks=["::1"]).replace(
            "name: allow", "name: ips"
        )
    )
    decision = policy_set(everything).evaluate(HTTPBIN, {})
    assert not decision.allowed
    assert decision.reason == "no ALLOW policy matched"


def test_values_of_the_wrong_type_do_not_match() -> None:
    policies = policy_set(
        allow_from(ipBlocks=["10.0.0.0/8"], principals=["*"])
        + "- {name: port, rules: [{to: [{operation: {ports: ['80']}}]}]}"
    )
    bag = {
        "source.ip": "not an address",
        "source.principal": 42,
        "destination.port": "80",
        "request.headers": ["not", "a", "map"],
    }
    assert not policies.evaluate(HTTPBIN, bag).allowed


def test_unhashable_and_odd_values_do_not_raise() -> None:
    policies = policy_set(
        allow_to(methods=["GET", "HEAD"], paths=["/a", "/b*"], hosts=["x"], notPorts=["1", "2"])
        + deny_when("request.auth.claims[groups]", not_values=["a", "b*"]).replace(
            "name: deny", "name: claims"
        )
    )
    bag = {
        "request.method": ["GET"],
        "request.url_path": {"a": 1},
        "request.host": 5,
        "destination.port": True,
        "request.auth.claims": {"groups": [["nested"], {"a": 1}, 3]},
    }
    decision = policies.evaluate(HTTPBIN, bag)
    assert not decision.allowed
    assert decision.policy == "claims.foo"


def test_string_addresses_are_read_too() -> None:
    policies = policy_set(allow_from(ipBlocks=["10.0.0.0/8"]))
    assert policies.evaluate(HTTPBIN, {"source.ip": "10.1.1.1"}).allowed


def test_selection_is_computed_once_per_namespace_and_labels() -> None:
    policies = policy_set(ALLOW_NOTHING_HTTPBIN + "- {name: other, namespace: bar}")
    same = WorkloadIdentity("httpbin-2", "foo", {"version": "v1", "app": "httpbin"})
    assert policies._select(HTTPBIN) is policies._select(same)
    assert policies._select(RATINGS_BAR) is not policies._select(HTTPBIN)


def test_the_snapshot_carries_the_policies_and_configz_lists_them() -> None:
    snapshot = compile_text(to_documents(EXT_AUTHZ_ADMIN + DRY_DENY_HEADERS))
    assert [p["name"] for p in snapshot.authorization.configz()] == [
        "dry-run-example.foo",
        "ext-authz.foo",
    ]
    assert snapshot.authorization.configz()[1]["provider"] == "my-custom-authz"
    assert snapshot.authorization.configz()[0]["dryRun"] is True


# --- Config errors, with their field paths -------------------------------------------------

ERRORS = [
    pytest.param(
        allow_from(ipBlocks=["10.0.0.1", "10.0.0.0/33", "nope"]),
        [
            "spec.rules[0].from[0].source.ipBlocks[1]: bad CIDR range (10.0.0.0/33)",
            "spec.rules[0].from[0].source.ipBlocks[2]: bad IP address (nope)",
        ],
        id="invalid IP blocks",
    ),
    pytest.param(
        allow_from(notRemoteIpBlocks=["300.1.1.1"]),
        ["spec.rules[0].from[0].source.notRemoteIpBlocks[0]: bad IP address (300.1.1.1)"],
        id="invalid remote IP block",
    ),
    pytest.param(
        allow_to(ports=["80", "http", "70000"]),
        [
            "spec.rules[0].to[0].operation.ports[1]: bad port (http)",
            "spec.rules[0].to[0].operation.ports[2]: bad port (70000)",
        ],
        id="invalid ports",
    ),
    pytest.param(
        allow_when("destination.port", ["-1"]),
        ["spec.rules[0].when[0].values[0]: bad port (-1)"],
        id="invalid port in a condition",
    ),
    pytest.param(
        allow_when("source.ip", not_values=["10.0.0.0/8", "x"]),
        ["spec.rules[0].when[0].notValues[1]: bad IP address (x)"],
        id="invalid IP in a condition",
    ),
    pytest.param(
        allow_when("request.header[x]", ["1"]),
        ["spec.rules[0].when[0].key: unknown attribute: request.header[x]"],
        id="unknown when key",
    ),
    pytest.param(
        allow_when("destination.labels[app]", ["x"]),
        [
            "spec.rules[0].when[0].key: attribute destination.labels[app] is replaced by the"
            " workload selector"
        ],
        id="retired when key",
    ),
    pytest.param(
        allow_when("request.headers[]", ["x"]),
        ["spec.rules[0].when[0].key: bad key (request.headers[])"],
        id="header key without a name",
    ),
    pytest.param(
        allow_when("request.auth.claims[a]b]", ["x"]),
        ["spec.rules[0].when[0].key: bad key (request.auth.claims[a]b])"],
        id="malformed claim key",
    ),
    pytest.param(
        allow_when("request.headers[x]"),
        ["spec.rules[0].when[0]: at least one of values or notValues must be set"],
        id="condition without values",
    ),
    pytest.param(
        allow_when("", ["x"]),
        ["spec.rules[0].when[0].key: `key` must not be empty"],
        id="empty key",
    ),
    pytest.param(
        allow_from(principals=["a", ""]),
        ["spec.rules[0].from[0].source.principals[1]: empty value not allowed"],
        id="empty value",
    ),
    pytest.param(
        "- {name: r, rules: [{from: [{source: {}}]}]}",
        ["spec.rules[0].from[0].source: `source` must not be empty"],
        id="empty source",
    ),
    pytest.param(
        "- {name: r, rules: [{from: [{}]}]}",
        ["spec.rules[0].from[0].source: required field is missing"],
        id="from without source",
    ),
    pytest.param(
        "- {name: r, rules: [{from: []}]}",
        ["spec.rules[0].from: `from` must not be empty"],
        id="empty from",
    ),
    pytest.param(
        "- {name: r, rules: [{to: [{operation: {}}]}]}",
        ["spec.rules[0].to[0].operation: `operation` must not be empty"],
        id="empty operation",
    ),
    pytest.param(
        allow_to(paths=["/a/{**}/{*}", "/b/{*}.txt", "/c/{id}", "/d/*/{*}"]),
        [
            "spec.rules[0].to[0].operation.paths[0]: invalid path template '/a/{**}/{*}':"
            " {**} must be the last operator",
            "spec.rules[0].to[0].operation.paths[1]: invalid path '/b/{*}.txt'",
            "spec.rules[0].to[0].operation.paths[2]: invalid path '/c/{id}'",
            "spec.rules[0].to[0].operation.paths[3]: invalid path template '/d/*/{*}':"
            " segment '*' is not a valid literal",
        ],
        id="invalid path templates",
    ),
    pytest.param(
        allow_from(serviceAccounts=["ns/*", "a/b/c"]),
        [
            "spec.rules[0].from[0].source.serviceAccounts[0]: wildcard not allowed",
            "spec.rules[0].from[0].source.serviceAccounts[1]: expected format",
        ],
        id="invalid service accounts",
    ),
    pytest.param(
        allow_from(serviceAccounts=["sleep"], namespaces=["foo"]),
        ["spec.rules[0].from[0].source.serviceAccounts: cannot be set with namespaces"],
        id="service accounts with namespaces",
    ),
    pytest.param(
        "- {name: r, targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}}",
        ["spec.targetRef: targetRef selects a Kubernetes Gateway"],
        id="targetRef",
    ),
    pytest.param(
        "- {name: r, targetRefs: [{kind: Service, group: '', name: httpbin}]}",
        ["spec.targetRefs: targetRef selects"],
        id="targetRefs",
    ),
    pytest.param(
        "- {name: r, action: DENY}",
        ["spec.rules: DENY action without rules is meaningless"],
        id="DENY without rules",
    ),
    pytest.param(
        "- {name: r, action: DENY, rules: []}",
        ["spec.rules: DENY action without rules is meaningless"],
        id="DENY with rules: []",
    ),
    pytest.param(
        "- {name: r, action: CUSTOM, provider: {name: opa}}",
        ["spec.rules: CUSTOM action without rules is meaningless"],
        id="CUSTOM without rules",
    ),
    pytest.param(
        "- {name: r, action: CUSTOM, rules: [{}]}",
        ["spec.provider.name: required with action CUSTOM"],
        id="CUSTOM without provider",
    ),
    pytest.param(
        "- {name: r, provider: {name: opa}, rules: [{}]}",
        ["spec.provider: only for action CUSTOM, not ALLOW"],
        id="provider without CUSTOM",
    ),
    pytest.param(
        """
        - name: r
          action: CUSTOM
          provider: {name: opa}
          rules:
          - from: [{source: {principals: ["*"]}}]
            when: [{key: "request.auth.claims[iss]", values: [x]}]
        """,
        [
            "spec.rules[0].from[0].source.principals: not supported with action CUSTOM",
            "spec.rules[0].when[0].key: request.auth.claims[iss] is not supported with action"
            " CUSTOM",
        ],
        id="CUSTOM with identity fields",
    ),
    pytest.param(
        "- {name: r, selector: {matchLabels: {app: 'web*'}}}",
        ["spec.selector.matchLabels.app: wildcard is not supported in selector"],
        id="wildcard selector",
    ),
    pytest.param(
        "- {name: r, annotations: {istio.io/dry-run: 'yes'}}",
        ["metadata.annotations[istio.io/dry-run]: not a boolean: 'yes'"],
        id="dry-run annotation not a boolean",
    ),
    pytest.param(
        "- {name: r, action: allow}",
        ["spec.action: Input should be 'ALLOW', 'DENY', 'AUDIT' or 'CUSTOM'"],
        id="lower-case action",
    ),
    pytest.param(
        "- {name: r, rules: [{from: [{source: {notPrincipal: [x]}}]}]}",
        ["spec.rules[0].from[0].source.notPrincipal: unknown field"],
        id="a typo in a field name",
    ),
    pytest.param(
        "- {name: r}\n- {name: r}",
        ["metadata.name: duplicate AuthorizationPolicy 'r' in namespace 'foo'"],
        id="duplicate name",
    ),
    pytest.param(
        "- {name: r, apiVersion: security.istio.io/v1alpha1}",
        ["apiVersion: unsupported version 'v1alpha1' of AuthorizationPolicy"],
        id="unsupported version",
    ),
]


@pytest.mark.parametrize(("policies", "expected"), ERRORS)
def test_config_errors_name_their_field(policies: str, expected: list[str]) -> None:
    errors = errors_of(policies)
    assert len(errors) == len(expected), errors
    for got, want in zip(errors, expected, strict=True):
        assert got.startswith(want), (got, want)


def test_every_error_of_a_file_is_reported_at_once() -> None:
    text = to_documents(
        allow_from(ipBlocks=["bad"]).replace("name: allow", "name: one")
        + "- {name: two, action: DENY}\n"
        + "- {name: three, rules: [{when: [{key: nope, values: [x]}]}]}\n"
    )
    with pytest.raises(Rejected) as e:
        compile_text(text)
    assert [(err.name, err.path) for err in e.value.errors] == [
        ("one", "spec.rules[0].from[0].source.ipBlocks[0]"),
        ("two", "spec.rules"),
        ("three", "spec.rules[0].when[0].key"),
    ]
    assert str(e.value.errors[0]).startswith(
        "policies.yaml: document 1 (AuthorizationPolicy/one):"
        " spec.rules[0].from[0].source.ipBlocks[0]: bad IP address (bad)"
    )


def test_a_policy_with_errors_is_not_half_compiled() -> None:
    # The shipped configuration and a policy file load together; a bad policy rejects the load.
    with pytest.raises(Rejected):
        compile_text(to_documents(ALLOW_ALL + allow_from(ipBlocks=["x"])))
