"""statsd: metric instances as StatsD lines, checked at a real UDP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import textwrap
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from mixerhub.adapters.statsd import INFO, StatsdHandler, StatsdParams
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from mixerhub.adapter import Env, ExportResult, InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.monitoring import REGISTRY
from mixerhub.registry import default_registry
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.templates import MetricInstance
from tests.statsd_receiver import Sample, StatsdReceiver, free_udp_port, parse_line

COUNT = "requestcount.instance.istio-system"
DURATION = "requestduration.instance.istio-system"
SIZE = "requestsize.instance.istio-system"
LEVEL = "queuelevel.instance.istio-system"

_I, _D, _S = ValueType.INT64, ValueType.DURATION, ValueType.STRING


def spec(name: str, value: ValueType = _I, **dimensions: ValueType) -> InstanceSpec:
    types = {"value": value, **{f"dimensions.{k}": t for k, t in dimensions.items()}}
    return InstanceSpec(name, "metric", types)


ROUTED = {
    COUNT: spec(COUNT, _I, response_code=_I, destination_service=_S),
    DURATION: spec(DURATION, _D, response_code=_I),
    SIZE: spec(SIZE, _I),
    LEVEL: spec(LEVEL, _I),
}


def counter(n: int = 1, code: int = 200, service: str = "reviews") -> MetricInstance:
    return MetricInstance(COUNT, n, {"response_code": code, "destination_service": service})


def env() -> Env:
    return Env(
        "statsd", "statsd.handler.istio-system", logging.getLogger("test"), CollectorRegistry()
    )


FAST = {"flushInterval": "20ms", "initialBackoff": "1ms", "maxBackoff": "5ms"}


def params(address: str, **kw: Any) -> StatsdParams:
    kw.setdefault(
        "metrics",
        {
            COUNT: {"type": "COUNTER", "name_template": "requests.{{.response_code}}"},
            DURATION: {"type": "DISTRIBUTION", "nameTemplate": "latency.{{ .response_code }}"},
            SIZE: {"type": "DISTRIBUTION"},
            LEVEL: {"type": "GAUGE", "nameTemplate": "queue"},
        },
    )
    kw.setdefault("batching", dict(FAST))
    return StatsdParams.model_validate({"address": address, **kw})


def build(p: StatsdParams, routed: Mapping[str, InstanceSpec] = ROUTED) -> StatsdHandler:
    assert list(INFO.validate(p, routed)) == []
    h = INFO.build(p, routed, env())
    assert isinstance(h, StatsdHandler)
    return h


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"adapter": "statsd", **labels}) or 0.0


def errors() -> float:
    return counted("mixerhub_adapter_errors_total")


def dropped(reason: str) -> float:
    return counted("mixerhub_adapter_dropped_total", reason=reason)


@pytest.fixture
async def receiver() -> AsyncIterator[StatsdReceiver]:
    r = await StatsdReceiver().start()
    yield r
    await r.stop()


# What is sent


def test_registered_with_mixers_name_and_defaults() -> None:
    assert default_registry().adapters["statsd"] is INFO
    assert INFO.templates == ("metric",)
    defaults = INFO.default_params
    assert {k: defaults[k] for k in ("address", "prefix", "flushDuration", "flushBytes")} == {
        "address": "localhost:8125",
        "prefix": "",
        "flushDuration": "0.3s",
        "flushBytes": 512,
    }
    assert defaults["samplingRate"] == 1.0
    assert defaults["metrics"] == {}


async def test_each_type_field_by_field(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, prefix="istio"))
    result = h.handle_metric(
        [
            counter(3, 503),
            MetricInstance(DURATION, datetime.timedelta(microseconds=1500), {"response_code": 200}),
            MetricInstance(DURATION, datetime.timedelta(seconds=2), {"response_code": 200}),
            MetricInstance(SIZE, 2048),
            MetricInstance(LEVEL, 17),
        ]
    )
    assert result is ExportResult.SUCCESS
    got = await receiver.wait_for(5)
    await h.close()
    assert got == [
        Sample("istio.requests.503", "3", "c", None),
        Sample("istio.latency.200", "1.5", "ms", None),  # durations in milliseconds
        Sample("istio.latency.200", "2000", "ms", None),
        Sample(f"istio.{SIZE}", "2048", "ms", None),  # no template: the instance's full name
        Sample("istio.queue", "17", "g", None),
    ]
    # Exactly what etsy/statsd reads: no rate suffix at rate 1, one line per value.
    assert receiver.datagrams[0].split(b"\n")[:2] == [
        b"istio.requests.503:3|c",
        b"istio.latency.200:1.5|ms",
    ]


async def test_a_prefix_ending_in_a_dot_is_not_doubled(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, prefix="mesh."))
    h.handle_metric([counter()])
    (sample,) = await receiver.wait_for(1)
    await h.close()
    assert sample.name == "mesh.requests.200"


async def test_a_negative_gauge_is_set_not_decremented(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address))
    h.handle_metric([MetricInstance(LEVEL, -5)])
    await receiver.wait_for(2)
    await h.close()
    # etsy/statsd reads "-5|g" as a change; setting 0 first in the same datagram makes it a value.
    assert receiver.datagrams == [b"queue:0|g\nqueue:-5|g"]


async def test_template_values_cannot_break_the_line(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address))
    h.handle_metric([MetricInstance(COUNT, 1, {"response_code": "a:b|c@d e\nx:1|c"})])
    await receiver.wait_for(1)
    await h.close()
    assert receiver.datagrams == [b"requests.a_b_c_d_e_x_1_c:1|c"]


async def test_values_the_type_cannot_take_are_counted_and_the_rest_sent(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address))
    before = errors()
    result = h.handle_metric(
        [
            MetricInstance(COUNT, "many", {"response_code": 200}),
            MetricInstance(LEVEL, 1.5),  # Mixer's gauges took INT64 only
            MetricInstance(LEVEL, True),
            MetricInstance("ghost.instance.default", 1),
            counter(),
        ]
    )
    assert result is ExportResult.FAILURE
    assert errors() - before == 4
    got = await receiver.wait_for(1)
    await h.close()
    assert [s.name for s in got] == ["requests.200"]


# Sampling


async def test_sampling_sends_about_rate_of_the_values_each_marked_with_it(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address, samplingRate=0.25, flushBytes=1432))
    for _ in range(20):
        h.handle_metric([counter() for _ in range(200)])
    await h.close()
    got = await receiver.quiet()
    assert 800 <= len(got) <= 1200  # 4000 x 0.25; the bounds are over 7 standard deviations
    assert {(s.rate, s.value, s.type) for s in got} == {(0.25, "1", "c")}
    assert receiver.datagrams[0].split(b"\n")[0] == b"requests.200:1|c|@0.250000"  # as cactus


async def test_sampling_rate_zero_sends_nothing(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, samplingRate=0))
    assert h.handle_metric([counter() for _ in range(100)]) is ExportResult.SUCCESS
    await h.close()
    assert await receiver.quiet() == []


# Datagrams


async def test_lines_are_packed_into_datagrams_of_at_most_flush_bytes(
    receiver: StatsdReceiver,
) -> None:
    h = build(params(receiver.address, flushBytes=100))
    sent = [counter(n) for n in range(1, 101)]
    h.handle_metric(sent)
    got = await receiver.wait_for(100)
    await h.close()
    assert [s.value for s in got] == [str(n) for n in range(1, 101)]  # in order, none split
    sizes = [len(d) for d in receiver.datagrams]
    assert max(sizes) <= 100
    # Packed, not one line each: no datagram could have taken the next line too.
    lines = [d.split(b"\n") for d in receiver.datagrams]
    for this, following in itertools.pairwise(lines):
        assert len(b"\n".join([*this, following[0]])) > 100


async def test_flush_bytes_zero_is_mixers_512(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, flushBytes=0))
    h.handle_metric([counter(n) for n in range(1000)])
    await receiver.wait_for(1000)
    await h.close()
    assert max(len(d) for d in receiver.datagrams) <= 512
    assert max(len(d) for d in receiver.datagrams) > 480


async def test_a_line_longer_than_flush_bytes_travels_alone(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, flushBytes=30))
    h.handle_metric([counter(1), counter(2, service="x"), counter(3, code=10**40)])
    await receiver.wait_for(3)
    await h.close()
    assert receiver.datagrams == [
        b"requests.200:1|c",
        b"requests.200:2|c",
        f"requests.{10**40}:3|c".encode(),  # 51 bytes: sent as it is, never split
    ]


async def test_lines_go_out_every_flush_duration(receiver: StatsdReceiver) -> None:
    p = params(receiver.address, flushDuration="200ms", batching={"batchSize": 10_000})
    h = build(p)
    h.handle_metric([counter()])
    await asyncio.sleep(0.02)
    assert receiver.datagrams == []  # waiting for the interval...
    assert len(await receiver.wait_for(1, timeout=2)) == 1  # ...which comes
    await h.close()


async def test_close_flushes_what_is_queued(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address, flushDuration="1h", batching={"batchSize": 10_000}))
    h.handle_metric([counter(n) for n in range(50)])
    await asyncio.sleep(0.05)
    assert receiver.datagrams == []
    await h.close()
    assert len(await receiver.wait_for(50)) == 50


# Faults


async def test_a_full_queue_drops_and_counts() -> None:
    # Nothing needs to listen: the queue is never sent before close.
    p = params(
        f"127.0.0.1:{free_udp_port()}",
        flushDuration="1h",
        batching={"queueSize": 10, "batchSize": 1000},
    )
    h = build(p)
    before = dropped("queue_full")
    assert h.handle_metric([counter() for _ in range(25)]) is ExportResult.FAILURE
    assert dropped("queue_full") - before == 15
    assert h.handle_metric([counter()]) is ExportResult.FAILURE
    assert dropped("queue_full") - before == 16
    await h.close()


async def test_nothing_listening_at_start_is_counted_then_delivery_begins() -> None:
    port = free_udp_port()
    h = build(params(f"127.0.0.1:{port}", flushBytes=20))
    before, lost = errors(), dropped("send_failed")
    for _ in range(10):  # batches of 4 datagrams; port unreachable replies come back
        assert h.handle_metric([counter() for _ in range(4)]) is ExportResult.SUCCESS
        await asyncio.sleep(0.03)
    # ConnectionRefusedError, counted and not raised: on a receive, or on a send, which loses
    # that datagram (counted by its lines).
    assert errors() - before >= 1
    assert dropped("send_failed") - lost >= 1

    late = StatsdReceiver()
    late.port = port
    await late.start()
    try:
        h.handle_metric([counter(7)])
        got = await late.wait_for(1)
        assert [s.value for s in got] == ["7"]
    finally:
        await h.close()
        await late.stop()


async def test_a_receiver_going_away_and_coming_back(receiver: StatsdReceiver) -> None:
    h = build(params(receiver.address))
    h.handle_metric([counter(1)])
    assert [s.value for s in await receiver.wait_for(1)] == ["1"]

    await receiver.stop()
    before = errors()
    for n in range(10):
        h.handle_metric([counter(100 + n)])
        await asyncio.sleep(0.03)
    assert errors() - before >= 1

    receiver.clear()
    await receiver.start()  # the same port
    h.handle_metric([counter(2)])
    got = await receiver.wait_for(1)
    await h.close()
    assert [s.value for s in got] == ["2"]


async def test_an_address_that_does_not_resolve_drops_after_retries() -> None:
    # .invalid never resolves (RFC 6761); each attempt is bounded by the batching timeout.
    p = params("name.invalid:8125", batching={**FAST, "maxRetries": 1, "timeout": "1s"})
    h = build(p)
    before = dropped("send_failed")
    h.handle_metric([counter(), counter()])
    for _ in range(200):
        await asyncio.sleep(0.05)
        if dropped("send_failed") - before >= 2:
            break
    await h.close()
    assert dropped("send_failed") - before == 2


# Validation


def problems(p: dict[str, Any], routed: Mapping[str, InstanceSpec] = ROUTED) -> dict[str, str]:
    return {e.path: e.reason for e in INFO.validate(StatsdParams.model_validate(p), routed)}


def test_a_valid_configuration() -> None:
    assert problems(params("localhost:8125").model_dump(by_alias=True, exclude={"batching"})) == {}
    assert problems(StatsdParams().model_dump(mode="json", by_alias=True), {}) == {}  # round trip
    assert problems({"address": "[::1]:8125"}, {}) == {}
    assert problems({"address": "statsd.monitoring.svc.cluster.local:9125"}, {}) == {}


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("", "address is empty; expected host:port, such as localhost:8125"),
        ("localhost", "missing port in address 'localhost'; expected host:port"),
        ("::1:8125", "too many colons in address '::1:8125'; an IPv6 host is written [::1]:8125"),
        ("[::1:8125", "malformed address '[::1:8125'; an IPv6 host is written [::1]:8125"),
        ("localhost:statsd", "invalid port 'statsd' in address 'localhost:statsd': 1 to 65535"),
        ("localhost:70000", "invalid port '70000' in address 'localhost:70000': 1 to 65535"),
    ],
)
def test_bad_addresses(address: str, reason: str) -> None:
    assert problems({"address": address}, {}) == {"address": reason}


def test_metrics_must_match_the_instances_the_handler_receives() -> None:
    routed = {COUNT: ROUTED[COUNT], SIZE: ROUTED[SIZE]}
    assert problems(
        {
            "metrics": {
                COUNT: {"type": "COUNTER"},
                "requestcount": {"type": "COUNTER"},  # a short name is not the instance's name
            }
        },
        routed,
    ) == {
        "metrics.requestcount": "not an instance this handler receives (by full name, such as"
        " requestcount.instance.istio-system); it receives:"
        f" {COUNT}, {SIZE}",
        "metrics": f"instance {SIZE} is sent to this handler but has no entry here",
    }
    # A handler no rule sends to has nothing to compare with.
    assert problems({"metrics": {"requestcount": {"type": "COUNTER"}}}, {}) == {}


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        (
            "requests.{{.code}}",
            "{{.code}} names no dimension of instance"
            f" {COUNT}; it has: destination_service, response_code",
        ),
        (
            "requests.{{.response_code | printf}}",
            "cannot parse 'requests.{{.response_code | printf}}':"
            " unsupported action '{{.response_code | printf}}': only {{.dimension}} is supported",
        ),
        (
            "{{- .response_code}}",
            "cannot parse '{{- .response_code}}': unsupported action '{{- .response_code}}':"
            " only {{.dimension}} is supported",
        ),
        (
            "{{if 1}}",
            "cannot parse '{{if 1}}': unsupported action '{{if 1}}': only {{.dimension}} is"
            " supported",
        ),
        (
            "requests.{{.response_code",
            "cannot parse 'requests.{{.response_code': unclosed action at '{{.response_code'",
        ),
        (
            "requests:{{.response_code}}",
            "cannot parse 'requests:{{.response_code}}':"
            " ':' cannot be part of a StatsD name (it delimits lines and fields)",
        ),
    ],
)
def test_name_templates(template: str, reason: str) -> None:
    assert problems(
        {"metrics": {COUNT: {"type": "COUNTER", "nameTemplate": template}}}, {COUNT: ROUTED[COUNT]}
    ) == {f"metrics.{COUNT}.nameTemplate": reason}


def test_value_types_are_mixers() -> None:
    routed = {
        COUNT: spec(COUNT, ValueType.DOUBLE),
        DURATION: spec(DURATION, _D),
        SIZE: spec(SIZE, _S),
        LEVEL: InstanceSpec(LEVEL, "metric", {}),
    }
    assert problems(
        {
            "metrics": {
                COUNT: {"type": "COUNTER"},
                DURATION: {"type": "GAUGE"},
                SIZE: {"type": "DISTRIBUTION"},
                LEVEL: {"type": "GAUGE"},
            }
        },
        routed,
    ) == {
        f"metrics.{COUNT}.type": f"a COUNTER needs an INT64 value; {COUNT}'s is DOUBLE",
        f"metrics.{DURATION}.type": f"a GAUGE needs an INT64 value; {DURATION}'s is DURATION",
        f"metrics.{SIZE}.type": f"a DISTRIBUTION needs an INT64 or DURATION value; {SIZE}'s"
        " is STRING",
        f"metrics.{LEVEL}.type": f"instance {LEVEL} sets no value",
    }


def test_flush_settings() -> None:
    assert problems({"flushDuration": "0s"}, {}) == {"flushDuration": "flush duration must be > 0"}
    assert problems({"flushDuration": "1s", "batching": {"flushInterval": "2s"}}, {}) == {
        "batching.flushInterval": "conflicts with flushDuration, which sets the same interval;"
        " give only one"
    }
    assert problems({"batching": {"flushInterval": "2s"}}, {}) == {}
    assert problems({"prefix": "istio|x"}, {}) == {"prefix": "'|' cannot be part of a StatsD name"}


@pytest.mark.parametrize(
    ("p", "where"),
    [
        ({"samplingRate": 1.5}, ("samplingRate",)),
        ({"samplingRate": -0.1}, ("samplingRate",)),
        ({"flushBytes": -1}, ("flushBytes",)),
        ({"flushBytes": 70_000}, ("flushBytes",)),
        ({"flushDuration": "soon"}, ("flushDuration",)),
        ({"metrics": {COUNT: {"type": "HISTOGRAM"}}}, ("metrics", COUNT, "type")),
        ({"metrics": {COUNT: {"type": 0}}}, ("metrics", COUNT, "type")),  # UNKNOWN
        ({"metrics": {COUNT: {"nameTemplate": "x"}}}, ("metrics", COUNT, "type")),
        ({"metricNameTemplateStrings": {}}, ("metricNameTemplateStrings",)),  # pre-1.1 field
        ({"batching": {"queueSize": 0}}, ("batching", "queueSize")),
    ],
)
def test_bad_params_name_the_field(p: dict[str, Any], where: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as e:
        StatsdParams.model_validate(p)
    assert tuple(str(x) for x in e.value.errors()[0]["loc"]) == where


def test_types_by_number_as_protobuf_json() -> None:
    p = StatsdParams.model_validate({"metrics": {COUNT: {"type": 1}, SIZE: {"type": 3}}})
    assert (p.metrics[COUNT].type, p.metrics[SIZE].type) == ("COUNTER", "DISTRIBUTION")


# Through the configuration store: Istio-shaped documents

CONFIG = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: statsd, namespace: istio-system}
spec:
  compiledAdapter: statsd
  params:
    address: ADDRESS
    prefix: mesh
    flushDuration: 10ms
    metrics:
      requestcount.instance.istio-system:
        type: COUNTER
        name_template: "{{.destination_service}}.requests.{{.response_code}}"
      requestduration.instance.istio-system:
        type: DISTRIBUTION
        nameTemplate: "{{.destination_service}}.latency"
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions:
      response_code: response.code | 200
      destination_service: destination.service.name | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestduration, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: response.duration | "0ms"
    dimensions:
      destination_service: destination.service.name | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: statsd, namespace: istio-system}
spec:
  match: context.protocol == "http"
  actions:
  - handler: statsd
    instances: [requestcount, requestduration]
"""


