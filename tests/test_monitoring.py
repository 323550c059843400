"""The hub's own metrics: what the plain-int collectors of the Check path expose is what
prometheus_client's Counter and Histogram expose for the same increments."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mixerhub.monitoring import LoopCounter, LoopHistogram

BUCKETS = (0.0001, 0.001, 0.01, 0.1)


def samples(registry: CollectorRegistry) -> list[tuple[str, list[tuple[str, str]], float]]:
    """Every sample but the creation times (which differ by when each was made)."""
    return sorted(
        (s.name, sorted(s.labels.items()), s.value)
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    )


def test_a_loop_counter_exposes_what_a_counter_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopCounter("hub_calls", "Calls.", ["result", "rule"], registry=ours)
    reference = Counter("hub_calls", "Calls.", ["result", "rule"], registry=theirs)
    for labels in [("ok", ""), ("ok", ""), ("denied", "deny-admin"), ("ok", "")]:
        loop.labels(*labels).value += 1
        reference.labels(*labels).inc()
    loop.labels("ok", "").inc(5)
    reference.labels("ok", "").inc(5)
    assert samples(ours) == samples(theirs)
    assert ours.get_sample_value("hub_calls_total", {"result": "ok", "rule": ""}) == 8
    assert ours.get_sample_value("hub_calls_created", {"result": "ok", "rule": ""})
    text = generate_latest(ours).decode()
    assert "# TYPE hub_calls_total counter" in text
    assert 'hub_calls_total{result="denied",rule="deny-admin"} 1.0' in text


def test_a_loop_histogram_exposes_what_a_histogram_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("hub_seconds", "Time.", BUCKETS, registry=ours)
    reference = Histogram("hub_seconds", "Time.", buckets=BUCKETS, registry=theirs)
    # On a bound, between bounds, below the first and above the last.
    for value in (0.0001, 0.0005, 0.00005, 0.001, 0.05, 3.0, 0.1):
        loop.observe(value)
        reference.observe(value)
    assert samples(ours) == samples(theirs)
    assert ours.get_sample_value("hub_seconds_bucket", {"le": "+Inf"}) == 7
    assert ours.get_sample_value("hub_seconds_created")
    assert "# TYPE hub_seconds histogram" in generate_latest(ours).decode()


def test_the_wrong_number_of_labels_is_refused() -> None:
    counter = LoopCounter("hub_x", "X.", ["a"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="hub_x"):
        counter.labels("a", "b")
