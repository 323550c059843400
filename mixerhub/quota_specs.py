"""Istio 1.4's QuotaSpec and QuotaSpecBinding (config.istio.io/v1alpha2), as configuration kinds.

A QuotaSpec maps requests to quota charges (``rules[]{match[]{clause: {attr: {exact|prefix|
regex}}}, quotas[]{quota, charge}}``); a QuotaSpecBinding says which services use which specs.
``quota`` names a quota instance, resolved as a rule's instances are (``name`` in the spec's
namespace, or ``name.namespace``). What the compiled result means at request time, and how a
binding's services are matched, is in mixerhub.quota.charges.
"""

from __future__ import annotations

import re
from typing import Final

from pydantic import Field, model_validator

from mixerhub.quota.charges import (
    Binding,
    ChargeRule,
    QuotaSpecRules,
    ServiceSelector,
    StringMatcher,
)
from mixerhub.store.compilation import Compilation, resolve
from mixerhub.store.documents import Document
from mixerhub.store.errors import join_path
from mixerhub.store.kinds import Kind
from mixerhub.templates import Variety
from mixerhub.types import Params

__all__ = ["QUOTA_SPEC", "QUOTA_SPEC_BINDING", "QuotaSpecBindingSpec", "QuotaSpecSpec"]

GROUP = "config.istio.io"
VERSIONS = ("v1alpha2",)


class StringMatch(Params):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of exact, prefix or regex is required"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class AttributeMatch(Params):
    # Every clause must hold (attribute name -> how its text must look).
    clause: dict[str, StringMatch] = Field(default_factory=dict)


class QuotaCharge(Params):
    quota: str
    charge: int = Field(default=1, ge=0)


class QuotaRule(Params):
    # Any one match holding applies the rule; no match at all applies it to every request.
    match: list[AttributeMatch] = Field(default_factory=list)
    quotas: list[QuotaCharge] = Field(default_factory=list)


class QuotaSpecSpec(Params):
    rules: list[QuotaRule] = Field(default_factory=list)


class IstioService(Params):
    name: str = ""
    namespace: str = ""
    domain: str = ""
    service: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class QuotaSpecReference(Params):
    name: str
    namespace: str = ""


class QuotaSpecBindingSpec(Params):
    services: list[IstioService] = Field(default_factory=list)
    quota_specs: list[QuotaSpecReference] = Field(default_factory=list)


def compile_quota_spec(doc: Document, spec: QuotaSpecSpec, c: Compilation) -> None:
    errors = len(c.errors)
    rules: list[ChargeRule] = []
    for i, rule in enumerate(spec.rules):
        path = ("spec", "rules", i)
        matches: list[tuple[StringMatcher, ...]] = []
        for j, match in enumerate(rule.match):
            clause: list[StringMatcher] = []
            for attr, how in match.clause.items():
                at = join_path(*path, "match", j, "clause", attr)
                base = attr.partition("[")[0]
                if base not in c.attributes:
                    c.error(doc, at, f"unknown attribute {base!r}")
                    continue
                pattern = None
                if how.regex is not None:
                    try:
                        pattern = re.compile(how.regex)
                    except re.error as e:
                        c.error(doc, join_path(at, "regex"), f"invalid regex: {e}")
                        continue
                clause.append(StringMatcher(attr, how.exact, how.prefix, pattern))
            matches.append(tuple(clause))
        charges: list[tuple[str, int]] = []
        for j, q in enumerate(rule.quotas):
            at = join_path(*path, "quotas", j, "quota")
            ref, why = resolve(
                q.quota, doc.namespace, c.instances, lambda i: ("instance", i.template.name)
            )
            if ref is None:
                if not c.is_broken("instance", q.quota, doc.namespace):
                    c.error(doc, at, f"unknown quota instance: {why}")
                continue
            instance = c.instances[ref]
            if instance.template.variety is not Variety.QUOTA:
                c.error(
                    doc,
                    at,
                    f"instance {instance.name} is of template {instance.template.name!r},"
                    " not a quota template",
                )
                continue
            charges.append((instance.name, q.charge))
        rules.append(ChargeRule(tuple(matches), tuple(charges)))
    if len(c.errors) != errors:
        c.mark_broken("QuotaSpec", doc)
    elif c.claim("QuotaSpec", doc):
        c.quota_charges.specs[(doc.name, doc.namespace)] = QuotaSpecRules(
            f"{doc.name}.{doc.namespace}", tuple(rules)
        )


def compile_quota_spec_binding(doc: Document, spec: QuotaSpecBindingSpec, c: Compilation) -> None:
    errors = len(c.errors)
    specs: list[QuotaSpecRules] = []
    for i, ref in enumerate(spec.quota_specs):
        namespace = ref.namespace or doc.namespace
        found = c.quota_charges.specs.get((ref.name, namespace))
        if found is None:
            if (ref.name, namespace) not in {
                (r.name, r.namespace) for r in c.broken.get("QuotaSpec", {})
            }:
                c.error(
                    doc,
                    join_path("spec", "quotaSpecs", i),
                    f"unknown QuotaSpec {ref.name!r} in namespace {namespace!r}",
                )
            continue
        specs.append(found)
    if not spec.services:
        c.error(doc, "spec.services", "a binding needs at least one service")
    services = tuple(
        ServiceSelector(s.name, s.namespace, s.service, tuple(sorted(s.labels.items())))
        for s in spec.services
    )
    for i, s in enumerate(spec.services):
        if not (s.name or s.service):
            c.error(doc, join_path("spec", "services", i), "a service needs a name or service")
    if len(c.errors) == errors and c.claim("QuotaSpecBinding", doc):
        c.quota_charges.bindings.append(
            Binding(f"{doc.name}.{doc.namespace}", services, tuple(specs))
        )


# After instances (20) and rules (30): a spec names quota instances; a binding names specs.
QUOTA_SPEC: Final = Kind(GROUP, VERSIONS, "QuotaSpec", QuotaSpecSpec, 40, compile_quota_spec)
QUOTA_SPEC_BINDING: Final = Kind(
    GROUP, VERSIONS, "QuotaSpecBinding", QuotaSpecBindingSpec, 41, compile_quota_spec_binding
)
