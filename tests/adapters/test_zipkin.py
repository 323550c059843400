"""zipkin: tracespan instances as Zipkin v2 spans, checked as a collector receives them."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import random
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mixerhub.adapters.zipkin import INFO, ZipkinHandler, ZipkinParams
from mixerhub.adapters.zipkin import spans as zspans
from prometheus_client import CollectorRegistry

from mixerhub import registry
from mixerhub.adapter import Env, ExportResult
from mixerhub.monitoring import REGISTRY
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot
from mixerhub.templates import TraceSpanInstance
from tests.harness import eventually, free_port
from tests.zipkin_receiver import ZipkinReceiver

END = datetime.datetime(2006, 1, 2, 22, 4, 5, tzinfo=datetime.UTC)
START = END - datetime.timedelta(milliseconds=100)
START_US, END_US = 1136239444900000, 1136239445000000
TRACE, SPAN, PARENT = "463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312", "0020000000000001"
FAST = {"flushInterval": "20ms", "initialBackoff": "1ms", "maxBackoff": "10ms", "timeout": "1s"}


# Every handler a test builds, closed when the test ends even if it failed: an unclosed aiohttp
# session left to the garbage collector would fail whichever test happens to collect it.
_built: list[ZipkinHandler] = []


@pytest.fixture(autouse=True)
async def close_handlers() -> AsyncIterator[None]:
    yield
    while _built:
        await _built.pop().close()


def handler(url: str, batching: dict[str, object] | None = None, **params: object) -> ZipkinHandler:
    env = Env(
        "zipkin", "zipkin.handler.istio-system", logging.getLogger("test"), CollectorRegistry()
    )
    params.setdefault("sampleProbability", 1.0)
    p = ZipkinParams.model_validate(
        {"url": url, "batching": {**FAST, **(batching or {})}, **params}
    )
    assert not list(INFO.validate(p, {}))
    built = INFO.build(p, {}, env)
    assert isinstance(built, ZipkinHandler)
    _built.append(built)
    return built


def span(n: int = 0, **fields: Any) -> TraceSpanInstance:
    """A server span of Mixer's own zipkin integration test; ``n`` makes its trace unique."""
    defaults: dict[str, Any] = {
        "trace_id": f"{n:032x}" if n else TRACE,
        "span_id": SPAN,
        "parent_span_id": PARENT,
        "span_name": "/foo/bar",
        "start_time": START,
        "end_time": END,
        "http_status_code": 200,
        "source_name": "srcsvc",
        "source_ip": ipaddress.ip_address("0.0.0.0"),
        "destination_name": "destsvc",
        "destination_ip": ipaddress.ip_address("0.0.0.0"),
        "request_size": 100,
        "request_total_size": 128,
        "response_size": 500,
        "response_total_size": 512,
        "api_protocol": "http",
        "span_tags": {
            "http.host": "example.istio.com",
            "http.method": "POST",
            "http.path": "/foo/bar",
            "http.user_agent": "xxx",
            "principal": "unknown",
            "source.version": "v1",
            "destination.version": "unknown",
        },
    }
    return TraceSpanInstance("default.tracespan.istio-system", **{**defaults, **fields})


# What Mixer 1.4 reported for span() (mixer/adapter/zipkin/zipkin_integration_test.go), but for
# the remote endpoint, which Mixer left out, and OpenCensus's own "opencensus.status_description".
MIXERS_SPAN = {
    "traceId": TRACE,
    "id": SPAN,
    "parentId": PARENT,
    "kind": "SERVER",
    "name": "/foo/bar",
    "timestamp": START_US,
    "duration": 100000,
    "localEndpoint": {"serviceName": "destsvc", "ipv4": "0.0.0.0"},
    "remoteEndpoint": {"serviceName": "srcsvc", "ipv4": "0.0.0.0"},
    "annotations": [
        {"timestamp": START_US, "value": "Received 128 bytes"},
        {"timestamp": END_US, "value": "Sent 512 bytes"},
    ],
    "tags": {
        "destination.version": "unknown",
        "http.host": "example.istio.com",
        "http.method": "POST",
        "http.path": "/foo/bar",
        "http.status_code": "200",
        "http.user_agent": "xxx",
        "principal": "unknown",
        "source.version": "v1",
    },
}


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "mixerhub_adapter_dropped_total", {"adapter": "zipkin", "reason": reason}
    )
    return value or 0.0


