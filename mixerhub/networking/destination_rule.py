"""Istio's DestinationRule: a service's traffic policy (load balancing, connection pool, outlier
detection, TLS) and its subsets.

Validation follows istiod's ValidateDestinationRule. The host is resolved from a short name in
the rule's namespace (Istio's ResolveShortnameToFQDN). Policies merge as in Istio's
MergeTrafficPolicy: a subset's policy overrides the rule's field by field, and a port-level
setting overrides both for its port (``DestinationRule.policy``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydantic import Field

from mixerhub.networking import DESTINATION_RULE_PHASE, GROUP, VERSIONS
from mixerhub.networking.validation import (
    Duration,
    Path,
    PortSelector,
    SpecErrors,
    dns_label_problem,
    duration_problem,
    export_scope,
    export_to_problems,
    host_problem,
    label_problems,
    not_supported,
    port_problem,
    resolve_host,
)
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

SimpleLB = Literal[
    "UNSPECIFIED", "ROUND_ROBIN", "LEAST_CONN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"
]
TLSMode = Literal["DISABLE", "ISTIO_MUTUAL", "SIMPLE", "MUTUAL"]


class LoadBalancerSettings(Params):
    simple: SimpleLB | None = None
    consistent_hash: Any = None
    locality_lb_setting: Any = None
    warmup_duration_secs: Any = None


class TCPSettings(Params):
    max_connections: int | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: Any = None
    max_connection_duration: Duration | None = None


class HTTPSettings(Params):
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


class ConnectionPoolSettings(Params):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(Params):
    consecutive_errors: int | None = None  # deprecated in Istio: consecutive5xxErrors
    consecutive_5xx_errors: int | None = Field(default=None, alias="consecutive5xxErrors")
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


class ClientTLSSettings(Params):
    mode: TLSMode = "DISABLE"
    sni: str = ""
    client_certificate: Any = None
    private_key: Any = None
    ca_certificates: Any = None
    credential_name: Any = None
    subject_alt_names: Any = None
    insecure_skip_verify: Any = None


class PortTrafficPolicy(Params):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicySpec(Params):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)
    tunnel: Any = None
    proxy_protocol: Any = None


class SubsetSpec(Params):
    name: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicySpec | None = None


class DestinationRuleSpec(Params):
    host: str = ""
    traffic_policy: TrafficPolicySpec | None = None
    subsets: list[SubsetSpec] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: Any = None


@dataclass(frozen=True)
class Policy:
    """The traffic policy one cluster gets: every part optional."""

    load_balancer: str | None = None  # simple: ROUND_ROBIN | LEAST_REQUEST | RANDOM | PASSTHROUGH
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None

    def over(self, base: Policy) -> Policy:
        """This policy's parts where set, else the base's (Istio's MergeTrafficPolicy)."""
        return Policy(
            self.load_balancer or base.load_balancer,
            self.connection_pool or base.connection_pool,
            self.outlier_detection or base.outlier_detection,
            self.tls or base.tls,
        )


@dataclass(frozen=True)
class TrafficPolicy:
    default: Policy = Policy()
    ports: Mapping[int, Policy] = field(default_factory=dict)

    def for_port(self, port: int) -> Policy:
        override = self.ports.get(port)
        return self.default if override is None else override.over(self.default)


@dataclass(frozen=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    traffic_policy: TrafficPolicy | None


@dataclass(frozen=True)
class DestinationRule:
    name: str
    namespace: str
    host: str  # resolved: a short name is a service of the rule's namespace
    traffic_policy: TrafficPolicy
    subsets: tuple[Subset, ...]
    export_to: frozenset[str]

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy(self, port: int, subset: str = "") -> Policy:
        """The policy of the cluster for (port, subset)."""
        policy = self.traffic_policy.for_port(port)
        found = self.subset(subset) if subset else None
        if found is not None and found.traffic_policy is not None:
            policy = found.traffic_policy.for_port(port).over(policy)
        return policy


Fail = Callable[[Path, str], None]


def _simple_lb(value: SimpleLB | None) -> str | None:
    # LEAST_CONN is Istio's deprecated name of LEAST_REQUEST; UNSPECIFIED is Envoy's default.
    if value is None or value == "UNSPECIFIED":
        return None
    return "LEAST_REQUEST" if value == "LEAST_CONN" else value


def _policy(
    lb: LoadBalancerSettings | None,
    pool: ConnectionPoolSettings | None,
    outlier: OutlierDetection | None,
    tls: ClientTLSSettings | None,
    path: Path,
    fail: Fail,
) -> Policy:
    simple: str | None = None
    if lb is not None:
        not_supported(
            fail,
            (*path, "loadBalancer"),
            {
                "consistentHash": lb.consistent_hash,
                "localityLbSetting": lb.locality_lb_setting,
                "warmupDurationSecs": lb.warmup_duration_secs,
            },
        )
        simple = _simple_lb(lb.simple)
    if pool is not None:
        _check_pool(pool, (*path, "connectionPool"), fail)
    if outlier is not None:
        _check_outlier(outlier, (*path, "outlierDetection"), fail)
    if tls is not None:
        _check_tls(tls, (*path, "tls"), fail)
    return Policy(simple, pool, outlier, tls)


def _check_pool(pool: ConnectionPoolSettings, path: Path, fail: Fail) -> None:
    if pool.tcp is None and pool.http is None:
        fail(path, "must have at least one field present")
    if pool.tcp is not None:
        t = pool.tcp
        not_supported(fail, (*path, "tcp"), {"tcpKeepalive": t.tcp_keepalive})
        if t.max_connections is not None and t.max_connections < 0:
            fail((*path, "tcp", "maxConnections"), "must be non-negative")
        for name, value in (
            ("connectTimeout", t.connect_timeout),
            ("maxConnectionDuration", t.max_connection_duration),
        ):
            problem = None if value is None else duration_problem(value)
            if problem:
                fail((*path, "tcp", name), problem)
    if pool.http is not None:
        h = pool.http
        for name, number in (
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ):
            if number is not None and number < 0:
                fail((*path, "http", name), "must be non-negative")
        if h.idle_timeout is not None:
            problem = duration_problem(h.idle_timeout)
            if problem:
                fail((*path, "http", "idleTimeout"), problem)


def _check_outlier(o: OutlierDetection, path: Path, fail: Fail) -> None:
    for name, number in (
        ("consecutiveErrors", o.consecutive_errors),
        ("consecutive5xxErrors", o.consecutive_5xx_errors),
        ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
        ("consecutiveLocalOriginFailures", o.consecutive_local_origin_failures),
    ):
        if number is not None and number < 0:
            fail((*path, name), "outlier detection consecutive errors cannot be negative")
    for name, percent in (
        ("maxEjectionPercent", o.max_ejection_percent),
        ("minHealthPercent", o.min_health_percent),
    ):
        if percent is not None and not 0 <= percent <= 100:
            fail((*path, name), "outlier detection percent must be in range [0, 100]")
    for name, value in (("interval", o.interval), ("baseEjectionTime", o.base_ejection_time)):
        problem = None if value is None else duration_problem(value)
        if problem:
            fail((*path, name), problem)


def _check_tls(tls: ClientTLSSettings, path: Path, fail: Fail) -> None:
    if tls.mode in ("SIMPLE", "MUTUAL"):
        # These need certificates from files or credentialName, which mixerhub does not serve.
        fail((*path, "mode"), f"TLS mode {tls.mode} is not supported by mixerhub")
    not_supported(
        fail,
        path,
        {
            "clientCertificate": tls.client_certificate,
            "privateKey": tls.private_key,
            "caCertificates": tls.ca_certificates,
            "credentialName": tls.credential_name,
            "subjectAltNames": tls.subject_alt_names,
            "insecureSkipVerify": tls.insecure_skip_verify,
        },
    )
    if tls.sni and tls.mode == "DISABLE":
        fail((*path, "sni"), "sni is only used with TLS")


def compile_traffic_policy(spec: TrafficPolicySpec, path: Path, fail: Fail) -> TrafficPolicy:
    not_supported(fail, path, {"tunnel": spec.tunnel, "proxyProtocol": spec.proxy_protocol})
    default = _policy(
        spec.load_balancer, spec.connection_pool, spec.outlier_detection, spec.tls, path, fail
    )
    ports: dict[int, Policy] = {}
    for i, setting in enumerate(spec.port_level_settings):
        at: Path = (*path, "portLevelSettings", i)
        if setting.port is None:
            fail((*at, "port"), "port must be specified")
            continue
        problem = port_problem(setting.port.number)
        if problem:
            fail((*at, "port", "number"), problem)
        elif setting.port.number in ports:
            fail((*at, "port", "number"), f"duplicate port {setting.port.number}")
        ports[setting.port.number] = _policy(
            setting.load_balancer,
            setting.connection_pool,
            setting.outlier_detection,
            setting.tls,
            at,
            fail,
        )
    return TrafficPolicy(default, ports)


def compile_destination_rule(doc: Document, spec: DestinationRuleSpec, c: Compilation) -> None:
    if not c.claim("DestinationRule", doc):
        return
    fail = SpecErrors(doc, c)

    not_supported(fail, (), {"workloadSelector": spec.workload_selector})
    if not spec.host:
        fail(("host",), "destination rule must have a host")
    else:
        problem = host_problem(spec.host)
        if problem:
            fail(("host",), problem)
    for i, problem in export_to_problems(spec.export_to):
        fail(("exportTo", i), problem)
    policy = TrafficPolicy()
    if spec.traffic_policy is not None:
        policy = compile_traffic_policy(spec.traffic_policy, ("trafficPolicy",), fail)
    subsets: list[Subset] = []
    names: set[str] = set()
    for i, s in enumerate(spec.subsets):
        if not s.name:
            fail(("subsets", i, "name"), "subset name must not be empty")
        elif dns_label_problem(s.name):
            fail(("subsets", i, "name"), f"invalid subset name {s.name!r}")
        elif s.name in names:
            fail(("subsets", i, "name"), f"duplicate subset name {s.name!r}")
        names.add(s.name)
        for key, problem in label_problems(s.labels):
            fail(("subsets", i, "labels", key), problem)
        subset_policy = None
        if s.traffic_policy is not None:
            subset_policy = compile_traffic_policy(
                s.traffic_policy, ("subsets", i, "trafficPolicy"), fail
            )
        subsets.append(Subset(s.name, dict(s.labels), subset_policy))
    if fail.failed:
        return
    c.destination_rules.append(
        DestinationRule(
            doc.name,
            doc.namespace,
            resolve_host(spec.host, doc.namespace),
            policy,
            tuple(subsets),
            export_scope(spec.export_to, doc.namespace),
        )
    )


DESTINATION_RULE: Final = Kind(
    GROUP,
    VERSIONS,
    "DestinationRule",
    DestinationRuleSpec,
    DESTINATION_RULE_PHASE,
    compile_destination_rule,
)
