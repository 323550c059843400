"""envoy.service.auth.v3.Authorization: Envoy's external authorization calls.

One Check: the calling workload from the call's metadata; the JWT, if RequestAuthentication
applies (an invalid token is a 401); the AuthorizationPolicy decision (a 403); then Mixer's check
and quota rules (their status, mapped to HTTP). An allowed request gets the rules' header
operations and the authentication's headers; a denied one a short body and an
``x-mixerhub-denied-by`` header naming what denied it. Everything runs within a time budget; a
failure inside the hub (a handler that breaks, a budget exceeded) follows the failure policy:
closed by default, like Mixer.

Requests are parsed here from bytes, not by gRPC, so a message protobuf cannot parse (Envoy
passes header bytes through that are not UTF-8) is answered with a denial rather than an error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from mixerhub import adapter
from mixerhub.adapter import QuotaArgs
from mixerhub.bag import ABSENT, LazyBag
from mixerhub.bootstrap import (
    LABELS_HEADER,
    NAMESPACE_HEADER,
    SERVICE_ACCOUNT_HEADER,
    WORKLOAD_HEADER,
)
from mixerhub.check_attributes import EXTRACTORS, CheckBag, CheckContext
from mixerhub.decision_cache import SCALARS, Decision, DecisionCache, freeze
from mixerhub.dispatcher import (
    CheckDispatcher,
    CheckOutcome,
    charge,
    charge_now,
    header_values,
)
from mixerhub.monitoring import LoopCounter, LoopHistogram
from mixerhub.security.authentication import NO_AUTHENTICATION, AuthnResult
from mixerhub.snapshot import BuiltHandler, Snapshot
from mixerhub.templates import Action, AuthorizationInstance, CheckNothingInstance, Subject
from mixerhub.workload import WorkloadIdentity

log = logging.getLogger("mixerhub.ext_authz")

SERVICE = "envoy.service.auth.v3.Authorization"
DENIED_BY_HEADER = "x-mixerhub-denied-by"

# Counted in plain ints: prometheus_client's locked increments are measurable on every Check.
CHECKS = LoopCounter(
    "mixerhub_check",
    "ext_authz Check calls answered, by result and by the rule or policy that decided.",
    ["result", "rule"],
)
CHECK_SECONDS = LoopHistogram(
    "mixerhub_check_duration_seconds",
    "Time to answer one ext_authz Check.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)

# google.rpc.Code -> HTTP status, as gRPC's HTTP mapping (and Mixer's proxy) did.
HTTP_STATUS = {
    0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
    10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip


@dataclass(frozen=True)
class FailurePolicy:
    """What a failure inside the hub means. Mixer's policyCheckFailOpen defaulted to false."""

    fail_open: bool = False
    # Envoy's ext_authz timeout is 200 ms by default; answering well within it keeps the denial
    # (or the allowance) ours rather than Envoy's status_on_error.
    budget: float = 0.15


def _absent(context: CheckContext) -> object:
    return ABSENT


def decision_key(
    attributes: Sequence[str], headers: Sequence[str]
) -> Callable[[CheckContext], Hashable]:
    """A function of a Check's context giving its decision cache key: the workload, each
    attribute's value (frozen when not a plain scalar) and each header's. Generated, so that a
    Check pays for no loop, and no call but the extractors'."""
    namespace: dict[str, Any] = {"freeze": freeze, "SCALARS": SCALARS}
    # Names come from configuration: in the source only as repr()s, never as code.
    lines = [f"def key(c):  # {tuple(attributes)!r}, headers {tuple(headers)!r}"]
    values = ["c.workload.key"]
    for i, name in enumerate(attributes):
        namespace[f"read{i}"] = EXTRACTORS.get(name, _absent)
        lines += [
            f"    v{i} = read{i}(c)  # {name!r}",
            f"    if v{i}.__class__ not in SCALARS:",
            f"        v{i} = freeze(v{i})",
        ]
        values.append(f"v{i}")
    if headers:
        lines.append("    h = c.headers")
        values += [f"h.get({name!r})" for name in headers]
    lines.append(f"    return ({', '.join(values)},)")
    source = "\n".join(lines) + "\n"
    exec(compile(source, "<decision key>", "exec"), namespace)
    key: Callable[[CheckContext], Hashable] = namespace["key"]
    return key


