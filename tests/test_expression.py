"""Mixer's expression language: what Istio 1.4 configuration needs, and Mixer-only behaviour."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import pickle
import re
from collections.abc import Iterator, Mapping

import pytest

from mixerhub.attributes import ValueType
from mixerhub.expression import EvaluationError, Expression, ExpressionError, compile_expression

V = ValueType

# Istio 1.4's attribute manifests, as shipped in
# manifests/istio-telemetry/mixer-telemetry/templates/config.yaml (attributemanifest "istioproxy"
# and "kubernetes").
ISTIO_1_4_ATTRIBUTES: Mapping[str, ValueType] = {
    **dict.fromkeys(
        (
            "origin.uid", "origin.user", "request.id", "request.host", "request.method",
            "request.path", "request.url_path", "request.reason", "request.referer",
            "request.scheme", "request.useragent", "response.grpc_status", "response.grpc_message",
            "source.uid", "source.user", "source.principal", "destination.uid",
            "destination.principal", "connection.event", "connection.id",
            "connection.requested_server_name", "context.protocol", "context.proxy_error_code",
            "context.reporter.kind", "context.reporter.uid", "context.proxy_version",
            "api.service", "api.version", "api.operation", "api.protocol",
            "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
            "request.auth.raw_claims", "request.api_key", "rbac.permissive.response_code",
            "rbac.permissive.effective_policy_id", "check.error_message", "source.name",
            "source.namespace", "source.owner", "source.serviceAccount", "source.services",
            "source.workload.uid", "source.workload.name", "source.workload.namespace",
            "destination.owner", "destination.name", "destination.container.name",
            "destination.namespace", "destination.service.uid", "destination.service.name",
            "destination.service.namespace", "destination.service.host",
            "destination.serviceAccount", "destination.workload.uid", "destination.workload.name",
            "destination.workload.namespace",
        ),
        V.STRING,
    ),
    **dict.fromkeys(
        (
            "request.total_size", "request.size", "response.code", "response.total_size",
            "response.size", "destination.port", "connection.received.bytes",
            "connection.received.bytes_total", "connection.sent.bytes",
            "connection.sent.bytes_total", "check.error_code",
        ),
        V.INT64,
    ),
    **dict.fromkeys(
        (
            "request.headers", "request.query_params", "response.headers", "request.auth.claims",
            "source.labels", "source.metadata", "destination.labels", "destination.metadata",
        ),
        V.STRING_MAP,
    ),
    **dict.fromkeys(
        ("request.time", "response.time", "context.timestamp", "context.time"), V.TIMESTAMP
    ),
    **dict.fromkeys(
        ("connection.mtls", "context.reporter.local", "check.cache_hit", "quota.cache_hit"), V.BOOL
    ),
    **dict.fromkeys(("response.duration", "connection.duration"), V.DURATION),
    **dict.fromkeys(("origin.ip", "source.ip", "destination.ip"), V.IP_ADDRESS),
}  # fmt: skip

# The kubernetesenv adapter's outputs; Mixer rewrote "$out." in attributeBindings to this prefix
# before compiling (mixer/template/template.gen.go), so the caller does the same.
KUBERNETES_OUT = "adapter_template_kubernetes.output."
KUBERNETES_OUTPUTS: Mapping[str, ValueType] = {
    KUBERNETES_OUT + name: value_type
    for name, value_type in {
        "source_pod_ip": V.IP_ADDRESS,
        "source_pod_uid": V.STRING,
        "source_labels": V.STRING_MAP,
        "source_pod_name": V.STRING,
        "source_namespace": V.STRING,
        "source_owner": V.STRING,
        "source_service_account_name": V.STRING,
        "source_workload_uid": V.STRING,
        "source_workload_name": V.STRING,
        "source_workload_namespace": V.STRING,
        "destination_pod_ip": V.IP_ADDRESS,
        "destination_pod_uid": V.STRING,
        "destination_labels": V.STRING_MAP,
        "destination_pod_name": V.STRING,
        "destination_container_name": V.STRING,
        "destination_namespace": V.STRING,
        "destination_owner": V.STRING,
        "destination_service_account_name": V.STRING,
        "destination_workload_uid": V.STRING,
        "destination_workload_name": V.STRING,
        "destination_workload_namespace": V.STRING,
    }.items()
}

# Rule matches in Istio 1.4's telemetry config.yaml and samples/bookinfo/policy/*.yaml.
ISTIO_RULE_MATCHES = [
    'context.protocol == "http" || context.protocol == "grpc"',
    'context.protocol == "tcp"',
    '(context.protocol == "http" || context.protocol == "grpc")'
    ' && (match((request.useragent | "-"), "kube-probe*") == false)'
    ' && (match((request.useragent | "-"), "Prometheus*") == false)',
    'context.protocol == "tcp" && ((connection.event | "na") == "open")',
    'context.protocol == "tcp" && ((connection.event | "na") == "close")',
    'source.labels["istio"] == "ingressgateway"',
    'destination.labels["app"] == "ratings" && source.labels["app"]=="reviews"'
    ' && source.labels["version"] == "v3"',
    'destination.labels["app"] == "details"'
    ' && source.user == "cluster.local/ns/default/sa/bookinfo-productpage"',
    'destination.labels["app"] == "ratings"',
    '(source.labels["istio"] | "") == "ingressgateway"'
    ' && (request.headers["x-user"] | "") == "john"',
    'request.headers["x-user"] == "john"',
    '(destination.labels["app"]|"unknown") == "ratings"',
    'match(request.headers["cookie"], "user=*") == false',
    "true",
]

# Instance params (field expressions) in the same files, with the template field's type where the
# field has one (None: an istio.policy.v1beta1.Value field, which takes any type).
ISTIO_INSTANCE_PARAMS: list[tuple[str, ValueType | None]] = [
    ('"Info"', V.STRING),
    ("request.time", V.TIMESTAMP),
    ('context.time | timestamp("2017-01-01T00:00:00Z")', V.TIMESTAMP),
    ('"global"', V.STRING),
    ('"UNSPECIFIED"', V.STRING),
    ("1", None),
    ("2", None),
    ('response.duration | "0ms"', None),
    ("request.size | 0", None),
    ("response.size | 0", None),
    ("connection.sent.bytes | 0", None),
    ("connection.received.bytes | 0", None),
    ('"twice the fun!"', None),
    ('source.ip | ip("0.0.0.0")', None),
    ('source.labels["app"] | ""', None),
    ('source.principal | ""', None),
    ('source.name | ""', None),
    ('source.workload.name | ""', None),
    ('destination.labels["app"] | ""', None),
    ('destination.ip | ip("0.0.0.0")', None),
    ('destination.service.host | request.host | ""', None),
    ('request.auth.raw_claims | ""', None),
    ('request.api_key | request.headers["x-api-key"] | ""', None),
    ('request.scheme | context.protocol | "http"', None),
    ('request.path | ""', None),
    ("response.code | 0", None),
    ('context.proxy_error_code | ""', None),
    ('rbac.permissive.response_code | "none"', None),
    ('rbac.permissive.effective_policy_id | "none"', None),
    ('request.headers["x-request-id"] | ""', None),
    ('request.headers["x-client-trace-id"] | ""', None),
    (
        'conditional((context.reporter.kind | "inbound") == "outbound", "unknown",'
        ' conditional(connection.mtls | false, "mutual_tls", "none"))',
        None,
    ),
    ('connection.requested_server_name | ""', None),
    ('request.useragent | ""', None),
    ("response.time", None),
    ("request.total_size | 0", None),
    ('request.headers[":authority"] | request.host | ""', None),
    ('request.headers["x-forwarded-for"] | "0.0.0.0"', None),
    (
        'conditional((context.reporter.kind | "inbound") == "outbound", "source", "destination")',
        None,
    ),
    ('response.grpc_status | ""', None),
    ('connection.event | ""', None),
    ('context.protocol | "tcp"', None),
    ('connection.duration | "0ms"', None),
    ("connection.received.bytes_total | 0", None),
    ('conditional((context.reporter.kind | "inbound") == "outbound", "client", "server")', None),
    ('source.workload.namespace | "unknown"', None),
    ('source.labels["version"] | "unknown"', None),
    (
        'destination.service.host | conditional((destination.service.name | "unknown")'
        ' == "unknown", "unknown", request.host)',
        None,
    ),
    ('api.protocol | context.protocol | "unknown"', None),
    ("response.code | 200", None),
    ('context.proxy_error_code | "-"', None),
    ('request.headers["x-forwarded-for"] | "unknown"', None),
    ('destination.labels["app"] | destination.service.name | "unknown"', None),
    ('request.host | "unknown"', None),
    ('source.name | "unknown"', None),
    ('destination.container.name | "unknown"', None),
    # The kubernetes template's typed fields.
    ('source.uid | ""', V.STRING),
    ('source.ip | ip("0.0.0.0")', V.IP_ADDRESS),
    ("destination.port | 0", V.INT64),
    ('source.labels["version"]', V.STRING),
]

# attributeBindings of the kubernetesenv instance, with "$out." already rewritten, and the type of
# the attribute each one sets.
ISTIO_ATTRIBUTE_BINDINGS: list[tuple[str, ValueType]] = [
    (f'{KUBERNETES_OUT}source_pod_ip | ip("0.0.0.0")', V.IP_ADDRESS),
    (f'{KUBERNETES_OUT}source_pod_uid | "unknown"', V.STRING),
    (f"{KUBERNETES_OUT}source_labels | emptyStringMap()", V.STRING_MAP),
    (f'{KUBERNETES_OUT}source_namespace | "default"', V.STRING),
    (f'{KUBERNETES_OUT}destination_pod_ip | ip("0.0.0.0")', V.IP_ADDRESS),
    (f"{KUBERNETES_OUT}destination_labels | emptyStringMap()", V.STRING_MAP),
    (f'{KUBERNETES_OUT}destination_container_name | "unknown"', V.STRING),
    (f'{KUBERNETES_OUT}destination_workload_namespace | "unknown"', V.STRING),
]

BAG: Mapping[str, object] = {
    "request.path": "/api/v1/ratings",
    "request.host": "ratings.default.svc.cluster.local",
    "request.method": "GET",
    "request.size": 120,
    "request.headers": {"user-agent": "curl/7.64", "x-empty": "", "x-id": "abc"},
    "request.time": datetime.datetime(2019, 11, 14, 12, 0, tzinfo=datetime.UTC),
    "response.code": 200,
    "response.time": datetime.datetime(2019, 11, 14, 12, 0, 1, tzinfo=datetime.UTC),
    "response.duration": datetime.timedelta(milliseconds=20),
    "source.labels": {"app": "reviews", "version": "v3"},
    "source.ip": ipaddress.ip_address("10.1.2.3"),
    "source.principal": "",
    "destination.service.host": "ratings.default.svc.cluster.local",
    "connection.mtls": False,
    "context.reporter.kind": "outbound",
    "context.protocol": "http",
    "destination.labels": {"app": "ratings"},
    "source.user": "cluster.local/ns/default/sa/bookinfo-productpage",
}


def evaluate(
    source: str,
    bag: Mapping[str, object] = BAG,
    attributes: Mapping[str, ValueType] = ISTIO_1_4_ATTRIBUTES,
) -> object:
    return compile_expression(source, attributes).evaluate(bag)


# --- Istio's own configuration ------------------------------------------------------------------


@pytest.mark.parametrize("source", ISTIO_RULE_MATCHES)
def test_istio_rule_matches_compile_as_bool(source: str) -> None:
    expression = compile_expression(source, ISTIO_1_4_ATTRIBUTES, V.BOOL)
    assert expression.result_type is V.BOOL
    assert isinstance(expression.evaluate(BAG), bool)


@pytest.mark.parametrize(("source", "field_type"), ISTIO_INSTANCE_PARAMS)
def test_istio_instance_params_compile(source: str, field_type: ValueType | None) -> None:
    expression = compile_expression(source, ISTIO_1_4_ATTRIBUTES, field_type)
    assert expression.result_type is not V.VALUE_TYPE_UNSPECIFIED
    if field_type is not None:
        assert expression.result_type is field_type
    expression.evaluate({**BAG, "connection.event": "open"})


@pytest.mark.parametrize(("source", "attribute_type"), ISTIO_ATTRIBUTE_BINDINGS)
def test_istio_attribute_bindings_compile(source: str, attribute_type: ValueType) -> None:
    attributes = {**ISTIO_1_4_ATTRIBUTES, **KUBERNETES_OUTPUTS}
    expression = compile_expression(source, attributes, attribute_type)
    assert expression.result_type is attribute_type
    expression.evaluate({})


def test_istio_latency_default_is_a_duration() -> None:
    expression = compile_expression('response.duration | "0ms"', ISTIO_1_4_ATTRIBUTES)
    assert expression.result_type is V.DURATION
    assert expression.evaluate({}) == datetime.timedelta(0)
    assert expression.evaluate(BAG) == datetime.timedelta(milliseconds=20)


def test_istio_connection_security_policy() -> None:
    source = ISTIO_INSTANCE_PARAMS[31][0]
    expression = compile_expression(source, ISTIO_1_4_ATTRIBUTES)
    assert expression.evaluate({"context.reporter.kind": "outbound"}) == "unknown"
    assert expression.evaluate({}) == "none"
    assert expression.evaluate({"connection.mtls": True}) == "mutual_tls"


# --- The | operator -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "bag", "want"),
    [
        # Missing: the default applies.
        ('request.path | "/"', {}, "/"),
        # Present: the attribute wins, even when it is empty. Mixer 1.4's IL (tresolve_s) tested
        # presence only; "treat empty strings as nil" belonged to the 2017 evaluator it replaced.
        ('request.path | "/"', {"request.path": ""}, ""),
        ('request.path | "/"', {"request.path": "/x"}, "/x"),
        # Non-string types: a present 0 or false is a value, not a gap.
        ("response.code | 200", {"response.code": 0}, 0),
        ("response.code | 200", {}, 200),
        ("connection.mtls | true", {"connection.mtls": False}, False),
        ("connection.mtls | true", {}, True),
        # Chains take the first present option, left to right.
        ('request.path | request.host | "x"', {"request.host": "h"}, "h"),
        ('request.path | request.host | "x"', {"request.path": "p", "request.host": "h"}, "p"),
        ('request.path | request.host | "x"', {}, "x"),
        ('(request.path | request.host) | "x"', {"request.host": "h"}, "h"),
        ('request.path | (request.host | "x")', {}, "x"),
        # On a map index: a missing map and a missing key both fall through.
        ('request.headers["x-id"] | "none"', {}, "none"),
        ('request.headers["x-id"] | "none"', {"request.headers": {}}, "none"),
        ('request.headers["x-id"] | "none"', {"request.headers": {"x-id": "7"}}, "7"),
        ('request.headers["x-id"] | "none"', {"request.headers": {"x-id": ""}}, ""),
        ('request.headers["a"] | request.headers["b"] | "c"', {"request.headers": {"b": "B"}}, "B"),
        # A key that is itself an attribute may be missing too (Mixer's TLookup).
        ('request.headers[request.method] | "none"', {"request.headers": {"GET": "g"}}, "none"),
        (
            'request.headers[request.method] | "none"',
            {"request.headers": {"GET": "g"}, "request.method": "GET"},
            "g",
        ),
        # A map attribute with a map default.
        ('(request.headers | emptyStringMap())["x"] | "d"', {}, "d"),
        ("request.headers | emptyStringMap()", {}, {}),
        ('source.ip | ip("0.0.0.0")', {}, ipaddress.ip_address("0.0.0.0")),
        # A function call always yields a value (or fails): the default after it is unreachable.
        ('toLower(request.path) | "x"', {"request.path": "A"}, "a"),
    ],
)
def test_default_operator(source: str, bag: Mapping[str, object], want: object) -> None:
    assert evaluate(source, bag) == want


def test_default_operator_last_option_is_required() -> None:
    with pytest.raises(EvaluationError, match=re.escape('lookup failed: "request.host"')):
        evaluate("request.path | request.host", {})


def test_default_operator_binds_like_go_plus() -> None:
    # | has + precedence in Go: tighter than ==, left-associative with +.
    assert evaluate('request.path | "a" == "a"', {}) is True
    assert evaluate('request.path | "a" + "b"', {}) == "ab"
    assert evaluate('request.path | "a" + "b"', {"request.path": "p"}) == "pb"


def test_default_needs_compatible_types() -> None:
    with pytest.raises(ExpressionError, match="needs operands of one type, got INT64 and STRING"):
        compile_expression('request.size | "unknown"', ISTIO_1_4_ATTRIBUTES)


def test_missing_map_key_reads_as_empty_string() -> None:
    # Mixer's compiler used NLookup for m[k] outside a |: a missing key is "", not an error, which
    # bookinfo's `destination.labels["app"] == "ratings"` rules rely on.
    assert evaluate('source.labels["missing"]') == ""
    assert evaluate('source.labels["missing"] == "x"') is False


def test_missing_map_attribute_is_an_error() -> None:
    with pytest.raises(EvaluationError, match=re.escape('lookup failed: "destination.labels"')):
        evaluate('destination.labels["app"] == "ratings"', {})


# --- Functions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "want"),
    [
        ("/api/*", "/api/v1", True),
        ("/api/*", "/v1/api/", False),
        ("*.ns1.svc.cluster.local", "svc1.ns1.svc.cluster.local", True),
        ("*.ns1.svc.cluster.local", "svc1.ns2.svc.cluster.local", False),
        ("exact", "exact", True),
        ("exact", "exact2", False),
        ("*", "anything", True),
        ("*a*", "*abc", True),  # a trailing * wins: the prefix "*a"
        ("*a*", "xaz", False),
    ],
)
def test_match_glob(pattern: str, value: str, want: bool) -> None:
    source = f'match(request.path, "{pattern}")'
    assert evaluate(source, {"request.path": value}) is want
    # A pattern from an attribute goes through the same rule at run time.
    bag = {"request.path": value, "request.host": pattern}
    assert evaluate("match(request.path, request.host)", bag) is want


def test_matches_receiver_is_the_pattern() -> None:
    # Mixer: "svc.*".matches(destination.service); CEL has it the other way round.
    assert evaluate('"ratings.*".matches(request.host)') is True
    assert evaluate('"^reviews".matches(request.host)') is False
    assert evaluate('"svc\\\\.local$".matches("a.svc.local")') is True
    assert evaluate("request.path.matches(request.path)", {"request.path": "a+"}) is True


def test_starts_and_ends_with() -> None:
    assert evaluate('request.path.startsWith("/api")') is True
    assert evaluate('request.path.endsWith("ratings")') is True
    assert evaluate('request.path.endsWith("/api")') is False
    assert evaluate('request.headers["user-agent"].startsWith("curl")') is True
    assert evaluate('(request.path | "").startsWith("/")', {}) is False


def test_ip() -> None:
    assert evaluate('source.ip == ip("10.1.2.3")') is True
    assert evaluate('source.ip != ip("10.1.2.4")') is True
    # Go's net.IP.Equal: an IPv4 address equals its IPv4-mapped IPv6 form.
    assert evaluate('ip("::ffff:10.1.2.3") == source.ip') is True
    assert (
        evaluate('ip(request.host) == ip("2001:db8::1")', {"request.host": "2001:db8::1"}) is True
    )
    with pytest.raises(EvaluationError, match=re.escape("could not convert 10.1.12 to IP_ADDRESS")):
        evaluate("ip(request.host)", {"request.host": "10.1.12"})


def test_timestamp() -> None:
    assert evaluate('request.time > timestamp("2015-01-02T15:04:35Z")') is True
    assert evaluate('request.time == timestamp("2019-11-14T13:00:00+01:00")') is True
    assert evaluate('timestamp("2015-01-02T15:04:35.5Z")', {}) == datetime.datetime(
        2015, 1, 2, 15, 4, 35, 500000, tzinfo=datetime.UTC
    )
    with pytest.raises(EvaluationError, match="could not convert '242233' to TIMESTAMP"):
        evaluate("timestamp(request.path)", {"request.path": "242233"})


def test_dns_name() -> None:
    assert evaluate('dnsName("www.istio.io")', {}) == "www.istio.io"
    assert (
        evaluate('dnsName(request.host) == dnsName("RATINGS.default.svc.cluster.local.")') is True
    )
    assert evaluate('dnsName("xn--bcher-kva.example") == dnsName("bücher.example")', {}) is True
    with pytest.raises(EvaluationError, match="to dns name"):
        evaluate("dnsName(request.path)", {"request.path": "a..b"})


def test_email() -> None:
    assert evaluate('email("awesome@istio.io")', {}) == "awesome@istio.io"
    assert evaluate('email(request.path) == email("a@ISTIO.io")', {"request.path": "a@istio.io"})
    assert evaluate('email("A@istio.io") == email("a@istio.io")', {}) is False
    with pytest.raises(EvaluationError, match="display names are not allowed"):
        evaluate("email(request.path)", {"request.path": "Jo <jo@istio.io>"})


def test_uri() -> None:
    assert evaluate('uri("http://istio.io")', {}) == "http://istio.io"
    assert evaluate('uri("HTTP://Istio.IO/a") == uri("http://istio.io./a")', {}) is True
    assert evaluate('uri("http://istio.io/a") == uri("http://istio.io/b")', {}) is False
    with pytest.raises(EvaluationError, match="empty string"):
        evaluate("uri(request.path)", {"request.path": ""})


def test_conditional() -> None:
    assert evaluate('conditional(response.code == 200, "ok", "bad")') == "ok"
    assert evaluate("conditional(connection.mtls, 1, 2)") == 2
    # Only the chosen branch is evaluated, so a missing attribute in the other is fine.
    assert evaluate('conditional(true, "a", request.reason)', {}) == "a"
    assert evaluate('conditional(connection.mtls | false, "a", request.method)') == "GET"
    # The branches may be duration literals when a DURATION is wanted.
    expression = compile_expression(
        'conditional(connection.mtls, "1s", "2s")', ISTIO_1_4_ATTRIBUTES, V.DURATION
    )
    assert expression.evaluate(BAG) == datetime.timedelta(seconds=2)


def test_conditional_string_evaluates_both_arguments() -> None:
    # conditionalString is an extern in Mixer: its arguments are evaluated before the call.
    assert evaluate('conditionalString(true, "a", "b")', {}) == "a"
    with pytest.raises(EvaluationError, match=re.escape("request.reason")):
        evaluate('conditionalString(true, "a", request.reason)', {})


def test_to_lower_and_size() -> None:
    assert evaluate('toLower("User-Agent")', {}) == "user-agent"
    assert evaluate('toLower(request.headers["user-agent"]) == "curl/7.64"') is True
    assert evaluate('size("admin")', {}) == 5
    assert evaluate("size(request.path)") == len("/api/v1/ratings")
    # size is Go's len(string): bytes of UTF-8, not characters.
    assert evaluate("size(request.path)", {"request.path": "é"}) == 2


def test_empty_string_map() -> None:
    assert evaluate("emptyStringMap()", {}) == {}
    assert evaluate('emptyStringMap()["k"]', {}) == ""


# --- Operators and literals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "want"),
    [
        ("response.code == 200", True),
        ("response.code != 200", False),
        ("response.code < 500 && response.code >= 200", True),
        ("request.size <= 120 && request.size > 119", True),
        ('request.method < "POST"', True),
        ("1.5 < 2.25", True),
        ('response.duration > "10ms" && response.duration <= "20ms"', True),
        ('"10ms" < response.duration', True),
        ('request.time < timestamp("2020-01-01T00:00:00Z")', True),
        ("true == TRUE && False == false", True),
        ("!connection.mtls", True),
        ("connection.mtls == false && true != connection.mtls", True),
        ("!(response.code == 200) || connection.mtls", False),
        ("-response.code + 300", 100),
        ("-1.5 + 2.0", 0.5),
        ("response.code + 1", 201),
        ('request.method + " " + request.path', "GET /api/v1/ratings"),
        ("9223372036854775807 + 1", -(2**63)),  # Go's int64 wraps
        ("1 + 2 == 3 && 2 + 1 != 4", True),
        ('"a\\tb\\x41\\u00e9\\101"', "a\tbAéA"),
        ("`raw\\n`", "raw\\n"),
        ("'x' + 'y'", "xy"),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("017", 17),  # Mixer read integers in base 10 (strconv.ParseInt(v, 10, 64))
        ("false || false || true", True),
        ("true && false || true", True),  # && binds tighter than ||
    ],
)
def test_operators(source: str, want: object) -> None:
    result = evaluate(source)
    assert result == want
    assert type(result) is type(want)


def test_logical_operators_short_circuit() -> None:
    assert evaluate('false && request.reason == "x"', {}) is False
    assert evaluate('true || request.reason == "x"', {}) is True
    assert evaluate('request.path == "/" || request.reason == "x"', {"request.path": "/"}) is True


# --- The Expression value -----------------------------------------------------------------------


def test_expression_value() -> None:
    expression = compile_expression(
        'destination.service.host == "a" && source.labels["app"] == "b"', ISTIO_1_4_ATTRIBUTES
    )
    assert isinstance(expression, Expression)
    assert expression.source == 'destination.service.host == "a" && source.labels["app"] == "b"'
    assert expression.result_type is V.BOOL
    assert expression.referenced == {"destination.service.host", "source.labels"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.source = "x"  # type: ignore[misc]


def test_dotted_name_is_one_attribute() -> None:
    attributes = {"destination.service": V.STRING, "destination.service.host": V.STRING}
    expression = compile_expression("destination.service.host", attributes)
    assert expression.referenced == {"destination.service.host"}
    assert expression.evaluate({"destination.service.host": "h", "destination.service": "s"}) == "h"


@pytest.mark.parametrize(
    ("source", "referenced", "value"),
    [
        ('"a" | request.path', set(), "a"),  # a constant option is always present
        ('conditional(1 < 2, "x", request.path)', set(), "x"),
        ('false && request.path == "x"', set(), False),
        ('size("admin") + 1', set(), 6),
        ('ip("10.0.0.1") == ip("::ffff:10.0.0.1")', set(), True),
        ('request.path | "a" | request.host', {"request.path"}, "a"),
    ],
)
def test_constant_folding(source: str, referenced: set[str], value: object) -> None:
    expression = compile_expression(source, ISTIO_1_4_ATTRIBUTES)
    assert expression.referenced == referenced
    assert expression.evaluate({}) == value


def test_folding_keeps_operands_that_can_fail() -> None:
    # x && false is false only if x evaluates: a missing x must still be reported.
    expression = compile_expression("connection.mtls && false", ISTIO_1_4_ATTRIBUTES)
    assert expression.referenced == {"connection.mtls"}
    with pytest.raises(EvaluationError):
        expression.evaluate({})


def test_expected_type() -> None:
    assert compile_expression("1", {}, V.INT64).result_type is V.INT64
    assert compile_expression('"1h"', {}, V.DURATION).evaluate({}) == datetime.timedelta(hours=1)
    assert compile_expression('"1h"', {}).result_type is V.STRING
    assert compile_expression('"1h"', {}, V.VALUE_TYPE_UNSPECIFIED).result_type is V.STRING
    with pytest.raises(ExpressionError) as e:
        compile_expression("request.size | 0", ISTIO_1_4_ATTRIBUTES, V.STRING)
    assert str(e.value) == "position 0: expression has type INT64, want STRING"


def test_rule_match_must_be_bool() -> None:
    with pytest.raises(ExpressionError, match="expression has type STRING, want BOOL"):
        compile_expression('request.path | "/"', ISTIO_1_4_ATTRIBUTES, V.BOOL)


# --- Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "position", "reason"),
    [
        ("a = 2", 2, "unexpected character '='"),
        ('request.path == "x', 16, "unterminated or malformed literal"),
        ("request.path ==", 15, "unexpected end of expression; expected an operand"),
        ('match(request.path, "a"', 23, "unexpected end of expression"),
        ("(request.path", 13, "unexpected end of expression"),
        ("request.path request.host", 13, "unexpected 'request'"),
        ('request.headers["x"', 19, "unexpected end of expression"),
        ("response.code == ) 2", 17, "unexpected ')'; expected an operand"),
        ("1 # 2", 2, "unexpected character '#'"),
        ('"\\q"', 1, "unknown escape sequence \\q"),
        ('"\\x4"', 1, "invalid \\x escape: want 2 hex digits"),
        ("'ab'", 0, "a rune literal holds exactly one character"),
        ("99999999999999999999", 0, "integer literal 99999999999999999999 overflows INT64"),
        ("0x1F", 1, "unexpected 'x1F'"),
    ],
)
def test_syntax_errors(source: str, position: int, reason: str) -> None:
    with pytest.raises(ExpressionError) as e:
        compile_expression(source, ISTIO_1_4_ATTRIBUTES)
    assert e.value.source == source
    assert e.value.position == position
    assert e.value.reason.startswith(reason)
    assert str(e.value) == f"position {position}: {e.value.reason}"


@pytest.mark.parametrize(
    ("source", "position", "reason"),
    [
        ("request.pth", 0, "unknown attribute request.pth; did you mean request.path?"),
        (
            'response.code == 200 && request.path.size == "x"',
            24,
            "unknown attribute request.path.size: request.path is a STRING and has no field size",
        ),
        ("response.code == true", 14, "== needs operands of one type, got INT64 and BOOL"),
        ('response.code == "200"', 14, "== needs operands of one type, got INT64 and STRING"),
        ("request.size == 1.0", 13, "== needs operands of one type, got INT64 and DOUBLE"),
        ('dnsName("a.b") == "a.b"', 15, "== needs operands of one type, got DNS_NAME and STRING"),
        ("request.headers == request.headers", 16, "== is not defined for STRING_MAP"),
        ("connection.mtls < true", 16, "< is not defined for BOOL"),
        ("source.ip < source.ip", 10, "< is not defined for IP_ADDRESS"),
        ("connection.mtls + true", 16, "+ is not defined for BOOL"),
        ('response.duration + "1s"', 18, "+ is not defined for DURATION"),
        ("request.path && true", 0, "the left operand of && must be BOOL, not STRING"),
        ("true || 1", 8, "the right operand of || must be BOOL, not INT64"),
        ("!request.path", 1, "the operand of ! must be BOOL, not STRING"),
        ('-"a"', 0, "unary - needs INT64 or DOUBLE, not STRING"),
        ("response.code - 1", 14, "operator - is not supported"),
        ("response.code * 2", 14, "operator * is not supported"),
        ("(response.code / 2) == 1", 15, "operator / is not supported"),
        ("response.code % 2", 14, "operator % is not supported"),
        ("request.path[0]", 12, "[] needs a STRING_MAP, not STRING"),
        ("request.headers[1]", 16, "a map key must be STRING, not INT64"),
        ("lower(request.path)", 0, "unknown function lower"),
        ("mach(request.path, 1)", 0, "unknown function mach; did you mean match?"),
        ("match(request.path, 1)", 20, "argument 2 of match must be STRING, not INT64"),
        ("match(request.path)", 0, "match takes 2 argument(s), got 1"),
        ("ip(1)", 3, "argument 1 of ip must be STRING, not INT64"),
        ("request.path.size()", 13, "size is a function, not a method: write size(...)"),
        ('startsWith(request.path, "/")', 0, "startsWith is a method: write x.startsWith(...)"),
        ('response.code.startsWith("/")', 0, "the target of startsWith must be STRING, not INT64"),
        ("conditional(true, 1)", 0, "conditional takes 3 arguments, got 2"),
        ('conditional(1, "a", "b")', 12, "argument 1 of conditional must be BOOL, not INT64"),
        ('conditional(true, "a", 1)', 23, "conditional needs operands of one type"),
        ('(request.path).startsWith("/").x', 31, "a value has no field x"),
        ("request.headers.x", 0, "unknown attribute request.headers.x"),
        ("f(request.path)(1)", 0, "only functions and methods can be called"),
        ('ip("10.1.12")', 0, "could not convert 10.1.12 to IP_ADDRESS"),
        ('request.time | timestamp("242233")', 15, "could not convert '242233' to TIMESTAMP"),
        ('"(".matches(request.path)', 4, "invalid regular expression '('"),
        ("   ", 0, "empty expression"),
        ("", 0, "empty expression"),
    ],
)
def test_type_errors(source: str, position: int, reason: str) -> None:
    with pytest.raises(ExpressionError) as e:
        compile_expression(source, ISTIO_1_4_ATTRIBUTES)
    assert (e.value.position, e.value.reason[: len(reason)]) == (position, reason)


def test_expression_error_pickles() -> None:
    error = ExpressionError("a +", 3, "unexpected end of expression")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.position, copy.reason, str(copy)) == (
        "a +",
        3,
        "unexpected end of expression",
        "position 3: unexpected end of expression",
    )


def test_unspecified_attribute_type_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="attribute a has no value type"):
        compile_expression("a", {"a": V.VALUE_TYPE_UNSPECIFIED})


def test_long_chains_compile() -> None:
    # Long || chains and concatenations are generated flat, within Python's nesting limit.
    values = compile_expression(
        " || ".join(f'request.path == "/{i}"' for i in range(400)), ISTIO_1_4_ATTRIBUTES
    )
    assert values.evaluate({"request.path": "/399"}) is True
    assert values.evaluate({"request.path": "/400"}) is False
    concatenation = compile_expression(" + ".join(["request.path"] * 300), ISTIO_1_4_ATTRIBUTES)
    assert concatenation.evaluate({"request.path": "ab"}) == "ab" * 300


def test_deep_nesting_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="nested too deeply"):
        compile_expression("(" * 3000 + "1" + ")" * 3000, {})


# --- Evaluation errors --------------------------------------------------------------------------


def test_missing_attribute_is_an_evaluation_error() -> None:
    expression = compile_expression('request.path == "/"', ISTIO_1_4_ATTRIBUTES)
    with pytest.raises(EvaluationError) as e:
        expression.evaluate({})
    assert str(e.value) == 'lookup failed: "request.path"'
    assert e.value.__cause__ is None


class _LazyBag(Mapping[str, object]):
    """A bag that builds attributes on demand, as the servers' bags may."""

    def __init__(self, attributes: Mapping[str, object]) -> None:
        self.attributes = attributes
        self.read: list[str] = []

    def __getitem__(self, name: str) -> object:
        self.read.append(name)
        return self.attributes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.attributes)

    def __len__(self) -> int:
        return len(self.attributes)


