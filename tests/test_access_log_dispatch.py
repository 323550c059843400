"""The generated access-log dispatch (mixerhub/access_log_dispatch.py) against the general report
path it stands in for: the same instances, in the same order, to the same handler calls, on many
entries and reporters; and the general path's own handling where an expression fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import linecache
import shutil
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mixerhub import access_log_dispatch, registry
from mixerhub.access_log import AccessLogService
from mixerhub.access_log_attributes import (
    BagPlan,
    Reporter,
    _headers_of,
    request_header,
    request_header_present,
)
from mixerhub.access_log_dispatch import ReportPrograms
from mixerhub.dispatcher import ReportDispatcher
from mixerhub.monitoring import ADAPTER_ERRORS
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents, mixer_kinds
from mixerhub.store.compile import compile_snapshot, default_config_dir
from mixerhub.templates import MetricInstance
from tests.mesh import workload_entry
from tests.test_access_log import entry
from tests.test_report_codegen import REPORTERS, _http_entries, _tcp_entries

# Rules beside the default ones: expressions that fail on some entries or for some reporters,
# a rule scoped to one namespace, and one whose match reads only the reporter.
EXTRA = """\
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: strict, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: response.code
    dimensions:
      app: destination.labels["app"]
      path: request.path
      agent: request.headers["user-agent"]
      method: request.headers[":method"]
      missing: request.headers["x-missing"]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: lenient, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions:
      workload: destination.workload.name | source.workload.name | "none"
      id: request.headers["x-request-id"] | "none"
      host: request.headers[":authority"] | "none"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: strictrule, namespace: istio-system}
spec:
  match: context.protocol == "http" || context.protocol == "grpc"
  actions: [{handler: stdio, instances: [strict, lenient]}]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: reviewsonly, namespace: istio-system}
spec:
  match: destination.workload.name == "reviews"
  actions: [{handler: stdio, instances: [lenient]}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: headers, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions:
      headers: response.headers
      path: request.path | ""
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: headersrule, namespace: istio-system}
spec:
  match: context.protocol == "http"
  actions: [{handler: stdio, instances: [headers]}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: shoponly, namespace: shop}
spec:
  compiledTemplate: metric
  params:
    value: request.size | connection.received.bytes | 0
    dimensions:
      code: response.code | 0
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: shoponly, namespace: shop}
spec:
  actions: [{handler: stdio.istio-system, instances: [shoponly]}]
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    shutil.copytree(default_config_dir(), folder / "default")
    (folder / "extra.yaml").write_text(EXTRA)
    return folder


@pytest.fixture
async def snapshot(config: Path) -> AsyncIterator[Snapshot]:
    snapshot = compile_snapshot(documents.read([config]), registry.default_registry())
    yield snapshot
    for built in snapshot.handlers.values():
        if built.handler is not None:
            await built.handler.close()


class Recorder:
    """Stands in for one handler method: what each call got."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def __call__(self, instances: Sequence[Any]) -> None:
        self.calls.append(list(instances))


def recording(reports: ReportDispatcher) -> dict[Any, Recorder]:
    """Every route's handler methods replaced by recorders (one per method, as batched)."""
    recorders: dict[Any, Recorder] = {}
    scoped = reports._scoped

    def swap(routes: tuple[Any, ...]) -> tuple[Any, ...]:
        out = []
        for route in routes:
            calls = tuple(
                dataclasses.replace(c, method=recorders.setdefault(c.method, Recorder()))
                for c in route.calls
            )
            out.append(dataclasses.replace(route, calls=calls))
        return tuple(out)

    scoped._mesh = swap(scoped._mesh)
    scoped._own = {ns: swap(routes) for ns, routes in scoped._own.items()}
    scoped._combined = {}
    return recorders


def both_ways(
    snapshot: Snapshot, kind: str, entries: Sequence[Any], reporter: Reporter
) -> Iterator[tuple[int, list[list[list[Any]]], ReportPrograms]]:
    """(dispatched, what each recorder got) by the general path, then by the generated one."""
    for generated in (False, True):
        reports = ReportDispatcher(snapshot)
        recorders = recording(reports)
        plan = BagPlan(snapshot.referenced)
        programs = ReportPrograms(reports, plan, snapshot.attributes)
        if generated:
            assert programs.program(kind, reporter) is not None
            n = programs.dispatch(kind, entries, reporter)
        else:
            extract = plan.http_for(reporter) if kind == "http" else plan.tcp_for(reporter)
            n = reports.report([extract(e, reporter) for e in entries], reporter.namespace)
        yield n, [r.calls for r in recorders.values()], programs


