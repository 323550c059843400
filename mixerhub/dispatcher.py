"""The dispatcher: compiled rules applied to one request's attributes, or to a batch of reports.

For a Check, every rule whose match holds and whose actions use check or quota templates runs:
its instances are built from the bag and handed to the handlers. Check actions run first and the
first denial ends the check; quotas are asked for only when every check passed, so a denied
request is never charged. Mixer's rule scoping holds: a rule in the mesh-wide namespace applies to
every request, a rule in another namespace only to workloads of that namespace.

For reports (access-log entries), every rule whose match holds builds its metric, logentry and
tracespan instances; each handler then gets all the instances of a batch of entries in one call,
never one call per entry.

Before either, Mixer's preprocessing: rules whose actions use an attribute generator (the
kubernetes template, with kubernetesenv) run first, and each instance's ``attributeBindings``
bind the handler's output into the bag. Produced values only fill attributes the request did not
carry (Mixer merged its preprocessing output under the request's own attributes). Only the
bindings of attributes that the side's rules read are kept; with none, nothing runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar, cast

from mixerhub import adapter
from mixerhub.adapter import CheckResult, QuotaArgs, QuotaResult, handler_method
from mixerhub.expression import EvaluationError
from mixerhub.monitoring import ADAPTER_ERRORS
from mixerhub.security import ROOT_NAMESPACE
from mixerhub.snapshot import (
    AttributeBinding,
    CompiledInstance,
    CompiledRule,
    HeaderOperation,
    Snapshot,
)
from mixerhub.store.mixer_kinds import GeneratedBuild, report_builder
from mixerhub.templates import Variety
from mixerhub.types import Bag

log = logging.getLogger("mixerhub.dispatcher")

# Quota answers that say the adapter could not decide, rather than that the quota is spent.
_FAILURES = frozenset({adapter.DEADLINE_EXCEEDED, adapter.INTERNAL, adapter.UNAVAILABLE})


@dataclass(frozen=True, slots=True)
class Call:
    """One handler method to call with the instances of one action, resolved at load time."""

    rule: str
    handler: str
    adapter: str
    method: Any  # the bound handle_<template> method
    instance: CompiledInstance
    # A quota handler's handle_quota_now, when it answers from memory: charged without a
    # coroutine on the Check path's fast lane.
    now: Any = None


@dataclass(frozen=True, slots=True)
class CheckRoute:
    rule: CompiledRule
    checks: tuple[Call, ...]
    quotas: tuple[Call, ...]


@dataclass(slots=True)
class CheckOutcome:
    """What the check rules decided, and what the response should carry."""

    status: int = adapter.OK
    message: str = ""
    rule: str = ""
    handler: str = ""
    valid_duration: float = adapter.DEFAULT_VALID_DURATION
    valid_use_count: int = adapter.DEFAULT_VALID_USE_COUNT
    # Rules whose match held: their header operations apply.
    matched: list[CompiledRule] = field(default_factory=list)
    # Set when a handler failed (raised, or its instance could not be built): the failure policy
    # decides what that means; the outcome is never cached.
    failed: bool = False
    quota_used: bool = False
    # The quota charges still to make when the checks passed (CheckDispatcher.check_rules).
    charges: tuple[QuotaCharge, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == adapter.OK

    def deny(self, status: int, message: str, call: Call) -> None:
        self.status, self.message, self.rule, self.handler = (
            status,
            message,
            call.rule,
            call.handler,
        )


class _Routed(Protocol):
    @property
    def rule(self) -> CompiledRule: ...


R = TypeVar("R", bound=_Routed)


class _Scoped(Generic[R]):
    """Routes by Mixer's scoping: mesh-wide rules apply to every namespace, a namespace's own
    rules to its workloads only. The routes for each namespace are put together once."""

    def __init__(self, routes: Sequence[R], mesh_namespace: str) -> None:
        self._mesh = tuple(r for r in routes if r.rule.namespace == mesh_namespace)
        own: dict[str, list[R]] = {}
        for r in routes:
            if r.rule.namespace != mesh_namespace:
                own.setdefault(r.rule.namespace, []).append(r)
        self._own = {namespace: tuple(rs) for namespace, rs in own.items()}
        self._combined: dict[str, tuple[R, ...]] = {}

    def route_sets(self) -> list[tuple[R, ...]]:
        """Every distinct set of routes: the mesh-wide ones alone, and with each namespace's."""
        return [self._mesh, *(self.routes_for(namespace) for namespace in self._own)]

    def routes_for(self, namespace: str) -> tuple[R, ...]:
        routes = self._combined.get(namespace)
        if routes is None:
            routes = self._mesh + self._own.get(namespace, ())
            if len(self._combined) < 10_000:  # namespaces come from the network: bounded
                self._combined[namespace] = routes
        return routes