def test_any_mapping_is_a_bag() -> None:
    bag = _LazyBag({"request.path": "/a", "request.headers": {"x": "1"}})
    expression = compile_expression(
        'request.path == "/a" && (request.headers["x"] | "0") == "1" && (request.host | "") == ""',
        ISTIO_1_4_ATTRIBUTES,
    )
    assert expression.evaluate(bag) is True
    assert sorted(set(bag.read)) == ["request.headers", "request.host", "request.path"]
    with pytest.raises(EvaluationError, match=re.escape('lookup failed: "response.code"')):
        compile_expression("response.code", ISTIO_1_4_ATTRIBUTES).evaluate(bag)


@pytest.mark.parametrize(
    ("source", "bag"),
    [
        ("response.code + 1", {"response.code": "200"}),  # a wrongly typed bag value
        ('request.path.startsWith("/")', {"request.path": 7}),
        ('request.headers["x"]', {"request.headers": "not a map"}),
        (
            'request.time < timestamp("2020-01-01T00:00:00Z")',
            {"request.time": datetime.datetime(2020, 1, 1)},
        ),
        ("request.host.matches(request.path)", {"request.host": "(", "request.path": ""}),
    ],
)
def test_evaluation_raises_only_evaluation_error(source: str, bag: Mapping[str, object]) -> None:
    expression = compile_expression(source, ISTIO_1_4_ATTRIBUTES)
    with pytest.raises(EvaluationError):
        expression.evaluate(bag)
