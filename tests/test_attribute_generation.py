"""Attribute generators (Mixer's APA): the kubernetes template's bindings fill the bag first,
on the report and the check path, with Istio's own telemetry configuration."""

from __future__ import annotations

import ipaddress
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from envoy.service.accesslog.v3 import als_pb2

from mixerhub import adapter, registry
from mixerhub.access_log import AccessLogService
from mixerhub.adapter import AdapterInfo, ExportResult, Handler, QuotaArgs
from mixerhub.dispatcher import CheckDispatcher, ReportDispatcher
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot, default_config_dir
from mixerhub.templates import MetricInstance
from mixerhub.types import Params
from tests.mesh import workload_entry
from tests.test_access_log import REPORTER, entry

IP = ipaddress.ip_address
TELEMETRY = Path(__file__).parent / "data" / "istio-1.4" / "telemetry.yaml"


class _Recorder(Handler):
    """Stands in for prometheus and stdio: keeps what it is handed."""

    metrics: list[MetricInstance] = []  # noqa: RUF012 - shared on purpose, reset by tests

    def handle_metric(self, instances: Sequence[MetricInstance]) -> ExportResult:
        type(self).metrics.extend(instances)
        return ExportResult.SUCCESS

    def handle_logentry(self, instances: Sequence[Any]) -> ExportResult:
        return ExportResult.SUCCESS


def _recording(info: object) -> object:
    if isinstance(info, AdapterInfo) and info.name in ("prometheus", "stdio"):
        return replace(info, build=lambda p, i, e: _Recorder())
    return info


RECORDER = AdapterInfo("recorder", "test", ("metric",), Params, lambda p, i, e: _Recorder())
REGISTRY = registry.build_registry(
    [*((origin, _recording(info)) for origin, info in registry.builtin()), ("test", RECORDER)]
)


def telemetry(tmp_path: Path, *entries: tuple[str, str]) -> Snapshot:
    files = [TELEMETRY]
    for i, (address, app) in enumerate(entries):
        files.append(tmp_path / f"we{i}.yaml")
        files[-1].write_text(workload_entry("productpage-v1-7f9", address, app))
    return compile_snapshot(documents.read(files), REGISTRY)


def requestcounts(service: AccessLogService, *sources: str) -> list[dict[str, Any]]:
    _Recorder.metrics = []
    message = als_pb2.StreamAccessLogsMessage()
    for source in sources:
        e = entry()
        e.common_properties.downstream_remote_address.socket_address.address = source
        message.http_logs.log_entry.append(e)
    service.ingest(message, REPORTER)
    return [
        m.dimensions for m in _Recorder.metrics if m.name == "requestcount.instance.istio-system"
    ]


def test_istios_telemetry_names_the_source_workload_from_its_workload_entry(
    tmp_path: Path,
) -> None:
    service = AccessLogService()
    service.activate(telemetry(tmp_path, ("10.0.0.9", "productpage")))
    known, unknown = requestcounts(service, "10.0.0.9", "10.0.0.99")
    assert (known["source_workload"], known["source_app"], known["source_version"]) == (
        "productpage",
        "productpage",
        "v1",
    )
    assert known["source_workload_namespace"] == "shop"
    assert (known["destination_workload"], known["destination_app"]) == ("reviews", "reviews")
    assert known["reporter"] == "destination"
    # An address no WorkloadEntry has: the bindings' defaults, as Mixer gave for unknown pods.
    assert (unknown["source_workload"], unknown["source_app"]) == ("unknown", "unknown")
    # ...but what the request carried stays: this namespace comes from the peer's principal.
    assert unknown["source_workload_namespace"] == "shop"


def test_what_envoy_reported_is_not_overwritten(tmp_path: Path) -> None:
    # A WorkloadEntry at the destination's address: the reporter's own metadata still wins.
    service = AccessLogService()
    service.activate(telemetry(tmp_path, ("10.0.0.1", "impostor")))
    (dims,) = requestcounts(service, "10.0.0.1")
    assert (dims["destination_workload"], dims["destination_app"]) == ("reviews", "reviews")
    assert dims["source_workload"] == "impostor"  # the source was not reported: it is filled


@pytest.mark.parametrize("pure", [True, False])
def test_a_generator_whose_outputs_depend_on_the_instance_alone_is_asked_once_per_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pure: bool
) -> None:
    service = AccessLogService()
    snapshot = telemetry(tmp_path, ("10.0.0.9", "productpage"))
    (kubernetesenv,) = [
        b.handler for b in snapshot.handlers.values() if b.adapter.name == "kubernetesenv"
    ]
    asked: list[Any] = []
    ask = kubernetesenv.generate_kubernetes_attributes
    monkeypatch.setattr(
        kubernetesenv, "generate_kubernetes_attributes", lambda i: asked.append(i) or ask(i)
    )
    monkeypatch.setattr(kubernetesenv, "outputs_depend_on_instance_alone", pure)
    service.activate(snapshot)
    sources = ["10.0.0.9", "10.0.0.99", "10.0.0.9", "10.0.0.9", "10.0.0.99"]
    first = requestcounts(service, *sources)
    again = requestcounts(service, *sources)
    assert first == again
    assert [d["source_workload"] for d in first] == [
        "productpage", "unknown", "productpage", "productpage", "unknown"
    ]  # fmt: skip
    assert len(asked) == (2 if pure else 2 * len(sources))


