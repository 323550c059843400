"""prometheus: metric instances read back as Prometheus series, across reloads and expiry."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mixerhub.adapters.prometheus import INFO, PrometheusHandler, PrometheusParams
from mixerhub.adapters.prometheus.handler import label_text
from prometheus_client import CollectorRegistry, Counter, generate_latest

from mixerhub import registry
from mixerhub.adapter import Env, ExportResult, InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.monitoring import REGISTRY
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.templates import MetricInstance

TELEMETRY = Path(__file__).parent.parent / "data" / "istio-1.4" / "telemetry.yaml"
RC = "requestcount.instance.istio-system"
RD = "requestduration.instance.istio-system"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def env(reg: CollectorRegistry, name: str = "prometheus.handler.istio-system") -> Env:
    return Env("prometheus", name, logging.getLogger("test"), reg)


def handler(
    reg: CollectorRegistry,
    *metrics: dict[str, Any],
    clock: Clock | None = None,
    name: str = "prometheus.handler.istio-system",
    **params: Any,
) -> PrometheusHandler:
    p = PrometheusParams.model_validate({"metrics": list(metrics), **params})
    if clock is None:
        built = INFO.build(p, {}, env(reg, name))
        assert isinstance(built, PrometheusHandler)
        return built
    return PrometheusHandler(p, {}, env(reg, name), clock)


def metric(name: str, instance: str, kind: str, *labels: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "instance_name": instance,
        "kind": kind,
        "label_names": list(labels),
        **more,
    }


def spec(name: str, *dimensions: str, value: ValueType = ValueType.INT64) -> InstanceSpec:
    types = {"value": value, **{f"dimensions.{d}": ValueType.STRING for d in dimensions}}
    return InstanceSpec(name, "metric", types)


def errors_count() -> float:
    return (
        REGISTRY.get_sample_value("mixerhub_adapter_errors_total", {"adapter": "prometheus"}) or 0.0
    )


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


# --- recording and exposition ------------------------------------------------------------------


async def test_counters_gauges_and_histograms_read_back(reg: CollectorRegistry) -> None:
    h = handler(
        reg,
        metric("requests_total", RC, "COUNTER", "code"),
        metric("in_flight", "inflight.instance.default", "GAUGE", "code", description="Now"),
        metric(
            "request_size",
            "requestsize.instance.default",
            "DISTRIBUTION",
            "code",
            buckets={"explicit_buckets": {"bounds": [10, 100, 1000]}},
        ),
    )
    result = h.handle_metric(
        [
            MetricInstance(RC, 1, {"code": 200}),
            MetricInstance(RC, 2, {"code": 200}),
            MetricInstance(RC, 1, {"code": 404}),
            MetricInstance("inflight.instance.default", 7, {"code": 200}),
            MetricInstance("inflight.instance.default", 3.5, {"code": 200}),
            MetricInstance("requestsize.instance.default", 10, {"code": 200}),
            MetricInstance("requestsize.instance.default", 50, {"code": 200}),
            MetricInstance("requestsize.instance.default", 5000, {"code": 200}),
        ]
    )
    assert result is ExportResult.SUCCESS
    # Istio's `requests_total` is istio_requests_total, as a Prometheus client writes a counter.
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 3
    assert reg.get_sample_value("istio_requests_total", {"code": "404"}) == 1
    assert reg.get_sample_value("istio_in_flight", {"code": "200"}) == 3.5
    bucket = "istio_request_size_bucket"
    assert reg.get_sample_value(bucket, {"code": "200", "le": "10.0"}) == 1  # le: value <= bound
    assert reg.get_sample_value(bucket, {"code": "200", "le": "100.0"}) == 2
    assert reg.get_sample_value(bucket, {"code": "200", "le": "1000.0"}) == 2
    assert reg.get_sample_value(bucket, {"code": "200", "le": "+Inf"}) == 3
    assert reg.get_sample_value("istio_request_size_count", {"code": "200"}) == 3
    assert reg.get_sample_value("istio_request_size_sum", {"code": "200"}) == 5060
    text = generate_latest(reg).decode()
    assert "# TYPE istio_requests_total counter" in text
    assert "# HELP istio_in_flight Now" in text
    assert "# HELP istio_requests_total requests_total" in text  # Mixer: no description -> name
    assert "# TYPE istio_request_size histogram" in text
    assert "_created" not in text
    await h.close()
    assert generate_latest(reg) == b""


@pytest.mark.parametrize(
    ("buckets", "bounds"),
    [
        # Mixer: numFiniteBuckets + 1 bounds, built as the Go client's LinearBuckets did.
        ({"linearBuckets": {"numFiniteBuckets": 3, "width": 10, "offset": 5}}, [5, 15, 25, 35]),
        ({"linear_buckets": {"num_finite_buckets": 1, "width": 1, "offset": 4}}, [4, 5]),
        (
            {"exponentialBuckets": {"numFiniteBuckets": 3, "growthFactor": 3, "scale": 4}},
            [4, 12, 36, 108],
        ),
        ({"explicitBuckets": {"bounds": [6, 7]}}, [6, 7]),
        # Mixer: a DISTRIBUTION without buckets gets the Prometheus client's DefBuckets.
        (None, [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]),
    ],
)
async def test_each_bucket_kind(
    reg: CollectorRegistry, buckets: dict[str, Any] | None, bounds: list[float]
) -> None:
    extra = {"buckets": buckets} if buckets else {}
    h = handler(reg, metric("h", "h.instance.default", "DISTRIBUTION", **extra))
    h.handle_metric([MetricInstance("h.instance.default", b) for b in bounds])
    h.handle_metric([MetricInstance("h.instance.default", bounds[-1] + 1)])
    for n, bound in enumerate(bounds, start=1):
        assert reg.get_sample_value("istio_h_bucket", {"le": str(float(bound))}) == n
    assert reg.get_sample_value("istio_h_bucket", {"le": "+Inf"}) == len(bounds) + 1
    await h.close()


async def test_names_follow_mixer_and_the_counter_convention(reg: CollectorRegistry) -> None:
    h = handler(
        reg,
        metric("double_request_count", "a.instance.istio-system", "COUNTER"),
        # No name: Mixer used the instance name, made Prometheus-safe.
        metric("", RC, "COUNTER"),
        metric("size", "b.instance.istio-system", "GAUGE", namespace="my-app.v1"),
    )
    h.handle_metric(
        [
            MetricInstance("a.instance.istio-system", 2),
            MetricInstance(RC, 1),
            MetricInstance("b.instance.istio-system", 9),
        ]
    )
    assert reg.get_sample_value("istio_double_request_count_total") == 2
    assert reg.get_sample_value("istio_requestcount_instance_istiosystem_total") == 1
    assert reg.get_sample_value("myapp_v1_size") == 9
    await h.close()


async def test_durations_are_seconds_unless_the_metric_says_milliseconds(
    reg: CollectorRegistry,
) -> None:
    h = handler(
        reg,
        metric("request_duration_seconds", RD, "DISTRIBUTION"),
        metric(
            "request_duration_milliseconds",
            RD,
            "DISTRIBUTION",
            durationUnit="MILLISECONDS",
            buckets={"explicitBuckets": {"bounds": [1, 5, 10, 25, 50, 100]}},
        ),
        metric("last_duration", "last.instance.default", "GAUGE", duration_unit="MILLISECONDS"),
    )
    result = h.handle_metric(
        [
            MetricInstance(RD, datetime.timedelta(milliseconds=42)),
            MetricInstance("last.instance.default", datetime.timedelta(seconds=1.5)),
        ]
    )
    assert result is ExportResult.SUCCESS
    assert reg.get_sample_value("istio_request_duration_seconds_sum") == pytest.approx(0.042)
    assert reg.get_sample_value("istio_request_duration_seconds_bucket", {"le": "0.05"}) == 1
    assert reg.get_sample_value("istio_request_duration_seconds_bucket", {"le": "0.025"}) == 0
    assert reg.get_sample_value("istio_request_duration_milliseconds_sum") == pytest.approx(42)
    assert reg.get_sample_value("istio_request_duration_milliseconds_bucket", {"le": "50.0"}) == 1
    assert reg.get_sample_value("istio_request_duration_milliseconds_bucket", {"le": "25.0"}) == 0
    assert reg.get_sample_value("istio_last_duration") == 1500
    await h.close()


async def test_values_of_every_type_and_label_texts(reg: CollectorRegistry) -> None:
    labels = ("ip", "latency", "mtls", "ratio", "code", "absent", "headers")
    h = handler(reg, metric("g", "g.instance.default", "GAUGE", *labels))
    dims = {
        "ip": ipaddress.ip_address("10.0.0.1"),
        "latency": datetime.timedelta(milliseconds=1.5),
        "mtls": True,
        "ratio": 200.0,
        "code": 404,
        "absent": None,
        "headers": {"b": "2", "a": "1"},
    }
    expected = {
        "ip": "10.0.0.1",
        "latency": "1.5ms",
        "mtls": "true",
        "ratio": "200",
        "code": "404",
        "absent": "",
        "headers": "a=1&b=2",
    }
    for value, seen in [(True, 1), (False, 0), (3, 3), (2.5, 2.5), ("8.25", 8.25)]:
        assert (
            h.handle_metric([MetricInstance("g.instance.default", value, dims)]).name == "SUCCESS"
        )
        assert reg.get_sample_value("istio_g", expected) == seen
    await h.close()
    assert label_text(1e20) == "100000000000000000000"
    assert label_text(0.1) == "0.1"
    assert label_text(float("inf")) == "+Inf"


async def test_bad_values_are_counted_and_skipped_never_raised(reg: CollectorRegistry) -> None:
    h = handler(
        reg,
        metric("c", "c.instance.default", "COUNTER", "code"),
        metric("d", "d.instance.default", "DISTRIBUTION", "code"),
    )
    before = errors_count()
    result = h.handle_metric(
        [
            MetricInstance("c.instance.default", 1, {"code": 200}),
            MetricInstance("c.instance.default", "lots", {"code": 200}),  # not a number
            MetricInstance("c.instance.default", None, {"code": 200}),
            MetricInstance("c.instance.default", -1, {"code": 200}),  # counters only go up
            MetricInstance("c.instance.default", float("nan"), {"code": 200}),
            MetricInstance("c.instance.default", 10**400, {"code": 200}),  # overflows a float
            MetricInstance("c.instance.default", 1, {}),  # a dimension is missing
            MetricInstance("d.instance.default", float("nan"), {"code": 200}),
            MetricInstance("d.instance.default", datetime.datetime.now(), {"code": 200}),
            MetricInstance("unknown.instance.default", 1, {"code": 200}),  # no metric for it
            MetricInstance("c.instance.default", 2, {"code": 200}),
        ]
    )
    assert result is ExportResult.FAILURE
    assert errors_count() - before == 9
    assert reg.get_sample_value("istio_c_total", {"code": "200"}) == 3
    assert reg.get_sample_value("istio_d_count", {"code": "200"}) is None
    await h.close()


async def test_instances_sharing_their_dimensions_get_each_metrics_labels(
    reg: CollectorRegistry,
) -> None:
    """A rule's instances share one dimensions dict (Istio's four HTTP metrics do): each metric
    still reads its own labels, and a missing one fails that metric alone."""
    h = handler(
        reg,
        metric("a", "a.instance.default", "COUNTER", "code", "path"),
        metric("b", "b.instance.default", "COUNTER", "code", "path"),
        metric("c", "c.instance.default", "COUNTER", "path"),
        metric("d", "d.instance.default", "COUNTER", "method"),
    )
    shared = {"code": 200, "path": "/x"}
    other = {"code": 404, "path": "/y"}
    before = errors_count()
    h.handle_metric(
        [
            MetricInstance("a.instance.default", 1, shared),
            MetricInstance("b.instance.default", 2, shared),
            MetricInstance("c.instance.default", 3, shared),
            MetricInstance("d.instance.default", 4, shared),  # no "method": skipped
            MetricInstance("a.instance.default", 5, shared),
            MetricInstance("a.instance.default", 6, other),
            MetricInstance("b.instance.default", 7, other),
        ]
    )
    assert errors_count() - before == 1
    assert reg.get_sample_value("istio_a_total", {"code": "200", "path": "/x"}) == 6
    assert reg.get_sample_value("istio_a_total", {"code": "404", "path": "/y"}) == 6
    assert reg.get_sample_value("istio_b_total", {"code": "200", "path": "/x"}) == 2
    assert reg.get_sample_value("istio_b_total", {"code": "404", "path": "/y"}) == 7
    assert reg.get_sample_value("istio_c_total", {"path": "/x"}) == 3
    await h.close()


async def test_typed_dimensions_skip_conversion_but_never_break_a_scrape(
    reg: CollectorRegistry,
) -> None:
    p = PrometheusParams.model_validate({"metrics": [metric("c", RC, "COUNTER", "code", "path")]})
    types = {"value": ValueType.INT64, "dimensions.code": ValueType.INT64}
    h = PrometheusHandler(
        p,
        {RC: InstanceSpec(RC, "metric", {**types, "dimensions.path": ValueType.STRING})},
        env(reg),
    )
    before = errors_count()
    h.handle_metric([MetricInstance(RC, 1, {"code": 200, "path": "/a"})])
    # A STRING dimension that is not one at run time is refused, not exposed.
    h.handle_metric([MetricInstance(RC, 1, {"code": 200, "path": 7})])
    assert errors_count() - before == 1
    assert reg.get_sample_value("istio_c_total", {"code": "200", "path": "/a"}) == 1
    assert generate_latest(reg).decode().count("istio_c_total{") == 1
    await h.close()


# --- Istio 1.4's own configuration ------------------------------------------------------------


def _istio_prometheus_documents() -> list[dict[str, Any]]:
    """The prometheus handler of Istio 1.4's telemetry config, its rules and their instances."""
    docs = [d for d in yaml.safe_load_all(TELEMETRY.read_text()) if d]
    rules = [
        d
        for d in docs
        if d["kind"] == "rule"
        and any(a["handler"] == "prometheus" for a in d["spec"].get("actions", []))
    ]
    wanted = {i for r in rules for a in r["spec"]["actions"] for i in a["instances"]}
    handlers = [d for d in docs if d["kind"] == "handler" and d["metadata"]["name"] == "prometheus"]
    instances = [d for d in docs if d["kind"] == "instance" and d["metadata"]["name"] in wanted]
    assert len(handlers) == 1
    assert len(instances) == len(wanted) == 8
    return [*handlers, *instances, *rules]