class CheckDispatcher:
    """The check side of one snapshot: routes built once, applied per request."""

    def __init__(self, snapshot: Snapshot, mesh_namespace: str = ROOT_NAMESPACE) -> None:
        self.mesh_namespace = mesh_namespace
        routes = [r for r in (_route(rule) for rule in snapshot.rules) if r is not None]
        self._scoped = _Scoped(routes, mesh_namespace)
        needed = frozenset().union(*(r.rule.referenced for r in routes))
        self.preprocessor = Preprocessor.build(snapshot.rules, needed, mesh_namespace)
        # The decision depends on the generators' inputs too (and the cache key with it).
        if self.preprocessor is not None:
            needed |= self.preprocessor.referenced
        self.referenced = needed
        self.uses_quota = any(r.quotas for r in routes)
        # Every quota answers from memory: a cached decision's charges never wait.
        self.quotas_answer_now = all(c.now is not None for r in routes for c in r.quotas)
        self.empty = not routes
        # Quota instances a QuotaSpec names are charged only as the bound specs say.
        self._charges = snapshot.quota_charges
        self._governed = snapshot.quota_charges.governed

    def routes_for(self, namespace: str) -> tuple[CheckRoute, ...]:
        return self._scoped.routes_for(namespace)

    @property
    def governed(self) -> bool:
        """Whether QuotaSpecs decide some quota's charge: they read attributes no rule
        references, so a charge prepared for one request may not fit the next."""
        return bool(self._governed)

    async def check(self, bag: Bag, namespace: str, quota_args: QuotaArgs) -> CheckOutcome:
        outcome = await self.check_rules(bag, namespace)
        if outcome.ok and not outcome.failed and outcome.charges:
            await charge(outcome.charges, quota_args, outcome)
        return outcome

    async def check_rules(self, bag: Bag, namespace: str) -> CheckOutcome:
        """The check actions of every matching rule, and, when they all pass, the quota charges
        the request is to make (``outcome.charges``), with their instances built: a decision a
        cache may keep, while the charges are made anew for each request (see ``charge``)."""
        outcome = CheckOutcome()
        if self.preprocessor is not None:
            self.preprocessor.generate(bag, namespace)
        routes = [r for r in self.routes_for(namespace) if _matches(r.rule, bag)]
        outcome.matched = [r.rule for r in routes]
        for route in routes:
            for call in route.checks:
                result = await _check(call, bag, outcome)
                if result is None:
                    return outcome
                outcome.valid_duration = min(outcome.valid_duration, result.valid_duration)
                outcome.valid_use_count = min(outcome.valid_use_count, result.valid_use_count)
                if not result.ok:
                    outcome.deny(result.status, result.message, call)
                    return outcome
        charges: list[QuotaCharge] = []
        amounts: dict[str, int] | None = None
        for route in routes:
            for call in route.quotas:
                amount = 0  # the request's own amount
                if call.instance.name in self._governed:
                    if amounts is None:
                        amounts = self._charges.amounts(bag, namespace)
                    amount = amounts.get(call.instance.name, 0)
                    if amount <= 0:
                        continue  # no bound QuotaSpec asks for this quota
                try:
                    charges.append(QuotaCharge(call, call.instance.build(bag), amount))
                except Exception as e:
                    # Reported when the charge is due, as if built then: an earlier quota may
                    # deny first.
                    charges.append(QuotaCharge(call, None, amount, e))
        outcome.charges = tuple(charges)
        return outcome


