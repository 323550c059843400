"""What QuotaSpecs and QuotaSpecBindings decide at request time: how much each quota is charged.

Istio's proxies read the QuotaSpecs bound to the destination service and put ``{quota: charge}``
in each Check; Mixer then asked only for those quotas. Here the hub is the proxy's side too:

* A quota instance that no QuotaSpec names keeps the hub's default: every Check whose rule
  matches charges it ``QuotaArgs.amount`` (1).
* A quota instance that some QuotaSpec names is charged only as the specs bound to the request's
  destination say: the sum of ``charge`` over every rule whose match holds, in every bound spec;
  a request no binding applies to (or whose rules do not match) does not charge it at all.

The destination is the workload the hub answers for (the Envoy that called Check): a binding's
service ``{name, namespace}`` matches when ``name`` is that workload's name, its ``app`` label
or the first label of ``request.host``, and ``namespace`` (when given) is the workload's
namespace. An unset namespace matches any namespace (the bookinfo samples bind services of
``default`` from ``istio-system``). ``service: "*"`` matches every request, another ``service``
(a host name such as ``ratings.default.svc.cluster.local``) matches ``request.host`` without its
port, or its first two labels as name and namespace. ``labels`` must all equal the workload's.
``domain`` is not used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mixerhub.types import Bag


def attribute(bag: Bag, name: str) -> object:
    """The attribute ``name``, or ``map[key]`` of a map attribute; None when absent."""
    base, bracket, rest = name.partition("[")
    value = bag.get(base)
    if bracket and rest.endswith("]"):
        if not isinstance(value, Mapping):
            return None
        return value.get(rest[:-1].strip("'\""))
    return value


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """One clause: an attribute's text matched exactly, by prefix or by a (full-match) regex."""

    attribute: str
    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None

    def matches(self, bag: Bag) -> bool:
        value = attribute(bag, self.attribute)
        if not isinstance(value, str):
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        return self.regex is not None and self.regex.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ChargeRule:
    """Charges that apply when any match holds (every clause of it), or always with no match."""

    matches: tuple[tuple[StringMatcher, ...], ...]
    charges: tuple[tuple[str, int], ...]  # (instance full name, charge)

    def applies(self, bag: Bag) -> bool:
        if not self.matches:
            return True
        return any(all(m.matches(bag) for m in clause) for clause in self.matches)


@dataclass(frozen=True, slots=True)
class QuotaSpecRules:
    name: str  # name.namespace
    rules: tuple[ChargeRule, ...]


@dataclass(frozen=True, slots=True)
class ServiceSelector:
    name: str = ""
    namespace: str = ""
    service: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, bag: Bag, namespace: str) -> bool:
        if self.service == "*":
            return True
        workload_labels = bag.get("destination.labels")
        labels = workload_labels if isinstance(workload_labels, Mapping) else {}
        if any(labels.get(k) != v for k, v in self.labels):
            return False
        raw_host = bag.get("request.host")
        host = _host(raw_host) if isinstance(raw_host, str) else ""
        name, ns = self.name, self.namespace
        if self.service:
            if host and host == self.service:
                return True
            parts = self.service.split(".")
            name, ns = parts[0], (parts[1] if len(parts) > 1 else "")
        if not name:
            return False
        workload_ns = bag.get("destination.namespace")
        actual_ns = workload_ns if isinstance(workload_ns, str) and workload_ns else namespace
        host_labels = host.split(".") if host else []
        names = {bag.get("destination.workload.name"), labels.get("app")}
        if host_labels:
            names.add(host_labels[0])
        if name not in names:
            return False
        if not ns:
            return True
        if ns == actual_ns:
            return True
        # The host names the namespace itself: ratings.default, ratings.default.svc...
        return len(host_labels) > 1 and host_labels[0] == name and host_labels[1] == ns


def _host(value: str) -> str:
    host = value.strip().lower()
    if host.startswith("["):  # [::1]:80
        return host.partition("]")[0][1:]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


@dataclass(frozen=True, slots=True)
class Binding:
    name: str  # name.namespace
    services: tuple[ServiceSelector, ...]
    specs: tuple[QuotaSpecRules, ...]


@dataclass
class QuotaCharges:
    """The bound QuotaSpecs of one configuration, filled in by the kinds' compile steps."""

    specs: dict[tuple[str, str], QuotaSpecRules] = field(default_factory=dict)
    bindings: list[Binding] = field(default_factory=list)

    @property
    def governed(self) -> frozenset[str]:
        """The quota instances some QuotaSpec names: only the specs decide their charge."""
        return frozenset(
            name for spec in self.specs.values() for rule in spec.rules for name, _ in rule.charges
        )

    def amounts(self, bag: Bag, namespace: str) -> dict[str, int]:
        """Instance full name -> total charge, from the specs bound to this request."""
        out: dict[str, int] = {}
        seen: set[str] = set()
        for binding in self.bindings:
            if not any(s.matches(bag, namespace) for s in binding.services):
                continue
            for spec in binding.specs:
                if spec.name in seen:  # a spec bound twice charges once
                    continue
                seen.add(spec.name)
                for rule in spec.rules:
                    if rule.applies(bag):
                        for name, charge in rule.charges:
                            out[name] = out.get(name, 0) + charge
        return out