@pytest.fixture
def istio_dir(tmp_path: Path) -> Path:
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump_all(_istio_prometheus_documents()))
    return tmp_path


async def test_istio_14_prometheus_handler_builds_and_records(istio_dir: Path) -> None:
    snapshot = compile_snapshot(documents.read([istio_dir]), registry.default_registry())
    built = snapshot.handlers["prometheus.handler.istio-system"]
    h = built.handler
    assert isinstance(h, PrometheusHandler)
    try:
        bag = {
            "context.protocol": "http",
            "context.reporter.kind": "inbound",
            "destination.service.host": "web.shop.svc.cluster.local",
            "destination.workload.name": "web",
            "destination.workload.namespace": "shop",
            "connection.mtls": True,
            "response.code": 503,
            "response.duration": datetime.timedelta(milliseconds=42),
            "request.size": 120,
            "response.size": 5000,
        }
        names = [RC, RD, "requestsize.instance.istio-system", "responsesize.instance.istio-system"]
        assert h.handle_metric([snapshot.instances[n].build(bag) for n in names]).name == "SUCCESS"
        labels = {
            "reporter": "destination",
            "source_app": "unknown",
            "source_principal": "unknown",
            "source_workload": "unknown",
            "source_workload_namespace": "unknown",
            "source_version": "unknown",
            "destination_app": "unknown",
            "destination_principal": "unknown",
            "destination_workload": "web",
            "destination_workload_namespace": "shop",
            "destination_version": "unknown",
            "destination_service": "web.shop.svc.cluster.local",
            "destination_service_name": "unknown",
            "destination_service_namespace": "unknown",
            "request_protocol": "http",
            "response_code": "503",
            "response_flags": "-",
            "permissive_response_code": "none",
            "permissive_response_policyid": "none",
            "connection_security_policy": "mutual_tls",
        }
        assert REGISTRY.get_sample_value("istio_requests_total", labels) == 1
        seconds = REGISTRY.get_sample_value("istio_request_duration_seconds_sum", labels)
        assert seconds == pytest.approx(0.042)
        # exponentialBuckets {numFiniteBuckets: 8, scale: 1, growthFactor: 10}: 1 ... 1e8
        bytes_bucket = "istio_request_bytes_bucket"
        assert REGISTRY.get_sample_value(bytes_bucket, {**labels, "le": "100.0"}) == 0
        assert REGISTRY.get_sample_value(bytes_bucket, {**labels, "le": "1000.0"}) == 1
        assert REGISTRY.get_sample_value(bytes_bucket, {**labels, "le": "1e+08"}) == 1
        assert REGISTRY.get_sample_value("istio_response_bytes_sum", labels) == 5000
        text = generate_latest(REGISTRY).decode()
        for name in ("tcp_sent_bytes", "tcp_received_bytes", "tcp_connections_opened"):
            assert f"# TYPE istio_{name}_total counter" in text
    finally:
        await h.close()
    assert REGISTRY.get_sample_value("istio_requests_total", labels) is None


