"""dogstatsd (the datadog adapter): metric instances as DogStatsD lines, at a real UDP receiver."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import textwrap
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from mixerhub.adapters.datadog import INFO, DogStatsdHandler, DogStatsdParams
from mixerhub.adapters.statsd.udp import UdpEndpoint
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from mixerhub.adapter import Env, ExportResult, InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.monitoring import REGISTRY
from mixerhub.registry import default_registry
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.templates import MetricInstance
from tests.statsd_receiver import Sample, StatsdReceiver, free_udp_port

_I, _D, _S = ValueType.INT64, ValueType.DURATION, ValueType.STRING


def spec(name: str, value: ValueType = _I) -> InstanceSpec:
    return InstanceSpec(name, "metric", {"value": value, "dimensions.response": _I})


# Mixer's own test (mixer/adapter/dogstatsd/dogstatsd_test.go, TestRecord), by full names.
COUNTER, DISTRIBUTION, GAUGE, DIMENSION = (
    f"{n}.instance.istio-system" for n in ("counter", "distribution", "gauge", "dimension")
)
ROUTED = {
    COUNTER: spec(COUNTER),
    DISTRIBUTION: spec(DISTRIBUTION, _D),
    GAUGE: spec(GAUGE),
    DIMENSION: spec(DIMENSION),
}
METRICS = {
    COUNTER: {"name": "counter", "type": "COUNTER", "tags": {"tag": "value"}},
    DISTRIBUTION: {"name": "distribution", "type": "DISTRIBUTION"},
    GAUGE: {"name": "gauge", "type": "GAUGE"},
    DIMENSION: {"name": "dimension", "type": "COUNTER"},
}
FAST = {"flushInterval": "20ms", "initialBackoff": "1ms", "maxBackoff": "5ms"}


def env() -> Env:
    return Env(
        "dogstatsd",
        "handler.dogstatsd.istio-system",
        logging.getLogger("test"),
        CollectorRegistry(),
    )


def params(address: str, **kw: Any) -> DogStatsdParams:
    kw.setdefault("prefix", "testing.")
    kw.setdefault("globalTags", {"global": "tag"})
    kw.setdefault("metrics", METRICS)
    kw.setdefault("batching", dict(FAST))
    return DogStatsdParams.model_validate({"address": address, **kw})


def build(p: DogStatsdParams, routed: Mapping[str, InstanceSpec] = ROUTED) -> DogStatsdHandler:
    assert list(INFO.validate(p, routed)) == []
    h = INFO.build(p, routed, env())
    assert isinstance(h, DogStatsdHandler)
    return h


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"adapter": "dogstatsd", **labels}) or 0.0


def errors() -> float:
    return counted("mixerhub_adapter_errors_total")


def dropped(reason: str) -> float:
    return counted("mixerhub_adapter_dropped_total", reason=reason)


@pytest.fixture
async def receiver() -> AsyncIterator[StatsdReceiver]:
    r = await StatsdReceiver().start()
    yield r
    await r.stop()


def test_registered_as_istios_dogstatsd_with_mixers_defaults() -> None:
    assert default_registry().adapters["dogstatsd"] is INFO
    assert "datadog" in INFO.description.lower()
    assert INFO.templates == ("metric",)
    defaults = INFO.default_params
    assert {k: defaults[k] for k in ("address", "prefix", "bufferLength", "globalTags")} == {
        "address": "localhost:8125",
        "prefix": "istio.",
        "bufferLength": 0,
        "globalTags": {},
    }
    assert defaults["sampleRate"] == 1.0  # the proto's documented default
    assert defaults["batching"]["flushInterval"] == "0.1s"  # datadog-go's buffered flush


# What is sent


async def test_mixers_record_cases_field_by_field(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address))
    result = h.handle_metric(
        [
            MetricInstance(GAUGE, 123),
            MetricInstance(COUNTER, 456),
            MetricInstance(DISTRIBUTION, datetime.timedelta(milliseconds=146)),
            MetricInstance(DISTRIBUTION, 3459),
            MetricInstance(DIMENSION, 1, {"response": 200}),
        ]
    )
    assert result is ExportResult.SUCCESS
    got = await receiver.wait_for(5)
    await h.close()
    # Mixer expected "testing.gauge:123.000000|g|#global:tag" and so on from datadog-go; the
    # datadog package writes numbers as Python does and puts the global tags last.
    assert got == [
        Sample("testing.gauge", "123", "g", None, ("global:tag",)),
        Sample("testing.counter", "456", "c", None, ("tag:value", "global:tag")),
        Sample("testing.distribution", "146.0", "ms", None, ("global:tag",)),  # a timing
        Sample("testing.distribution", "3459", "h", None, ("global:tag",)),  # a histogram
        Sample("testing.dimension", "1", "c", None, ("response:200", "global:tag")),
    ]


async def test_dimensions_become_tags_and_win_over_the_metrics_tags(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address, globalTags={}))
    h.handle_metric(
        [
            MetricInstance(
                COUNTER,
                1,
                {
                    "tag": "from-dimension",
                    "ok": True,
                    "latency": datetime.timedelta(microseconds=1500),
                    "source_ip": ipaddress.ip_address("10.0.0.1"),
                    "path": "/a b,c|d",
                },
            )
        ]
    )
    (sample,) = await receiver.wait_for(1)
    await h.close()
    assert sample.tags == (
        "tag:from-dimension",
        "ok:true",
        "latency:1.5ms",
        "source_ip:10.0.0.1",
        "path:/a_b_c_d",  # the client escapes what would end a tag
    )


@pytest.mark.parametrize(
    ("prefix", "name"),
    [("istio.", "istio.counter"), ("istio", "istio.counter"), ("", "counter")],
)
async def test_prefixes(receiver: StatsdReceiver, prefix: str, name: str) -> None:
    h = build(params(receiver.address, prefix=prefix))
    h.handle_metric([MetricInstance(COUNTER, 1)])
    (sample,) = await receiver.wait_for(1)
    await h.close()
    assert sample.name == name


async def test_only_global_tags_not_the_hubs_environment(
    receiver: StatsdReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DD_SERVICE", "mixerhub")
    monkeypatch.setenv("DD_ENV", "prod")
    monkeypatch.setenv("DATADOG_TAGS", "team:mesh")
    h = build(params(receiver.address))
    h.handle_metric([MetricInstance(GAUGE, 1)])
    (sample,) = await receiver.wait_for(1)
    await h.close()
    assert sample.tags == ("global:tag",)  # the metrics describe the mesh, not the hub


async def test_values_the_type_cannot_take_are_counted_and_the_rest_sent(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address))
    before = errors()
    result = h.handle_metric(
        [
            MetricInstance(COUNTER, "many"),
            MetricInstance(GAUGE, 2.5),  # Mixer's counters and gauges took INT64 only
            MetricInstance(DISTRIBUTION, None),
            MetricInstance("ghost.instance.default", 1),
            MetricInstance(GAUGE, 7),
        ]
    )
    assert result is ExportResult.FAILURE
    assert errors() - before == 4
    got = await receiver.wait_for(1)
    await h.close()
    assert [(s.name, s.value) for s in got] == [("testing.gauge", "7")]


async def test_sampling_by_the_client_each_value_marked_with_the_rate(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address, sampleRate=0.25))
    for _ in range(20):
        h.handle_metric([MetricInstance(COUNTER, 1) for _ in range(200)])
    await h.close()
    got = await receiver.quiet()
    assert 800 <= len(got) <= 1200  # 4000 x 0.25; the bounds are over 7 standard deviations
    assert {(s.rate, s.value, s.type) for s in got} == {(0.25, "1", "c")}


async def test_buffer_length_caps_metrics_per_datagram(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, bufferLength=3))
    h.handle_metric([MetricInstance(GAUGE, n) for n in range(10)])
    got = await receiver.wait_for(10)
    await h.close()
    assert [s.value for s in got] == [str(n) for n in range(10)]
    assert [len(d.strip().split(b"\n")) for d in receiver.datagrams] == [3, 3, 3, 1]


async def test_buffer_length_zero_packs_up_to_the_clients_udp_payload(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address))
    h.handle_metric([MetricInstance(COUNTER, n) for n in range(500)])
    got = await receiver.wait_for(500)
    await h.close()
    assert [s.value for s in got] == [str(n) for n in range(500)]
    sizes = [len(d) for d in receiver.datagrams]
    assert max(sizes) <= 1432  # the datadog client's optimal UDP payload
    assert len(sizes) < 500 / 10  # packed, many metrics to a datagram


async def test_the_client_runs_no_thread_and_sends_from_the_event_loop(
    receiver: StatsdReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = set(threading.enumerate())
    sent_from: list[threading.Thread] = []
    send = UdpEndpoint.send

    def recording(endpoint: UdpEndpoint, datagram: bytes) -> bool:
        sent_from.append(threading.current_thread())
        sent: bool = send(endpoint, datagram)
        return sent

    monkeypatch.setattr(UdpEndpoint, "send", recording)
    h = build(params(receiver.address))
    h.handle_metric([MetricInstance(COUNTER, 1) for _ in range(300)])
    await receiver.wait_for(300)
    await h.close()
    # Only the loop's own executor, which resolved the address, may have started a thread.
    assert [t.name for t in set(threading.enumerate()) - threads if "asyncio" not in t.name] == []
    assert sent_from
    assert set(sent_from) == {threading.main_thread()}


async def test_close_flushes_what_is_queued(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, batching={"flushInterval": "1h", "batchSize": 10_000}))
    h.handle_metric([MetricInstance(COUNTER, n) for n in range(50)])
    await asyncio.sleep(0.05)
    assert receiver.datagrams == []
    await h.close()
    assert len(await receiver.wait_for(50)) == 50


# Faults


async def test_a_full_queue_drops_and_counts() -> None:
    p = params(
        f"127.0.0.1:{free_udp_port()}",
        batching={"flushInterval": "1h", "queueSize": 10, "batchSize": 1000},
    )
    h = build(p)
    before = dropped("queue_full")
    assert h.handle_metric([MetricInstance(COUNTER, 1)] * 25) is ExportResult.FAILURE
    assert dropped("queue_full") - before == 15
    await h.close()


async def test_nothing_listening_at_start_is_counted_then_delivery_begins() -> None:
    port = free_udp_port()
    h = build(params(f"127.0.0.1:{port}", bufferLength=1))
    before, lost = errors(), dropped("send_failed")
    for _ in range(10):  # batches of 4 datagrams; port unreachable replies come back
        assert h.handle_metric([MetricInstance(COUNTER, 1)] * 4) is ExportResult.SUCCESS
        await asyncio.sleep(0.03)
    # ConnectionRefusedError, counted and not raised: on a receive, or on a send, which loses
    # that datagram (counted by its lines).
    assert errors() - before >= 1
    assert dropped("send_failed") - lost >= 1

    late = StatsdReceiver()
    late.port = port
    await late.start()
    try:
        h.handle_metric([MetricInstance(COUNTER, 7)])
        got = await late.wait_for(1)
        assert [s.value for s in got] == ["7"]
    finally:
        await h.close()
        await late.stop()


async def test_an_agent_going_away_and_coming_back(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address))
    h.handle_metric([MetricInstance(COUNTER, 1)])
    assert [s.value for s in await receiver.wait_for(1)] == ["1"]

    await receiver.stop()
    before = errors()
    for n in range(10):
        h.handle_metric([MetricInstance(COUNTER, 100 + n)])
        await asyncio.sleep(0.03)
    assert errors() - before >= 1

    receiver.clear()
    await receiver.start()  # the same port
    h.handle_metric([MetricInstance(COUNTER, 2)])
    got = await receiver.wait_for(1)
    await h.close()
    assert [s.value for s in got] == ["2"]


# Validation


def problems(p: dict[str, Any], routed: Mapping[str, InstanceSpec] = ROUTED) -> dict[str, str]:
    return {e.path: e.reason for e in INFO.validate(DogStatsdParams.model_validate(p), routed)}


def test_mixers_validation_cases() -> None:
    # {} with an instance routed: "is a valid metric but is not configured" (metricName).
    assert problems({}, {"unsupported": spec("unsupported")}) == {
        "metrics": "instance unsupported is sent to this handler but has no entry here"
    }
    # A metric for no routed instance (metricType: "is not a valid metric").
    assert problems({"metrics": {**METRICS, "nonexistant": {"name": "n", "type": "COUNTER"}}}) == {
        "metrics.nonexistant": "not an instance this handler receives (by full name, such as"
        " requestcount.instance.istio-system); it receives: " + ", ".join(sorted(ROUTED))
    }
    # Counters and gauges INT64, distributions INT64 or DURATION (metricType).
    routed = {
        COUNTER: spec(COUNTER, _D),
        GAUGE: spec(GAUGE, _S),
        DISTRIBUTION: spec(DISTRIBUTION, _S),
    }
    assert problems({"metrics": {k: v for k, v in METRICS.items() if k in routed}}, routed) == {
        f"metrics.{COUNTER}.type": f"a COUNTER needs an INT64 value; {COUNTER}'s is DURATION",
        f"metrics.{GAUGE}.type": f"a GAUGE needs an INT64 value; {GAUGE}'s is STRING",
        f"metrics.{DISTRIBUTION}.type": "a DISTRIBUTION needs an INT64 or DURATION value;"
        f" {DISTRIBUTION}'s is STRING",
    }
    assert problems({"address": "nothostport"}, {}) == {
        "address": "missing port in address 'nothostport'; expected host:port"
    }
    assert problems({"address": "localhost:9999999"}, {}) == {
        "address": "invalid port '9999999' in address 'localhost:9999999': 1 to 65535"
    }
    assert problems({"metrics": {COUNTER: {"name": "", "type": "COUNTER"}}}, {}) == {
        f"metrics.{COUNTER}.name": "the metric's name in Datadog is required"
    }
    assert problems({"metrics": {COUNTER: {"name": "a|b", "type": "COUNTER"}}}, {}) == {
        f"metrics.{COUNTER}.name": "'|' cannot be part of a metric name"
    }
    assert problems({"prefix": "istio:"}, {}) == {"prefix": "':' cannot be part of a metric name"}


@pytest.mark.parametrize(
    ("p", "where"),
    [
        ({"sampleRate": -1}, ("sampleRate",)),
        ({"sampleRate": 2}, ("sampleRate",)),
        ({"bufferLength": -1}, ("bufferLength",)),
        ({"metrics": {"m": {"name": "m", "type": "UNKNOWN_TYPE"}}}, ("metrics", "m", "type")),
        ({"metrics": {"m": {"name": "m"}}}, ("metrics", "m", "type")),
        ({"metrics": {"m": {"type": "GAUGE"}}}, ("metrics", "m", "name")),
        ({"globalTags": ["a:b"]}, ("globalTags",)),
        ({"flushInterval": "1s"}, ("flushInterval",)),
    ],
)
def test_bad_params_name_the_field(p: dict[str, Any], where: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as e:
        DogStatsdParams.model_validate(p)
    assert tuple(str(x) for x in e.value.errors()[0]["loc"]) == where


def test_yaml_scalars_in_tags_are_their_text() -> None:
    p = DogStatsdParams.model_validate(
        {
            "global_tags": {"version": 1, "canary": True},
            "metrics": {"m": {"name": "m", "type": 1, "tags": {"port": 8080}}},
        }
    )
    assert p.global_tags == {"version": "1", "canary": "true"}
    assert p.metrics["m"].tags == {"port": "8080"}
    assert p.metrics["m"].type == "COUNTER"


# Through the configuration store: Istio 1.4's operator configuration for this adapter
# (mixer/adapter/dogstatsd/operatorconfig/config.yaml), with its instances.

OPERATOR_CONFIG = """
apiVersion: "config.istio.io/v1alpha2"
kind: dogstatsd
metadata:
  name: handler
  namespace: istio-system
