"""The state of one configuration being compiled: what each kind's compile step reads and adds.

Compile steps run kind by kind in phase order (attribute manifests first, handlers last), each
adding to this object; errors are collected, never raised, so one load reports all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from mixerhub.adapter import InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.expression import Expression, compile_expression
from mixerhub.quota.charges import QuotaCharges
from mixerhub.ratelimit.matching import Domain
from mixerhub.registry import Registry
from mixerhub.security.enforcement import CompiledPolicy
from mixerhub.snapshot import BuiltHandler, CompiledInstance, CompiledRule, Snapshot
from mixerhub.store.documents import Document
from mixerhub.store.errors import ConfigError, join_path

if TYPE_CHECKING:
    from mixerhub.networking.destination_rule import DestinationRule
    from mixerhub.networking.service_entry import ServiceEntry
    from mixerhub.networking.sidecar import Sidecar
    from mixerhub.networking.virtual_service import VirtualService
    from mixerhub.networking.workload_entry import WorkloadEntry
    from mixerhub.security.authentication import RequestAuthenticationPolicy
    from mixerhub.security.peer_authentication import PeerAuthenticationPolicy

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Ref:
    """A resource's identity for references: its name and namespace."""

    name: str
    namespace: str


@dataclass
class HandlerDeclaration:
    """A handler document whose adapter is known; built in the last phase."""

    document: Document
    adapter: str
    params: dict[str, Any]
    display: str  # name.kind.namespace


@dataclass
class Compilation:
    registry: Registry
    build_handlers: bool
    previous: Snapshot | None
    errors: list[ConfigError] = field(default_factory=list)
    attributes: dict[str, ValueType] = field(default_factory=dict)
    attribute_origin: dict[str, str] = field(default_factory=dict)
    handlers: dict[Ref, HandlerDeclaration] = field(default_factory=dict)
    instances: dict[Ref, CompiledInstance] = field(default_factory=dict)
    # Instances routed to each handler by the rules: what the handler's builder is told about.
    handler_instances: dict[Ref, dict[str, InstanceSpec]] = field(default_factory=dict)
    # Rules wait for their handlers to be built; the final step links them.
    rule_plans: list[Callable[[Mapping[Ref, BuiltHandler]], CompiledRule | None]] = field(
        default_factory=list
    )
    built: dict[Ref, BuiltHandler] = field(default_factory=dict)
    names: dict[tuple[str, Ref], Document] = field(default_factory=dict)
    _expressions: dict[tuple[str, ValueType | None], Expression] = field(default_factory=dict)
    # Resources that failed with an error of their own: a reference to one is not reported again.
    broken: dict[str, dict[Ref, Document]] = field(default_factory=dict)
    authorization: list[CompiledPolicy] = field(default_factory=list)
    request_authentications: list[RequestAuthenticationPolicy] = field(default_factory=list)
    peer_authentications: list[PeerAuthenticationPolicy] = field(default_factory=list)
    # RateLimitConfigs by domain (mixerhub.ratelimit.config).
    rate_limits: dict[str, Domain] = field(default_factory=dict)
    # QuotaSpecs and QuotaSpecBindings (mixerhub.quota_specs).
    quota_charges: QuotaCharges = field(default_factory=QuotaCharges)
    # Istio's networking kinds (mixerhub.networking), joined into one registry at the end.
    service_entries: list[ServiceEntry] = field(default_factory=list)
    workload_entries: list[WorkloadEntry] = field(default_factory=list)
    destination_rules: list[DestinationRule] = field(default_factory=list)
    virtual_services: list[VirtualService] = field(default_factory=list)
    sidecars: list[Sidecar] = field(default_factory=list)

    def error(self, document: Document, path: str, reason: str) -> None:
        self.errors.append(document.error(path, reason))

    def compile_expression(self, source: str, expected: ValueType | None = None) -> Expression:
        """The expression compiled once per configuration: the same text in many instances is
        one function, so an entry's bag can keep its result for all of them."""
        key = (source, expected)
        expr = self._expressions.get(key)
        if expr is None:
            expr = self._expressions[key] = compile_expression(source, self.attributes, expected)
        return expr

    def mark_broken(self, group: str, document: Document) -> None:
        self.broken.setdefault(group, {})[Ref(document.name, document.namespace)] = document

    def is_broken(self, group: str, reference: str, namespace: str) -> bool:
        ref, _ = resolve(reference, namespace, self.broken.get(group, {}), lambda d: (d.kind,))
        return ref is not None

    def claim(self, group: str, document: Document) -> bool:
        """Record a name in its group (handler, instance, rule...); False and an error if taken."""
        ref = Ref(document.name, document.namespace)
        first = self.names.get((group, ref))
        if first is not None:
            self.error(
                document,
                "metadata.name",
                f"duplicate {group} {document.name!r} in namespace {document.namespace!r}"
                f" (first defined in {first.file}: document {first.index})",
            )
            return False
        self.names[(group, ref)] = document
        return True

    def validate(
        self, document: Document, model: type[M], data: object, *path: str | int
    ) -> M | None:
        """Validate data against a model, recording every pydantic error with its field path."""
        try:
            return model.model_validate(data)
        except ValidationError as e:
            for err in e.errors():
                loc = [
                    p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
                ]
                self.error(document, join_path(*path, *loc), _reason(err))
            return None


def _reason(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    msg: str = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if (
        kind not in ("value_error", "assertion_error")
        and "input" in err
        and not isinstance(err["input"], dict | list)
    ):
        msg += f" (got {err['input']!r})"
    return msg


def resolve(
    reference: str,
    namespace: str,
    known: Mapping[Ref, Any],
    kinds: Callable[[Any], tuple[str, ...]],
) -> tuple[Ref | None, str]:
    """Resolve a reference as Mixer did: ``name``, ``name.namespace`` or ``name.kind.namespace``.

    Older configs also wrote ``name.kind`` (``handler.stdio``, ``accesslog.logentry``): a second
    part that names the resource's kind rather than a namespace. ``kinds`` says which kind names
    a resource answers to. Returns the ref, or None and why.
    """
    parts = reference.split(".")
    candidates: list[tuple[Ref, str | None]] = []
    if len(parts) == 1:
        candidates.append((Ref(parts[0], namespace), None))
    elif len(parts) == 2:
        candidates.append((Ref(parts[0], parts[1]), None))
        candidates.append((Ref(parts[0], namespace), parts[1]))
    else:
        candidates.append((Ref(".".join(parts[:-2]), parts[-1]), parts[-2]))
        # A name may itself hold dots (Kubernetes names are DNS subdomains).
        candidates.append((Ref(".".join(parts[:-1]), parts[-1]), None))
        candidates.append((Ref(reference, namespace), None))
    for ref, kind in candidates:
        target = known.get(ref)
        if target is not None and (kind is None or kind in kinds(target)):
            return ref, ""
    return None, f"{reference!r} does not name any in namespace {namespace!r} or as name.namespace"
