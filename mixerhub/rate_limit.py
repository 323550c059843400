"""envoy.service.ratelimit.v3.RateLimitService: Envoy's global rate-limit calls.

Each descriptor of a request finds its limit in the active snapshot's RateLimitConfigs
(mixerhub.ratelimit.matching) and the limited ones are charged together through a backend
(mixerhub.ratelimit.backend): when one is over its limit, none is charged. The answer follows
envoyproxy/ratelimit (src/service/ratelimit.go): an unknown domain or a descriptor that matches
no limit is OK with no current_limit; an unlimited one is OK with limit_remaining MaxUint32; a
limit named in another matched limit's ``replaces`` is skipped; a shadow-mode limit is counted
but answers OK; the request is OVER_LIMIT when any descriptor is. Errors answer OK (Envoy's
failure_mode_deny is false by default), are logged and counted: a call never raises.

Envoy itself turns the statuses into X-RateLimit-* headers (enable_x_ratelimit_headers), so the
hub adds only the unprefixed RateLimit-Limit / RateLimit-Remaining / RateLimit-Reset of the
later IETF drafts, from the same status Envoy picks: the limited one with the least remaining.

The gRPC method reads and writes bytes itself (ratelimit/wire.py): each distinct descriptor of a
domain is worked out once per snapshot into a plan (its limit, its charge, its metric series,
its current_limit as bytes), found again by the descriptor's serialized bytes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY, Count, LoopCounter
from mixerhub.ratelimit import wire
from mixerhub.ratelimit.backend import Backend, Charge, MemoryBackend, Outcome
from mixerhub.ratelimit.matching import Domain, Limit, RateLimits, Unit
from mixerhub.snapshot import Snapshot

log = logging.getLogger("mixerhub.rate_limit")

# Counted on the event loop, every call: plain ints (mixerhub.monitoring.LoopCounter), where
# prometheus_client's Counter takes a lock per increment.
DECISIONS = LoopCounter(
    "mixerhub_ratelimit_decisions",
    "ShouldRateLimit calls answered, by overall code.",
    ["code"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "mixerhub_ratelimit_errors",
    "ShouldRateLimit calls that failed inside the hub and were answered OK.",
    registry=REGISTRY,
)
MALFORMED = Counter(
    "mixerhub_ratelimit_malformed_requests",
    "ShouldRateLimit calls whose request could not be parsed, answered INVALID_ARGUMENT.",
    registry=REGISTRY,
)
# envoyproxy/ratelimit's per-limit stats; descriptor is the matched configuration path
# (key_value joined with "."), or the request's entries with detailed_metric.
_LABELS = ["domain", "descriptor"]
TOTAL_HITS = LoopCounter(
    "mixerhub_ratelimit_total_hits", "Hits on a limit.", _LABELS, registry=REGISTRY
)
OVER_LIMIT = LoopCounter(
    "mixerhub_ratelimit_over_limit", "Hits over a limit.", _LABELS, registry=REGISTRY
)
NEAR_LIMIT = LoopCounter(
    "mixerhub_ratelimit_near_limit",
    "Hits that left a limit at least 80% used.",
    _LABELS,
    registry=REGISTRY,
)
SHADOW_MODE = LoopCounter(
    "mixerhub_ratelimit_shadow_mode",
    "Hits over a shadow-mode limit, answered OK.",
    _LABELS,
    registry=REGISTRY,
)

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"

_Response = rls_pb2.RateLimitResponse
_OK, _OVER = wire.OK, wire.OVER_LIMIT
_MAX_UINT32 = 2**32 - 1
_UNITS: dict[Unit, int] = {
    "second": _Response.RateLimit.Unit.SECOND,
    "minute": _Response.RateLimit.Unit.MINUTE,
    "hour": _Response.RateLimit.Unit.HOUR,
    "day": _Response.RateLimit.Unit.DAY,
    "week": _Response.RateLimit.Unit.WEEK,
    "month": _Response.RateLimit.Unit.MONTH,
    "year": _Response.RateLimit.Unit.YEAR,
}
_UNIT_NAMES: dict[int, Unit] = {v: k for k, v in _UNITS.items()}
_OK_STATUS = wire.status_without_limit(_OK)
_UNLIMITED_STATUS = wire.status_without_limit(_OK, _MAX_UINT32)
_DECIDED_OK = DECISIONS.labels("OK")
_DECIDED_OVER = DECISIONS.labels("OVER_LIMIT")
# Distinct descriptors remembered per domain; past this (e.g. one per client address) the
# plans start afresh.
_MAX_PLANS = 50_000


class RateLimitService:
    def __init__(self, backend: Backend | None = None) -> None:
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        # A backend that answers from memory is asked without a coroutine.
        self._take_now: Callable[[Sequence[Charge]], Sequence[Outcome]] | None = getattr(
            self.backend, "take_now", None
        )
        self.limits = RateLimits()
        self._domains: dict[bytes, DomainPlans] = {}

    async def close(self) -> None:
        """Release the backend's connections (the Redis backend's pool)."""
        aclose = getattr(self.backend, "aclose", None)
        if aclose is not None:
            await aclose()

    def activate(self, snapshot: Snapshot) -> None:
        """A new snapshot: the next call matches its limits (the counters stay), and every plan
        made from the previous one is dropped."""
        self.limits = snapshot.rate_limits
        self._domains = {
            name.encode(): DomainPlans(domain) for name, domain in self.limits.domains.items()
        }

    def plans(self, domain: str) -> DomainPlans | None:
        """The active plans of a domain (None when the snapshot has no such domain)."""
        return self._domains.get(domain.encode())

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """ShouldRateLimit as grpc.aio serves it: the request's bytes in, the response's out."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                    self.should_rate_limit_bytes,
                    request_deserializer=None,
                    response_serializer=None,
                )
            },
        )

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext | None
    ) -> rls_pb2.RateLimitResponse:
        """The same decision for a request as a message (tests, in-process callers)."""
        data = await self.should_rate_limit_bytes(request.SerializeToString(), context)
        return _Response.FromString(data)

    async def should_rate_limit_bytes(
        self, data: bytes, context: grpc.aio.ServicerContext | None
    ) -> bytes:
        """A serialized RateLimitResponse for a serialized RateLimitRequest. A request that is
        not one is refused with INVALID_ARGUMENT (Envoy's failure_mode_deny then decides);
        any other failure answers OK."""
        descriptors: list[bytes] = []
        try:
            domain, descriptors, hits = wire.read_request(data)
            answer, over = await self.decide(domain, descriptors, hits)
        except wire.MalformedRequest as e:
            MALFORMED.inc()
            if context is None:
                raise
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed RateLimitRequest: {e}"
            )
            raise  # abort raises; this keeps the type checker certain of it
        except Exception:
            log.exception("ShouldRateLimit failed; answering OK")
            ERRORS.inc()
            answer, over = _all_ok(len(descriptors)), False
        (_DECIDED_OVER if over else _DECIDED_OK).inc()
        return answer

    async def decide(
        self, domain: bytes, descriptors: list[bytes], hits: int
    ) -> tuple[bytes, bool]:
        """The serialized response, and whether it is OVER_LIMIT."""
        plans_of = self._domains.get(domain)
        if plans_of is None:
            try:
                domain.decode()
            except UnicodeDecodeError:
                raise wire.MalformedRequest("the domain is not UTF-8") from None
            return _all_ok(len(descriptors)), False
        known = plans_of.known
        plans = [known.get(d) or plans_of.plan(d) for d in descriptors]
        hits = hits or 1
        replaced = [p.replaces for p in plans if p.replaces]
        skipped = frozenset().union(*replaced) if replaced else frozenset()
        statuses: list[bytes] = []
        charged: list[tuple[int, DescriptorPlan]] = []
        charges: list[Charge] = []
        for i, plan in enumerate(plans):
            if plan.total_hits is None or (skipped and plan.name and plan.name in skipped):
                statuses.append(_OK_STATUS)
                continue
            plan.total_hits.inc(hits)
            if plan.unlimited:
                statuses.append(_UNLIMITED_STATUS)
                continue
            statuses.append(b"")  # its outcome's, below
            charged.append((i, plan))
            charges.append(plan.charge if hits == 1 else plan.charge_of(hits))
        if not charges:
            return wire.response(_OK, statuses), False
        take_now = self._take_now
        outcomes = take_now(charges) if take_now is not None else await self.backend.take(charges)
        over = False
        tightest: tuple[DescriptorPlan, int, int] | None = None
        for (i, plan), outcome in zip(charged, outcomes, strict=True):
            code = _OK
            if outcome.over_limit:
                plan.count_over(hits)
                remaining = 0
                if not plan.shadow_mode:
                    code = _OVER
                    over = True
            else:
                remaining = outcome.remaining
                if outcome.charged and remaining * 5 <= plan.requests_per_unit:
                    plan.count_near(hits)  # at least 80% used
            reset = math.ceil(outcome.reset_after)
            statuses[i] = wire.status(code, plan.current_limit, remaining, reset)
            if tightest is None or remaining < tightest[1]:
                tightest = (plan, remaining, reset)
        assert tightest is not None
        headers = tightest[0].limit_header + wire.remaining_headers(tightest[1], tightest[2])
        return wire.response(_OVER if over else _OK, statuses, headers), over


