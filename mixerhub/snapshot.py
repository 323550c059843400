"""The snapshot: one immutable, fully compiled configuration.

Requests read the snapshot that was active when they arrived; a config change builds a new one
and swaps it in whole, so no request ever sees half a configuration.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mixerhub.adapter import AdapterInfo, Handler, InstanceSpec
from mixerhub.attributes import ValueType
from mixerhub.expression import Expression
from mixerhub.quota.charges import QuotaCharges
from mixerhub.ratelimit.matching import RateLimits
from mixerhub.security.enforcement import PolicySet
from mixerhub.store.documents import Document
from mixerhub.templates import Template, Variety
from mixerhub.types import Bag, dump

if TYPE_CHECKING:
    from mixerhub.networking.registry import Networking
    from mixerhub.security.authentication import Authenticator
    from mixerhub.security.peer_authentication import PeerAuthentications


@dataclass(frozen=True, slots=True)
class AttributeBinding:
    """One of an attribute generator instance's ``attributeBindings``: an attribute and the
    expression that computes it from the handler's output (``$out.<field>``).

    ``evaluate`` reads a bag of the output's set fields, keyed ``template.output_prefix + field``;
    with ``reads_request`` it falls back to the request's own attributes.
    """

    attribute: str
    evaluate: Callable[[Bag], object]
    source: str
    output_fields: frozenset[str]  # the output fields it reads, without "$out."
    reads_request: bool


@dataclass(frozen=True, slots=True)
class CompiledInstance:
    """An instance whose field expressions are compiled; ``build`` evaluates them against a bag.

    ``build`` raises mixerhub.expression.EvaluationError when an attribute it needs is missing.
    """

    name: str  # Mixer's full name, e.g. requestcount.instance.istio-system
    template: Template
    spec: InstanceSpec
    build: Callable[[Bag], Any]
    referenced: frozenset[str]
    expressions: Mapping[str, str]  # field path -> source, for /debug/configz
    # Attribute generators only: what the handler's output produces.
    bindings: tuple[AttributeBinding, ...] = ()


@dataclass(frozen=True, slots=True)
class BuiltHandler:
    """A handler built from validated params. ``handler`` is None when compiled only to validate."""

    name: str  # e.g. prometheus.handler.istio-system
    adapter: AdapterInfo[Any]
    params: BaseModel
    handler: Handler | None
    # Same signature = same adapter, params and instances: the built handler is reused across
    # snapshots (as Mixer did) so its queues, connections and metric series survive a reload.
    signature: str


@dataclass(frozen=True, slots=True)
class CompiledAction:
    name: str
    handler: BuiltHandler
    instances: tuple[CompiledInstance, ...]


@dataclass(frozen=True, slots=True)
class HeaderOperation:
    """A rule's request/response header operation (Mixer's Rule.HeaderOperationTemplate)."""

    name: str
    values: tuple[Expression, ...]
    operation: str  # REPLACE | REMOVE | APPEND


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str  # e.g. promhttp.rule.istio-system
    namespace: str
    match: Expression | None  # None: the rule always applies (Mixer's empty match)
    actions: tuple[CompiledAction, ...]
    request_header_operations: tuple[HeaderOperation, ...]
    response_header_operations: tuple[HeaderOperation, ...]
    referenced: frozenset[str]

    def varieties(self) -> frozenset[Variety]:
        return frozenset(i.template.variety for a in self.actions for i in a.instances)


def _no_authentication() -> Authenticator:
    # Imported here: the security kinds import the store, which imports this module.
    from mixerhub.security.authentication import Authenticator

    return Authenticator()


def _no_peer_authentication() -> PeerAuthentications:
    # Imported here: the security kinds import the store, which imports this module.
    from mixerhub.security.peer_authentication import PeerAuthentications

    return PeerAuthentications()


def _no_networking() -> Networking:
    # Imported here: the networking kinds import the store, which imports this module.
    from mixerhub.networking.registry import Networking

    return Networking()


@dataclass(frozen=True)
class Snapshot:
    version: str
    loaded_at: datetime.datetime
    files: tuple[str, ...]
    documents: tuple[Document, ...]
    attributes: Mapping[str, ValueType]
    handlers: Mapping[str, BuiltHandler]
    instances: Mapping[str, CompiledInstance]
    rules: tuple[CompiledRule, ...]
    # The attribute names any rule or instance may read: what request handling must produce.
    referenced: frozenset[str] = field(default_factory=frozenset)
    # Istio AuthorizationPolicies, compiled (mixerhub.security.authorization).
    authorization: PolicySet = field(default_factory=PolicySet)
    # Istio RequestAuthentications, compiled (mixerhub.security.authentication).
    authenticator: Authenticator = field(default_factory=_no_authentication)
    # Istio PeerAuthentications: each inbound port's mTLS mode
    # (mixerhub.security.peer_authentication).
    peer_authentication: PeerAuthentications = field(default_factory=_no_peer_authentication)
    # envoyproxy/ratelimit RateLimitConfigs, compiled (mixerhub.ratelimit.config).
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # Istio QuotaSpecs and their bindings: what each quota is charged (mixerhub.quota_specs).
    quota_charges: QuotaCharges = field(default_factory=QuotaCharges)
    # Istio's networking kinds, compiled (mixerhub.networking): what the xDS translation reads.
    networking: Networking = field(default_factory=_no_networking)

    def configz(self) -> dict[str, Any]:
        """The active configuration as JSON-ready data, for /debug/configz."""
        return {
            "version": self.version,
            "loadedAt": self.loaded_at.isoformat(),
            "files": list(self.files),
            "handlers": {
                name: {
                    "adapter": h.adapter.name,
                    "params": dump(h.params),
                    "built": h.handler is not None,
                }
                for name, h in self.handlers.items()
            },
            "instances": {
                name: {"template": i.template.name, "params": dict(i.expressions)}
                for name, i in self.instances.items()
            },
            "rules": [
                {
                    "name": r.name,
                    "match": r.match.source if r.match else "",
                    "actions": [
                        {
                            "name": a.name,
                            "handler": a.handler.name,
                            "instances": [i.name for i in a.instances],
                        }
                        for a in r.actions
                    ],
                }
                for r in self.rules
            ],
            "attributes": len(self.attributes),
            "referencedAttributes": sorted(self.referenced),
            "documents": [
                {
                    "file": d.file,
                    "index": d.index,
                    "kind": d.kind,
                    "name": d.name,
                    "namespace": d.namespace,
                }
                for d in self.documents
            ],
        }
