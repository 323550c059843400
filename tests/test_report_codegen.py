"""The report path's generated code against the generic code it replaces, on many entries.

BagPlan's generated extraction must give what the extractors give (the LazyBag path tests and
tools use), and a rule's generated builder must build what each instance's own builder does, or
raise EvaluationError so that the dispatcher falls back to them.
"""

from __future__ import annotations

import datetime
import itertools
import linecache
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from mixerhub import registry
from mixerhub.access_log_attributes import (
    HTTP_EXTRACTORS,
    TCP_EXTRACTORS,
    BagPlan,
    Reporter,
    http_bag,
    tcp_bag,
)
from mixerhub.dispatcher import ReportDispatcher
from mixerhub.expression import EvaluationError
from mixerhub.store import documents
from mixerhub.store.compile import compile_snapshot, default_config_dir
from tests.test_access_log import entry

REPORTERS = [
    Reporter("reviews", "shop", {"app": "reviews", "version": "v2"}, "reviews-sa", "inbound",
             "kubernetes://reviews.shop"),
    Reporter("productpage", "shop", {"app": "productpage"}, "pp-sa", "outbound", "uid-1"),
    Reporter(),
    Reporter(kind="outbound"),
]  # fmt: skip


def _http_entries() -> list[accesslog_pb2.HTTPAccessLogEntry]:
    out = []
    for n, (code, content_type, timeout) in enumerate(
        itertools.product((200, 404, 503), ("application/json", "application/grpc+proto"), (0, 1))
    ):
        e = entry(path=f"/p/{n}?q={n}", code=code, content_type=content_type, timeout=bool(timeout),
                  ms=n)  # fmt: skip
        if n % 3 == 0:
            e.response.response_trailers["grpc-status"] = "14"
            e.response.response_trailers["grpc-message"] = "unavailable"
        if n % 4 == 0:
            e.request.authority = "[fd00::1]:9080"
        if n % 5 == 0:
            e.request.authority = "10.1.2.3:80"
        out.append(e)
    bare = accesslog_pb2.HTTPAccessLogEntry()  # nothing set: every attribute that can be absent
    out.append(bare)
    odd = entry()
    odd.common_properties.ClearField("duration")
    odd.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(7)
    odd.common_properties.ClearField("tls_properties")
    odd.common_properties.tls_properties.local_certificate_properties.subject_alt_name.add(
        uri="spiffe://cluster.local/ns/shop/sa/reviews"
    )
    odd.common_properties.tls_properties.tls_sni_hostname = "reviews.shop"
    odd.common_properties.upstream_remote_address.socket_address.address = "10.9.9.9"
    odd.common_properties.upstream_remote_address.socket_address.port_value = 9080
    odd.request.ClearField("request_method")
    odd.request.referer, odd.request.forwarded_for = "http://x/", "1.2.3.4"
    odd.response.ClearField("response_code")
    odd.response.response_headers["grpc-status"] = "0"
    out.append(odd)
    return out


def _tcp_entries() -> list[accesslog_pb2.TCPAccessLogEntry]:
    bare = accesslog_pb2.TCPAccessLogEntry()
    full = accesslog_pb2.TCPAccessLogEntry()
    full.common_properties.CopyFrom(entry().common_properties)
    full.common_properties.upstream_cluster = "outbound|9080||reviews"
    full.connection_properties.received_bytes, full.connection_properties.sent_bytes = 10, 20
    return [bare, full]


def _lazy(bag: Any, names: Any) -> dict[str, Any]:
    return {name: bag[name] for name in names if name in bag}


@pytest.mark.parametrize("reporter", REPORTERS, ids=lambda r: f"{r.kind}-{r.name or 'none'}")
def test_generated_extraction_gives_what_the_extractors_give(reporter: Reporter) -> None:
    plan = BagPlan(frozenset(HTTP_EXTRACTORS) | frozenset(TCP_EXTRACTORS))
    for e in _http_entries():
        assert plan.http_bag(e, reporter) == _lazy(http_bag(e, reporter), HTTP_EXTRACTORS)
    for t in _tcp_entries():
        assert plan.tcp_bag(t, reporter) == _lazy(tcp_bag(t, reporter), TCP_EXTRACTORS)