class Checker:
    """The check side of one snapshot: built when the snapshot becomes active."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.dispatcher = CheckDispatcher(snapshot)
        self.authenticator = snapshot.authenticator
        self.policies = snapshot.authorization
        # The decision depends on exactly these attributes (and on the workload).
        self.referenced = tuple(sorted(self.dispatcher.referenced | self.policies.referenced))
        # Of request.headers, only the headers the policies name, unless a Mixer rule reads the
        # map: requests differ in headers nothing reads (x-request-id, for one).
        self._headers: tuple[str, ...] = ()
        if (
            "request.headers" in self.referenced
            and self.policies.headers is not None
            and "request.headers" not in self.dispatcher.referenced
        ):
            self.referenced = tuple(n for n in self.referenced if n != "request.headers")
            self._headers = tuple(sorted(self.policies.headers))
        # The key reads the request through the extractors, not a bag: on a hit no bag is filled.
        # An attribute no extractor makes (a generator's output) is absent when the key is made.
        self._key = decision_key(self.referenced, self._headers)
        self.cache = DecisionCache()
        # QuotaSpecs read attributes no rule references: the charges they decide cannot be
        # kept with a decision, so none is cached.
        self._caching = not self.dispatcher.governed
        self._authenticating = self.authenticator.referenced
        # A cached decision whose quotas answer from memory needs nothing awaited.
        self.answers_now = self._caching and self.dispatcher.quotas_answer_now

    def answer_now(
        self, request: external_auth_pb2.CheckRequest, workload: WorkloadIdentity
    ) -> bytes | None:
        """``check``'s answer when nothing needs awaiting: a token already verified, a cached
        decision, quotas charged from memory. Most Checks are such repeats: they are answered
        without a coroutine, an await or a budget timer (nothing can exceed the budget without
        waiting). None when something must be awaited; nothing has been counted or charged
        then, and ``check`` starts over."""
        context = CheckContext(request, workload)
        authn: AuthnResult | None = None
        if self._authenticating:
            authn = self.authenticator.known(
                workload, context.headers, context.http.path.partition("?")[2]
            )
            if authn is None:
                return None
            refused = _authenticated(context, authn)
            if refused is not None:
                return refused
        decision = self.cache.get(self._key(context), count_miss=False)
        if decision is None:
            return None
        if decision.charges:
            outcome = charge_now(decision.charges, QuotaArgs(1, False, context.http.id))
            if outcome is not None:
                decision = _charged(decision, outcome)
        return _answer(decision, authn)

    async def check(
        self, request: external_auth_pb2.CheckRequest, workload: WorkloadIdentity
    ) -> bytes:
        context = CheckContext(request, workload)
        http = context.http
        authn: AuthnResult | None = None
        if self._authenticating:
            query = http.path.partition("?")[2]
            headers = context.headers
            # NO_AUTHENTICATION when no rule applies to the workload.
            authn = self.authenticator.known(workload, headers, query)
            if authn is None:
                authn = await self.authenticator.authenticate(workload, headers, query)
            refused = _authenticated(context, authn)
            if refused is not None:
                return refused
        if self._caching:
            key = self._key(context)
            decision = self.cache.get(key)
            if decision is None:
                decision = await self._decide(CheckBag(context), workload)
                self.cache.put(key, decision)
        else:
            decision = await self._decide(CheckBag(context), workload)
        if decision.charges:
            # Quotas are charged for every request, the decision cached or not.
            outcome = await charge(decision.charges, QuotaArgs(1, False, http.id))
            if outcome is not None:
                decision = _charged(decision, outcome)
        return _answer(decision, authn)

    async def _decide(self, bag: LazyBag[CheckContext], workload: WorkloadIdentity) -> Decision:
        """The decision of the policies and the check rules, with the quota charges an allowed
        request is still to make: what depends only on the referenced attributes."""
        if self.policies.applies(workload):
            verdict = self.policies.evaluate(workload, bag)
            for policy, action, matched in verdict.dry_run:
                log.info("dry-run %s %s: %s", action, policy, "matched" if matched else "no match")
            for provider in verdict.custom:
                # Istio's order: a CUSTOM denial comes before DENY and ALLOW policies.
                custom = await self._custom(provider, bag)
                if custom is not None:
                    return custom
            if not verdict.allowed:
                return Decision.deny(
                    adapter.PERMISSION_DENIED,
                    f"RBAC: access denied ({verdict.reason})",
                    f"AuthorizationPolicy/{verdict.policy}"
                    if verdict.policy
                    else "AuthorizationPolicy",
                )
        if self.dispatcher.empty:
            return Decision.allow()
        outcome = await self.dispatcher.check_rules(bag, workload.namespace)
        request_ops = [
            h for r in outcome.matched for h in header_values(r.request_header_operations, bag)
        ]
        response_ops = [
            h for r in outcome.matched for h in header_values(r.response_header_operations, bag)
        ]
        if outcome.failed:
            raise HandlerFailure(outcome.message)
        if not outcome.ok:
            return Decision.deny(
                outcome.status,
                outcome.message or "denied",
                f"{outcome.rule}/{outcome.handler}",
                response_ops,
                valid_duration=outcome.valid_duration,
                valid_use_count=outcome.valid_use_count,
            )
        return Decision(
            True,
            adapter.OK,
            "",
            "",
            tuple(request_ops),
            tuple(response_ops),
            valid_duration=outcome.valid_duration,
            valid_use_count=outcome.valid_use_count,
            charges=outcome.charges,
        )

    async def _custom(self, provider: str, bag: LazyBag[CheckContext]) -> Decision | None:
        """A CUSTOM policy's provider is a Mixer handler: the hub's own extension model stands
        where Istio puts an external authorizer. None when it allows."""
        denied_by = f"AuthorizationPolicy CUSTOM/{provider}"
        handler = _provider_handler(self.snapshot, provider)
        if handler is None or handler.handler is None:
            return Decision.deny(
                adapter.PERMISSION_DENIED,
                f"CUSTOM provider {provider!r} is not a handler of this configuration",
                denied_by,
            )
        try:
            if "authorization" in handler.adapter.templates:
                result = await handler.handler.handle_authorization(  # type: ignore[attr-defined]
                    _authorization_instance(provider, bag)
                )
            else:
                result = await handler.handler.handle_checknothing(  # type: ignore[attr-defined]
                    CheckNothingInstance(provider)
                )
        except Exception as e:  # the handler broke its word: a failure, not a decision
            log.exception("CUSTOM provider %s failed", provider)
            raise HandlerFailure(f"CUSTOM provider {provider} failed") from e
        if result.ok:
            return None
        return Decision.deny(result.status, result.message or "denied", denied_by, cacheable=False)


def _authenticated(context: CheckContext, authn: AuthnResult) -> bytes | None:
    """The 401 answer for a refused token; otherwise None, the identity put in the context."""
    if authn.error is not None:
        count("unauthenticated", "RequestAuthentication")
        return _serialize(unauthenticated(authn.error))
    if authn.identity is not None:
        context.identity = _identity_attributes(authn.identity)
    return None


def _answer(decision: Decision, authn: AuthnResult | None) -> bytes:
    """A decision, counted and serialized: both paths of a Check end here."""
    count(decision.result, decision.denied_by)
    if not decision.allowed:
        return _serialize(denied(decision))
    return allowed_bytes(decision, authn)


def _charged(decision: Decision, outcome: CheckOutcome) -> Decision:
    """The decision once its quota charges denied or failed (``charge``'s outcome)."""
    if outcome.failed:
        raise HandlerFailure(outcome.message)
    if outcome.ok:
        return decision
    return Decision.deny(
        outcome.status,
        outcome.message or "denied",
        f"{outcome.rule}/{outcome.handler}",
        decision.response_headers,
        cacheable=False,
    )


def _provider_handler(snapshot: Snapshot, provider: str) -> BuiltHandler | None:
    """``name``, ``name.namespace`` or the full ``name.handler.namespace`` of a handler that can
    answer a CUSTOM policy (it supports authorization or checknothing)."""
    for h in snapshot.handlers.values():
        name, _, rest = h.name.partition(".")
        namespace = rest.rpartition(".")[2]
        if provider in (h.name, name, f"{name}.{namespace}") and (
            {"authorization", "checknothing"} & set(h.adapter.templates)
        ):
            return h
    return None


def _authorization_instance(provider: str, bag: LazyBag[CheckContext]) -> AuthorizationInstance:
    user = bag.get("request.auth.principal") or bag.get("source.principal") or ""
    return AuthorizationInstance(
        provider,
        Subject(user=str(user), properties={"source.principal": bag.get("source.principal", "")}),
        Action(
            namespace=str(bag.get("destination.namespace", "")),
            service=str(bag.get("request.host", "")),
            method=str(bag.get("request.method", "")),
            path=str(bag.get("request.url_path", "")),
        ),
    )


class _Expiry:
    """One Check's deadline: cancels its task when the budget is spent, and remembers that it
    did. ``task`` is None once the Check has answered."""

    __slots__ = ("deadline", "fired", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task: asyncio.Task[Any] | None = task
        self.deadline = deadline
        self.fired = False

    def fire(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            self.fired = True
            task.cancel()


# What the event loop itself allows a timer (asyncio's clock resolution): a deadline this close
# is due, rather than a timer set again for the rest.
_TIMER_RESOLUTION = 0.001


class _Budget:
    """The deadlines of every Check in flight under one budget, kept by one loop timer.

    A timer per Check (call_later, then cancel) costs more than the rest of a cached Check's
    bookkeeping. Under one budget the deadlines come in the order the Checks started: a queue
    whose head is the next to expire, and one timer set for it. A Check that answers only
    clears its entry; the timer drops cleared entries when it fires."""

    __slots__ = ("_loop", "_queue", "_timer", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Expiry] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[Any]) -> _Expiry:
        loop = task.get_loop()
        if loop is not self._loop:  # another loop (tests run several): start afresh there
            self._loop, self._queue, self._timer = loop, deque(), None
        expiry = _Expiry(task, loop.time() + self.seconds)
        self._queue.append(expiry)
        if self._timer is None:
            self._timer = loop.call_at(expiry.deadline, self._expire)
        return expiry

    def _expire(self) -> None:
        self._timer = None
        loop, queue = self._loop, self._queue
        assert loop is not None
        due = loop.time() + _TIMER_RESOLUTION
        while queue:
            head = queue[0]
            if head.task is not None and head.deadline > due:
                self._timer = loop.call_at(head.deadline, self._expire)
                return
            queue.popleft()
            head.fire()

    def __len__(self) -> int:
        """Entries held (Checks in flight, and answered ones not yet dropped): for tests."""
        return len(self._queue)


class HandlerFailure(Exception):
    """A handler failed while deciding; the failure policy decides what that means."""


class AuthorizationService:
    """The gRPC service. Holds the checker of the active snapshot, swapped on every change."""

    def __init__(self, failure: FailurePolicy | None = None) -> None:
        self.failure = failure or FailurePolicy()
        self.checker: Checker | None = None
        self._budget = _Budget(self.failure.budget)
        self._background: set[asyncio.Future[None]] = set()

    def activate(self, snapshot: Snapshot) -> None:
        """A new snapshot: a new checker and an empty decision cache (never a stale allow).

        Key sets of new issuers are fetched now, not by the first request that needs them,
        whose budget a fetch could exceed."""
        self.checker = Checker(snapshot)
        task = asyncio.ensure_future(snapshot.authenticator.prefetch())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return _CheckHandlers(self)

    async def check_bytes(
        self,
        data: bytes,
        context: grpc.aio.ServicerContext,
        workload: WorkloadIdentity | None = None,
    ) -> bytes:
        """A Check from its bytes to the response's: gRPC neither parses nor serializes. The
        calling workload, when not given, from the call's metadata."""
        started = time.perf_counter()
        try:
            try:
                request = external_auth_pb2.CheckRequest.FromString(data)
            except DecodeError:
                count("malformed", "")
                return _serialize(
                    denied(Decision.deny(adapter.INVALID_ARGUMENT, "malformed request", "mixerhub"))
                )
            if workload is None:
                workload = _workload(context.invocation_metadata())
            checker = self.checker
            if checker is not None and checker.answers_now:
                try:
                    answer = checker.answer_now(request, workload)
                except HandlerFailure as e:
                    return _serialize(self._failed(str(e)))
                except Exception:  # as in check: one request's clear answer, not the process
                    log.exception("check failed")
                    return _serialize(self._failed("internal error"))
                if answer is not None:
                    return answer
            response = await self.check(request, workload)
            return response if response.__class__ is bytes else _serialize(response)
        finally:
            CHECK_SECONDS.observe(time.perf_counter() - started)

    async def check(
        self, request: external_auth_pb2.CheckRequest, workload: WorkloadIdentity
    ) -> external_auth_pb2.CheckResponse | bytes:
        checker = self.checker
        if checker is None:
            return self._failed("no valid configuration loaded")
        task = asyncio.current_task()
        assert task is not None
        budget = self._budget
        if budget.seconds != self.failure.budget:  # the policy was replaced
            budget = self._budget = _Budget(self.failure.budget)
        expiry = budget.start(task)
        try:
            return await checker.check(request, workload)
        except asyncio.CancelledError:
            if not expiry.fired:
                raise  # cancelled from outside: the call was dropped, or the server stops
            task.uncancel()
            return self._failed(f"policy check exceeded its {budget.seconds * 1000:g} ms budget")
        except HandlerFailure as e:
            return self._failed(str(e))
        except Exception:  # a bug must cost one request a clear answer, not the process
            log.exception("check failed")
            return self._failed("internal error")
        finally:
            expiry.task = None

    def _failed(self, reason: str) -> external_auth_pb2.CheckResponse:
        if self.failure.fail_open:
            count("failed_open", "")
            return allowed(Decision.allow(), (), (), {})
        count("failed_closed", "")
        return denied(Decision.deny(adapter.UNAVAILABLE, reason, "mixerhub"))


_CHECK_METHOD = f"/{SERVICE}/Check"


class _CheckHandlers(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The Check method, one handler per calling workload. gRPC hands a generic handler the
    call's metadata to find the method by; the workload is read from that, and the handler
    found is the workload's own, so the call does not build the metadata again (which gRPC
    does anew on every ``context.invocation_metadata()``: several µs a call)."""

    def __init__(self, service: AuthorizationService) -> None:
        self._service = service
        self._handlers: dict[tuple[str, str, str, str], grpc.RpcMethodHandler] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != _CHECK_METHOD:
            return None
        workload = _workload(handler_call_details.invocation_metadata)
        handler = self._handlers.get(workload.key)
        if handler is None:
            handler = grpc.unary_unary_rpc_method_handler(
                functools.partial(self._service.check_bytes, workload=workload)
            )
            if len(self._handlers) >= 4096:  # metadata comes from the network: bounded
                self._handlers.clear()
            self._handlers[workload.key] = handler
        return handler


_workloads: dict[tuple[tuple[str, str | bytes], ...], WorkloadIdentity] = {}
_IDENTITY_METADATA = frozenset(
    {WORKLOAD_HEADER, NAMESPACE_HEADER, LABELS_HEADER, SERVICE_ACCOUNT_HEADER}
)


def _workload(metadata: Iterable[tuple[str, str | bytes]] | None) -> WorkloadIdentity:
    """The calling workload. A proxy sends the same identity metadata on every call: parsed
    once, and the same object each time (which the authenticator's plan lookup relies on)."""
    identity = tuple([m for m in metadata or () if m[0] in _IDENTITY_METADATA])
    workload = _workloads.get(identity)
    if workload is None:
        workload = WorkloadIdentity.from_metadata(identity)
        if len(_workloads) >= 4096:  # metadata comes from the network: bounded
            _workloads.clear()
        _workloads[identity] = workload
    return workload


def count(result: str, rule: str) -> None:
    """mixerhub_check_total{result, rule} += 1."""
    CHECKS.labels(result, rule).value += 1


# By identity object: the authenticator hands back the same one for a repeated token. An entry
# holds the identity, so its id stays its own.
_identities: dict[int, tuple[Any, Mapping[str, object]]] = {}


def _identity_attributes(identity: Any) -> Mapping[str, object]:
    known = _identities.get(id(identity))
    if known is not None and known[0] is identity:
        return known[1]
    attributes = identity_attributes(identity)
    if len(_identities) >= 4096:
        _identities.clear()
    _identities[id(identity)] = (identity, attributes)
    return attributes


def identity_attributes(identity: Any) -> dict[str, object]:
    return {
        "request.auth.principal": identity.principal,
        "request.auth.audiences": identity.audiences,
        "request.auth.presenter": identity.presenter,
        "request.auth.claims": identity.claims,
        "request.auth.raw_claims": identity.raw_claims,
    }


def _header(name: str, value: str, append: bool = False) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=(
            base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
            if append
            else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        ),
    )


# A plain allowance carries nothing of the request: one message serves them all.
_ALLOW = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
)
_ALLOW_BYTES: bytes = _ALLOW.SerializeToString()

# Serialized allowances by (decision, authentication result). Both come back as the same objects
# while their caches hold them (the decision cache, the authenticator's results), so a repeated
# request is answered with bytes made once. An entry holds the two objects, so their ids cannot
# be reused by others while it exists.
_allowances: dict[tuple[int, int], tuple[Decision, AuthnResult | None, bytes]] = {}
_MAX_ALLOWANCES = 4096


def allowed_bytes(decision: Decision, authn: AuthnResult | None) -> bytes:
    """``allowed`` for a Check's decision and authentication, serialized."""
    plain = authn is None or authn is NO_AUTHENTICATION
    if plain and not (decision.request_headers or decision.response_headers):
        return _ALLOW_BYTES
    entry = _allowances.get((id(decision), id(authn)))
    if entry is not None and entry[0] is decision and entry[1] is authn:
        return entry[2]
    if authn is None:
        response = allowed(decision, (), (), {})
    else:
        identity = identity_attributes(authn.identity) if authn.identity is not None else {}
        response = allowed(decision, authn.headers_to_set, authn.headers_to_remove, identity)
    data: bytes = response.SerializeToString()
    if len(_allowances) >= _MAX_ALLOWANCES:
        _allowances.clear()
    _allowances[(id(decision), id(authn))] = (decision, authn, data)
    return data


def _serialize(response: external_auth_pb2.CheckResponse | bytes) -> bytes:
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


def allowed(
    decision: Decision,
    set_headers: tuple[tuple[str, str], ...],
    remove_headers: tuple[str, ...],
    identity: Mapping[str, object],
) -> external_auth_pb2.CheckResponse:
    if not (
        identity or set_headers or remove_headers or decision.request_headers
        or decision.response_headers
    ):  # fmt: skip
        return _ALLOW
    ok = external_auth_pb2.OkHttpResponse()
    for operation, name, value in decision.request_headers:
        if operation == "REMOVE":
            ok.headers_to_remove.append(name)
        else:
            ok.headers.append(_header(name, value, append=operation == "APPEND"))
    for name, value in set_headers:
        ok.headers.append(_header(name, value))
    ok.headers_to_remove.extend(remove_headers)
    for operation, name, value in decision.response_headers:
        if operation != "REMOVE":
            ok.response_headers_to_add.append(_header(name, value, append=operation == "APPEND"))
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0), ok_response=ok)
    if identity:
        # For the rate-limit filter and the access logs: who the request is, once verified.
        response.dynamic_metadata.CopyFrom(_identity_struct(identity))
    return response