def test_istio_14_prometheus_params_validate_against_its_instances(istio_dir: Path) -> None:
    snapshot = compile_snapshot(
        documents.read([istio_dir]), registry.default_registry(), build_handlers=False
    )
    built = snapshot.handlers["prometheus.handler.istio-system"]
    specs = {name: i.spec for name, i in snapshot.instances.items()}
    assert list(INFO.validate(built.params, specs)) == []
    assert built.params.metrics_expiration_policy.metrics_expiry_duration == datetime.timedelta(
        minutes=10
    )


# --- validation ---------------------------------------------------------------------------------

ROUTED = {RC: spec(RC, "a", "b"), "t.instance.default": spec("t", value=ValueType.TIMESTAMP)}


@pytest.mark.parametrize(
    ("params", "path", "reason"),
    [
        (
            {"metrics": [metric("x", "other.instance.default", "COUNTER")]},
            "metrics[0].instanceName",
            "no instance named 'other.instance.default' is routed to this handler",
        ),
        (
            {"metrics": [metric("x", "", "COUNTER")]},
            "metrics[0].instanceName",
            "required",
        ),
        (
            {"metrics": [metric("x", RC, "COUNTER", "a")]},
            "metrics[0].labelNames",
            f"label names must be exactly the dimensions of instance {RC}: missing b",
        ),
        (
            {"metrics": [metric("x", RC, "COUNTER", "a", "b", "c")]},
            "metrics[0].labelNames",
            "not dimensions of the instance: c",
        ),
        (
            {"metrics": [metric("x", RC, "COUNTER", "a", "b", "a")]},
            "metrics[0].labelNames[2]",
            "listed twice",
        ),
        (
            {"metrics": [metric("x", "w.instance.default", "COUNTER", "a", "b-c")]},
            "metrics[0].labelNames[1]",
            "not a valid Prometheus label name",
        ),
        (
            {"metrics": [metric("x", "t.instance.default", "GAUGE")]},
            "metrics[0].instanceName",
            "the value of instance t.instance.default is TIMESTAMP",
        ),
        (
            {"metrics": [metric("x", RC, "UNSPECIFIED", "a", "b")]},
            "metrics[0].kind",
            "kind must be GAUGE, COUNTER or DISTRIBUTION",
        ),
        (
            {"metrics": [metric("requests+errors", RC, "COUNTER", "a", "b")]},
            "metrics[0].name",
            "'istio_requests+errors' is not a valid Prometheus metric name",
        ),
        (
            # Mixer: a namespace that is empty once made safe leaves the bare name.
            {"metrics": [metric("9lives", RC, "COUNTER", "a", "b", namespace="-")]},
            "metrics[0].name",
            "'9lives' is not a valid Prometheus metric name",
        ),
        (
            {"metrics": [metric("a:b", RC, "COUNTER", "a", "b", namespace="é")]},
            "metrics[0].name",
            "'é_a:b' is not a valid Prometheus metric name",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={
                            "linearBuckets": {"numFiniteBuckets": 1, "width": 1},
                            "explicitBuckets": {"bounds": [1]},
                        },
                    )
                ]
            },
            "metrics[0].buckets",
            "set exactly one of linearBuckets, exponentialBuckets and explicitBuckets;"
            " found linearBuckets, explicitBuckets",
        ),
        (
            {"metrics": [metric("x", RC, "DISTRIBUTION", "a", "b", buckets={})]},
            "metrics[0].buckets",
            "set exactly one",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={"linearBuckets": {"numFiniteBuckets": 0, "width": 1}},
                    )
                ]
            },
            "metrics[0].buckets.linearBuckets.numFiniteBuckets",
            "must be greater than 0",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={"linearBuckets": {"numFiniteBuckets": 2, "width": 0}},
                    )
                ]
            },
            "metrics[0].buckets.linearBuckets.width",
            "must be greater than 0",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={
                            "exponentialBuckets": {
                                "numFiniteBuckets": 2,
                                "growthFactor": 1,
                                "scale": 1,
                            }
                        },
                    )
                ]
            },
            "metrics[0].buckets.exponentialBuckets.growthFactor",
            "must be greater than 1",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={"exponentialBuckets": {"numFiniteBuckets": 2, "growthFactor": 2}},
                    )
                ]
            },
            "metrics[0].buckets.exponentialBuckets.scale",
            "must be greater than 0",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={
                            "exponentialBuckets": {
                                "numFiniteBuckets": 2000,
                                "growthFactor": 10,
                                "scale": 1,
                            }
                        },
                    )
                ]
            },
            "metrics[0].buckets",
            "the bucket bounds grow past the largest number",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={"linearBuckets": {"numFiniteBuckets": 10**9, "width": 1}},
                    )
                ]
            },
            "metrics[0].buckets.linearBuckets.numFiniteBuckets",
            "must be at most 10000",
        ),
        (
            {
                "metrics": [
                    metric(
                        "x",
                        RC,
                        "DISTRIBUTION",
                        "a",
                        "b",
                        buckets={"explicitBuckets": {"bounds": [1, 2, 2]}},
                    )
                ]
            },
            "metrics[0].buckets.explicitBuckets.bounds[2]",
            "bounds must increase: 2 follows 2",
        ),
        (
            {
                "metrics": [
                    metric("x", RC, "DISTRIBUTION", "a", "b", buckets={"explicitBuckets": {}})
                ]
            },
            "metrics[0].buckets.explicitBuckets.bounds",
            "needs at least one bound",
        ),
        (
            {
                "metrics": [
                    metric("x", RC, "COUNTER", "a", "b"),
                    metric("x", RC, "GAUGE", "a", "b"),
                ]
            },
            "metrics[1]",
            "metric istio_x is already defined by metrics[0] with different kind",
        ),
        (
            # `requests` and `requests_total` are one counter: istio_requests_total.
            {
                "metrics": [
                    metric("requests_total", RC, "COUNTER", "a", "b"),
                    metric("requests", "u.instance.default", "COUNTER", "a"),
                ]
            },
            "metrics[1]",
            "already defined by metrics[0] with different labels",
        ),
        (
            {
                "metrics": [
                    metric("x", RC, "COUNTER", "a", "b"),
                    metric("x_total", RC, "GAUGE", "a", "b"),
                ]
            },
            "metrics[1].name",
            "metric istio_x_total exposes a series name that metrics[0] exposes too",
        ),
        (
            {"metricsExpirationPolicy": {"metricsExpiryDuration": "0s"}},
            "metricsExpirationPolicy.metricsExpiryDuration",
            "metricsExpiryDuration 0s is invalid, must be > 0",
        ),
    ],
)
def test_validation_errors_have_field_paths(params: dict[str, Any], path: str, reason: str) -> None:
    routed = {
        **ROUTED,
        "u.instance.default": spec("u", "a"),
        "w.instance.default": spec("w", "a", "b-c"),
    }
    errors = [
        (e.path, e.reason) for e in INFO.validate(PrometheusParams.model_validate(params), routed)
    ]
    assert [p for p, _ in errors] == [path]
    assert reason in errors[0][1]


