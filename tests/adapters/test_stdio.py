"""stdio: logentry and metric instances as lines, in Mixer's shapes."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import logging
import sys
from pathlib import Path

import pytest
from mixerhub.adapters.stdio import INFO, StdioHandler, StdioParams
from prometheus_client import CollectorRegistry

from mixerhub.adapter import Env, ExportResult
from mixerhub.bag import parse_ip
from mixerhub.monitoring import REGISTRY
from mixerhub.templates import LogEntryInstance, MetricInstance

AT = datetime.datetime(2026, 11, 25, 12, 0, 0, 500000, tzinfo=datetime.UTC)


def handler(**params: object) -> StdioHandler:
    env = Env("stdio", "h.handler.ns", logging.getLogger("test"), CollectorRegistry())
    built = INFO.build(StdioParams.model_validate(params), {}, env)
    assert isinstance(built, StdioHandler)
    return built


def entry(severity: str = "Info", **variables: object) -> LogEntryInstance:
    return LogEntryInstance("accesslog.instance.istio-system", variables, AT, severity)


async def lines_of(h: StdioHandler, path: Path) -> list[str]:
    await h.close()
    return path.read_text().splitlines()


async def test_logentries_as_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    h = handler(outputPath=str(out))
    result = h.handle_logentry(
        [
            entry(
                responseCode=200,
                latency=datetime.timedelta(milliseconds=1.5),
                sourceIp=ipaddress.ip_address("10.0.0.1"),
                labels={"app": "web"},
            )
        ]
    )
    assert result is ExportResult.SUCCESS
    (line,) = await lines_of(h, out)
    assert json.loads(line) == {
        "level": "info",
        "time": "2026-11-25T12:00:00.500000Z",
        "instance": "accesslog.instance.istio-system",
        "responseCode": 200,
        "latency": "1.5ms",
        "sourceIp": "10.0.0.1",
        "labels": {"app": "web"},
    }


async def test_envoy_addresses_and_durations_as_mixer_printed_them(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    h = handler(outputPath=str(out))
    us = datetime.timedelta(microseconds=1)
    durations = [0 * us, us, 201 * us, 999 * us, 1000 * us, 1500 * us, -5 * us, 2_000_001 * us]
    h.handle_logentry(
        [
            entry(sourceIp=parse_ip("10.0.0.1"), destinationIp=parse_ip("::1"), latency=d)
            for d in durations
        ]
    )
    lines = await lines_of(h, out)
    head = (
        '{"level":"info","time":"2026-11-25T12:00:00.500000Z",'
        '"instance":"accesslog.instance.istio-system","sourceIp":"10.0.0.1","destinationIp":"::1"'
    )
    texts = ["0s", "1µs", "201µs", "999µs", "1ms", "1.5ms", "-5µs", "2.000001s"]
    assert lines == [f'{head},"latency":"{t}"}}' for t in texts]


async def test_text_lines_and_severity_levels(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    h = handler(outputPath=str(out), output_as_json=False, outputLevel="WARNING")
    h.handle_logentry([entry("Info", a=1), entry("warning", b=2), entry("ERR", c=3), entry("odd")])
    lines = await lines_of(h, out)
    assert lines == [
        '2026-11-25T12:00:00.500000Z\twarn\taccesslog.instance.istio-system\t{"b":2}',
        '2026-11-25T12:00:00.500000Z\terror\taccesslog.instance.istio-system\t{"c":3}',
    ]


async def test_metrics_with_value_and_dimensions(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    h = handler(outputPath=str(out))
    h.handle_metric(
        [MetricInstance("requestcount.instance.istio-system", 1, {"response_code": 404})]
    )
    (line,) = await lines_of(h, out)
    record = json.loads(line)
    assert record["instance"] == "requestcount.instance.istio-system"
    assert (record["level"], record["value"], record["response_code"]) == ("info", 1, 404)
    h = handler(outputPath=str(out), metricLevel="INFO", outputLevel="ERROR")
    h.handle_metric([MetricInstance("m", 1)])
    assert len(await lines_of(h, out)) == 1  # below the output level: nothing more written


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    h = handler(outputPath=str(tmp_path / "out.log"), queue_size=1)
    before = (
        REGISTRY.get_sample_value(
            "mixerhub_adapter_dropped_total", {"adapter": "stdio", "reason": "queue_full"}
        )
        or 0.0
    )
    results = [h.handle_logentry([entry(n=n) for n in range(50)]) for _ in range(20)]
    await h.close()
    after = REGISTRY.get_sample_value(
        "mixerhub_adapter_dropped_total", {"adapter": "stdio", "reason": "queue_full"}
    )
    written = len((tmp_path / "out.log").read_text().splitlines())
    assert ExportResult.FAILURE in results
    assert after is not None
    assert after - before == 1000 - written
    assert written >= 1


async def test_files_rotate_by_size(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    h = handler(outputPath=str(out), maxMegabytesBeforeRotation=1, maxRotatedFiles=2)
    big = "x" * 200_000
    for _ in range(15):
        h.handle_logentry([entry(blob=big)])
    await h.close()
    assert (tmp_path / "out.log.1").exists()
    assert (tmp_path / "out.log.2").exists()
    assert not (tmp_path / "out.log.3").exists()
    assert (tmp_path / "out.log.1").stat().st_size >= 1024 * 1024


async def test_lines_to_stdout_keep_their_order_with_text_written_before(
    capfd: pytest.CaptureFixture[str],
) -> None:
    print("before", flush=False)  # still in the text layer when the handler writes bytes below
    h = handler()
    h.handle_logentry([entry(n=1), entry(n=2)])
    await h.close()
    out = capfd.readouterr().out.splitlines()
    assert out[0] == "before"
    assert [json.loads(line)["n"] for line in out[1:]] == [1, 2]


async def test_a_text_stream_without_bytes_below_it_still_gets_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    h = handler(logStream="STDERR", output_as_json=False)
    h.handle_metric([MetricInstance("m", 1, {"code": 200})])
    await h.close()
    assert stream.getvalue().endswith('\tinfo\tm\t{"value":1,"code":200}\n')
