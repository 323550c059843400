"""mixerhub.networking: Istio's networking kinds, validated with field paths, and the registry."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mixerhub import registry
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot

_API = "apiVersion: networking.istio.io/v1beta1"


def load(tmp_path: Path, text: str) -> Snapshot:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    source = documents.read([path])
    return compile_snapshot(source, registry.default_registry(), build_handlers=False)


def errors(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(Rejected) as info:
        load(tmp_path, text)
    return [(e.path, e.reason) for e in info.value.errors]


def doc(kind: str, spec: str, name: str = "x", namespace: str = "shop") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return (
        f"{_API}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n"
    )


SERVICE = doc(
    "ServiceEntry",
    """
    hosts: [reviews.shop.svc.cluster.local]
    ports: [{number: 9080, name: http, protocol: HTTP}]
    resolution: STATIC
    endpoints:
    - {address: 10.0.0.1, labels: {version: v1}}
    - {address: 10.0.0.2, labels: {version: v2}, ports: {http: 9999}}
    """,
    name="reviews",
)
RULE = doc(
    "DestinationRule",
    """
    host: reviews
    subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """,
    name="reviews",
)


BAD = [
    # ServiceEntry
    (
        "ServiceEntry",
        "hosts: ['*']\nports: [{number: 80, name: http}]",
        "spec.hosts[0]",
        "invalid host *",
    ),
    ("ServiceEntry", "hosts: [a..b]\nports: [{number: 80}]", "spec.hosts[0]", "not a valid host"),
    ("ServiceEntry", "hosts: [a.com]", "spec.ports", "at least one port"),
    ("ServiceEntry", "hosts: [a.com]\nports: [{number: 0}]", "spec.ports[0].number", "1..65535"),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80, name: a}, {number: 80, name: b}]",
        "spec.ports[1].number",
        "not unique",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80, protocol: UDP}]",
        "spec.ports[0].protocol",
        "not supported",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80, protocol: FOO}]",
        "spec.ports[0].protocol",
        "unrecognized",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\naddresses: [300.1.1.1]",
        "spec.addresses[0]",
        "CIDR",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nresolution: STATIC",
        "spec.endpoints",
        "endpoints must be provided",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nresolution: STATIC\nendpoints: [{address: a.com}]",
        "spec.endpoints[0].address",
        "must be an IP address",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nendpoints: [{address: 1.1.1.1}]",
        "spec.endpoints",
        "resolution type none",
    ),
    (
        "ServiceEntry",
        "hosts: ['*.a.com']\nports: [{number: 80}]\nresolution: DNS",
        "spec.hosts[0]",
        "cannot be resolved by DNS",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80, name: http}]\nresolution: STATIC\n"
        "endpoints: [{address: 1.1.1.1, ports: {grpc: 90}}]",
        "spec.endpoints[0].ports.grpc",
        "not a port of the service entry",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nresolution: STATIC\nendpoints: [{address: 1.1.1.1}]"
        "\nworkloadSelector: {labels: {app: a}}",
        "spec.workloadSelector",
        "only one of",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nsubjectAltNames: [x]",
        "spec.subjectAltNames",
        "not supported",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nlocation: SOMEWHERE",
        "spec.location",
        "",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nexportTo: ['~', '.']",
        "spec.exportTo[0]",
        "only entry",
    ),
    (
        "ServiceEntry",
        "hosts: [a.com]\nports: [{number: 80}]\nbogus: 1",
        "spec.bogus",
        "unknown field",
    ),
    # WorkloadEntry
    ("WorkloadEntry", "ports: {http: 80}", "spec.address", "must be set"),
    ("WorkloadEntry", "address: 1.1.1.1\nports: {http: 70000}", "spec.ports.http", "1..65535"),
    (
        "WorkloadEntry",
        "address: 1.1.1.1\nlabels: {'bad key!': x}",
        "spec.labels.bad key!",
        "invalid label key",
    ),
    ("WorkloadEntry", "address: 1.1.1.1\nnetwork: n1", "spec.network", "not supported"),
    # DestinationRule
    ("DestinationRule", "subsets: []", "spec.host", "must have a host"),
    (
        "DestinationRule",
        "host: a\nsubsets: [{name: v1}, {name: v1}]",
        "spec.subsets[1].name",
        "duplicate subset",
    ),
    (
        "DestinationRule",
        "host: a\nsubsets: [{name: V_1}]",
        "spec.subsets[0].name",
        "invalid subset name",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}",
        "spec.trafficPolicy.loadBalancer.simple",
        "",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}",
        "spec.trafficPolicy.loadBalancer.consistentHash",
        "not supported",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {tls: {mode: SIMPLE}}",
        "spec.trafficPolicy.tls.mode",
        "not supported",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 120}}",
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        "[0, 100]",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {outlierDetection: {interval: 5 minutes}}",
        "spec.trafficPolicy.outlierDetection.interval",
        "not a duration",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 100us}}}",
        "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        "at least 1ms",
    ),
    (
        "DestinationRule",
        "host: a\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}",
        "spec.trafficPolicy.portLevelSettings[1].port.number",
        "duplicate port",
    ),
    (
        "DestinationRule",
        "host: a\nsubsets: [{name: v1, trafficPolicy: {connectionPool: {}}}]",
        "spec.subsets[0].trafficPolicy.connectionPool",
        "at least one field",
    ),
    # VirtualService
    (
        "VirtualService",
        "http: [{route: [{destination: {host: a}}]}]",
        "spec.hosts",
        "at least one host",
    ),
    (
        "VirtualService",
        "hosts: ['*']\nhttp: [{route: [{destination: {host: a}}]}]",
        "spec.hosts[0]",
        "mesh gateway",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}, weight: 60}, {destination:"
        " {host: b}, weight: 30}]}]",
        "spec.http[0].route",
        "total destination weight 90 != 100",
    ),
    ("VirtualService", "hosts: [a]\nhttp: [{route: []}]", "spec.http[0].route", "required"),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{match: [{uri: {regex: '(?=x)'}}], route: [{destination: {host: a}}]}]",
        "spec.http[0].match[0].uri.regex",
        "RE2",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{match: [{uri: {regex: '(a'}}], route: [{destination: {host: a}}]}]",
        "spec.http[0].match[0].uri.regex",
        "does not compile",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{match: [{uri: {}}], route: [{destination: {host: a}}]}]",
        "spec.http[0].match[0].uri",
        "one of exact, prefix or regex",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{match: [{uri: {exact: /a, prefix: /b}}], route:"
        " [{destination: {host: a}}]}]",
        "spec.http[0].match[0].uri",
        "only one of",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{match: [{headers: {X-Up: {exact: a}}}], route:"
        " [{destination: {host: a}}]}]",
        "spec.http[0].match[0].headers.X-Up",
        "lower case",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], timeout: 0.1ms}]",
        "spec.http[0].timeout",
        "at least 1ms",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], retries: {attempts: 2,"
        " retryOn: 'oops'}}]",
        "spec.http[0].retries.retryOn",
        "not a valid retryOn",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 99}}}]",
        "spec.http[0].fault.abort.httpStatus",
        "invalid abort http status",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {delay:"
        " {percentage: {value: 10}}}}]",
        "spec.http[0].fault.delay.fixedDelay",
        "required",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {delay:"
        " {fixedDelay: 1s, percentage: {value: 101}}}}]",
        "spec.http[0].fault.delay.percentage.value",
        "[0, 100]",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], mirror: {host: b}}]",
        "spec.http[0].mirror",
        "not supported",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{redirect: {uri: /b}}]",
        "spec.http[0].redirect",
        "not supported",
    ),
    (
        "VirtualService",
        "hosts: [a]\ntcp: [{route: [{destination: {host: a}}]}]",
        "spec.tcp",
        "not supported",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: '*.a.com'}}]}]",
        "spec.http[0].route[0].destination.host",
        "wildcard",
    ),
    (
        "VirtualService",
        "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], rewrite: {uri: /x,"
        " uriRegexRewrite: {match: a, rewrite: b}}}]",
        "spec.http[0].rewrite",
        "only one of",
    ),
    # Sidecar
    ("Sidecar", "workloadSelector: {labels: {app: a}}", "spec", "empty configuration"),
    (
        "Sidecar",
        "egress: [{port: {number: 80, protocol: HTTP}}]",
        "spec.egress[0].hosts",
        "at least one host",
    ),
    ("Sidecar", "egress: [{hosts: [a.com]}]", "spec.egress[0].hosts[0]", "namespace/dnsName"),
    ("Sidecar", "egress: [{hosts: ['./a..b']}]", "spec.egress[0].hosts[0]", "not a valid host"),
    (
        "Sidecar",
        "egress: [{hosts: ['./*']}, {port: {number: 80, protocol: HTTP}, hosts: ['./*']}]",
        "spec.egress[0].port",
        "should be the last",
    ),
    (
        "Sidecar",
        "egress: [{port: {number: 80}, hosts: ['./*']}]",
        "spec.egress[0].port.protocol",
        "required",
    ),
    (
        "Sidecar",
        "egress: [{port: {number: 80, protocol: HTTP}, bind: localhost, hosts: ['./*']}]",
        "spec.egress[0].bind",
        "must be an IP address",
    ),
    (
        "Sidecar",
        "ingress: [{port: {number: 80, protocol: HTTP}, defaultEndpoint: '10.1.1.1:80'}]",
        "spec.ingress[0].defaultEndpoint",
        "invalid defaultEndpoint",
    ),
    (
        "Sidecar",
        "ingress: [{port: {number: 80, protocol: HTTP}, defaultEndpoint: '127.0.0.1:8080'},"
        " {port: {number: 80, protocol: HTTP}, defaultEndpoint: '127.0.0.1:8081'}]",
        "spec.ingress[1].port.number",
        "must be unique",
    ),
    (
        "Sidecar",
        "egress: [{hosts: ['./*']}]\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}",
        "spec.outboundTrafficPolicy",
        "not supported",
    ),
]


@pytest.mark.parametrize(
    ("kind", "spec", "path", "reason"), BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)]
)
def test_invalid_spec_is_rejected_at_its_field_path(
    tmp_path: Path, kind: str, spec: str, path: str, reason: str
) -> None:
    found = errors(tmp_path, doc(kind, spec))
    assert any(p == path and reason in r for p, r in found), found


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_every_istio_version_loads(tmp_path: Path, version: str) -> None:
    text = (SERVICE + "---\n" + RULE).replace("v1beta1", version)
    snapshot = load(tmp_path, text)
    assert len(snapshot.networking.services) == 1
    assert len(snapshot.networking.destination_rules) == 1


def test_a_missing_subset_is_an_error_when_the_destination_rule_is_there(tmp_path: Path) -> None:
    vs = doc(
        "VirtualService",
        """
        hosts: [reviews]
        http: [{route: [{destination: {host: reviews, subset: v3}}]}]
        """,
    )
    found = errors(tmp_path, "---\n".join([SERVICE, RULE, vs]))
    assert found == [
        (
            "spec.http[0].route[0].destination.subset",
            "subset 'v3' is not defined by the DestinationRule of"
            " reviews.shop.svc.cluster.local (shop/reviews)",
        )
    ]


def test_a_subset_without_any_destination_rule_is_accepted(tmp_path: Path) -> None:
    vs = doc(
        "VirtualService",
        "hosts: [reviews]\nhttp: [{route: [{destination: {host: reviews, subset: v3}}]}]",
    )
    load(tmp_path, SERVICE + "---\n" + vs)


def test_two_namespace_wide_sidecars_conflict(tmp_path: Path) -> None:
    a = doc("Sidecar", "egress: [{hosts: ['./*']}]", name="a")
    b = doc("Sidecar", "egress: [{hosts: ['./*']}]", name="b")
    found = errors(tmp_path, a + "---\n" + b)
    assert [p for p, _ in found] == ["spec.workloadSelector"]


def test_registry_resolves_endpoints_and_short_names(tmp_path: Path) -> None:
    snapshot = load(tmp_path, SERVICE + "---\n" + RULE)
    net = snapshot.networking
    (service,) = net.services
    assert service.hostname == "reviews.shop.svc.cluster.local"
    assert [(i.address, i.port, dict(i.labels)) for i in service.instances[9080]] == [
        ("10.0.0.1", 9080, {"version": "v1"}),
        ("10.0.0.2", 9999, {"version": "v2"}),
    ]
    rule = net.destination_rule("shop", service)
    assert rule is not None
    assert rule.host == "reviews.shop.svc.cluster.local"  # "reviews" in namespace shop
    assert [s.name for s in rule.subsets] == ["v1", "v2"]


def test_workload_entries_are_selected_in_the_service_namespace(tmp_path: Path) -> None:
    se = doc(
        "ServiceEntry",
        """
        hosts: [ratings.shop.svc]
        ports: [{number: 9080, name: http, protocol: HTTP, targetPort: 8000}]
        resolution: STATIC
        workloadSelector: {labels: {app: ratings}}
        """,
    )
    entries = [
        doc("WorkloadEntry", "address: 10.0.0.5\nlabels: {app: ratings}", name="r1"),
        doc(
            "WorkloadEntry",
            "address: 10.0.0.6\nlabels: {app: ratings}\nports: {http: 7}",
            name="r2",
        ),
        doc("WorkloadEntry", "address: 10.0.0.7\nlabels: {app: other}", name="o"),
        doc(
            "WorkloadEntry",
            "address: 10.0.0.8\nlabels: {app: ratings}",
            name="r3",
            namespace="else",
        ),
    ]
    snapshot = load(tmp_path, "---\n".join([se, *entries]))
    (service,) = snapshot.networking.services
    assert [(i.address, i.port) for i in service.instances[9080]] == [
        ("10.0.0.5", 8000),
        ("10.0.0.6", 7),
    ]


def test_sidecar_selection_prefers_selector_then_namespace_then_root(tmp_path: Path) -> None:
    selected = doc(
        "Sidecar", "workloadSelector: {labels: {app: a}}\negress: [{hosts: ['./*']}]", name="sel"
    )
    namespace_wide = doc("Sidecar", "egress: [{hosts: ['./*']}]", name="ns")
    root = doc("Sidecar", "egress: [{hosts: ['*/*']}]", name="root", namespace="istio-system")
    net = load(tmp_path, "---\n".join([selected, namespace_wide, root])).networking

    def chosen(namespace: str, **labels: str) -> str | None:
        sidecar = net.sidecar(namespace, labels)
        return None if sidecar is None else sidecar.name

    assert chosen("shop", app="a") == "sel"
    assert chosen("shop", app="b") == "ns"
    assert chosen("other", app="a") == "root"


def test_export_to_hides_services_from_other_namespaces(tmp_path: Path) -> None:
    private = doc(
        "ServiceEntry",
        "hosts: [p.com]\nports: [{number: 80}]\nexportTo: ['.']\nresolution: DNS",
        name="p",
    )
    public = doc("ServiceEntry", "hosts: [q.com]\nports: [{number: 80}]\nresolution: DNS", name="q")
    net = load(tmp_path, private + "---\n" + public).networking
    assert [s.hostname for s in net.services_for("shop")] == ["p.com", "q.com"]
    assert [s.hostname for s in net.services_for("other")] == ["q.com"]


def test_virtual_services_bound_only_to_gateways_do_not_apply_to_sidecars(tmp_path: Path) -> None:
    vs = doc(
        "VirtualService",
        "hosts: [reviews]\ngateways: [edge]\nhttp: [{route: [{destination: {host: reviews}}]}]",
    )
    net = load(tmp_path, SERVICE + "---\n" + vs).networking
    assert net.virtual_service("shop", "reviews.shop.svc.cluster.local") is None


def test_durations_accept_go_and_protobuf_forms(tmp_path: Path) -> None:
    rule = doc(
        "DestinationRule",
        """
        host: reviews
        trafficPolicy:
          outlierDetection: {interval: 1m30s, baseEjectionTime: 0.5s}
          connectionPool: {tcp: {connectTimeout: 250ms}}
        """,
    )
    (compiled,) = load(tmp_path, rule).networking.destination_rules
    outlier = compiled.traffic_policy.default.outlier_detection
    assert outlier is not None
    assert outlier.interval == 90 * 10**9
    assert outlier.base_ejection_time == 5 * 10**8