_structs: dict[tuple[str, str, tuple[str, ...]], struct_pb2.Struct] = {}


def _identity_struct(identity: Mapping[str, object]) -> struct_pb2.Struct:
    # Clients repeat their token, so the same few identities come back: build each Struct once.
    audiences = identity.get("request.auth.audiences") or ()
    key = (
        str(identity.get("request.auth.principal", "")),
        str(identity.get("request.auth.presenter", "")),
        tuple(audiences) if isinstance(audiences, list | tuple) else (str(audiences),),
    )
    struct = _structs.get(key)
    if struct is None:
        struct = struct_pb2.Struct()
        struct.update(
            {
                "request.auth.principal": key[0],
                "request.auth.presenter": key[1],
                "request.auth.audiences": list(key[2]),
            }
        )
        if len(_structs) >= 10_000:
            _structs.clear()
        _structs[key] = struct
    return struct


def denied(decision: Decision) -> external_auth_pb2.CheckResponse:
    status = HTTP_STATUS.get(decision.status, 403)
    body = {"error": decision.message, "deniedBy": decision.denied_by}
    response = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=status),
        body=json.dumps(body) + "\n",
        headers=[
            _header("content-type", "application/json"),
            _header(DENIED_BY_HEADER, decision.denied_by),
            *(_header(n, v) for op, n, v in decision.response_headers if op != "REMOVE"),
            *(_header(n, v) for n, v in decision.extra_headers),
        ],
    )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=decision.status, message=decision.message),
        denied_response=response,
    )


def unauthenticated(reason: str) -> external_auth_pb2.CheckResponse:
    # RFC 6750 section 3: how a resource server says a bearer token was refused.
    quoted = reason.replace("\\", "\\\\").replace('"', "'")
    challenge = f'Bearer error="invalid_token", error_description="{quoted}"'
    return denied(
        Decision.deny(
            adapter.UNAUTHENTICATED,
            f"Jwt verification fails: {reason}",
            "RequestAuthentication",
            extra_headers=(("www-authenticate", challenge),),
        )
    )