def all_dropped() -> float:
    return sum(dropped(r) for r in ("queue_full", "send_failed", "shutdown"))


@pytest.fixture
async def collector() -> AsyncIterator[ZipkinReceiver]:
    r = ZipkinReceiver()
    await r.start()
    yield r
    await r.stop()
    assert not r.problems


async def test_a_server_span_arrives_as_mixer_reported_it(collector: ZipkinReceiver) -> None:
    h = handler(collector.url)
    assert h.handle_tracespan([span()]) is ExportResult.SUCCESS
    await eventually(lambda: len(collector.spans) == 1)
    assert collector.spans == [MIXERS_SPAN]
    await h.close()


async def test_a_client_span_is_the_sources_and_rewrites_its_id(collector: ZipkinReceiver) -> None:
    h = handler(collector.url)
    client = span(
        client_span=True,
        rewrite_client_span_id=True,
        source_ip=ipaddress.ip_address("10.1.2.3"),
        destination_ip=ipaddress.ip_address("fd00::7"),
        destination_name="",
        http_status_code=503,
        span_tags={"retries": 2, "cached": False, "ratio": 0.5, "labels": {"b": "2", "a": "1"}},
    )
    # The server side of the same hop: its parent becomes the client span's rewritten id.
    server = dataclasses.replace(client, client_span=False, span_tags={}, http_status_code=0)
    h.handle_tracespan([client, server])
    await h.close()
    sent, received = collector.spans
    rewritten = f"{int(SPAN, 16) ^ 0x3F6A2EC3C810C2AB:016x}"
    assert sent == {
        "traceId": TRACE,
        "id": rewritten,
        "parentId": PARENT,
        "kind": "CLIENT",
        "name": "/foo/bar",
        "timestamp": START_US,
        "duration": 100000,
        "localEndpoint": {"serviceName": "srcsvc", "ipv4": "10.1.2.3"},
        "remoteEndpoint": {"ipv6": "fd00::7"},
        "annotations": [
            {"timestamp": START_US, "value": "Sent 128 bytes"},
            {"timestamp": END_US, "value": "Received 512 bytes"},
        ],
        "tags": {
            "http.status_code": "503",
            "error": "UNAVAILABLE",
            "retries": "2",
            "cached": "false",
            "ratio": "0.5",
            "labels": '{"a":"1","b":"2"}',
        },
    }
    assert (received["id"], received["parentId"], received["kind"]) == (SPAN, rewritten, "SERVER")
    assert received["localEndpoint"] == {
        "serviceName": "default",
        "ipv6": "fd00::7",
    }  # Mixer's name
    assert "tags" not in received


def test_http_statuses_become_an_error_tag_as_opencensus_mapped_them() -> None:
    def error(code: int) -> str | None:
        tags: dict[str, str] = zspans.span(span(http_status_code=code), TRACE, SPAN, "")["tags"]
        return tags.get("error")

    assert [error(c) for c in (200, 201, 302)] == [None, None, None]
    assert [error(c) for c in (400, 401, 403, 404, 429, 499, 501, 503, 504)] == [
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "CANCELLED",
        "UNIMPLEMENTED",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
    ]
    assert [error(c) for c in (100, 418, 500, 502)] == ["UNKNOWN"] * 4


