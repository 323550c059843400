"""Access-log entries straight to report instances: one generated function per entry type,
reporter side and set of rules.

The general report path (ReportDispatcher.report) extracts each entry's attributes into a dict
(BagPlan) and then runs each rule over that dict. On Istio's default telemetry much of an
entry's cost there is moving values in and out of dicts. Here one generated function loops over
a message's entries instead: the attributes are its locals, computed by the snippets BagPlan
uses; each rule's match and field expressions are compiled against those locals by the
expression compiler; and whatever depends only on the reporting workload (its identity, and
every expression over it alone: half of Istio's metric labels) is computed once per message,
before the loop. A metric's dimensions (a label set) are made once per distinct values in a
message, and the entries that share them share one map, whose labels a handler reads once per
run of such entries.

The general path stays the reference, and the fallback: an entry on which one of a rule's
expressions fails goes through that rule's general path, which skips and counts just the
instances that cannot be built; so does every entry the rule applies to when an expression over
the reporter alone failed. Attribute generators (kubernetesenv) run first for each entry, on a
dict of what they read and produce. A rule with an instance that cannot be generated for leaves
its set of rules on the general path.
"""

from __future__ import annotations

import linecache
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixerhub.access_log_attributes import (
    HTTP_EXTRACTORS,
    LOCALS,
    TCP_EXTRACTORS,
    BagPlan,
    ExtractBag,
    Reporter,
    attribute_snippet,
    plan_namespace,
    request_header_present,
)
from mixerhub.attributes import ValueType
from mixerhub.bag import ABSENT
from mixerhub.dispatcher import (
    Call,
    Preprocessor,
    ReportDispatcher,
    ReportRoute,
    apply_route,
    hand_over,
)
from mixerhub.expression import typed
from mixerhub.expression.compile import Generator, inline_code
from mixerhub.store.mixer_kinds import Evaluator, InstanceBuilder, InstanceCode
from mixerhub.templates import MetricInstance

log = logging.getLogger("mixerhub.access_log")

# The generated function: (entries, reporter, output lists, fallback(route index, entry)).
Dispatch = Callable[[Sequence[Any], Reporter, list[list[Any]], Callable[[int, Any], None]], None]

_MAX_PROGRAMS = 1_000  # sets of routes come from the configuration, but stay bounded


@dataclass(frozen=True, slots=True)
class Program:
    """One generated dispatch function; output list ``i`` is the batch for ``calls[i]``."""

    function: Dispatch
    routes: tuple[ReportRoute, ...]
    calls: tuple[Call, ...]
    source: str
    filename: str


class ReportPrograms:
    """The report side of one snapshot, for access-log entries: a Program per entry type,
    reporter side and set of routes (the mesh-wide rules alone, or with a namespace's own).

    ``prepare`` generates them all; until it has, entries take the general path. Generating
    one takes tens of milliseconds, which a message's entries (and the Checks sharing the
    event loop) must not wait for: the hub prepares them in a thread of their own.
    """

    def __init__(
        self, reports: ReportDispatcher, plan: BagPlan, attributes: Mapping[str, ValueType]
    ) -> None:
        self.reports, self.plan, self.attributes = reports, plan, attributes
        self._programs: dict[tuple[str, bool, tuple[int, ...]], Program | None] = {}

    def prepare(self) -> None:
        """Generate every program; safe to run in another thread. A program that cannot be
        generated leaves its entries on the general path."""
        for routes in self.reports.route_sets():
            for kind in ("http", "tcp"):
                for inbound in (True, False):
                    try:
                        self._program(kind, inbound, routes)
                    except Exception:  # a bug here must not cost more than the speed-up
                        log.exception("access-log rules take the general path")

    def program(self, kind: str, reporter: Reporter) -> Program | None:
        """The program for ``kind`` ("http" or "tcp") entries from ``reporter``, generated now
        if it was not yet; None when they go the general way."""
        routes = self.reports.routes_for(reporter.namespace)
        return self._program(kind, reporter.kind == "inbound", routes)

    def ready(self, kind: str, reporter: Reporter) -> Program | None:
        """The program, if it has been generated (never generating one)."""
        routes = self.reports.routes_for(reporter.namespace)
        return self._programs.get((kind, reporter.kind == "inbound", tuple(id(r) for r in routes)))

    def _program(self, kind: str, inbound: bool, routes: tuple[ReportRoute, ...]) -> Program | None:
        key = (kind, inbound, tuple(id(r) for r in routes))
        try:
            return self._programs[key]
        except KeyError:
            pass
        program = (
            generate(kind, inbound, routes, self.attributes, self.reports.preprocessor)
            if routes
            else None
        )
        if len(self._programs) >= _MAX_PROGRAMS:
            self._programs.clear()
        self._programs[key] = program
        return program

    def dispatch(self, kind: str, entries: Sequence[Any], reporter: Reporter) -> int:
        """The entries through the report rules of the reporter's namespace, each handler
        getting its instances in one call. Returns how many instances were dispatched. Never
        raises."""
        extract: ExtractBag = (
            self.plan.http_for(reporter) if kind == "http" else self.plan.tcp_for(reporter)
        )
        program = self.ready(kind, reporter)
        if program is None:
            bags = [extract(e, reporter) for e in entries]
            return self.reports.report(bags, reporter.namespace)
        outputs: list[list[Any]] = [[] for _ in program.calls]
        batches = {c.method: (c, out) for c, out in zip(program.calls, outputs, strict=True)}
        routes, preprocessor, namespace = (
            program.routes,
            self.reports.preprocessor,
            reporter.namespace,
        )

        def fallback(route: int, entry: Any) -> None:
            bag = extract(entry, reporter)
            if preprocessor is not None:
                preprocessor.generate(bag, namespace)
            apply_route(routes[route], bag, batches)

        program.function(entries, reporter, outputs, fallback)
        return hand_over(batches.values())