def test_a_plan_extracts_only_what_is_referenced() -> None:
    referenced = frozenset({"response.code", "request.path", "source.workload.name", "no.such"})
    plan = BagPlan(referenced)
    inbound, outbound = REPORTERS[0], REPORTERS[1]
    assert plan.http_bag(entry(), inbound) == {"response.code": 200, "request.path": "/api/v1?x=1"}
    assert plan.http_bag(entry(), outbound)["source.workload.name"] == "productpage"
    assert "request.headers" not in plan.sources["http", True]


@pytest.fixture
async def dispatcher() -> AsyncIterator[ReportDispatcher]:
    """The default config's report side, with its handlers built (rules without are skipped)."""
    snapshot = compile_snapshot(documents.read([default_config_dir()]), registry.default_registry())
    yield ReportDispatcher(snapshot)
    for built in snapshot.handlers.values():
        if built.handler is not None:
            await built.handler.close()


async def test_generated_rule_builders_build_what_each_instance_builds(
    dispatcher: ReportDispatcher,
) -> None:
    routes = dispatcher.routes_for("shop")
    assert all(r.generated is not None for r in routes)
    plan = BagPlan(frozenset(HTTP_EXTRACTORS) | frozenset(TCP_EXTRACTORS))
    bags = [plan.http_bag(e, r) for e in _http_entries() for r in REPORTERS]
    bags += [plan.tcp_bag(e, r) for e in _tcp_entries() for r in REPORTERS]
    compared = 0
    for route, bag in itertools.product(routes, bags):
        assert route.generated is not None
        try:
            expected = tuple(call.instance.build(dict(bag)) for call in route.calls)
        except EvaluationError:
            with pytest.raises(EvaluationError):
                route.generated.function(dict(bag))
            continue
        assert route.generated.function(dict(bag)) == expected
        compared += 1
    assert compared > len(bags)


async def test_a_failing_expression_falls_back_to_the_instances_that_can_be_built(
    dispatcher: ReportDispatcher,
) -> None:
    (stdio,) = [r for r in dispatcher.routes_for("shop") if r.rule.name.startswith("stdio.")]
    bag = BagPlan(frozenset(HTTP_EXTRACTORS)).http_bag(entry(), REPORTERS[0])
    del bag["request.time"]  # the accesslog instance's timestamp has no default
    assert stdio.generated is not None
    with pytest.raises(EvaluationError):
        stdio.generated.function(dict(bag))
    built: list[Any] = []
    calls = tuple(c.__class__(c.rule, c.handler, c.adapter, built.extend, c.instance)
                  for c in stdio.calls)  # fmt: skip
    route = stdio.__class__(stdio.rule, calls, stdio.generated)
    dispatcher._scoped = type(dispatcher._scoped)([route], "istio-system")
    assert dispatcher.report([bag], "shop") == 0  # skipped and counted, as without generated code
    assert built == []


async def test_generated_code_can_be_read_back(dispatcher: ReportDispatcher) -> None:
    (promhttp,) = [r for r in dispatcher.routes_for("shop")
                   if r.rule.name.startswith("promhttp.")]  # fmt: skip
    generated = promhttp.generated
    assert generated is not None
    assert generated.filename == "<report promhttp.rule.istio-system>"
    assert "'requestcount.instance.istio-system'" in generated.source
    # Istio's four HTTP metrics share their 21 dimensions: each distinct expression is evaluated
    # once, into a local.
    sources = {text for call in promhttp.calls for text in call.instance.expressions.values()}
    assert len(sources) < sum(len(call.instance.expressions) for call in promhttp.calls)
    evaluations = re.findall(r"^        v\d+ = (.*)  # ", generated.source, re.MULTILINE)
    assert len(evaluations) == len(sources)
    # Each expression's code is inlined, not called.
    assert "(bag)" not in "".join(evaluations)
    assert linecache.getlines(generated.filename)[0].startswith("def build(bag):")


def test_durations_and_times_are_unchanged_by_the_faster_arithmetic() -> None:
    e = entry(ms=1234)
    e.common_properties.start_time.nanos = 987_654_321
    bag = BagPlan(frozenset(HTTP_EXTRACTORS)).http_bag(e, REPORTERS[0])
    assert bag["response.duration"] == datetime.timedelta(seconds=1, microseconds=234_000)
    assert bag["request.time"].microsecond == 987_654
    assert bag["response.time"] == bag["request.time"] + bag["response.duration"]