@dataclass(frozen=True, slots=True)
class QuotaCharge:
    """One quota a request is charged, its instance built from the request's attributes."""

    call: Call
    instance: Any
    amount: int  # 0: the request's own amount (QuotaArgs.amount); else a QuotaSpec's charge
    error: Exception | None = None  # the instance could not be built


async def charge(
    charges: Sequence[QuotaCharge], quota_args: QuotaArgs, outcome: CheckOutcome | None = None
) -> CheckOutcome | None:
    """Charge each quota in turn; the first one spent denies, and the rest are not asked.

    What a charge denies or fails is recorded in ``outcome``, or in one made then: every charge
    granted, nothing is made (a cached decision's request pays for no outcome), and the given
    outcome (or None) comes back."""
    for c in charges:
        call = c.call
        args = replace(quota_args, amount=c.amount) if c.amount else quota_args
        if outcome is not None:
            outcome.quota_used = True
        if c.error is not None:
            return _fail(call, c.error, outcome)
        try:
            quota: QuotaResult = await call.method(c.instance, args)
        except Exception as e:  # an adapter that broke its word
            return _fail(call, e, outcome)
        outcome, spent = _charged(call, quota, args, outcome)
        if spent:
            return outcome
    return outcome


def charge_now(charges: Sequence[QuotaCharge], quota_args: QuotaArgs) -> CheckOutcome | None:
    """``charge`` for charges whose handlers all answer now (``Call.now``), without a
    coroutine: what a cached decision's request makes on the Check path's fast lane."""
    outcome: CheckOutcome | None = None
    for c in charges:
        call = c.call
        args = replace(quota_args, amount=c.amount) if c.amount else quota_args
        if outcome is not None:
            outcome.quota_used = True
        if c.error is not None:
            return _fail(call, c.error, outcome)
        try:
            quota: QuotaResult = call.now(c.instance, args)
        except Exception as e:  # an adapter that broke its word
            return _fail(call, e, outcome)
        outcome, spent = _charged(call, quota, args, outcome)
        if spent:
            return outcome
    return outcome


def _charged(
    call: Call, quota: QuotaResult, args: QuotaArgs, outcome: CheckOutcome | None
) -> tuple[CheckOutcome | None, bool]:
    """A quota's answer recorded: the outcome (made when something is to be recorded), and
    whether the quota is spent, so that no later one is charged."""
    if quota.status in _FAILURES:
        # The backend failed (a Redis down): the failure policy decides, as for a raise.
        if outcome is None:
            outcome = CheckOutcome(quota_used=True)
        outcome.failed = True
    if quota.amount < args.amount and not (args.best_effort and quota.amount):
        message = quota.message or f"quota {call.instance.name} exhausted"
        status = quota.status if quota.status != adapter.OK else adapter.RESOURCE_EXHAUSTED
        if outcome is None:
            outcome = CheckOutcome(quota_used=True)
        outcome.deny(status, message, call)
        return outcome, True
    return outcome, False
    return outcome


def header_values(operations: Sequence[HeaderOperation], bag: Bag) -> list[tuple[str, str, str]]:
    """(operation, name, value) for each value of each operation that evaluates; REMOVE has ""."""
    out: list[tuple[str, str, str]] = []
    for op in operations:
        if op.operation == "REMOVE":
            out.append((op.operation, op.name, ""))
            continue
        for expr in op.values:
            try:
                value = expr.evaluate(bag)
            except EvaluationError as e:
                log.debug("header %s: %s", op.name, e)
                continue
            out.append((op.operation, op.name, str(value)))
    return out