def generate(
    kind: str,
    inbound: bool,
    routes: Sequence[ReportRoute],
    attributes: Mapping[str, ValueType],
    preprocessor: Preprocessor | None = None,
) -> Program | None:
    """``def dispatch(entries, reporter, outputs, fallback)`` for these routes; None when some
    instance cannot be generated for. With a preprocessor (attribute generators), each entry's
    generators run first, on a dict of just the attributes they read and produce, and the
    attributes they produce are read from it."""
    label = (
        f"{kind} {'inbound' if inbound else 'outbound'}: {', '.join(r.rule.name for r in routes)}"
    )
    code = _Code(kind, inbound, label, preprocessor)
    calls: dict[Any, int] = {}  # handler method -> output list
    call_list: list[Call] = []
    for route in routes:
        for call in route.calls:
            if call.method not in calls:
                calls[call.method] = len(call_list)
                call_list.append(call)
    rule_blocks: list[list[str]] = []
    for index, route in enumerate(routes):
        block = code.rule(index, route, attributes, calls)
        if block is None:
            return None
        rule_blocks.append(block)
    source = code.source(rule_blocks, len(call_list))
    filename = f"<access-log dispatch {label[:200]}>"
    try:
        compiled = compile(source, filename, "exec")
    except (SyntaxError, RecursionError, MemoryError):  # past what Python's compiler takes
        log.warning("access-log rules %s take the general path: too large to generate", label)
        return None
    exec(compiled, code.namespace)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return Program(code.namespace["dispatch"], tuple(routes), tuple(call_list), source, filename)


def _label_set(cls: type[Any], field: str) -> bool:
    """Whether a map field holds a label set: few distinct values, entry after entry."""
    return cls is MetricInstance and field == "dimensions"


class _Failed:
    """What a per-message expression holds when it failed: its rules take the general path."""

    def __repr__(self) -> str:
        return "<failed>"


_FAILED = _Failed()


class _Fallback(Exception):
    """Raised in generated code to send an entry through a rule's general path."""


def _absent(name: str) -> Any:
    raise KeyError(name)  # what reading an absent attribute from a bag raises