def test_one_metric_may_be_fed_by_two_instances_with_the_same_definition() -> None:
    params = PrometheusParams.model_validate(
        {
            "metrics": [
                metric("x", RC, "COUNTER", "a", "b"),
                metric("x", "v.instance.default", "COUNTER", "b", "a"),
            ]
        }
    )
    routed = {RC: spec(RC, "a", "b"), "v.instance.default": spec("v", "a", "b")}
    assert list(INFO.validate(params, routed)) == []


def test_an_unused_handler_is_checked_without_instances() -> None:
    params = PrometheusParams.model_validate({"metrics": [metric("x", RC, "COUNTER", "a")]})
    assert list(INFO.validate(params, {})) == []


def test_errors_reach_the_config_with_the_full_path(tmp_path: Path) -> None:
    docs = _istio_prometheus_documents()
    docs[0]["spec"]["params"]["metrics"][0]["label_names"].append("pod")
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump_all(docs))
    with pytest.raises(Rejected) as e:
        compile_snapshot(documents.read([tmp_path]), registry.default_registry())
    assert [(err.path, err.reason) for err in e.value.errors] == [
        (
            "spec.params.metrics[0].labelNames",
            f"label names must be exactly the dimensions of instance {RC}:"
            " not dimensions of the instance: pod",
        )
    ]