def _route(rule: CompiledRule) -> CheckRoute | None:
    checks: list[Call] = []
    quotas: list[Call] = []
    for action in rule.actions:
        handler = action.handler.handler
        if handler is None:
            continue
        for instance in action.instances:
            variety = instance.template.variety
            if variety is Variety.REPORT or variety is Variety.ATTRIBUTE_GENERATOR:
                continue
            method = getattr(handler, handler_method(instance.template.name))
            now = getattr(handler, "handle_quota_now", None) if variety is Variety.QUOTA else None
            call = Call(
                rule.name, action.handler.name, action.handler.adapter.name, method, instance, now
            )
            (quotas if variety is Variety.QUOTA else checks).append(call)
    if not (checks or quotas or rule.request_header_operations or rule.response_header_operations):
        return None  # a telemetry-only rule
    return CheckRoute(rule, tuple(checks), tuple(quotas))


def _matches(rule: CompiledRule, bag: Bag) -> bool:
    if rule.match is None:
        return True
    try:
        return rule.match.evaluate(bag) is True
    except EvaluationError as e:
        # Mixer: a rule whose match cannot be evaluated does not apply.
        log.debug("rule %s not applied: %s", rule.name, e)
        return False


async def _check(call: Call, bag: Bag, outcome: CheckOutcome) -> CheckResult | None:
    try:
        instance = call.instance.build(bag)
        result: CheckResult = await call.method(instance)
        return result
    except Exception as e:  # an instance that cannot be built, or an adapter that broke its word
        _fail(call, e, outcome)
        return None


def _fail(call: Call, error: Exception, outcome: CheckOutcome | None) -> CheckOutcome:
    ADAPTER_ERRORS.labels(call.adapter).inc()
    if isinstance(error, EvaluationError):
        reason = f"instance {call.instance.name}: {error}"
    else:
        # The error's own traceback: a quota instance's build error is reported after the fact.
        log.error("handler %s failed", call.handler, exc_info=error)
        reason = f"handler {call.handler} failed"
    if outcome is None:
        outcome = CheckOutcome(quota_used=True)
    outcome.failed = True
    outcome.deny(adapter.INTERNAL, reason, call)
    return outcome


@dataclass(frozen=True, slots=True)
class ReportRoute:
    rule: CompiledRule
    calls: tuple[Call, ...]
    # All the calls' instances from one generated function (its source is kept there, for
    # debugging); None when the instances cannot be generated for, and each builds its own.
    generated: GeneratedBuild | None = None


class ReportDispatcher:
    """The report side of one snapshot: routes built once, applied per batch of entries."""

    def __init__(self, snapshot: Snapshot, mesh_namespace: str = ROOT_NAMESPACE) -> None:
        routes: list[ReportRoute] = []
        for rule in snapshot.rules:
            calls = []
            for action in rule.actions:
                handler = action.handler.handler
                if handler is None:
                    continue
                for instance in action.instances:
                    if instance.template.variety is Variety.REPORT:
                        method = getattr(handler, handler_method(instance.template.name))
                        calls.append(
                            Call(rule.name, action.handler.name, action.handler.adapter.name,
                                 method, instance)
                        )  # fmt: skip
            if calls:
                generated = report_builder(rule.name, [c.instance.build for c in calls])
                routes.append(ReportRoute(rule, tuple(calls), generated))
        self._scoped = _Scoped(routes, mesh_namespace)
        self.empty = not routes
        needed = frozenset().union(*(r.rule.referenced for r in routes))
        self.preprocessor = Preprocessor.build(snapshot.rules, needed, mesh_namespace)

    def routes_for(self, namespace: str) -> tuple[ReportRoute, ...]:
        return self._scoped.routes_for(namespace)

    def route_sets(self) -> list[tuple[ReportRoute, ...]]:
        return self._scoped.route_sets()

    def report(self, bags: Sequence[Bag], namespace: str) -> int:
        """Apply the rules to each bag and hand each handler its instances in one call.
        Returns how many instances were dispatched. Never raises."""
        routes = self.routes_for(namespace)
        if not routes:
            return 0
        batches: dict[Any, tuple[Call, list[Any]]] = {}
        preprocessor = self.preprocessor
        for bag in bags:
            if preprocessor is not None:
                preprocessor.generate(bag, namespace)
            for route in routes:
                apply_route(route, bag, batches)
        return hand_over(batches.values())


