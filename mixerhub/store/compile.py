"""Compiling documents into a snapshot: every kind's compile step, then the handlers are built.

Either the whole configuration compiles and a new snapshot comes out, or ``ConfigRejected``
carries every error found; nothing in between is ever served.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Mapping
from importlib import resources
from typing import Any

from mixerhub.adapter import AdapterInfo, Env, Handler, InstanceSpec, check_handler
from mixerhub.attributes import ValueType
from mixerhub.monitoring import REGISTRY
from mixerhub.networking.destination_rule import DESTINATION_RULE
from mixerhub.networking.registry import Networking
from mixerhub.networking.service_entry import SERVICE_ENTRY
from mixerhub.networking.sidecar import SIDECAR
from mixerhub.networking.virtual_service import VIRTUAL_SERVICE
from mixerhub.networking.workload_entry import WORKLOAD_ENTRY, WorkloadEntry
from mixerhub.quota_specs import QUOTA_SPEC, QUOTA_SPEC_BINDING
from mixerhub.ratelimit import config as ratelimit_config
from mixerhub.ratelimit.matching import RateLimits
from mixerhub.registry import Registry
from mixerhub.security import authentication, authorization, peer_authentication
from mixerhub.security.enforcement import PolicySet
from mixerhub.snapshot import BuiltHandler, CompiledRule, Snapshot
from mixerhub.store import documents, mixer_kinds
from mixerhub.store.compilation import Compilation, HandlerDeclaration, Ref
from mixerhub.store.documents import Document, Source
from mixerhub.store.errors import ConfigError, ConfigRejected, join_path
from mixerhub.store.kinds import Kind, kind_table, split_api_version
from mixerhub.types import dump

KINDS = kind_table(
    (
        *mixer_kinds.KINDS,
        authorization.AUTHORIZATION_POLICY,
        authentication.REQUEST_AUTHENTICATION,
        peer_authentication.PEER_AUTHENTICATION,
        ratelimit_config.RATE_LIMIT_CONFIG,
        QUOTA_SPEC,
        QUOTA_SPEC_BINDING,
        SERVICE_ENTRY,
        WORKLOAD_ENTRY,
        DESTINATION_RULE,
        VIRTUAL_SERVICE,
        SIDECAR,
    )
)

log = logging.getLogger("mixerhub.config")


class Rejected(ConfigRejected):
    """A rejected configuration, with the handlers it had already built (the caller closes them)."""

    def __init__(self, errors: list[ConfigError], unused: list[Handler]) -> None:
        super().__init__(errors)
        self.unused = tuple(unused)


def default_config_dir() -> str:
    """What `mixerhub serve` runs when given no config (config/default in the repository)."""
    return str(resources.files("mixerhub.shipped") / "default")


def builtin_attributes() -> Mapping[str, ValueType]:
    """The vocabulary the hub itself produces: Istio 1.4's attribute manifests, shipped in
    config/default/attributes.yaml. Every configuration is compiled against it, so a user's
    config need not carry its own manifest (Istio's Helm chart always installed one)."""
    path = resources.files("mixerhub.shipped") / "default" / "attributes.yaml"
    docs, errors = documents.parse(str(path), path.read_bytes())
    c = Compilation(Registry({}), build_handlers=False, previous=None)
    for doc in docs:
        spec = c.validate(doc, mixer_kinds.AttributeManifestSpec, doc.spec, "spec")
        if spec is not None:
            mixer_kinds.compile_manifest(doc, spec, c)
    if errors or c.errors:  # the shipped file is part of the program: a defect, not a user error
        raise RuntimeError("; ".join(str(e) for e in [*errors, *c.errors]))
    return c.attributes


def compile_snapshot(
    source: Source,
    registry: Registry,
    *,
    previous: Snapshot | None = None,
    build_handlers: bool = True,
    base_attributes: Mapping[str, ValueType] | None = None,
) -> Snapshot:
    """Compile the documents; raise ``Rejected`` with every error when any is found."""
    c = Compilation(registry, build_handlers, previous)
    c.errors += source.errors
    attributes = builtin_attributes() if base_attributes is None else base_attributes
    c.attributes.update(attributes)
    c.attribute_origin.update(dict.fromkeys(attributes, "the built-in vocabulary"))

    steps: list[tuple[int, int, Kind[Any], Document, Any]] = []
    for order, raw in enumerate(source.documents):
        legacy = mixer_kinds.legacy_kind(raw, registry.adapters)
        doc, kind = legacy if legacy else (raw, _kind_of(raw, c))
        if kind is None:
            continue
        spec = c.validate(doc, kind.spec, doc.spec, "spec")
        if spec is not None:
            steps.append((kind.phase, order, kind, doc, spec))
    for _, _, kind, doc, spec in sorted(steps, key=lambda s: (s[0], s[1])):
        kind.compile(doc, spec, c)

    built, unused = _build_handlers(c)
    if c.errors:
        raise Rejected(c.errors, unused)
    rules: list[CompiledRule] = []
    for link in c.rule_plans:
        rule = link(built)
        if rule is not None:
            rules.append(rule)
    referenced = frozenset().union(*(r.referenced for r in rules))
    return Snapshot(
        version=source.digest,
        loaded_at=datetime.datetime.now(datetime.UTC),
        files=source.files,
        documents=source.documents,
        attributes=dict(c.attributes),
        handlers={h.name: h for h in built.values()},
        instances={i.name: i for i in c.instances.values()},
        rules=tuple(rules),
        referenced=referenced,
        authorization=PolicySet(c.authorization),
        authenticator=authentication.Authenticator(c.request_authentications),
        peer_authentication=peer_authentication.PeerAuthentications(c.peer_authentications),
        rate_limits=RateLimits(dict(c.rate_limits)),
        quota_charges=c.quota_charges,
        networking=Networking.build(
            c.service_entries,
            c.workload_entries,
            c.virtual_services,
            c.destination_rules,
            c.sidecars,
        ),
    )


def _kind_of(doc: Document, c: Compilation) -> Kind[Any] | None:
    group, version = split_api_version(doc.api_version)
    kind = KINDS.get((group, doc.kind))
    if kind is None:
        known = sorted(k.kind for (g, _), k in KINDS.items() if g == group)
        hint = f"; {group} has {', '.join(known)}" if known else ""
        c.error(doc, "kind", f"unknown kind {doc.kind!r} for apiVersion {doc.api_version!r}{hint}")
        return None
    if version not in kind.versions:
        c.error(
            doc,
            "apiVersion",
            f"unsupported version {version!r} of {doc.kind}; use {' or '.join(kind.api_versions)}",
        )
        return None
    return kind


def _build_handlers(c: Compilation) -> tuple[dict[Ref, BuiltHandler], list[Handler]]:
    """Validate every handler's params; build those the rules use (when there are no errors yet).

    A handler whose adapter, params and instances are unchanged since the previous snapshot is
    reused as it is. Returns the built handlers and those built here (to close on rejection).
    """
    validated: list[tuple[Ref, HandlerDeclaration, AdapterInfo[Any], Any]] = []
    for ref, decl in c.handlers.items():
        info = c.registry.adapters[decl.adapter]
        params = c.validate(decl.document, info.params, decl.params, "spec", "params")
        if params is None:
            continue
        instances = c.handler_instances.get(ref, {})
        field_errors = list(info.validate(params, instances))
        for fe in field_errors:
            c.error(decl.document, join_path("spec", "params", fe.path), fe.reason)
        if not field_errors:
            validated.append((ref, decl, info, params))

    # A CUSTOM AuthorizationPolicy names a handler as its provider: that handler is used too.
    providers = {p.provider for p in c.authorization if p.provider}
    built: dict[Ref, BuiltHandler] = {}
    fresh: list[Handler] = []
    previous = c.previous.handlers if c.previous else {}
    for ref, decl, info, params in validated:
        routed = c.handler_instances.get(ref)
        if routed is None and providers & {ref.name, f"{ref.name}.{ref.namespace}", decl.display}:
            routed = {}
        if routed is None or not c.build_handlers or c.errors:
            built[ref] = BuiltHandler(decl.display, info, params, None, "")
            continue
        workloads = tuple(c.workload_entries) if info.reads_workloads else ()
        signature = _signature(info, params, routed, workloads)
        old = previous.get(decl.display)
        if old is not None and old.signature == signature and old.handler is not None:
            built[ref] = old
            continue
        env = Env(
            info.name,
            decl.display,
            logging.getLogger(f"mixerhub.adapter.{info.name}"),
            REGISTRY,
            workloads,
        )
        try:
            handler = info.build(params, routed, env)
        except Exception as e:  # an adapter's build may fail in any way; it is a config error
            log.exception("adapter %s failed to build %s", info.name, decl.display)
            c.error(decl.document, "spec.params", f"adapter {info.name} could not build: {e}")
            continue
        problems = check_handler(info, handler)
        for p in problems:
            c.error(decl.document, "spec.compiledAdapter", p)
        if isinstance(handler, Handler):
            fresh.append(handler)
        if not problems:
            built[ref] = BuiltHandler(decl.display, info, params, handler, signature)
    return built, fresh


def _signature(
    info: AdapterInfo[Any],
    params: Any,
    instances: Mapping[str, InstanceSpec],
    workloads: tuple[WorkloadEntry, ...] = (),
) -> str:
    data: dict[str, Any] = {
        "adapter": info.name,
        "params": dump(params),
        "instances": {
            name: [spec.template, sorted((k, v.name) for k, v in spec.types.items())]
            for name, spec in sorted(instances.items())
        },
    }
    if workloads:
        data["workloads"] = [repr(w) for w in workloads]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