def test_the_adapter_is_registered() -> None:
    info = registry.default_registry().adapters["prometheus"]
    assert info.templates == ("metric",)
    assert info.default_params == {"metrics": [], "metricsExpirationPolicy": None}


# --- expiry -------------------------------------------------------------------------------------


def _series(reg: CollectorRegistry, name: str) -> Iterator[dict[str, str]]:
    for m in reg.collect():
        for s in m.samples:
            if s.name == name:
                yield s.labels


async def test_label_sets_not_updated_for_the_expiry_duration_go(reg: CollectorRegistry) -> None:
    clock = Clock()
    h = handler(
        reg,
        metric("c", "c.instance.default", "COUNTER", "path"),
        metricsExpirationPolicy={
            "metricsExpiryDuration": "10m",
            "expiryCheckIntervalDuration": "1m",
        },
        clock=clock,
    )

    def record(*paths: str) -> None:
        h.handle_metric([MetricInstance("c.instance.default", 1, {"path": p}) for p in paths])

    record("/a", "/b")
    clock.now += 300
    record("/a")
    clock.now += 299  # /b: 599 s without an update
    assert sorted(s["path"] for s in _series(reg, "istio_c_total")) == ["/a", "/b"]
    clock.now += 62  # /b: 661 s; the check after a minute removes it
    assert [s["path"] for s in _series(reg, "istio_c_total")] == ["/a"]
    record("/b")  # back, from zero
    assert reg.get_sample_value("istio_c_total", {"path": "/b"}) == 1
    assert reg.get_sample_value("istio_c_total", {"path": "/a"}) == 2
    await h.close()