def apply_route(route: ReportRoute, bag: Bag, batches: dict[Any, tuple[Call, list[Any]]]) -> None:
    """One rule on one bag: when its match holds, its instances go into ``batches`` (one list
    per handler method). An instance that cannot be built is skipped and counted, as in Mixer."""
    if not _matches(route.rule, bag):
        return
    if route.generated is not None:
        try:
            built = route.generated.function(bag)
        except EvaluationError:
            pass  # the instances' own builders below skip only the failing ones
        else:
            for call, instance in zip(route.calls, built, strict=True):
                batch = batches.get(call.method)
                if batch is None:
                    batches[call.method] = (call, [instance])
                else:
                    batch[1].append(instance)
            return
    for call in route.calls:
        try:
            instance = call.instance.build(bag)
        except EvaluationError as e:
            ADAPTER_ERRORS.labels(call.adapter).inc()
            log.debug("instance %s: %s", call.instance.name, e)
            continue
        batch = batches.get(call.method)
        if batch is None:
            batches[call.method] = (call, [instance])
        else:
            batch[1].append(instance)


def hand_over(batches: Iterable[tuple[Call, list[Any]]]) -> int:
    """Each handler method gets its batch in one call; returns how many instances went out.
    Never raises: an adapter that broke its word must not break ingestion."""
    dispatched = 0
    for call, instances in batches:
        if not instances:
            continue
        dispatched += len(instances)
        try:
            call.method(instances)
        except Exception:
            ADAPTER_ERRORS.labels(call.adapter).inc()
            log.exception("handler %s failed", call.handler)
    return dispatched


# --- preprocessing: attribute generators ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """One attribute generator instance of one action, with the bindings its side needs."""

    rule: str
    handler: str
    adapter: str
    method: Any  # the bound generate_<template>_attributes method
    instance: CompiledInstance
    bindings: tuple[AttributeBinding, ...]
    # The output fields those bindings read, and the names the bindings read them by.
    output_fields: tuple[tuple[str, str], ...]
    # For a handler whose outputs depend on its instance alone: what it produced, by the
    # instance's field values (the output's values, and each binding's value that reads
    # nothing else).
    memo: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any]]] | None = None
    instance_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateRoute:
    rule: CompiledRule
    generations: tuple[Generation, ...]