@functools.lru_cache(maxsize=64)
def _all_ok(descriptors: int) -> bytes:
    return wire.response(_OK, [_OK_STATUS] * descriptors)


class DescriptorPlan:
    """What one descriptor of one domain leads to, the same on every request until the
    configuration changes: its limit, the charge it makes, its metric series and the pieces of
    its status."""

    __slots__ = (
        "_domain", "_label", "charge", "current_limit", "limit", "limit_header", "name",
        "replaces", "requests_per_unit", "shadow_mode", "total_hits", "unlimited",
    )  # fmt: skip

    def __init__(self, domain: str, entries: tuple[tuple[str, str], ...], limit: Limit | None):
        self.limit = limit
        self.name = limit.name if limit is not None else ""
        self.replaces = limit.replaces if limit is not None else frozenset()
        self.unlimited = limit is not None and limit.unlimited
        self.shadow_mode = limit is not None and limit.shadow_mode
        self.requests_per_unit = limit.requests_per_unit if limit is not None else 0
        self._domain = domain
        self._label = "" if limit is None else _label(limit, entries)
        # None: the descriptor matches no limit, and is answered OK without one.
        self.total_hits = None if limit is None else _child(TOTAL_HITS, domain, self._label)
        self.charge = Charge(
            (domain, entries),
            1,
            self.requests_per_unit,
            limit.unit_seconds if limit is not None else 1,
            limit.algorithm if limit is not None else "fixed_window",
            enforced=not self.shadow_mode,
        )
        rate_limit = (
            _Response.RateLimit(
                name=limit.name, requests_per_unit=limit.requests_per_unit, unit=_UNITS[limit.unit]
            )
            if limit is not None
            else _Response.RateLimit()
        )
        self.current_limit = wire.current_limit(rate_limit)
        self.limit_header = wire.limit_header(self.requests_per_unit)

    def charge_of(self, hits: int) -> Charge:
        c = self.charge
        return Charge(c.key, hits, c.limit, c.unit_seconds, c.algorithm, c.enforced)

    def count_over(self, hits: int) -> None:
        _child(OVER_LIMIT, self._domain, self._label).inc(hits)
        if self.shadow_mode:
            _child(SHADOW_MODE, self._domain, self._label).inc(hits)

    def count_near(self, hits: int) -> None:
        _child(NEAR_LIMIT, self._domain, self._label).inc(hits)