class _Code:
    """The parts of one generated dispatch function, put together by ``source``."""

    def __init__(
        self, kind: str, inbound: bool, label: str, preprocessor: Preprocessor | None
    ) -> None:
        self.kind, self.inbound = kind, inbound
        self.extractors = HTTP_EXTRACTORS if kind == "http" else TCP_EXTRACTORS
        self.generator = _LocalGenerator(
            label, self._attribute, self._define_local if kind == "http" else None
        )
        self.namespace = self.generator.namespace
        self.namespace.update(plan_namespace(self.extractors))
        self.namespace.update(
            {"_A": ABSENT, "_absent": _absent, "_F": _FAILED, "_Fallback": _Fallback}
        )
        self.per_message: list[str] = []  # attributes and expressions fixed for a message
        self.per_entry: list[str] = []  # attributes of each entry
        self.entry_locals: set[str] = set()
        self.fixed_attributes: set[str] = set()
        self.fixed: dict[tuple[str, ValueType | None], str] = {}  # expression -> local
        self.never_absent = self.generator.never_absent
        self.raw: dict[str, str] = {}  # attribute -> local, as the entry carries it
        self.always_absent: set[str] = set()
        self.generated: list[str] = []  # the attribute generators' run, and what they produce
        self.produced: frozenset[str] = frozenset()
        if preprocessor is not None:
            self._preprocess(preprocessor)

    def _preprocess(self, preprocessor: Preprocessor) -> None:
        """Each entry's generators run on a dict holding what they read, and the attributes
        they produce that the entry already carries (those are kept, as in Mixer)."""
        self.produced = preprocessor.produced
        self.namespace["_generate"] = preprocessor.generate
        lines = ["pre = {}"]
        for name in sorted(preprocessor.referenced | preprocessor.produced):
            local = self._raw(name)
            if local in self.always_absent:
                continue
            if local in self.never_absent:
                lines.append(f"pre[{name!r}] = {local}")
            else:
                lines.append(f"if {local} is not _A: pre[{name!r}] = {local}")
        lines.append("_generate(pre, reporter.namespace)")
        self.generated = lines

    # --- attributes -------------------------------------------------------------------------

    def _attribute(self, name: str) -> str:
        """The local holding attribute ``name`` (ABSENT when absent), defined on first use."""
        local = self.generator.attribute_locals.get(name)
        if local is not None:
            return local
        if name in self.produced:  # from the generators' dict, after they ran
            local = f"g{len(self.generator.attribute_locals)}"
            self.generated.append(f"{local} = pre.get({name!r}, _A)  # {name}")
        else:
            local = self._raw(name)
        self.generator.attribute_locals[name] = local
        return local

    def _raw(self, name: str) -> str:
        """The local holding attribute ``name`` as the entry carries it, defined on first use."""
        local = self.raw.get(name)
        if local is not None:
            return local
        local = self.raw[name] = f"a{len(self.raw)}"
        snippet = attribute_snippet(self.kind, name, self.inbound)
        if snippet is None:
            if name not in self.extractors:
                self._fixed_attribute(name, local, "_A")  # no entry of this type carries it
                return local
            self._define("context", "EntryContext(entry, reporter)")
            self.per_entry.append(f"{local} = extractors[{name!r}](context)  # {name}")
            return local
        if snippet.code == "ABSENT":
            self._fixed_attribute(name, local, "_A")
            return local
        if not snippet.absent:
            self.never_absent.add(local)
        if not snippet.needs and "entry" not in snippet.code:
            self._fixed_attribute(name, local, snippet.code)  # the reporter's alone
            return local
        for need in snippet.needs:
            self._define_local(need)
        self.per_entry.append(f"{local} = {snippet.code}  # {name}")
        return local

    def _fixed_attribute(self, name: str, local: str, code: str) -> None:
        if code == "_A":
            self.always_absent.add(local)
        if name not in self.produced:  # what the generators produce differs entry by entry
            self.fixed_attributes.add(name)
        self.per_message.append(f"{local} = {code}  # {name}")

    def _define_local(self, name: str) -> None:
        if name in self.entry_locals:
            return
        snippet = LOCALS[name]
        for need in snippet.needs:
            self._define_local(need)
        self._define(name, snippet.code)

    def _define(self, name: str, code: str) -> None:
        if name not in self.entry_locals:
            self.entry_locals.add(name)
            self.per_entry.append(f"{name} = {code}")

    # --- expressions and rules ----------------------------------------------------------------

    def expression(
        self, source: str, attributes: Mapping[str, ValueType], expected: ValueType | None
    ) -> tuple[str, str | None] | None:
        """``source`` as code over the attribute locals, and the local it was computed into
        once per message when it reads only what is fixed for a message (else None)."""
        inlined = inline_code(self.generator, source, attributes, expected)
        if inlined is None:
            return None
        code, referenced = inlined
        if not referenced <= self.fixed_attributes:
            return code, None
        key = (source, expected)
        local = self.fixed.get(key)
        if local is None:
            local = self.fixed[key] = f"h{len(self.fixed)}"
            self.per_message += [
                "try:",
                f"    {local} = {code}  # {source[:80]!r}",
                "except Exception:",
                f"    {local} = _F",
            ]
        return code, local

    def rule(
        self,
        index: int,
        route: ReportRoute,
        attributes: Mapping[str, ValueType],
        calls: Mapping[Any, int],
    ) -> list[str] | None:
        """The loop body's lines for one rule, or None when it cannot be generated."""
        builders = [c.instance.build for c in route.calls]
        if not all(isinstance(b, InstanceBuilder) and b.message.memoize for b in builders):
            return None
        fixed_used: list[str] = []
        body: list[str] = []
        match = "True"
        if route.rule.match is not None:
            compiled = self.expression(route.rule.match.source, attributes, ValueType.BOOL)
            if compiled is None:
                return None
            match, fixed_local = compiled
            if fixed_local is not None:
                # A match that failed holds _F, which is not True: the rule does not apply, as
                # in the general path.
                match = fixed_local
        local: dict[Evaluator, str] = {}
        per_rule: dict[tuple[str, ValueType | None], str] = {}
        for builder in builders:
            assert isinstance(builder, InstanceBuilder)
            message = builder.message
            for ev in message.evaluators():
                if ev in local:
                    continue
                inline = message.inline.get(ev)
                if inline is None:
                    return None
                key = (inline.source, inline.expected)
                if key in per_rule:
                    local[ev] = per_rule[key]
                    continue
                compiled = self.expression(inline.source, inline.attributes, inline.expected)
                if compiled is None:
                    return None
                expression_code, fixed_local = compiled
                if fixed_local is not None:
                    fixed_used.append(fixed_local)
                    local[ev] = per_rule[key] = fixed_local
                    continue
                name = local[ev] = per_rule[key] = f"v{index}_{len(per_rule)}"
                body.append(f"{name} = {expression_code}  # {inline.source[:80]!r}")
        construction = InstanceCode(
            self.namespace,
            local,
            prefix=f"m{index}_",
            recurring=_label_set,
            fixed=set(self.fixed.values()),
            batched=True,
        )
        built = [
            construction.instance(b.message, b.name)
            for b in builders
            if isinstance(b, InstanceBuilder)
        ]
        self.per_message += [f"{memo} = {{}}" for memo in construction.memos]
        self.per_message += construction.templates
        body += construction.prelude
        body += [f"n{index}_{i} = {code}" for i, code in enumerate(built)]
        adds = [f"add{calls[c.method]}(n{index}_{i})" for i, c in enumerate(route.calls)]
        lines = [f"# {route.rule.name}", "try:", f"    if ({match}) is True:"]
        failed = " or ".join(f"{h} is _F" for h in dict.fromkeys(fixed_used))
        if failed:
            # An expression over the reporter alone failed: when the rule applies, its general
            # path says which instances can still be built.
            flag = f"r{index}"
            self.per_message.append(f"{flag} = {failed}  # {route.rule.name}")
            lines += [f"        if {flag}:", "            raise _Fallback"]
        lines += [
            *(f"        {line}" for line in body),
            "        ok = True",
            "    else:",
            "        ok = False",
            "except Exception:",
            "    ok = False",
            f"    fallback({index}, entry)",
            "if ok:",
            *(f"    {add}" for add in adds),
        ]
        return lines

    def source(self, rule_blocks: Sequence[Sequence[str]], outputs: int) -> str:
        lines = ["def dispatch(entries, reporter, outputs, fallback):"]
        lines += [f"    add{i} = outputs[{i}].append" for i in range(outputs)]
        lines += [f"    {line}" for line in self.per_message]
        lines.append("    for entry in entries:")
        lines += [f"        {line}" for line in self.per_entry]
        lines += [f"        {line}" for line in self.generated]
        for block in rule_blocks:
            lines += [f"        {line}" for line in block]
        return "\n".join(lines) + "\n"