spec:
  address: "ADDRESS"
  prefix: "istio."
  global_tags:
    service_mesh: istio
  sample_rate: 1.0
  metrics:
    requestcount.metric.istio-system:
      name: requestcount
      type: COUNTER
      tags:
        my: "istio_metric"
    requestduration.metric.istio-system:
      name: requestduration
      type: DISTRIBUTION
      tags:
        my: "istio_metric"
---
apiVersion: "config.istio.io/v1alpha2"
kind: rule
metadata:
  name: doghttp
  namespace: istio-system
spec:
  match: context.protocol == "http" || context.protocol == "grpc"
  actions:
  - handler: handler.dogstatsd
    instances:
    - requestcount.metric
    - requestduration.metric
---
apiVersion: "config.istio.io/v1alpha2"
kind: metric
metadata:
  name: requestcount
  namespace: istio-system
spec:
  value: "1"
  dimensions:
    response_code: response.code | 200
    destination_service: destination.service.host | "unknown"
---
apiVersion: "config.istio.io/v1alpha2"
kind: metric
metadata:
  name: requestduration
  namespace: istio-system
spec:
  value: response.duration | "0ms"
  dimensions:
    response_code: response.code | 200
"""


def write_config(tmp_path: Path, address: str, text: str = OPERATOR_CONFIG) -> Path:
    (tmp_path / "dogstatsd.yaml").write_text(textwrap.dedent(text).replace("ADDRESS", address))
    return tmp_path


async def test_istios_operator_configuration_loads_and_sends(
    tmp_path: Path, receiver: StatsdReceiver
) -> None:
    snapshot = compile_snapshot(
        documents.read([write_config(tmp_path, receiver.address)]), default_registry()
    )
    (built,) = (h.handler for h in snapshot.handlers.values() if h.adapter is INFO)
    assert isinstance(built, DogStatsdHandler)
    bag = {
        "context.protocol": "http",
        "destination.service.host": "reviews.default.svc.cluster.local",
        "response.code": 503,
        "response.duration": datetime.timedelta(milliseconds=7),
    }
    made = [
        snapshot.instances[f"{n}.metric.istio-system"].build(bag)
        for n in ("requestcount", "requestduration")
    ]
    assert built.handle_metric(made) is ExportResult.SUCCESS
    got = await receiver.wait_for(2)
    await built.close()
    assert [(s.name, s.value, s.type, s.tag_map) for s in got] == [
        (
            "istio.requestcount",
            "1",
            "c",
            {
                "my": "istio_metric",
                "response_code": "503",
                "destination_service": "reviews.default.svc.cluster.local",
                "service_mesh": "istio",
            },
        ),
        (
            "istio.requestduration",
            "7.0",
            "ms",
            {"my": "istio_metric", "response_code": "503", "service_mesh": "istio"},
        ),
    ]


def test_configuration_errors_carry_the_document_and_field(tmp_path: Path) -> None:
    text = OPERATOR_CONFIG.replace(
        "    requestduration.metric.istio-system:", "    requestduration:"
    )
    folder = write_config(tmp_path, "localhost:8125", text)
    with pytest.raises(Rejected) as e:
        compile_snapshot(documents.read([folder]), default_registry(), build_handlers=False)
    reasons = sorted(str(err).split(": ", 2)[-1] for err in e.value.errors)
    assert reasons == [
        "spec.params.metrics.requestduration: not an instance this handler receives (by full"
        " name, such as requestcount.instance.istio-system); it receives:"
        " requestcount.metric.istio-system, requestduration.metric.istio-system",
        "spec.params.metrics: instance requestduration.metric.istio-system is sent to this"
        " handler but has no entry here",
    ]