def test_without_generators_or_readers_nothing_runs(tmp_path: Path) -> None:
    default = compile_snapshot(documents.read([default_config_dir()]), registry.default_registry(),
                               build_handlers=False)  # fmt: skip
    assert ReportDispatcher(default).preprocessor is None
    assert CheckDispatcher(default).preprocessor is None
    snapshot = telemetry(tmp_path)
    assert ReportDispatcher(snapshot).preprocessor is not None
    # Istio's telemetry has no check rule to read what kubernetesenv produces.
    assert CheckDispatcher(snapshot).preprocessor is None


CONFIG = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: kubernetesenv, namespace: shop}
spec: {compiledAdapter: kubernetesenv}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: attributes, namespace: shop}
spec:
  compiledTemplate: kubernetes
  params:
    source_uid: source.uid | ""
    source_ip: source.ip | ip("0.0.0.0")
  attributeBindings:
    source.uid: $out.source_pod_uid | "unknown"
    source.labels: $out.source_labels | emptyStringMap()
    source.workload.name: $out.source_workload_name | "unknown"
    source.name: $out.source_pod_name | request.host
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: generate, namespace: shop}
spec:
  actions: [{handler: kubernetesenv, instances: [attributes]}]
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: rec, namespace: istio-system}
spec: {compiledAdapter: recorder}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requests, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions:
      source_uid: source.uid | ""
      source_workload: source.workload.name | "unknown"
      source_name: source.name | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: report, namespace: istio-system}
spec:
  actions: [{handler: rec, instances: [requests]}]
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: deny, namespace: istio-system}
spec: {compiledAdapter: denier, params: {status: {code: 7, message: no productpage}}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: nothing, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-productpage, namespace: istio-system}
spec:
  match: source.labels["app"] == "productpage"
  actions: [{handler: deny, instances: [nothing]}]
"""


def scoped(tmp_path: Path) -> Snapshot:
    (tmp_path / "c.yaml").write_text(textwrap.dedent(CONFIG))
    (tmp_path / "we.yaml").write_text(
        workload_entry("productpage-v1-7f9", "10.0.0.9", "productpage")
    )
    return compile_snapshot(documents.read([tmp_path]), REGISTRY)


def test_reports_are_filled_in_the_generators_namespace_only(tmp_path: Path) -> None:
    reports = ReportDispatcher(scoped(tmp_path))
    _Recorder.metrics = []
    bags: list[dict[str, object]] = [
        {"source.ip": IP("10.0.0.9"), "request.host": "h"},
        {"source.ip": IP("10.0.0.8"), "request.host": "h"},
    ]
    reports.report(bags, "shop")
    reports.report([{"source.ip": IP("10.0.0.9")}], "other")
    assert [m.dimensions for m in _Recorder.metrics] == [
        # The generator's input `source.uid | ""` was read before the bag was filled; the
        # metric reading the same expression still sees the filled value.
        {"source_uid": "kubernetes://productpage-v1-7f9.shop", "source_workload": "productpage",
         "source_name": "productpage-v1-7f9"},
        # Unknown: the defaults, one of them an attribute of the request.
        {"source_uid": "unknown", "source_workload": "unknown", "source_name": "h"},
        {"source_uid": "", "source_workload": "unknown", "source_name": "unknown"},
    ]  # fmt: skip


async def test_checks_see_the_generated_attributes(tmp_path: Path) -> None:
    checks = CheckDispatcher(scoped(tmp_path))
    assert {"source.ip", "source.uid", "source.labels"} <= checks.referenced
    denied = await checks.check({"source.ip": IP("10.0.0.9")}, "shop", QuotaArgs())
    assert (denied.status, denied.message) == (adapter.PERMISSION_DENIED, "no productpage")
    allowed = await checks.check({"source.ip": IP("10.0.0.8")}, "shop", QuotaArgs())
    assert allowed.ok
    # Labels the request carried are its own.
    bag = {"source.ip": IP("10.0.0.9"), "source.labels": {"app": "ratings"}}
    assert (await checks.check(bag, "shop", QuotaArgs())).ok
    # Out of the generator's namespace nothing is generated.
    assert (await checks.check({"source.ip": IP("10.0.0.9")}, "other", QuotaArgs())).ok


BAD = """
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: %s, namespace: istio-system}
spec:
  compiledTemplate: %s
  params: {}
  attributeBindings: {%s}
"""


@pytest.mark.parametrize(
    ("template", "bindings", "path", "reason"),
    [
        ("metric", "source.uid: '\"x\"'", "spec.attributeBindings",
         "template 'metric' produces no attributes; only attribute-generating templates do"
         " (kubernetes)"),
        ("kubernetes", "source.nope: $out.source_pod_name", "spec.attributeBindings.source.nope",
         "unknown attribute 'source.nope'"),
        ("kubernetes", "source.labels: $out.source_pod_name",
         "spec.attributeBindings.source.labels", "position 0: expression has type STRING, want"
         " STRING_MAP in '$out.source_pod_name'"),
        ("kubernetes", "source.uid: $out.source_pod", "spec.attributeBindings.source.uid",
         "position 0: unknown attribute $out.source_pod"),
    ],
)  # fmt: skip
def test_bad_bindings_are_config_errors(
    tmp_path: Path, template: str, bindings: str, path: str, reason: str
) -> None:
    (tmp_path / "c.yaml").write_text(textwrap.dedent(BAD % ("bad", template, bindings)))
    with pytest.raises(Rejected) as e:
        compile_snapshot(documents.read([tmp_path]), registry.default_registry())
    (error,) = e.value.errors
    assert (error.kind, error.name, error.path) == ("instance", "bad", path)
    assert error.reason.startswith(reason), error.reason