class _LocalGenerator(Generator):
    """The expression compiler's code generator, reading attributes from the dispatch
    function's locals (ABSENT when absent) rather than from a bag. With ``define_local`` (HTTP
    entries), ``request.headers["name"]`` reads that one header from the entry rather than
    first building every header into a dict."""

    def __init__(
        self,
        label: str,
        attribute_local: Callable[[str], str],
        define_local: Callable[[str], None] | None,
    ) -> None:
        super().__init__(label)
        self.attribute_locals: dict[str, str] = {}
        self.never_absent: set[str] = set()
        self._attribute_local = attribute_local
        self._define_local = define_local

    def _header(self, node: typed.Node) -> str | None:
        """The header a lookup reads, when it is ``request.headers[<constant>]``."""
        if (
            self._define_local is not None
            and isinstance(node, typed.Lookup)
            and isinstance(node.map, typed.Attribute)
            and node.map.name == "request.headers"
            and isinstance(node.key, typed.Const)
            and isinstance(node.key.value, str)
        ):
            self._define_local("request")
            return node.key.value
        return None

    def strict(self, node: typed.Node) -> str:
        name = self._header(node)
        if name is not None:  # Mixer's NLookup: a missing key reads as ""
            return f"_header(request, {name!r}, '')"
        return super().strict(node)

    def present(self, node: typed.Node, out: str) -> str | None:
        name = self._header(node)
        if name is not None:
            inline = request_header_present(name, out)
            if inline is None:
                return f"(({out} := _header(request, {name!r}, _M)) is not _M)"
            assert self._define_local is not None  # as _header made sure
            self._define_local("request_headers")
            return inline
        return super().present(node, out)

    def attribute(self, name: str) -> str:
        local = self._attribute_local(name)
        if local in self.never_absent:
            return local
        return f"({local} if {local} is not _A else _absent({name!r}))"

    def attribute_present(self, name: str, out: str) -> str:
        return f"(({out} := {self._attribute_local(name)}) is not _A)"