def write_config(tmp_path: Path, address: str, text: str = CONFIG) -> Path:
    (tmp_path / "statsd.yaml").write_text(textwrap.dedent(text).replace("ADDRESS", address))
    return tmp_path


async def test_istio_shaped_configuration_loads_and_sends(
    tmp_path: Path, receiver: StatsdReceiver
) -> None:
    folder = write_config(tmp_path, receiver.address)
    snapshot = compile_snapshot(documents.read([folder]), default_registry())
    built = snapshot.handlers["statsd.handler.istio-system"].handler
    assert isinstance(built, StatsdHandler)
    bag = {
        "context.protocol": "http",
        "destination.service.name": "reviews",
        "response.code": 404,
        "response.duration": datetime.timedelta(milliseconds=12),
    }
    made = [snapshot.instances[name].build(bag) for name in (COUNT, DURATION)]
    assert built.handle_metric(made) is ExportResult.SUCCESS
    got = await receiver.wait_for(2)
    await built.close()
    assert got == [
        Sample("mesh.reviews.requests.404", "1", "c", None),
        Sample("mesh.reviews.latency", "12", "ms", None),
    ]


def test_configuration_errors_carry_the_document_and_field(tmp_path: Path) -> None:
    text = CONFIG.replace("{{.response_code}}", "{{.code}}").replace(
        "type: DISTRIBUTION", "type: 7"
    )
    folder = write_config(tmp_path, "localhost", text)
    with pytest.raises(Rejected) as e:
        compile_snapshot(documents.read([folder]), default_registry(), build_handlers=False)
    reasons = sorted(str(err).split(": ", 2)[-1] for err in e.value.errors)
    assert reasons == [
        f"spec.params.metrics.{DURATION}.type: Input should be 'COUNTER', 'GAUGE' or"
        " 'DISTRIBUTION' (got 7)",
    ]
    # With the type fixed, the handler's own checks run: every problem at once.
    folder = write_config(tmp_path, "localhost", CONFIG.replace("{{.response_code}}", "{{.code}}"))
    with pytest.raises(Rejected) as e:
        compile_snapshot(documents.read([folder]), default_registry(), build_handlers=False)
    reasons = sorted(str(err).split(": ", 2)[-1] for err in e.value.errors)
    assert reasons == [
        "spec.params.address: missing port in address 'localhost'; expected host:port",
        f"spec.params.metrics.{COUNT}.nameTemplate: {{{{.code}}}} names no dimension of"
        f" instance {COUNT}; it has: destination_service, response_code",
    ]


def test_lines_parse_as_the_receiver_reads_them() -> None:
    assert parse_line("a.b:1.5|ms|@0.1|#k:v,x") == Sample("a.b", "1.5", "ms", 0.1, ("k:v", "x"))