class DomainPlans:
    """A domain's descriptor plans, by the descriptor's serialized bytes (which carry Envoy's
    limit override too). Made afresh for every snapshot."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.known: dict[bytes, DescriptorPlan] = {}

    def plan(self, descriptor: bytes) -> DescriptorPlan:
        """The plan of a descriptor not seen yet; MalformedRequest when it is not one."""
        try:
            message = ratelimit_pb2.RateLimitDescriptor.FromString(descriptor)
        except DecodeError as e:
            raise wire.MalformedRequest(f"a descriptor: {e}") from None
        entries = tuple((e.key, e.value) for e in message.entries)
        plan = DescriptorPlan(self.domain.name, entries, _limit(self.domain, message, entries))
        if len(self.known) >= _MAX_PLANS:
            self.known.clear()
        self.known[descriptor] = plan
        return plan


def _limit(
    domain: Domain,
    descriptor: ratelimit_pb2.RateLimitDescriptor,
    entries: Sequence[tuple[str, str]],
) -> Limit | None:
    if descriptor.HasField("limit"):
        # A limit override from Envoy's route (envoyproxy/ratelimit: it wins over the config).
        override = descriptor.limit
        unit = _UNIT_NAMES.get(override.unit)
        if unit is None:
            return None
        path = ".".join(k for k, _ in entries)
        return Limit(override.requests_per_unit, unit, path=path)
    return domain.find(entries)


def _label(limit: Limit, entries: Sequence[tuple[str, str]]) -> str:
    if limit.detailed_metric:
        return ".".join(f"{k}_{v}" for k, v in entries)
    return limit.path


# A series is found once: plans hold their series.
# Bounded: detailed_metric labels carry values.
_CHILDREN: dict[tuple[int, str, str], Count] = {}
_MAX_CHILDREN = 10_000


def _child(metric: LoopCounter, domain: str, label: str) -> Count:
    key = (id(metric), domain, label)
    child = _CHILDREN.get(key)
    if child is None:
        if len(_CHILDREN) >= _MAX_CHILDREN:
            _CHILDREN.clear()
        child = _CHILDREN[key] = metric.labels(domain, label)
    return child