class Preprocessor:
    """The attribute generators of one side (check or report) of a snapshot."""

    def __init__(self, routes: Sequence[GenerateRoute], mesh_namespace: str) -> None:
        self._scoped = _Scoped(routes, mesh_namespace)
        # What the generators read (their rules' matches and instances), and what they produce.
        self.referenced: frozenset[str] = frozenset().union(*(r.rule.referenced for r in routes))
        self.produced: frozenset[str] = frozenset(
            b.attribute for r in routes for g in r.generations for b in g.bindings
        )

    @classmethod
    def build(
        cls, rules: Iterable[CompiledRule], needed: frozenset[str], mesh_namespace: str
    ) -> Preprocessor | None:
        """The generators whose bindings produce attributes in ``needed`` (or feed another
        generator that does); None when there are none, so a side without them pays nothing."""
        candidates = [
            (rule, action, instance)
            for rule in rules
            for action in rule.actions
            if action.handler.handler is not None
            for instance in action.instances
            if instance.template.variety is Variety.ATTRIBUTE_GENERATOR and instance.bindings
        ]
        wanted = set(needed)
        while True:  # a generator's inputs may be another's outputs
            before = len(wanted)
            for rule, _, instance in candidates:
                if any(b.attribute in wanted for b in instance.bindings):
                    wanted |= rule.referenced
            if len(wanted) == before:
                break
        routes: list[GenerateRoute] = []
        for rule in rules:
            generations = []
            for r, action, instance in candidates:
                if r is not rule:
                    continue
                bindings = tuple(b for b in instance.bindings if b.attribute in wanted)
                if not bindings:
                    continue
                handler = action.handler.handler
                pure = getattr(handler, "outputs_depend_on_instance_alone", False) is True
                generations.append(
                    Generation(
                        rule.name,
                        action.handler.name,
                        action.handler.adapter.name,
                        getattr(handler, handler_method(instance.template.name)),
                        instance,
                        bindings,
                        tuple(
                            (f, instance.template.output_prefix + f)
                            for f in sorted(frozenset().union(*(b.output_fields for b in bindings)))
                        ),
                        {} if pure else None,
                        tuple(f.name for f in dataclasses.fields(instance.template.instance)),
                    )
                )
            if generations:
                routes.append(GenerateRoute(rule, tuple(generations)))
        return cls(routes, mesh_namespace) if routes else None

    def generate(self, bag: Bag, namespace: str) -> None:
        """Fill the bag with what the generators produce. Never raises: a generator that fails
        leaves its attributes absent, and the rules' defaults apply, as in Mixer."""
        # Both paths hand in bags that can take values: a LazyBag or an entry's plain dict.
        target = cast(MutableMapping[str, Any], bag)
        for route in self._scoped.routes_for(namespace):
            if not _matches(route.rule, bag):
                continue
            for g in route.generations:
                missing = [b for b in g.bindings if b.attribute not in target]
                if not missing:
                    continue  # the request carried them all: no lookup at all
                try:
                    instance = g.instance.build(bag)
                except EvaluationError as e:
                    ADAPTER_ERRORS.labels(g.adapter).inc()
                    log.debug("instance %s: %s", g.instance.name, e)
                    continue
                produced = _produced(g, instance)
                if produced is None:
                    continue
                values, fixed = produced
                for b in missing:
                    if not b.reads_request:
                        if b.attribute in fixed:  # absent when its binding failed
                            target[b.attribute] = fixed[b.attribute]
                        continue
                    try:
                        target[b.attribute] = b.evaluate(_Overlay(values, bag))
                    except EvaluationError as e:
                        log.debug("binding %s of %s: %s", b.attribute, g.instance.name, e)


_MAX_MEMO = 10_000  # instances come from the network: bounded


def _produced(g: Generation, instance: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """What one generator instance gives: the output's fields (by the names bindings read
    them by) and the value of each binding that reads nothing else (absent when it fails);
    None when the handler failed. Kept for an instance seen before, when the handler says its
    outputs depend on the instance alone."""
    memo, key = g.memo, None
    if memo is not None:
        key = tuple(getattr(instance, f) for f in g.instance_fields)
        try:
            known = memo.get(key)
        except TypeError:  # a field that cannot be a key (a map): asked every time
            key = None
        else:
            if known is not None:
                return known
    try:
        output = g.method(instance)
    except Exception:  # an adapter that broke its word must not break the request
        ADAPTER_ERRORS.labels(g.adapter).inc()
        log.exception("handler %s failed", g.handler)
        return None
    values: dict[str, Any] = {}
    for name, bound_as in g.output_fields:
        value = getattr(output, name, None)
        # An unset field (zero value) is absent: the binding's `|` default applies.
        if value is not None and value != "" and value != {}:
            values[bound_as] = value
    fixed: dict[str, Any] = {}
    for b in g.bindings:
        if b.reads_request:
            continue
        try:
            fixed[b.attribute] = b.evaluate(values)
        except EvaluationError as e:
            log.debug("binding %s of %s: %s", b.attribute, g.instance.name, e)
    produced = (values, fixed)
    if memo is not None and key is not None:
        if len(memo) >= _MAX_MEMO:
            memo.clear()
        memo[key] = produced
    return produced


class _Overlay(dict[str, Any]):
    """The output's fields, then the request's attributes: for a binding that reads both."""

    __slots__ = ("_bag",)

    def __init__(self, values: dict[str, Any], bag: Bag) -> None:
        super().__init__(values)
        self._bag = bag

    def __missing__(self, name: str) -> Any:
        return self._bag[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default