def test_ids_from_b3_headers_and_traceparent_are_normalized() -> None:
    def ids(trace: str, span_id: str = "", parent: str = "") -> tuple[str, str, str] | None:
        found: tuple[str, str, str] | None = zspans.ids(
            span(trace_id=trace, span_id=span_id, parent_span_id=parent)
        )
        return found

    assert ids(TRACE.upper(), SPAN.upper(), PARENT) == (TRACE, SPAN, PARENT)
    assert ids(" abc ", "1", "") == ("0000000000000abc", "0000000000000001", "")
    assert ids("0" * 16 + "a" * 16, SPAN) == ("a" * 16, SPAN, "")  # 128 bits, high half zero
    assert ids("1" + "0" * 16, SPAN) == ("0" * 15 + "1" + "0" * 16, SPAN, "")  # 17 digits: 128
    assert ids(TRACE, SPAN, "not hex") == (TRACE, SPAN, "")  # Mixer kept the span, as a root
    assert ids(TRACE, SPAN, SPAN) == (TRACE, SPAN, "")  # not its own parent
    # W3C traceparent: the parent-id is the id of the span that sent the request.
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert ids(traceparent) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "")
    assert ids(traceparent, SPAN, traceparent) == (
        "0af7651916cd43dd8448eb211c80319c",
        SPAN,
        "b7ad6b7169203331",
    )
    # A single b3 header: traceid-spanid-sampled-parentspanid.
    b3 = f"{TRACE}-{SPAN}-1-{PARENT}"
    assert ids(b3) == (TRACE, SPAN, PARENT)
    assert ids(f"{TRACE}-{SPAN}") == (TRACE, SPAN, "")
    assert ids("") is None
    for bad in (
        ("0" * 32, SPAN),  # all zero
        ("a" * 33, SPAN),
        ("xyz", SPAN),
        (TRACE, "a" * 17),
        (TRACE, ""),
        (TRACE, "0"),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", ""),  # version ff
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", ""),
        ("00-" + "0" * 32 + "-b7ad6b7169203331-01", ""),
    ):
        with pytest.raises(zspans.InvalidId):
            ids(*bad)


async def test_spans_without_valid_ids_are_dropped_and_counted(collector: ZipkinReceiver) -> None:
    h = handler(collector.url)
    before_invalid, before_none = dropped("invalid_id"), dropped("no_trace_id")
    result = h.handle_tracespan(
        [span(1), span(trace_id="nothex"), span(span_id=""), span(trace_id="", span_id="")]
    )
    assert result is ExportResult.FAILURE
    assert dropped("invalid_id") - before_invalid == 2
    assert dropped("no_trace_id") - before_none == 1
    await h.close()
    assert [s["traceId"] for s in collector.spans] == [f"{1:016x}"]


async def test_sampling_is_decided_per_trace(collector: ZipkinReceiver) -> None:
    h = handler(collector.url, sampleProbability=0.25)
    rng = random.Random(7)
    traces = [f"{rng.getrandbits(128):032x}" for _ in range(2000)]
    # Two spans per trace, in separate calls: a trace is sent whole or not at all.
    h.handle_tracespan([span(trace_id=t) for t in traces])
    h.handle_tracespan([span(trace_id=t, span_id="b" * 16) for t in traces])
    await h.close()
    per_trace: dict[str, int] = {}
    for s in collector.spans:
        per_trace[s["traceId"]] = per_trace.get(s["traceId"], 0) + 1
    assert set(per_trace.values()) == {2}
    assert 0.2 < len(per_trace) / len(traces) < 0.3


async def test_sample_probability_zero_sends_nothing_as_in_mixer(collector: ZipkinReceiver) -> None:
    h = handler(collector.url, sampleProbability=0)
    assert h.handle_tracespan([span(n + 1) for n in range(10)]) is ExportResult.SUCCESS
    await h.close()
    assert collector.requests == 0


