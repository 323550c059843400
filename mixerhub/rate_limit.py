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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2
from prometheus_client import Counter

from mixerhub.monitoring import REGISTRY
from mixerhub.ratelimit.backend import Backend, Charge, MemoryBackend, Outcome
from mixerhub.ratelimit.matching import Domain, Limit, RateLimits, Unit
from mixerhub.snapshot import Snapshot

log = logging.getLogger("mixerhub.rate_limit")

DECISIONS = Counter(
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
# envoyproxy/ratelimit's per-limit stats; descriptor is the matched configuration path
# (key_value joined with "."), or the request's entries with detailed_metric.
_LABELS = ["domain", "descriptor"]
TOTAL_HITS = Counter(
    "mixerhub_ratelimit_total_hits", "Hits on a limit.", _LABELS, registry=REGISTRY
)
OVER_LIMIT = Counter(
    "mixerhub_ratelimit_over_limit", "Hits over a limit.", _LABELS, registry=REGISTRY
)
NEAR_LIMIT = Counter(
    "mixerhub_ratelimit_near_limit",
    "Hits that left a limit at least 80% used.",
    _LABELS,
    registry=REGISTRY,
)
SHADOW_MODE = Counter(
    "mixerhub_ratelimit_shadow_mode",
    "Hits over a shadow-mode limit, answered OK.",
    _LABELS,
    registry=REGISTRY,
)

_Response = rls_pb2.RateLimitResponse
_OK = _Response.Code.OK
_OVER = _Response.Code.OVER_LIMIT
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


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, backend: Backend | None = None) -> None:
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self.limits = RateLimits()

    async def close(self) -> None:
        """Release the backend's connections (the Redis backend's pool)."""
        aclose = getattr(self.backend, "aclose", None)
        if aclose is not None:
            await aclose()

    def activate(self, snapshot: Snapshot) -> None:
        """A new snapshot: the next call matches its limits (the counters stay)."""
        self.limits = snapshot.rate_limits

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext | None
    ) -> rls_pb2.RateLimitResponse:
        try:
            response = await self.decide(request)
        except Exception:
            log.exception("ShouldRateLimit failed for domain %r; answering OK", request.domain)
            ERRORS.inc()
            response = _Response(
                overall_code=_OK,
                statuses=[_Response.DescriptorStatus(code=_OK)] * len(request.descriptors),
            )
        DECISIONS.labels("OVER_LIMIT" if response.overall_code == _OVER else "OK").inc()
        return response

    async def decide(self, request: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        descriptors = request.descriptors
        statuses = [_Response.DescriptorStatus(code=_OK) for _ in descriptors]
        domain = self.limits.domains.get(request.domain)
        if domain is None:
            return _Response(overall_code=_OK, statuses=statuses)
        hits = request.hits_addend or 1
        entries = [tuple((e.key, e.value) for e in d.entries) for d in descriptors]
        limits = [_limit(domain, d, e) for d, e in zip(descriptors, entries, strict=True)]
        replaced = frozenset().union(*(lim.replaces for lim in limits if lim is not None))
        charged: list[tuple[int, Limit, str]] = []
        charges: list[Charge] = []
        for i, limit in enumerate(limits):
            if limit is None or (limit.name and limit.name in replaced):
                continue
            label = _label(limit, entries[i])
            _child(TOTAL_HITS, domain.name, label).inc(hits)
            if limit.unlimited:
                statuses[i].limit_remaining = _MAX_UINT32
                continue
            charged.append((i, limit, label))
            charges.append(
                Charge(
                    (domain.name, entries[i]),
                    hits,
                    limit.requests_per_unit,
                    limit.unit_seconds,
                    limit.algorithm,
                    enforced=not limit.shadow_mode,
                )
            )
        outcomes = await self.backend.take(charges) if charges else ()
        over = False
        for (i, limit, label), outcome in zip(charged, outcomes, strict=True):
            _count(domain.name, label, limit, hits, outcome)
            denied = outcome.over_limit and not limit.shadow_mode
            over = over or denied
            statuses[i] = _Response.DescriptorStatus(
                code=_OVER if denied else _OK,
                current_limit=_rate_limit(limit),
                limit_remaining=0 if outcome.over_limit else outcome.remaining,
                duration_until_reset=duration_pb2.Duration(seconds=math.ceil(outcome.reset_after)),
            )
        response = _Response(overall_code=_OVER if over else _OK, statuses=statuses)
        if charged:
            response.response_headers_to_add.extend(_headers(statuses))
        return response


def _rate_limit(limit: Limit) -> rls_pb2.RateLimitResponse.RateLimit:
    """The limit as the response states it; made once per configured limit."""
    message = _RATE_LIMITS.get(limit)
    if message is None:
        if len(_RATE_LIMITS) >= _MAX_CHILDREN:  # limits from Envoy's overrides come and go
            _RATE_LIMITS.clear()
        message = _RATE_LIMITS[limit] = _Response.RateLimit(
            name=limit.name, requests_per_unit=limit.requests_per_unit, unit=_UNITS[limit.unit]
        )
    return message


_RATE_LIMITS: dict[Limit, rls_pb2.RateLimitResponse.RateLimit] = {}


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


def _count(domain: str, label: str, limit: Limit, hits: int, outcome: Outcome) -> None:
    if outcome.over_limit:
        _child(OVER_LIMIT, domain, label).inc(hits)
        if limit.shadow_mode:
            _child(SHADOW_MODE, domain, label).inc(hits)
    elif outcome.charged and (limit.requests_per_unit - outcome.remaining) * 5 >= (
        limit.requests_per_unit * 4
    ):
        _child(NEAR_LIMIT, domain, label).inc(hits)


# prometheus_client's labels() validates and locks on every call; a decision counts three or
# four series, the same ones again and again. Bounded: detailed_metric labels carry values.
_CHILDREN: dict[tuple[int, str, str], Counter] = {}
_MAX_CHILDREN = 10_000


def _child(metric: Counter, domain: str, label: str) -> Counter:
    key = (id(metric), domain, label)
    child = _CHILDREN.get(key)
    if child is None:
        if len(_CHILDREN) >= _MAX_CHILDREN:
            _CHILDREN.clear()
        child = _CHILDREN[key] = metric.labels(domain, label)
    return child


def _headers(
    statuses: Sequence[rls_pb2.RateLimitResponse.DescriptorStatus],
) -> list[base_pb2.HeaderValue]:
    limited = [s for s in statuses if s.HasField("current_limit")]
    tightest = min(limited, key=lambda s: s.limit_remaining)
    return [
        base_pb2.HeaderValue(
            key="RateLimit-Limit", value=str(tightest.current_limit.requests_per_unit)
        ),
        base_pb2.HeaderValue(key="RateLimit-Remaining", value=str(tightest.limit_remaining)),
        base_pb2.HeaderValue(
            key="RateLimit-Reset", value=str(tightest.duration_until_reset.seconds)
        ),
    ]