@pytest.mark.parametrize("reporter", REPORTERS, ids=lambda r: f"{r.kind}-{r.name or 'none'}")
@pytest.mark.parametrize("kind", ["http", "tcp"])
async def test_generated_dispatch_gives_what_the_general_path_gives(
    snapshot: Snapshot, kind: str, reporter: Reporter
) -> None:
    entries: list[Any] = _http_entries() if kind == "http" else _tcp_entries()
    (general_n, general, _), (generated_n, generated, _) = both_ways(
        snapshot, kind, entries, reporter
    )
    assert generated_n == general_n > 0
    assert generated == general


async def test_expressions_that_fail_take_the_general_path(snapshot: Snapshot) -> None:
    # No labels: destination.labels["app"] fails for the whole message (it reads the reporter
    # alone); a bare entry has no response.code, so `strict` fails for it alone.
    reporter = Reporter("reviews", "shop", {}, "sa", "inbound", "uid")
    entries = [entry(), entry().__class__(), entry(code=404)]
    errors = ADAPTER_ERRORS.labels("stdio")
    before = errors._value.get()
    (general_n, general, _), (generated_n, generated, programs) = both_ways(
        snapshot, "http", entries, reporter
    )
    assert generated == general
    assert generated_n == general_n
    # The general path skips and counts just the instances that cannot be built, both times:
    # `strict` for each entry, and the bare entry's access log (it has no request.time).
    assert errors._value.get() - before == 2 * (len(entries) + 1)
    program = programs.program("http", reporter)
    assert program is not None
    names = [i.name for call in generated for batch in call for i in batch]
    assert "strict.instance.istio-system" not in names
    assert names.count("lenient.instance.istio-system") == 2 * len(entries)


async def test_a_namespaces_rules_apply_to_its_reporters_alone(snapshot: Snapshot) -> None:
    def names(reporter: Reporter) -> set[str]:
        (_, _, _), (_, generated, _) = both_ways(snapshot, "http", [entry()], reporter)
        return {i.name for call in generated for batch in call for i in batch}

    assert "shoponly.instance.shop" in names(REPORTERS[0])  # reviews in shop
    other = dataclasses.replace(REPORTERS[0], namespace="other")
    assert "shoponly.instance.shop" not in names(other)
    assert "lenient.instance.istio-system" in names(other)


async def test_what_depends_on_the_reporter_alone_is_computed_once_per_message(
    snapshot: Snapshot,
) -> None:
    programs = ReportPrograms(
        ReportDispatcher(snapshot), BagPlan(snapshot.referenced), snapshot.attributes
    )
    program = programs.program("http", REPORTERS[0])
    assert program is not None
    before_loop, _, loop = program.source.partition("    for entry in entries:\n")
    # Istio's destination_workload label reads the reporter alone; request.path does not.
    assert "'destination.workload.name | \"unknown\"'" in before_loop
    assert "request.path" in loop
    assert "request.path" not in before_loop
    # A constant header name reads that one header, without building every header first.
    assert "_headers_of" not in program.source
    assert linecache.getlines(program.filename)[0].startswith("def dispatch(")
    # Programs are kept: one per entry type, reporter side and set of rules.
    assert programs.program("http", REPORTERS[0]) is program
    same_rules = dataclasses.replace(REPORTERS[0], name="ratings")
    assert programs.program("http", same_rules) is program
    assert programs.program("http", REPORTERS[1]) is not program  # outbound