async def test_a_batch_is_one_post(collector: ZipkinReceiver) -> None:
    h = handler(collector.url, batching={"batchSize": 5, "flushInterval": "10s"})
    h.handle_tracespan([span(n + 1) for n in range(12)])
    await eventually(lambda: len(collector.batches) == 2)
    await h.close()  # the last two go on close
    assert [len(b) for b in collector.batches] == [5, 5, 2]
    assert [int(s["traceId"], 16) for s in collector.spans] == list(range(1, 13))


async def test_a_503_is_a_failure_retried_until_the_collector_recovers(
    collector: ZipkinReceiver,
) -> None:
    collector.status = 503
    h = handler(collector.url, batching={"maxRetries": 1000})
    failures = REGISTRY.get_sample_value(
        "mixerhub_adapter_send_failures_total", {"adapter": "zipkin"}
    )
    h.handle_tracespan([span(1)])

    def failed() -> float:
        after = REGISTRY.get_sample_value(
            "mixerhub_adapter_send_failures_total", {"adapter": "zipkin"}
        )
        return (after or 0) - (failures or 0)

    # The collector counts a request before its answer reaches the handler: wait for the count.
    await eventually(lambda: collector.requests >= 3 and failed() >= 3)
    assert not collector.batches
    collector.status = 202
    await eventually(lambda: len(collector.spans) == 1)
    await h.close()


async def test_a_collector_down_at_start_costs_bounded_memory_then_delivery_resumes() -> None:
    collector = ZipkinReceiver()
    collector.port = free_port()  # nothing listens here yet
    h = handler(collector.url, batching={"queueSize": 50, "batchSize": 10, "maxRetries": 2})
    before = all_dropped()
    results = []
    for round_ in range(20):
        batch = [span(round_ * 100 + n + 1) for n in range(100)]
        results.append(h.handle_tracespan(batch))  # never raises
        assert len(h._sender) <= 50
        await asyncio.sleep(0.005)
    assert ExportResult.FAILURE in results
    await eventually(lambda: all_dropped() - before == 2000)  # all of it, counted
    assert dropped("queue_full") > 0
    assert dropped("send_failed") > 0

    await collector.start()
    try:
        h.handle_tracespan([span(5000 + n) for n in range(5)])
        await eventually(lambda: len(collector.spans) == 5)
        await h.close()
    finally:
        await collector.stop()
    assert [int(s["traceId"], 16) for s in collector.spans] == list(range(5000, 5005))
    assert not collector.problems


