"""Istio's VirtualService: HTTP routing for a set of hosts (matches, weighted destinations,
rewrites, timeouts, retries, fault injection, header manipulation).

Validation follows istiod's ValidateVirtualService. Only the sidecars' gateway ("mesh") is
served: a VirtualService whose ``gateways`` leave out "mesh" is kept but applies to no proxy, as
in Istio; a gateway name is otherwise not checked against any Gateway. Hosts and destination
hosts are resolved from short names in the VirtualService's namespace. A destination subset is
checked against the DestinationRule for its host when that rule is in the same configuration
(Istio leaves this to istioctl analyze; a route to a missing subset fails every request).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import Field

from mixerhub.networking import GROUP, VERSIONS, VIRTUAL_SERVICE_PHASE
from mixerhub.networking.validation import (
    Duration,
    Path,
    Percent,
    PortSelector,
    SpecErrors,
    dns_label_problem,
    duration_problem,
    export_scope,
    export_to_problems,
    header_name_problem,
    host_problem,
    label_problems,
    not_supported,
    port_problem,
    regex_problem,
    resolve_host,
    visible,
)
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

MESH: Final = "mesh"

# Envoy's retry policies (x-envoy-retry-on and x-envoy-retry-grpc-on), which Istio passes on.
RETRY_POLICIES: Final = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


class StringMatch(Params):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class HTTPMatchRequest(Params):
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: int | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str = ""
    stat_prefix: Any = None


class Destination(Params):
    host: str = ""
    subset: str = ""
    port: PortSelector | None = None


class HeaderOperations(Params):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(Params):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(Params):
    destination: Destination | None = None
    weight: int | None = None
    headers: Headers | None = None


class RegexRewrite(Params):
    match: str = ""
    rewrite: str = ""


class HTTPRewrite(Params):
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None


class HTTPRetry(Params):
    attempts: int = 0
    per_try_timeout: Duration | None = None
    retry_on: str = ""
    retry_remote_localities: Any = None


class Delay(Params):
    fixed_delay: Duration | None = None
    exponential_delay: Any = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated in Istio: percentage


class Abort(Params):
    http_status: int | None = None
    grpc_status: Any = None
    http2_error: Any = None
    percentage: Percent | None = None


class HTTPFaultInjection(Params):
    delay: Delay | None = None
    abort: Abort | None = None


class HTTPRouteSpec(Params):
    name: str = ""
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(default_factory=list)
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    headers: Headers | None = None
    redirect: Any = None
    direct_response: Any = None
    delegate: Any = None
    mirror: Any = None
    mirrors: Any = None
    mirror_percentage: Any = None
    mirror_percent: Any = None
    cors_policy: Any = None


class VirtualServiceSpec(Params):
    hosts: list[str] = Field(default_factory=list)
    gateways: list[str] = Field(default_factory=list)
    http: list[HTTPRouteSpec] = Field(default_factory=list)
    tls: Any = None
    tcp: Any = None
    export_to: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class RouteDestination:
    host: str  # resolved
    subset: str
    port: int | None
    weight: int  # percent; 100 for a single destination
    headers: Headers | None


@dataclass(frozen=True)
class HTTPRoute:
    name: str
    matches: tuple[HTTPMatchRequest, ...]
    destinations: tuple[RouteDestination, ...]
    rewrite: HTTPRewrite | None
    timeout: int | None  # nanoseconds
    retries: HTTPRetry | None
    fault: HTTPFaultInjection | None
    headers: Headers | None


@dataclass(frozen=True)
class VirtualService:
    name: str
    namespace: str
    hosts: tuple[str, ...]  # resolved
    http: tuple[HTTPRoute, ...]
    export_to: frozenset[str]
    # Whether it applies to sidecars: no gateways, or "mesh" among them.
    mesh: bool


Fail = Callable[[Path, str], None]


class _Checker:
    def __init__(self, doc: Document, c: Compilation) -> None:
        self.doc, self.c = doc, c
        self.fail = SpecErrors(doc, c)

    @property
    def failed(self) -> bool:
        return self.fail.failed

    def string_match(self, m: StringMatch, path: Path, *, empty_ok: bool = False) -> None:
        given = [
            k
            for k, v in (("exact", m.exact), ("prefix", m.prefix), ("regex", m.regex))
            if v is not None
        ]
        if len(given) > 1:
            self.fail(
                path, f"only one of exact, prefix or regex may be set (got {', '.join(given)})"
            )
        elif not given and not empty_ok:
            self.fail(path, "one of exact, prefix or regex is required")
        if m.regex is not None:
            problem = regex_problem(m.regex)
            if problem:
                self.fail((*path, "regex"), problem)

    def match(self, m: HTTPMatchRequest, path: Path) -> None:
        not_supported(self.fail, path, {"statPrefix": m.stat_prefix})
        for name in ("uri", "scheme", "method", "authority"):
            value = getattr(m, name)
            if value is not None:
                self.string_match(value, (*path, name))
        for field_name, headers in (("headers", m.headers), ("withoutHeaders", m.without_headers)):
            for header, sm in headers.items():
                problem = header_name_problem(header)
                if problem:
                    self.fail((*path, field_name, header), problem)
                # Istio: an empty match on a header is a presence match.
                self.string_match(sm, (*path, field_name, header), empty_ok=True)
        for param, sm in m.query_params.items():
            if not param:
                self.fail((*path, "queryParams"), "query parameter name must not be empty")
            if sm.prefix is not None:
                self.fail(
                    (*path, "queryParams", param, "prefix"),
                    "query params support exact and regex only",
                )
            self.string_match(sm, (*path, "queryParams", param), empty_ok=True)
        if m.port is not None:
            problem = port_problem(m.port)
            if problem:
                self.fail((*path, "port"), problem)
        for key, problem in label_problems(m.source_labels):
            self.fail((*path, "sourceLabels", key), problem)
        if m.source_namespace and dns_label_problem(m.source_namespace):
            self.fail((*path, "sourceNamespace"), f"invalid namespace {m.source_namespace!r}")

    def headers(self, h: Headers, path: Path) -> None:
        for side, ops in (("request", h.request), ("response", h.response)):
            if ops is None:
                continue
            for op, names in (
                ("set", list(ops.set)),
                ("add", list(ops.add)),
                ("remove", ops.remove),
            ):
                for name in names:
                    problem = header_name_problem(name.lower())
                    if problem:
                        self.fail((*path, side, op, name), problem)

    def fault(self, f: HTTPFaultInjection, path: Path) -> None:
        if f.delay is None and f.abort is None:
            self.fail(path, "HTTP fault injection must have an abort and/or a delay")
        if f.delay is not None:
            d, at = f.delay, (*path, "delay")
            not_supported(self.fail, at, {"exponentialDelay": d.exponential_delay})
            if d.fixed_delay is None:
                self.fail((*at, "fixedDelay"), "required field is missing")
            else:
                problem = duration_problem(d.fixed_delay)
                if problem:
                    self.fail((*at, "fixedDelay"), problem)
            self.percent(d.percentage, (*at, "percentage"))
            if d.percent is not None and not 0 <= d.percent <= 100:
                self.fail((*at, "percent"), "percentage must be in range [0, 100]")
        if f.abort is not None:
            a, at = f.abort, (*path, "abort")
            not_supported(self.fail, at, {"grpcStatus": a.grpc_status, "http2Error": a.http2_error})
            if a.http_status is None:
                self.fail((*at, "httpStatus"), "required field is missing")
            elif not 200 <= a.http_status <= 599:
                self.fail((*at, "httpStatus"), f"invalid abort http status {a.http_status}")
            self.percent(a.percentage, (*at, "percentage"))

    def percent(self, p: Percent | None, path: Path) -> None:
        if p is not None and not 0 <= p.value <= 100:
            self.fail((*path, "value"), "percentage must be in range [0, 100]")

    def retries(self, r: HTTPRetry, path: Path) -> None:
        not_supported(self.fail, path, {"retryRemoteLocalities": r.retry_remote_localities})
        if r.attempts < 0:
            self.fail((*path, "attempts"), "attempts cannot be negative")
        if r.per_try_timeout is not None:
            problem = duration_problem(r.per_try_timeout)
            if problem:
                self.fail((*path, "perTryTimeout"), problem)
        for policy in filter(None, (p.strip() for p in r.retry_on.split(","))):
            if policy not in RETRY_POLICIES and not (
                policy.isdigit() and 100 <= int(policy) <= 599
            ):
                self.fail((*path, "retryOn"), f"{policy!r} is not a valid retryOn policy")

    def destination(self, d: HTTPRouteDestination, path: Path) -> RouteDestination | None:
        if d.destination is None:
            self.fail((*path, "destination"), "destination is required")
            return None
        dest, at = d.destination, (*path, "destination")
        problem = host_problem(dest.host) if dest.host else "destination host is required"
        if problem:
            self.fail((*at, "host"), problem)
        elif dest.host.startswith("*"):
            self.fail((*at, "host"), "a destination host must not be a wildcard")
        if dest.subset and dns_label_problem(dest.subset):
            self.fail((*at, "subset"), f"invalid subset name {dest.subset!r}")
        port = dest.port.number if dest.port is not None else None
        port_error = None if port is None else port_problem(port)
        if port_error:
            self.fail((*at, "port", "number"), port_error)
        if d.weight is not None and d.weight < 0:
            self.fail((*path, "weight"), "weight must not be negative")
        if d.headers is not None:
            self.headers(d.headers, (*path, "headers"))
        host = resolve_host(dest.host, self.doc.namespace)
        return RouteDestination(host, dest.subset, port, d.weight or 0, d.headers)

    def subsets(self, destinations: list[RouteDestination], path: Path) -> None:
        for i, d in enumerate(destinations):
            if not d.subset:
                continue
            rules = [
                r
                for r in self.c.destination_rules
                if r.host == d.host and visible(r.export_to, self.doc.namespace)
            ]
            if rules and not any(r.subset(d.subset) for r in rules):
                names = ", ".join(f"{r.namespace}/{r.name}" for r in rules)
                self.fail(
                    (*path, i, "destination", "subset"),
                    f"subset {d.subset!r} is not defined by the DestinationRule of {d.host}"
                    f" ({names})",
                )

    def route(self, r: HTTPRouteSpec, path: Path) -> HTTPRoute:
        not_supported(
            self.fail,
            path,
            {
                "redirect": r.redirect,
                "directResponse": r.direct_response,
                "delegate": r.delegate,
                "mirror": r.mirror,
                "mirrors": r.mirrors,
                "mirrorPercentage": r.mirror_percentage,
                "mirrorPercent": r.mirror_percent,
                "corsPolicy": r.cors_policy,
            },
        )
        for i, m in enumerate(r.match):
            self.match(m, (*path, "match", i))
        if not r.route:
            self.fail((*path, "route"), "HTTP route is required")
        destinations = [
            d
            for d in (self.destination(rd, (*path, "route", i)) for i, rd in enumerate(r.route))
            if d is not None
        ]
        if len(destinations) == 1:
            destinations = [_with_weight(destinations[0], 100)]
        elif destinations:
            total = sum(d.weight for d in destinations)
            if total != 100:
                self.fail((*path, "route"), f"total destination weight {total} != 100")
        self.subsets(destinations, (*path, "route"))
        if r.rewrite is not None:
            rw, at = r.rewrite, (*path, "rewrite")
            if rw.uri and rw.uri_regex_rewrite is not None:
                self.fail(at, "only one of uri and uriRegexRewrite may be set")
            if rw.uri_regex_rewrite is not None:
                problem = regex_problem(rw.uri_regex_rewrite.match)
                if problem:
                    self.fail((*at, "uriRegexRewrite", "match"), problem)
            if rw.authority and host_problem(rw.authority.rsplit(":", 1)[0], wildcard=False):
                self.fail((*at, "authority"), f"invalid authority {rw.authority!r}")
        if r.timeout is not None:
            problem = duration_problem(r.timeout)
            if problem:
                self.fail((*path, "timeout"), problem)
        if r.retries is not None:
            self.retries(r.retries, (*path, "retries"))
        if r.fault is not None:
            self.fault(r.fault, (*path, "fault"))
        if r.headers is not None:
            self.headers(r.headers, (*path, "headers"))
        return HTTPRoute(
            r.name,
            tuple(r.match),
            tuple(destinations),
            r.rewrite,
            r.timeout,
            r.retries,
            r.fault,
            r.headers,
        )


def _with_weight(d: RouteDestination, weight: int) -> RouteDestination:
    return RouteDestination(d.host, d.subset, d.port, weight, d.headers)


def compile_virtual_service(doc: Document, spec: VirtualServiceSpec, c: Compilation) -> None:
    if not c.claim("VirtualService", doc):
        return
    check = _Checker(doc, c)
    not_supported(check.fail, (), {"tls": spec.tls, "tcp": spec.tcp})
    mesh = not spec.gateways or MESH in spec.gateways
    if not spec.hosts:
        check.fail(("hosts",), "virtual service must have at least one host")
    for i, host in enumerate(spec.hosts):
        if host == "*" and mesh:
            check.fail(
                ("hosts", i),
                "wildcard host * is not allowed for virtual services bound to the mesh gateway",
            )
            continue
        problem = host_problem(host)
        if problem:
            check.fail(("hosts", i), problem)
    for i, gateway in enumerate(spec.gateways):
        name = gateway.rpartition("/")[2]
        if gateway != MESH and (not name or host_problem(name, wildcard=False)):
            check.fail(("gateways", i), f"invalid gateway name {gateway!r}")
    for i, problem in export_to_problems(spec.export_to):
        check.fail(("exportTo", i), problem)
    if not spec.http and mesh:
        check.fail(("http",), "http must have at least one route (tcp and tls are not supported)")
    routes = tuple(check.route(r, ("http", i)) for i, r in enumerate(spec.http))
    if check.failed:
        return
    c.virtual_services.append(
        VirtualService(
            doc.name,
            doc.namespace,
            tuple(resolve_host(h, doc.namespace) for h in spec.hosts),
            routes,
            export_scope(spec.export_to, doc.namespace),
            mesh,
        )
    )


def applies_to(match: HTTPMatchRequest, namespace: str, labels: Mapping[str, str]) -> bool:
    """Whether a match's source conditions (sourceLabels, sourceNamespace, gateways) hold for
    a sidecar: Istio leaves out, per proxy, the matches that cannot hold for it."""
    if match.gateways and MESH not in match.gateways:
        return False
    if match.source_namespace and match.source_namespace != namespace:
        return False
    return all(labels.get(k) == v for k, v in match.source_labels.items())


VIRTUAL_SERVICE: Final = Kind(
    GROUP,
    VERSIONS,
    "VirtualService",
    VirtualServiceSpec,
    VIRTUAL_SERVICE_PHASE,
    compile_virtual_service,
)