async def test_expiry_runs_on_the_report_path_without_scrapes(reg: CollectorRegistry) -> None:
    clock = Clock()
    h = handler(
        reg,
        metric("g", "g.instance.default", "GAUGE", "id"),
        metricsExpirationPolicy={"metricsExpiryDuration": "10s"},  # checked every 5 s
        clock=clock,
    )
    family = h._families[0]
    h.handle_metric([MetricInstance("g.instance.default", 1, {"id": str(n)}) for n in range(100)])
    assert len(family.series) == 100
    clock.now += 11
    h.handle_metric([MetricInstance("g.instance.default", 1, {"id": "new"})])
    assert list(family.series) == [("new",)]
    await h.close()


async def test_a_shared_label_set_finds_its_series_once_per_batch(reg: CollectorRegistry) -> None:
    h = handler(
        reg,
        metric("requests_total", RC, "COUNTER", "code"),
        metric("d", RD, "DISTRIBUTION", "code", buckets={"explicitBuckets": {"bounds": [1]}}),
    )
    counter, histogram = h._families

    class Lookups(dict[tuple[str, ...], list[Any]]):
        gets = 0

        def get(self, key: Any, default: Any = None) -> Any:
            Lookups.gets += 1
            return super().get(key, default)

    counter.series = Lookups()
    histogram.series = Lookups()
    ok, not_found = {"code": 200}, {"code": 404}  # one map per label set, as the dispatch shares
    instances = [
        MetricInstance(name, value, dimensions)
        for dimensions in (ok, not_found, ok, ok)  # entries of one label set need not be adjacent
        for name, value in ((RC, 1), (RD, 0.5))
    ]
    assert h.handle_metric(instances) is ExportResult.SUCCESS
    assert Lookups.gets == 4  # each metric's two series, each found once
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 3
    assert reg.get_sample_value("istio_requests_total", {"code": "404"}) == 1
    assert reg.get_sample_value("istio_d_count", {"code": "200"}) == 3
    assert reg.get_sample_value("istio_d_sum", {"code": "200"}) == 1.5
    assert len(counter.series) == len(histogram.series) == 2
    # The next batch finds them again: what a batch found does not outlive it.
    assert h.handle_metric(instances[:2]) is ExportResult.SUCCESS
    assert Lookups.gets == 6
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 4
    await h.close()