async def test_the_collector_going_down_under_load_and_coming_back(
    collector: ZipkinReceiver,
) -> None:
    h = handler(
        collector.url,
        batching={"queueSize": 200, "batchSize": 20, "maxRetries": 1000, "maxBackoff": "20ms"},
    )
    before = all_dropped()
    sent = 0

    async def load(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            h.handle_tracespan([span(sent + n + 1) for n in range(10)])
            sent += 10
            assert len(h._sender) <= 200
            await asyncio.sleep(0.002)

    def delivered() -> set[int]:
        return {int(s["traceId"], 16) - 1 for s in collector.spans}

    await load(20)
    await eventually(lambda: len(collector.spans) == 200)
    await collector.stop()
    await load(60)
    assert all_dropped() - before > 0
    await collector.start()
    await eventually(lambda: len(delivered()) + all_dropped() - before >= sent)
    await load(5)
    await h.close()
    assert set(range(sent - 50, sent)) <= delivered()  # delivery resumed
    assert len(delivered()) + all_dropped() - before >= sent  # nothing unaccounted for


async def test_close_flushes_and_closes_the_session(collector: ZipkinReceiver) -> None:
    h = handler(collector.url, batching={"flushInterval": "1h", "batchSize": 100})
    h.handle_tracespan([span(n + 1) for n in range(100)])  # a full batch goes at once
    await eventually(lambda: len(collector.spans) == 100)
    session = h._session
    assert session is not None
    h.handle_tracespan([span(n + 101) for n in range(50)])
    await asyncio.sleep(0.05)
    assert len(collector.spans) == 100  # the rest waits for the interval...
    await h.close()  # ...or for close
    assert [int(s["traceId"], 16) for s in collector.spans] == list(range(1, 151))
    assert session.closed
    before = dropped("shutdown")
    assert h.handle_tracespan([span(1)]) is ExportResult.FAILURE  # after close: counted
    assert dropped("shutdown") - before == 1


def test_params_are_validated_as_mixer_did() -> None:
    def errors(**params: object) -> list[tuple[str, str]]:
        return [(e.path, e.reason) for e in INFO.validate(ZipkinParams.model_validate(params), {})]

    ok = "http://zipkin.istio-system:9411/api/v2/spans"
    assert errors(url=ok, sampleProbability=0.5) == []
    assert errors(url=ok, sampleProbability=1.5) == [
        ("sampleProbability", "must be between 0 and 1 inclusive")
    ]
    assert errors(url=ok, sampleProbability=float("nan"))[0][0] == "sampleProbability"
    assert errors() == [("url", "required: the Zipkin collector's /api/v2/spans URL")]
    assert errors(url="zipkin:9411")[0][0] == "url"
    assert errors(url="ftp://zipkin/api/v2/spans")[0][0] == "url"


YAML = """
apiVersion: config.istio.io/v1alpha2
kind: tracespan
metadata: {name: default, namespace: istio-system}
spec:
  traceId: request.headers["x-b3-traceid"] | ""
  spanId: request.headers["x-b3-spanid"] | ""
  parentSpanId: request.headers["x-b3-parentspanid"] | ""
  spanName: request.path | "/"
  startTime: request.time
  endTime: response.time
  httpStatusCode: response.code | 0
  sourceName: source.workload.name | ""
  sourceIp: source.ip | ip("0.0.0.0")
  destinationName: destination.workload.name | ""
  destinationIp: destination.ip | ip("0.0.0.0")
  requestSize: request.size | 0
  requestTotalSize: request.total_size | 0
  responseSize: response.size | 0
  responseTotalSize: response.total_size | 0
  apiProtocol: api.protocol | ""
  spanTags:
    http.host: request.host | ""
    http.method: request.method | ""
    http.path: request.path | ""
    http.user_agent: request.useragent | ""
    principal: request.auth.principal | "unknown"
    source.version: source.labels["version"] | "unknown"
    destination.version: destination.labels["version"] | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: zipkin
metadata: {name: handler, namespace: istio-system}
spec:
  url: URL
  sampleProbability: 1.0
  batching: {flushInterval: 20ms}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: zipkin, namespace: istio-system}
spec:
  match: "true"
  actions:
  - handler: handler.zipkin
    instances: [default.tracespan]
"""


async def test_mixers_own_zipkin_test_config_loads_and_reports_the_same_span(
    tmp_path: Path, collector: ZipkinReceiver
) -> None:
    (tmp_path / "zipkin.yaml").write_text(textwrap.dedent(YAML).replace("URL", collector.url))
    snapshot = compile_snapshot(documents.read([tmp_path]), registry.default_registry())
    (action,) = snapshot.rules[0].actions
    h = action.handler.handler
    assert isinstance(h, ZipkinHandler)
    bag = {
        "request.time": START,
        "response.time": END,
        "request.headers": {
            "x-b3-traceid": TRACE,
            "x-b3-spanid": SPAN,
            "x-b3-parentspanid": PARENT,
        },
        "request.path": "/foo/bar",
        "request.host": "example.istio.com",
        "request.useragent": "xxx",
        "request.size": 100,
        "request.total_size": 128,
        "response.size": 500,
        "response.total_size": 512,
        "source.workload.name": "srcsvc",
        "destination.workload.name": "destsvc",
        "source.labels": {"version": "v1"},
        "api.protocol": "http",
        "request.method": "POST",
        "response.code": 200,
    }
    h.handle_tracespan([action.instances[0].build(bag)])
    await eventually(lambda: len(collector.spans) == 1)
    await h.close()
    assert collector.spans == [MIXERS_SPAN]
