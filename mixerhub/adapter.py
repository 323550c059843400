"""The adapter SDK: how an adapter declares itself, is configured and handles instances.

Modelled on Mixer's adapter SDK (mixer/pkg/adapter): an adapter is plain data (``AdapterInfo``);
configuration time and request time are separate. At configuration time the hub validates the
adapter's params against its pydantic model, calls ``validate`` with the instances the handler will
receive, then ``build`` to get a ``Handler``. At request time the hub calls one method per template:

=========================  =========================================================  ===========
template variety           handler method                                             returns
=========================  =========================================================  ===========
report (metric, ...)       ``handle_<template>(instances: Sequence[Instance])``        ExportResult
check (listentry, ...)     ``async handle_<template>(instance: Instance)``             CheckResult
quota                      ``async handle_quota(instance: QuotaInstance, args)``       QuotaResult
attribute generator        ``generate_<template>_attributes(instance: Instance)``      the output
=========================  =========================================================  ===========

A quota handler that answers from memory (memquota) may also offer
``handle_quota_now(instance, args) -> QuotaResult``, the same answer without a coroutine: a Check
whose decision is cached is then answered without suspending.

An attribute generator (Mixer's APA, e.g. kubernetes) runs before check and report rules, on both
paths, so its method is synchronous and must answer from memory (Mixer's
GenerateKubernetesAttributes). The instance's ``attributeBindings`` bind the output into the bag.

Request-time methods never raise into the dispatcher: they return a result and count their own
failures (``Env.count_error``). Report methods get batches and must not block: an adapter that talks
to a network backend queues the batch and sends it in the background. ``close()`` flushes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from mixerhub.attributes import ValueType
from mixerhub.monitoring import ADAPTER_DROPPED, ADAPTER_ERRORS
from mixerhub.templates import TEMPLATES, Variety
from mixerhub.types import Params, dump

__all__ = ["AdapterInfo", "Env", "Handler", "Params"]

# google.rpc.Code values used in check results (Mixer's adapters answer with rpc statuses).
OK = 0
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# Mixer's default when no adapter bounds a decision: cacheable for 1 minute or 10,000 uses.
DEFAULT_VALID_DURATION = 60.0
DEFAULT_VALID_USE_COUNT = 10_000


class ExportResult(enum.Enum):
    """What a report method did with its batch (OpenTelemetry's exporter result)."""

    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A check handler's answer: an rpc status, and how long and how often it may be reused."""

    status: int = OK
    message: str = ""
    valid_duration: float = DEFAULT_VALID_DURATION
    valid_use_count: int = DEFAULT_VALID_USE_COUNT

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class QuotaArgs:
    """How much is asked for. ``deduplication_id`` makes a retried request count once."""

    amount: int = 1
    best_effort: bool = False
    deduplication_id: str = ""


@dataclass(frozen=True, slots=True)
class QuotaResult:
    """The amount granted (0 when exhausted) and for how long the grant holds."""

    amount: int
    valid_duration: float = 0.0
    status: int = OK
    message: str = ""


@dataclass(frozen=True, slots=True)
class FieldError:
    """An adapter's complaint about its params: a dotted path below ``spec.params`` and a reason."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What a handler will receive from one instance: its full name, template and field types.

    ``types`` maps field paths to the compiled expression's type: ``value``,
    ``dimensions.response_code``, ``subject.user``. A metrics adapter checks its label names
    against the ``dimensions.*`` keys here, as Mixer's SetMetricTypes did.
    """

    name: str
    template: str
    types: Mapping[str, ValueType]

    def map_keys(self, field_name: str) -> tuple[str, ...]:
        prefix = field_name + "."
        return tuple(k[len(prefix) :] for k in self.types if k.startswith(prefix))


class Workload(Protocol):
    """One workload the configuration declares (a WorkloadEntry), as an adapter may read it."""

    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def service_account(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Env:
    """What the hub lends a handler: names, a logger, the /metrics registry, failure counters.

    ``workloads`` are the configuration's WorkloadEntries, read-only; only an adapter that sets
    ``AdapterInfo.reads_workloads`` gets them (its handler is then rebuilt when they change).
    """

    adapter: str
    handler: str
    logger: logging.Logger
    registry: CollectorRegistry
    workloads: tuple[Workload, ...] = ()

    def count_error(self, n: int = 1) -> None:
        """A request this handler failed: mixerhub_adapter_errors_total{adapter}."""
        ADAPTER_ERRORS.labels(self.adapter).inc(n)

    def count_dropped(self, reason: str, n: int = 1) -> None:
        """Items given up on: mixerhub_adapter_dropped_total{adapter, reason}."""
        ADAPTER_DROPPED.labels(self.adapter, reason).inc(n)


class Handler:
    """Base class for handlers. Subclasses add one ``handle_<template>`` method per template."""

    # An attribute generator whose output depends on nothing but its instance (and what the
    # handler was built with, such as kubernetesenv's pods) says so: the dispatcher then keeps
    # what it produced for an instance it has seen, and asks again only for a new one.
    outputs_depend_on_instance_alone: bool = False

    async def close(self) -> None:
        """Flush what is queued and release resources. Called once, when a config drops it."""


P = TypeVar("P", bound=BaseModel)


def _no_errors(params: Any, instances: Mapping[str, InstanceSpec]) -> Iterable[FieldError]:
    return ()


@dataclass(frozen=True)
class AdapterInfo(Generic[P]):
    """An adapter, declared as data. One of these per adapter is its whole registration."""

    name: str
    description: str
    templates: tuple[str, ...]
    params: type[P]
    build: Callable[[P, Mapping[str, InstanceSpec], Env], Handler]
    validate: Callable[[P, Mapping[str, InstanceSpec]], Iterable[FieldError]] = field(
        default=_no_errors
    )
    # The handler reads Env.workloads: it is built again whenever the WorkloadEntries change.
    reads_workloads: bool = False

    @property
    def default_params(self) -> dict[str, Any]:
        """The params a handler gets when its configuration says nothing."""
        return dump(self.params())


def handler_method(template: str) -> str:
    known = TEMPLATES.get(template)
    if known is not None and known.variety is Variety.ATTRIBUTE_GENERATOR:
        return f"generate_{template}_attributes"
    return f"handle_{template}"


def check_info(info: object) -> list[str]:
    """Why an object cannot serve as an adapter declaration (empty when it can)."""
    if not isinstance(info, AdapterInfo):
        return [f"expected a mixerhub.adapter.AdapterInfo, got {type(info).__name__}"]
    problems: list[str] = []
    if not info.name or not info.name.replace("_", "").isalnum():
        problems.append(f"name {info.name!r} must be a non-empty identifier")
    if not info.templates:
        problems.append("supports no template")
    problems += [f"unknown template {t!r}" for t in info.templates if t not in TEMPLATES]
    if not (isinstance(info.params, type) and issubclass(info.params, BaseModel)):
        problems.append("params must be a pydantic model class")
    else:
        try:
            info.params()
        except Exception as e:  # a third-party model may fail in any way; report, don't crash
            problems.append(f"params model has no defaults for every field: {e}")
    if not callable(info.build):
        problems.append("build must be callable")
    return problems


def check_handler(info: AdapterInfo[Any], handler: object) -> list[str]:
    """Why a built handler cannot serve its adapter's templates (empty when it can)."""
    if not isinstance(handler, Handler):
        return [f"build returned {type(handler).__name__}, not a mixerhub.adapter.Handler"]
    return [
        f"handler has no {handler_method(t)}() for template {t!r}"
        for t in info.templates
        if not callable(getattr(handler, handler_method(t), None))
    ]


def variety(template: str) -> Variety:
    return TEMPLATES[template].variety
