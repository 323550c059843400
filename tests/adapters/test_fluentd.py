"""fluentd: logentry instances as Fluentd events, checked as a real in_forward decodes them."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fluent.sender import FluentSender
from mixerhub.adapters.fluentd import INFO, FluentdHandler, FluentdParams
from mixerhub.adapters.fluentd.forward import pack_entry
from prometheus_client import CollectorRegistry

from mixerhub import registry
from mixerhub.adapter import Env, ExportResult
from mixerhub.monitoring import REGISTRY
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot
from mixerhub.templates import LogEntryInstance
from tests.fluentd_receiver import EventTime, FluentdReceiver
from tests.harness import eventually, free_port

AT = datetime.datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=datetime.UTC)
AT_SECONDS = int(AT.timestamp())
NAME = "accesslog.instance.istio-system"
# Quick to flush and to retry, so that tests take a fraction of a second.
FAST = {"flushInterval": "20ms", "initialBackoff": "1ms", "maxBackoff": "10ms", "timeout": "1s"}


def handler(
    address: str, batching: dict[str, object] | None = None, **params: object
) -> FluentdHandler:
    env = Env(
        "fluentd", "fluentd.handler.istio-system", logging.getLogger("test"), CollectorRegistry()
    )
    p = FluentdParams.model_validate(
        {"address": address, "batching": {**FAST, **(batching or {})}, **params}
    )
    assert not list(INFO.validate(p, {}))
    built = INFO.build(p, {}, env)
    assert isinstance(built, FluentdHandler)
    return built


def entry(
    n: int = 0, severity: str = "Info", name: str = NAME, **variables: object
) -> LogEntryInstance:
    return LogEntryInstance(name, {"n": n, **variables}, AT, severity)


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "mixerhub_adapter_dropped_total", {"adapter": "fluentd", "reason": reason}
    )
    return value or 0.0


def all_dropped() -> float:
    return sum(
        dropped(r) for r in ("queue_full", "send_failed", "shutdown", "too_large", "invalid")
    )


@pytest.fixture
async def receiver() -> AsyncIterator[FluentdReceiver]:
    r = FluentdReceiver()
    await r.start()
    yield r
    await r.stop()
    assert not r.problems


async def test_every_field_arrives_as_mixer_sent_it(receiver: FluentdReceiver) -> None:
    h = handler(receiver.address)
    variables: dict[str, Any] = {
        "responseCode": 200,
        "method": "GET",
        "latency": datetime.timedelta(milliseconds=1.5),
        "long": datetime.timedelta(minutes=1, seconds=30),
        "sourceIp": ipaddress.ip_address("10.0.0.1"),
        "destinationIp": ipaddress.ip_address("fd00::1"),
        "requestTime": AT,
        "mtls": True,
        "ratio": 0.25,
        "labels": {"app": "web", "version": "v1"},
        "severity": "overridden by the entry's severity, as in Mixer",
    }
    assert (
        h.handle_logentry([LogEntryInstance(NAME, variables, AT, "Warning")])
        is ExportResult.SUCCESS
    )
    await eventually(lambda: len(receiver.events) == 1)
    (event,) = receiver.events
    assert event.tag == NAME
    # EventTime, nanosecond precision: the entry's microseconds exactly.
    assert event.time == EventTime(AT_SECONDS, 123_456_000)
    assert event.record == {
        "responseCode": 200,
        "method": "GET",
        "latency": "1.5ms",
        "long": "1m30s",
        "sourceIp": "10.0.0.1",
        "destinationIp": "fd00::1",
        "requestTime": "2026-11-25T12:00:00.123456Z",
        "mtls": True,
        "ratio": 0.25,
        "labels": {"app": "web", "version": "v1"},
        "severity": "Warning",
    }
    (message,) = receiver.messages
    assert (message.mode, message.tag, message.events) == ("Forward", NAME, 1)
    assert message.option["size"] == 1
    assert isinstance(message.option["chunk"], str)
    await h.close()


async def test_integer_durations_are_whole_milliseconds(receiver: FluentdReceiver) -> None:
    h = handler(receiver.address, integerDuration=True)
    h.handle_logentry(
        [entry(latency=datetime.timedelta(microseconds=1999), long=datetime.timedelta(hours=1))]
    )
    await h.close()
    (record,) = receiver.records
    assert (record["latency"], record["long"]) == (1, 3_600_000)  # truncated, as Go's d / ms


async def test_a_tag_variable_is_the_tag_and_the_name_goes_in_the_record(
    receiver: FluentdReceiver,
) -> None:
    h = handler(receiver.address)
    h.handle_logentry([entry(1, tag="app.access"), entry(2, tag="")])
    await h.close()
    assert sorted((e.tag, e.record["n"]) for e in receiver.events) == [
        ("accesslog.instance.istio-system", 2),
        ("app.access", 1),
    ]
    by_n = {e.record["n"]: e.record for e in receiver.events}
    assert by_n[1] == {"n": 1, "name": NAME, "severity": "Info"}
    assert "tag" not in by_n[2]
    assert by_n[2]["name"] == NAME


async def test_an_entry_without_a_timestamp_gets_the_time_it_was_handled(
    receiver: FluentdReceiver,
) -> None:
    h = handler(receiver.address)
    before = time.time()
    h.handle_logentry([LogEntryInstance(NAME, {"n": 1})])
    await h.close()
    (event,) = receiver.events
    assert isinstance(event.time, EventTime)
    assert before - 1 <= event.time.seconds + event.time.nanoseconds / 1e9 <= time.time()
    assert event.record == {"n": 1, "severity": ""}


async def test_a_batch_is_one_forward_message_per_tag(receiver: FluentdReceiver) -> None:
    h = handler(receiver.address, batching={"batchSize": 6, "flushInterval": "10s"})
    entries = [entry(n, name=f"log{n % 2}.instance.default") for n in range(6)]
    h.handle_logentry(entries)
    await eventually(lambda: len(receiver.events) == 6)
    assert sorted((m.tag, m.events, m.mode) for m in receiver.messages) == [
        ("log0.instance.default", 3, "Forward"),
        ("log1.instance.default", 3, "Forward"),
    ]
    assert [e.record["n"] for e in receiver.events if e.tag == "log0.instance.default"] == [0, 2, 4]
    assert receiver.connections == 1
    await h.close()


async def test_packed_forward_mode(receiver: FluentdReceiver) -> None:
    h = handler(receiver.address, mode="PackedForward")
    h.handle_logentry([entry(n) for n in range(3)])
    await h.close()
    ((mode, events),) = {(m.mode, m.events) for m in receiver.messages}
    assert (mode, events) == ("PackedForward", 3)
    assert [e.record["n"] for e in receiver.events] == [0, 1, 2]
    assert all(e.time == EventTime(AT_SECONDS, 123_456_000) for e in receiver.events)


async def test_without_acks_messages_carry_no_chunk(receiver: FluentdReceiver) -> None:
    receiver.ack = False
    h = handler(receiver.address, requireAck=False)
    h.handle_logentry([entry(n) for n in range(3)])
    await h.close()
    assert [e.record["n"] for e in receiver.events] == [0, 1, 2]
    assert all("chunk" not in m.option for m in receiver.messages)


async def test_max_batch_size_bytes_splits_messages_and_drops_what_cannot_fit(
    receiver: FluentdReceiver,
) -> None:
    one = len(pack_entry(AT, {"n": 0, "blob": "x" * 100, "severity": "Info"}))
    h = handler(receiver.address, maxBatchSizeBytes=3 * one)
    before = dropped("too_large")
    result = h.handle_logentry(
        [entry(n, blob="x" * 100) for n in range(6)] + [entry(99, blob="y" * 3 * one)]
    )
    assert result is ExportResult.FAILURE
    assert dropped("too_large") - before == 1  # bigger than a whole message: dropped, as Mixer did
    await h.close()
    assert [e.record["n"] for e in receiver.events] == [0, 1, 2, 3, 4, 5]
    assert [m.events for m in receiver.messages] == [3, 3]


async def test_an_unanswered_ack_is_a_failure_and_the_batch_is_sent_again(
    receiver: FluentdReceiver,
) -> None:
    receiver.ack = False
    h = handler(receiver.address, batching={"timeout": "100ms", "maxRetries": 50})
    failures = (
        REGISTRY.get_sample_value("mixerhub_adapter_send_failures_total", {"adapter": "fluentd"})
        or 0.0
    )
    h.handle_logentry([entry(7)])
    await eventually(lambda: len(receiver.messages) >= 2)  # no ack: sent again, on a new connection
    assert (
        REGISTRY.get_sample_value("mixerhub_adapter_send_failures_total", {"adapter": "fluentd"})
        or 0
    ) > failures
    assert receiver.connections >= 2
    receiver.ack = True
    await eventually(lambda: receiver.ack and len(receiver.messages) >= 3)
    await h.close()
    assert {e.record["n"] for e in receiver.events} == {7}  # at least once


async def test_a_fluentd_down_at_start_costs_bounded_memory_then_delivery_resumes() -> None:
    port = free_port()  # nothing listens here yet
    h = handler(f"127.0.0.1:{port}", batching={"queueSize": 50, "batchSize": 10, "maxRetries": 2})
    before = all_dropped()
    results = []
    for round_ in range(20):
        batch = [entry(round_ * 100 + n) for n in range(100)]
        results.append(h.handle_logentry(batch))  # never raises
        assert len(h._sender) <= 50
        await asyncio.sleep(0.005)
    assert ExportResult.FAILURE in results  # the queue filled up
    await eventually(lambda: all_dropped() - before == 2000)  # every entry given up on is counted
    assert dropped("queue_full") > 0
    assert dropped("send_failed") > 0

    receiver = FluentdReceiver()
    receiver.port = port
    await receiver.start()
    try:
        h.handle_logentry([entry(1000 + n) for n in range(5)])
        await eventually(lambda: len(receiver.events) == 5)
        assert [e.record["n"] for e in receiver.events] == [1000, 1001, 1002, 1003, 1004]
        await h.close()
    finally:
        await receiver.stop()
    assert not receiver.problems


async def test_fluentd_going_down_under_load_and_coming_back(receiver: FluentdReceiver) -> None:
    h = handler(
        receiver.address,
        batching={"queueSize": 200, "batchSize": 20, "maxRetries": 1000, "maxBackoff": "20ms"},
    )
    before = all_dropped()
    sent = 0

    async def load(rounds: int) -> None:
        nonlocal sent
        for _ in range(rounds):
            h.handle_logentry([entry(sent + n) for n in range(10)])
            sent += 10
            assert len(h._sender) <= 200
            await asyncio.sleep(0.002)

    await load(20)
    await eventually(lambda: len(receiver.events) == 200)
    await receiver.stop()  # Fluentd dies; the hub keeps reporting
    await load(60)
    assert all_dropped() - before > 0  # past queueSize, counted
    await receiver.start()  # back on the same port
    await eventually(
        lambda: len({e.record["n"] for e in receiver.events}) + all_dropped() - before >= sent
    )
    await load(5)
    await h.close()
    delivered = {e.record["n"] for e in receiver.events}
    assert set(range(sent - 50, sent)) <= delivered  # delivery resumed
    assert len(delivered) + all_dropped() - before >= sent  # nothing unaccounted for


async def test_close_flushes_what_is_queued(receiver: FluentdReceiver) -> None:
    h = handler(receiver.address, batching={"flushInterval": "1h", "batchSize": 1000})
    h.handle_logentry([entry(n) for n in range(100)])
    await asyncio.sleep(0.05)
    assert not receiver.events  # waiting for the interval...
    await h.close()  # ...or for close
    assert [e.record["n"] for e in receiver.events] == list(range(100))
    before = dropped("shutdown")
    assert h.handle_logentry([entry()]) is ExportResult.FAILURE  # after close: counted, not kept
    assert dropped("shutdown") - before == 1


async def test_a_value_msgpack_cannot_carry_is_dropped_and_counted(
    receiver: FluentdReceiver,
) -> None:
    h = handler(receiver.address)
    before = dropped("invalid")
    assert h.handle_logentry([entry(1, huge=1 << 70), entry(2)]) is ExportResult.FAILURE
    assert dropped("invalid") - before == 1
    await h.close()
    assert [e.record["n"] for e in receiver.events] == [2]


def test_params_are_mixers_and_validated_as_mixer_did() -> None:
    p = FluentdParams.model_validate({})
    assert (p.address, p.integer_duration, p.max_batch_size_bytes) == (
        "localhost:24224",
        False,
        8 * 1024 * 1024,
    )
    assert p.effective_batching == p.batching
    p = FluentdParams.model_validate(
        {
            "address": "[::1]:24224",
            "instanceBufferSize": 1024,
            "pushIntervalDuration": "1m",
            "pushTimeoutDuration": "30s",
        }
    )
    assert p.host_port == ("::1", 24224)
    b = p.effective_batching
    assert (b.queue_size, b.flush_interval, b.timeout) == (
        1024,
        datetime.timedelta(minutes=1),
        datetime.timedelta(seconds=30),
    )

    def errors(**params: object) -> list[tuple[str, str]]:
        return [(e.path, e.reason) for e in INFO.validate(FluentdParams.model_validate(params), {})]

    assert errors(address="") == [("address", "Address is empty")]
    assert errors(address="fluentd") == [
        ("address", "Address is malformed: missing port in address")
    ]
    assert errors(address="fluentd:http")[0][0] == "address"
    assert errors(address="::1:24224")[0][1] == "Address is malformed: too many colons in address"
    assert errors(instanceBufferSize=10, batching={"queueSize": 20}) == [
        ("instanceBufferSize", "set together with batching.queueSize; set one of them")
    ]
    assert errors(pushTimeoutDuration="0s", batching={"timeout": "1s"}) == []


YAML = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: handler, namespace: istio-system}
spec:
  compiledAdapter: fluentd
  params:
    address: "ADDRESS"
    integerDuration: true
    batching: {flushInterval: 20ms}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: newlog, namespace: istio-system}
spec:
  compiledTemplate: logentry
  params:
    severity: '"info"'
    timestamp: request.time
    variables:
      source: source.labels["app"] | source.workload.name | "unknown"
      user: source.user | "unknown"
      destination: destination.labels["app"] | destination.workload.name | "unknown"
      responseCode: response.code | 0
      responseSize: response.size | 0
      latency: response.duration | "0ms"
    monitored_resource_type: '"UNSPECIFIED"'
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: newlogtofluentd, namespace: istio-system}
spec:
  match: "true"
  actions:
  - handler: handler
    instances: [newlog]
"""