async def test_entries_with_the_same_labels_share_one_dimensions_map(
    snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A metric's dimensions become a label set: a message's entries with the same values get
    # the same map, built once, whose labels the Prometheus handler then reads once.
    general_routes: list[Any] = []
    monkeypatch.setattr(
        access_log_dispatch,
        "apply_route",
        lambda route, bag, batches: general_routes.append(route.rule.name),
    )
    entries = [entry(), entry(path="/other"), entry(code=404), entry()]
    (_, _, _), (_, generated, _) = both_ways(snapshot, "http", entries, REPORTERS[0])
    metrics = [i for call in generated for batch in call for i in batch]
    count = [i for i in metrics if i.name == "requestcount.instance.istio-system"]
    size = [i for i in metrics if i.name == "requestsize.instance.istio-system"]
    assert [i.dimensions["response_code"] for i in count] == [200, 200, 404, 200]
    assert count[0].dimensions is count[1].dimensions is count[3].dimensions is size[3].dimensions
    assert count[2].dimensions is not count[0].dimensions
    # A map value (response.headers) cannot key a label set: built for each entry, in the
    # generated code all the same (no entry took its rule's general path).
    headers = [i for i in metrics if i.name == "headers.instance.istio-system"]
    paths = [i.dimensions["path"] for i in headers]
    assert paths == ["/api/v1?x=1", "/other", "/api/v1?x=1", "/api/v1?x=1"]
    assert headers[0].dimensions == headers[3].dimensions
    assert headers[0].dimensions is not headers[3].dimensions
    assert general_routes == []


@pytest.mark.parametrize("kind", ["http", "tcp"])
async def test_a_large_map_is_copied_from_its_template_in_its_own_order(
    snapshot: Snapshot, kind: str
) -> None:
    # Istio's access log has 39 variables: made from a template once per message, a copy per
    # entry. What the stdio handler writes depends on their order, not just their values.
    entries: list[Any] = _http_entries() if kind == "http" else _tcp_entries()
    reporter = REPORTERS[0]
    (_, general, _), (_, generated, programs) = both_ways(snapshot, kind, entries, reporter)
    logs = [
        [i for call in calls for batch in call for i in batch if hasattr(i, "variables")]
        for calls in (general, generated)
    ]
    assert len(logs[1]) == len(logs[0]) > 0
    for made, expected in zip(logs[1], logs[0], strict=True):
        assert list(made.variables.items()) == list(expected.variables.items())
    variables = [i.variables for i in logs[1]]
    assert len({id(v) for v in variables}) == len(variables)  # one map per entry
    program = programs.program(kind, reporter)
    assert program is not None
    assert "= tpl_m" in program.source


async def test_instances_are_made_without_their_init_as_it_would_make_them(
    snapshot: Snapshot,
) -> None:
    entries: list[Any] = _http_entries()
    (_, general, _), (_, generated, programs) = both_ways(snapshot, "http", entries, REPORTERS[0])
    made = [i for call in generated for batch in call for i in batch]
    expected = [i for call in general for batch in call for i in batch]
    assert made == expected
    assert [type(i) for i in made] == [type(i) for i in expected]
    # A default made by a factory is a new one per instance, as __init__ makes it.
    defaults = [i.monitored_resource_dimensions for i in made]
    assert len({id(d) for d in defaults}) == len(defaults)
    program = programs.program("http", REPORTERS[0])
    assert program is not None
    assert "_new(MetricInstance" in program.source


def test_only_plain_dataclasses_are_made_by_stores() -> None:
    @dataclasses.dataclass
    class Checked:
        name: str

        def __post_init__(self) -> None:
            raise ValueError

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        name: str

    assert mixer_kinds._settable(MetricInstance)
    assert not mixer_kinds._settable(Checked)
    assert not mixer_kinds._settable(Frozen)


WORKLOAD_ENTRIES = "---\n".join(
    [
        workload_entry("productpage-v1-7f9", "10.0.0.9", "productpage"),
        workload_entry("reviews-v2-5d8", "10.0.0.1", "reviews", version="v2"),
    ]
)


@pytest.mark.parametrize("reporter", REPORTERS[:2], ids=lambda r: r.kind)
@pytest.mark.parametrize("kind", ["http", "tcp"])
async def test_istios_attribute_generators_run_first_in_the_generated_path(
    tmp_path: Path, kind: str, reporter: Reporter
) -> None:
    """Istio 1.4's telemetry.yaml, whose kubernetesenv rules fill source.* and destination.*
    from the pods (WorkloadEntries here) before the metric and log rules read them."""
    istio = Path(__file__).parent / "data" / "istio-1.4" / "telemetry.yaml"
    (tmp_path / "pods.yaml").write_text(WORKLOAD_ENTRIES)
    snapshot = compile_snapshot(documents.read([istio, tmp_path]), registry.default_registry())
    try:
        assert ReportDispatcher(snapshot).preprocessor is not None  # kubernetesenv
        entries: list[Any] = _http_entries() if kind == "http" else _tcp_entries()
        (general_n, general, _), (generated_n, generated, programs) = both_ways(
            snapshot, kind, entries, reporter
        )
        assert generated == general
        assert generated_n == general_n > 0
        program = programs.program(kind, reporter)
        assert program is not None
        assert "_generate(pre, reporter.namespace)" in program.source
        # An entry like Envoy's usual ones goes through no rule's general path.
        fallbacks: list[int] = []
        program.function(
            entries[-1:], reporter, [[] for _ in program.calls], lambda i, e: fallbacks.append(i)
        )
        assert fallbacks == []
        labels = [
            i.dimensions for call in generated for batch in call for i in batch
            if getattr(i, "dimensions", None)
        ]  # fmt: skip
        # The pod at the entry's source address names the source workload.
        if kind == "http" and reporter.kind == "inbound":
            assert any(d.get("source_workload") == "productpage" for d in labels)
    finally:
        for built in snapshot.handlers.values():
            if built.handler is not None:
                await built.handler.close()


def test_one_header_reads_as_in_the_headers_map() -> None:
    names = [":authority", ":path", "user-agent", "referer", "x-request-id", "x-forwarded-for",
             ":method", "content-type", "x-none"]  # fmt: skip
    for e in [*_http_entries(), entry()]:
        e.request.request_headers["x-request-id"] = "logged"  # a logged header wins
        headers = _headers_of(e.request)
        for name in names:
            assert request_header(e.request, name, None) == headers.get(name), name
    bare = entry().__class__().request
    assert request_header(bare, ":method", "default") == "default"


def test_an_inlined_header_read_reads_as_the_call() -> None:
    missing = object()
    names = [":authority", ":path", "user-agent", "referer", "x-request-id", "x-forwarded-for",
             "content-type", "x-empty", "x-none"]  # fmt: skip
    for e in [*_http_entries(), entry()]:
        request = e.request
        request.request_headers["x-empty"] = ""
        request.request_headers[":path"] = ""  # logged, even empty, it wins over the field
        for name in names:
            code = request_header_present(name, "out")
            assert code is not None
            scope = {"_M": missing, "request": request, "request_headers": request.request_headers}
            present = eval(code, scope)  # our own generated code
            expected = request_header(request, name, missing)
            assert present == (expected is not missing), name
            assert scope["out"] is expected if expected is missing else scope["out"] == expected
    assert request_header_present(":method", "out") is None  # only the call reads it


async def test_every_program_is_ready_once_the_configuration_is_active(
    snapshot: Snapshot,
) -> None:
    programs = ReportPrograms(
        ReportDispatcher(snapshot), BagPlan(snapshot.referenced), snapshot.attributes
    )
    programs.prepare()
    # The mesh-wide rules alone, and with shop's own: each for two entry types and two sides.
    assert len(programs._programs) == 2 * 2 * 2
    ready = dict(programs._programs)
    for reporter in [*REPORTERS, dataclasses.replace(REPORTERS[0], namespace="elsewhere")]:
        for kind in ("http", "tcp"):
            assert programs.program(kind, reporter) in ready.values()
    assert programs._programs == ready  # nothing generated on the request path


async def test_entries_take_the_general_path_until_the_programs_are_ready(
    snapshot: Snapshot,
) -> None:
    reports = ReportDispatcher(snapshot)
    recorders = recording(reports)
    programs = ReportPrograms(reports, BagPlan(snapshot.referenced), snapshot.attributes)
    assert programs.ready("http", REPORTERS[0]) is None
    before = programs.dispatch("http", _http_entries(), REPORTERS[0])
    general = [r.calls for r in recorders.values()]
    assert programs._programs == {}  # nothing generated on the request path
    programs.prepare()
    assert programs.ready("http", REPORTERS[0]) is not None
    for r in recorders.values():
        r.calls = []
    assert programs.dispatch("http", _http_entries(), REPORTERS[0]) == before
    assert [r.calls for r in recorders.values()] == general


async def test_the_hub_prepares_the_programs_off_the_event_loop(
    snapshot: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """activate returns before any program is generated; entries meanwhile take the general
    path, and the programs are there once the preparing thread is done."""
    release = threading.Event()
    prepare = ReportPrograms.prepare

    def slow_prepare(self: ReportPrograms) -> None:
        release.wait(10)
        prepare(self)

    monkeypatch.setattr(ReportPrograms, "prepare", slow_prepare)
    service = AccessLogService()
    service.activate(snapshot)  # would block here for 10 s if it prepared in line
    programs = service.programs
    assert programs is not None
    assert programs.ready("http", REPORTERS[0]) is None
    assert programs.dispatch("http", [entry()], REPORTERS[0]) > 0  # the general path serves
    release.set()
    for _ in range(200):
        if programs.ready("http", REPORTERS[0]) is not None:
            break
        await asyncio.sleep(0.05)
    assert programs.ready("http", REPORTERS[0]) is not None
