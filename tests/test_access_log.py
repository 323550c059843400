"""Access-log ingestion: Envoy's entries as attributes, report rules, batches to handlers."""

from __future__ import annotations

import datetime
import ipaddress
import json
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from mixerhub import registry
from mixerhub.access_log import AccessLogService
from mixerhub.access_log_attributes import Reporter, http_bag, tcp_bag
from mixerhub.adapter import AdapterInfo, ExportResult, Handler
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot, default_config_dir
from mixerhub.templates import LogEntryInstance, MetricInstance
from mixerhub.types import Params
from tests.harness import EnvoyFactory, Hub, Upstream, loopback_options


class _Recorder(Handler):
    """A test adapter that keeps every batch it is handed."""

    batches: list[list[MetricInstance]] = []  # noqa: RUF012 - shared on purpose, reset by tests

    def handle_metric(self, instances: Sequence[MetricInstance]) -> ExportResult:
        type(self).batches.append(list(instances))
        return ExportResult.SUCCESS


RECORDER = AdapterInfo("recorder", "test", ("metric",), Params, lambda p, i, e: _Recorder())
REGISTRY = registry.build_registry([*registry.builtin(), ("test", RECORDER)])

START = datetime.datetime(2026, 11, 25, 12, 0, 0, tzinfo=datetime.UTC)


def entry(
    path: str = "/api/v1?x=1", code: int = 200, **kw: Any
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    common = e.common_properties
    common.downstream_remote_address.socket_address.address = "10.0.0.9"
    common.downstream_remote_address.socket_address.port_value = 51000
    common.downstream_local_address.socket_address.address = "10.0.0.1"
    common.downstream_local_address.socket_address.port_value = 8080
    common.start_time.FromDatetime(START.replace(tzinfo=None))
    common.duration.FromMilliseconds(kw.get("ms", 12))
    common.upstream_cluster = "upstream"
    san = common.tls_properties.peer_certificate_properties.subject_alt_name.add()
    san.uri = "spiffe://cluster.local/ns/shop/sa/frontend"
    common.response_flags.upstream_request_timeout = kw.get("timeout", False)
    e.request.request_method = 3  # POST
    e.request.scheme, e.request.authority, e.request.path = "http", "reviews.shop:9080", path
    e.request.user_agent, e.request.request_id = "curl/8", "rid-1"
    e.request.request_headers_bytes, e.request.request_body_bytes = 100, 20
    e.request.request_headers["content-type"] = kw.get("content_type", "application/json")
    e.response.response_code.value = code
    e.response.response_headers_bytes, e.response.response_body_bytes = 50, 300
    return e


REPORTER = Reporter("reviews", "shop", {"app": "reviews", "version": "v2"}, "reviews-sa")


def test_http_entries_become_mixers_attributes() -> None:
    bag = http_bag(entry(timeout=True, content_type="application/grpc"), REPORTER)
    expected = {
        "source.ip": ipaddress.ip_address("10.0.0.9"),
        "source.port": 51000,
        "destination.ip": ipaddress.ip_address("10.0.0.1"),
        "destination.port": 8080,
        "source.principal": "cluster.local/ns/shop/sa/frontend",
        "source.namespace": "shop",
        "connection.mtls": True,
        "destination.workload.name": "reviews",
        "destination.workload.namespace": "shop",
        "destination.labels": {"app": "reviews", "version": "v2"},
        "destination.service.host": "reviews.shop",
        "destination.service.name": "reviews",
        "request.method": "POST",
        "request.host": "reviews.shop:9080",
        "request.path": "/api/v1?x=1",
        "request.url_path": "/api/v1",
        "request.useragent": "curl/8",
        "request.id": "rid-1",
        "request.size": 20,
        "request.total_size": 120,
        "request.time": START,
        "response.code": 200,
        "response.size": 300,
        "response.total_size": 350,
        "response.duration": datetime.timedelta(milliseconds=12),
        "response.time": START + datetime.timedelta(milliseconds=12),
        "context.protocol": "grpc",
        "context.reporter.kind": "inbound",
        "context.proxy_error_code": "UT",
    }
    assert {name: bag[name] for name in expected} == expected
    assert "source.workload.name" not in bag  # an inbound reporter does not know its peer's
    assert bag["request.headers"]["user-agent"] == "curl/8"


def test_tcp_entries() -> None:
    e = accesslog_pb2.TCPAccessLogEntry()
    e.common_properties.downstream_remote_address.socket_address.address = "10.0.0.9"
    e.connection_properties.received_bytes, e.connection_properties.sent_bytes = 10, 20
    bag = tcp_bag(e, REPORTER)
    assert (
        bag["context.protocol"],
        bag["connection.received.bytes"],
        bag["connection.sent.bytes"],
    ) == ("tcp", 10, 20)
    assert bag["connection.event"] == "close"
    assert bag["connection.mtls"] is False


def test_the_reporter_comes_from_the_first_messages_node_metadata() -> None:
    message = als_pb2.StreamAccessLogsMessage()
    identifier = message.identifier
    identifier.log_name = "mixerhub"
    identifier.node.id = "sidecar~127.0.0.1~reviews.shop~shop.svc.cluster.local"
    identifier.node.metadata.update(
        {"NAMESPACE": "shop", "WORKLOAD_NAME": "reviews", "SERVICE_ACCOUNT": "sa",
         "LABELS": {"app": "reviews"}}
    )  # fmt: skip
    reporter = Reporter.from_identifier(identifier)
    assert reporter == Reporter(
        "reviews", "shop", {"app": "reviews"}, "sa", "inbound", "kubernetes://reviews.shop"
    )
    identifier.log_name = "mixerhub-outbound"
    assert Reporter.from_identifier(identifier).kind == "outbound"


CONFIG = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: rec}
spec: {compiledAdapter: recorder}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requests}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions:
      response_code: response.code | 200
      reporter: conditional(context.reporter.kind == "outbound", "source", "destination")
      destination_workload: destination.workload.name | "unknown"
      source_workload: source.workload.name | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: http}