async def test_a_bad_value_still_makes_no_series_with_a_shared_label_set(
    reg: CollectorRegistry,
) -> None:
    h = handler(reg, metric("requests_total", RC, "COUNTER", "code"))
    (family,) = h._families
    dimensions = {"code": 200}
    batch = [MetricInstance(RC, -1, dimensions), MetricInstance(RC, 2, dimensions)]
    assert h.handle_metric(batch) is ExportResult.FAILURE  # a counter cannot go down, as before
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 2
    assert h.handle_metric([MetricInstance(RC, -1, dimensions)]) is ExportResult.FAILURE
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 2
    assert len(family.series) == 1
    await h.close()


async def test_an_expired_series_comes_back_from_zero_with_the_same_label_set(
    reg: CollectorRegistry,
) -> None:
    clock = Clock()
    h = handler(
        reg,
        metric("c", "c.instance.default", "COUNTER", "path"),
        metricsExpirationPolicy={"metricsExpiryDuration": "10s"},  # checked every 5 s
        clock=clock,
    )
    (family,) = h._families
    dimensions = {"path": "/a"}  # the same map in every batch
    h.handle_metric([MetricInstance("c.instance.default", 1, dimensions)] * 2)
    assert reg.get_sample_value("istio_c_total", {"path": "/a"}) == 2
    clock.now += 11
    assert list(_series(reg, "istio_c_total")) == []  # the scrape's check removed it
    h.handle_metric([MetricInstance("c.instance.default", 1, dimensions)] * 3)
    assert reg.get_sample_value("istio_c_total", {"path": "/a"}) == 3  # a new series
    assert list(family.series) == [("/a",)]
    await h.close()