async def test_istios_fluentd_task_config_loads_and_delivers(
    tmp_path: Path, receiver: FluentdReceiver
) -> None:
    # The handler, instance and rule of Istio's "Logging with Fluentd" task (1.4).
    (tmp_path / "fluentd.yaml").write_text(
        textwrap.dedent(YAML).replace("ADDRESS", receiver.address)
    )
    snapshot = compile_snapshot(documents.read([tmp_path]), registry.default_registry())
    (rule,) = snapshot.rules
    (action,) = rule.actions
    h = action.handler.handler
    assert isinstance(h, FluentdHandler)
    instance = action.instances[0].build(
        {
            "request.time": AT,
            "source.workload.name": "productpage-v1",
            "destination.labels": {"app": "reviews"},
            "response.code": 200,
            "response.duration": datetime.timedelta(milliseconds=12, microseconds=700),
        }
    )
    h.handle_logentry([instance])
    await eventually(lambda: len(receiver.events) == 1)
    await h.close()
    (event,) = receiver.events
    assert (event.tag, event.time) == (
        "newlog.instance.istio-system",
        EventTime(AT_SECONDS, 123_456_000),
    )
    assert event.record == {
        "source": "productpage-v1",
        "user": "unknown",
        "destination": "reviews",
        "responseCode": 200,
        "responseSize": 0,
        "latency": 12,
        "severity": "info",
    }


def test_a_bad_address_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "fluentd.yaml").write_text(
        textwrap.dedent(YAML).replace("ADDRESS", "fluentd-es.logging")
    )
    with pytest.raises(Rejected) as e:
        compile_snapshot(
            documents.read([tmp_path]), registry.default_registry(), build_handlers=False
        )
    assert [err.path for err in e.value.errors] == ["spec.params.address"]


async def test_the_receiver_decodes_fluent_loggers_own_message_mode(
    receiver: FluentdReceiver,
) -> None:
    # The receiver against fluent-logger's sender (Message mode, EventTime), not only ours.
    sender = FluentSender("app", host="127.0.0.1", port=receiver.port, nanosecond_precision=True)
    try:
        assert await asyncio.to_thread(sender.emit_with_time, "access", 1_700_000_000.5, {"a": 1})
    finally:
        await asyncio.to_thread(sender.close)
    await eventually(lambda: len(receiver.events) == 1)
    (event,) = receiver.events
    assert (event.tag, event.time, event.record) == (
        "app.access",
        EventTime(1_700_000_000, 500_000_000),
        {"a": 1},
    )
    assert receiver.messages[0].mode == "Message"