spec:
  match: context.protocol == "http"
  actions: [{handler: rec, instances: [requests]}]
"""


def test_each_message_is_one_batch_per_handler(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(textwrap.dedent(CONFIG))
    service = AccessLogService()
    service.activate(compile_snapshot(documents.read([tmp_path]), REGISTRY))
    _Recorder.batches = []
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend([entry(code=c) for c in (200, 404, 503)])
    message.http_logs.log_entry.append(entry(content_type="application/grpc"))  # not matched
    assert service.ingest(message, REPORTER) == 3
    (batch,) = _Recorder.batches
    assert [i.dimensions["response_code"] for i in batch] == [200, 404, 503]
    assert batch[0].dimensions == {
        "response_code": 200,
        "reporter": "destination",
        "destination_workload": "reviews",
        "source_workload": "unknown",
    }
    assert batch[0].name == "requests.instance.istio-system"


def test_the_default_config_logs_each_request_as_istio_did() -> None:
    snapshot = compile_snapshot(documents.read([default_config_dir()]), registry.default_registry(),
                                build_handlers=False)  # fmt: skip
    accesslog = snapshot.instances["accesslog.instance.istio-system"]
    instance = accesslog.build(http_bag(entry(code=503), REPORTER))
    assert isinstance(instance, LogEntryInstance)
    v = instance.variables
    assert (v["responseCode"], v["method"], v["url"], v["reporter"]) == (
        503,
        "POST",
        "/api/v1?x=1",
        "destination",
    )
    assert v["destinationWorkload"] == "reviews"
    assert v["sourcePrincipal"] == "cluster.local/ns/shop/sa/frontend"
    assert v["connection_security_policy"] == "mutual_tls"
    assert v["latency"] == datetime.timedelta(milliseconds=12)


@pytest.fixture
def hub_config() -> None:
    return None  # the shipped default: access logs to stdout


def test_access_logs_from_a_real_envoy_reach_stdout(
    upstream: Upstream, hub: Hub, envoy: EnvoyFactory
) -> None:
    proxy = envoy(loopback_options(upstream.address, hub.grpc_address))
    for path in ("/a", "/b?q=1", "/c"):
        assert proxy.get(path, headers={"user-agent": "e2e"}).status == 200
    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in hub.log().splitlines() if line.startswith('{"level"')]
        if len(lines) >= 3:
            break
        time.sleep(0.1)
    # Each Envoy worker streams its own log: entries may arrive in any order.
    assert sorted(line["url"] for line in lines) == ["/a", "/b?q=1", "/c"], hub.log()
    first = lines[0]
    assert first["instance"] == "accesslog.instance.istio-system"
    assert (first["method"], first["responseCode"], first["userAgent"]) == ("GET", 200, "e2e")
    assert first["reporter"] == "destination"
    assert first["destinationWorkload"] == "unknown"  # the bootstrap's default workload name
    assert first["protocol"] == "http"
    assert first["latency"].endswith(("ms", "µs", "s"))