# --- reloads ------------------------------------------------------------------------------------


async def test_a_reload_keeps_series_and_never_registers_twice(reg: CollectorRegistry) -> None:
    counter = metric("requests_total", RC, "COUNTER", "code")
    old = handler(reg, counter)
    old.handle_metric([MetricInstance(RC, 5, {"code": 200})])
    # The new configuration is built while the old handler is still open.
    new = handler(reg, counter, metric("extra", "e.instance.default", "GAUGE"))
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 5
    new.handle_metric([MetricInstance(RC, 1, {"code": 200})])
    old.handle_metric([MetricInstance(RC, 1, {"code": 200})])  # in flight while it retires
    await old.close()
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 7
    await old.close()  # closing twice is harmless
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 7
    await new.close()
    assert generate_latest(reg) == b""
    again = handler(reg, counter)
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) is None
    await again.close()


async def test_a_changed_definition_replaces_the_old_one(reg: CollectorRegistry) -> None:
    old = handler(reg, metric("requests_total", RC, "COUNTER", "code"))
    old.handle_metric([MetricInstance(RC, 5, {"code": 200})])
    changed = handler(reg, metric("requests_total", RC, "COUNTER", "code", "method"))
    changed.handle_metric([MetricInstance(RC, 1, {"code": 200, "method": "GET"})])
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) is None
    assert reg.get_sample_value("istio_requests_total", {"code": "200", "method": "GET"}) == 1
    # A rejected configuration closes what it built: the old definition is exposed again.
    await changed.close()
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 5
    # A change of kind changes the names on the registry; both ways work.
    gauge = handler(reg, metric("requests_total", RC, "GAUGE", "code"))
    gauge.handle_metric([MetricInstance(RC, 2, {"code": 200})])
    assert "# TYPE istio_requests_total gauge" in generate_latest(reg).decode()
    await old.close()
    assert reg.get_sample_value("istio_requests_total", {"code": "200"}) == 2
    await gauge.close()
    assert generate_latest(reg) == b""


async def test_a_description_change_keeps_the_series(reg: CollectorRegistry) -> None:
    old = handler(reg, metric("c", RC, "COUNTER"))
    old.handle_metric([MetricInstance(RC, 3)])
    new = handler(reg, metric("c", RC, "COUNTER", description="Requests."))
    await old.close()
    assert reg.get_sample_value("istio_c_total") == 3
    assert "# HELP istio_c_total Requests." in generate_latest(reg).decode()
    await new.close()


async def test_a_name_the_hub_already_exposes_cannot_be_built(reg: CollectorRegistry) -> None:
    Counter("mixerhub_check", "The hub's own.", registry=reg)
    with pytest.raises(ValueError, match=r"metrics\[1\]: mixerhub_check_total clashes .* Dup"):
        handler(
            reg,
            metric("ok", RC, "COUNTER"),
            metric("check_total", "x.instance.default", "COUNTER", namespace="mixerhub"),
        )
    # What the failed build had attached is gone again.
    assert "istio_ok" not in generate_latest(reg).decode()
    h = handler(reg, metric("ok", RC, "COUNTER"))
    await h.close()


async def test_istio_config_reload_through_the_store(istio_dir: Path) -> None:
    reg = registry.default_registry()
    first = compile_snapshot(documents.read([istio_dir]), reg)
    h1 = first.handlers["prometheus.handler.istio-system"].handler
    assert isinstance(h1, PrometheusHandler)
    try:
        h1.handle_metric([first.instances[RC].build({"context.protocol": "http"})])
        docs = _istio_prometheus_documents()
        docs[0]["spec"]["params"]["metrics"][0]["description"] = "Requests."
        (istio_dir / "prometheus.yaml").write_text(yaml.safe_dump_all(docs))
        second = compile_snapshot(documents.read([istio_dir]), reg, previous=first)
        h2 = second.handlers["prometheus.handler.istio-system"].handler
        assert isinstance(h2, PrometheusHandler)
        assert h2 is not h1
        await h1.close()
        text = generate_latest(REGISTRY).decode()
        assert "# HELP istio_requests_total Requests." in text
        assert 'istio_requests_total{connection_security_policy="none"' in text
        assert text.count("# TYPE istio_requests_total counter") == 1
        await h2.close()
    finally:
        await h1.close()
    assert "istio_requests_total" not in generate_latest(REGISTRY).decode()
