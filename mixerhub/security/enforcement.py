"""Compiled AuthorizationPolicies and what they decide for one request.

A snapshot holds one ``PolicySet``. Policies are indexed by namespace when it is built, and the
policies that select a workload are worked out once per (namespace, labels) and cached, so a
request only runs the rules of the policies that apply to it, each policy's rules generated as
one plain Python function when configuration loads (compile_rules). The order of evaluation
is Istio's (istio/api security/v1 AuthorizationPolicy): CUSTOM, then DENY, then ALLOW; AUDIT
never changes the decision and dry-run policies are only reported.

Missing attributes follow Istio's generated Envoy RBAC: a value list never matches what is not
there, and a ``not*`` list is ``not(any of them)``, so it holds when the attribute is missing. A
DENY with ``notRequestPrincipals: ["*"]`` therefore denies a request with no JWT instead of
letting it slip by (istio/istio pilot/pkg/security/authz/model/model.go).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mixerhub.security import ROOT_NAMESPACE
from mixerhub.security.matching import Matcher, StringMatcher, lookup
from mixerhub.types import Bag
from mixerhub.workload import WorkloadIdentity

ALLOW: Final = "ALLOW"
DENY: Final = "DENY"
AUDIT: Final = "AUDIT"
CUSTOM: Final = "CUSTOM"


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    allowed: bool
    policy: str  # "name.namespace" of the policy that decided; "" for a default
    action: str  # ALLOW | DENY | "" (the action of the policy that decided)
    reason: str  # short, for logs and the denial body
    custom: tuple[str, ...] = ()  # providers of matching CUSTOM policies, for the caller to ask
    audit: tuple[str, ...] = ()  # AUDIT policies that matched
    dry_run: tuple[tuple[str, str, bool], ...] = ()  # (policy, action, matched)


NO_POLICY: Final = AuthzDecision(True, "", "", "no authorization policy applies to the workload")
NO_ALLOW_POLICY: Final = AuthzDecision(True, "", "", "no ALLOW policy applies to the workload")
NO_ALLOW_MATCHED: Final = AuthzDecision(False, "", "", "no ALLOW policy matched")


# What a field reads: an attribute's name, or a function of the bag for a header or a claim;
# None means the request does not carry it.
Reader = str | Callable[[Bag], object]
# A compiled test of a request.
Test = Callable[[Bag], bool]


class HeaderReader:
    """A request header by its lower-cased name, from the ``request.headers`` map. A class, not
    a closure, so the decision cache can key on this one header rather than on the whole map."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, bag: Bag) -> object:
        headers = bag.get("request.headers")
        return headers.get(self.name) if isinstance(headers, Mapping) else None


def header(name: str) -> Reader:
    return HeaderReader(name)


def claim(path: tuple[str, ...]) -> Reader:
    """A JWT claim, nested keys walked one by one (``request.auth.claims[a][b]``)."""

    def read(bag: Bag) -> object:
        return lookup(bag.get("request.auth.claims"), path)

    return read


class FieldTest:
    """One field of a source, an operation or a ``when`` condition: the request must match one of
    its values (if any are given) and none of its ``not`` values."""

    __slots__ = ("attributes", "exclude", "http_only", "match", "read")

    def __init__(
        self,
        read: Reader,
        match: Matcher | None,
        exclude: Matcher | None,
        *,
        attributes: Iterable[str],
        http_only: bool,
    ) -> None:
        if match is None and exclude is None:
            raise ValueError("a field test needs values or not-values")
        self.read = read
        self.match = match
        self.exclude = exclude
        self.attributes = frozenset(attributes)
        # Fields Istio calls "HTTP only" (hosts, methods, paths, JWT, headers) read differently
        # for TCP traffic; see Rule.for_tcp.
        self.http_only = http_only


Clause = tuple[FieldTest, ...]  # every test must hold; an empty clause always does


@dataclass(frozen=True, slots=True)
class Rule:
    """A rule matches when one of its sources, one of its operations and all its conditions
    match; an absent from/to/when matches everything, so ``{}`` matches every request."""

    sources: tuple[Clause, ...] = ()
    operations: tuple[Clause, ...] = ()
    conditions: Clause = ()

    def tests(self) -> Iterable[FieldTest]:
        for clause in (*self.sources, *self.operations, self.conditions):
            yield from clause

    def for_tcp(self, action: str) -> Rule | None:
        """The rule as Istio builds it for a TCP filter chain, where HTTP-only fields cannot be
        read: an ALLOW rule using one is dropped (it allows less), any other action ignores
        those fields (DENY, AUDIT and CUSTOM then match more). Istio's docs: "For a DENY rule,
        missing attributes are treated as matches."""
        if not any(t.http_only for t in self.tests()):
            return self
        if action == ALLOW:
            return None

        def tcp(clause: Clause) -> Clause:
            return tuple(t for t in clause if not t.http_only)

        return Rule(
            tuple(tcp(c) for c in self.sources),
            tuple(tcp(c) for c in self.operations),
            tcp(self.conditions),
        )


def compile_rules(rules: Sequence[Rule]) -> Test:
    """Rules as one plain Python function of the bag, true when any rule matches.

    Generated, as Mixer expressions are (mixerhub.expression): every field becomes one inline
    test, ``(v := bag.get("request.method")) is not None and v == "GET"``, so a request runs no
    interpreter of policies, only comparisons. Values are referenced as constants, never
    spliced into the source."""
    return _Generator().function(rules)


class _Generator:
    def __init__(self) -> None:
        self.constants: dict[str, object] = {}

    def constant(self, value: object) -> str:
        name = f"_k{len(self.constants)}"
        self.constants[name] = value
        return name

    def function(self, rules: Sequence[Rule]) -> Test:
        body = " or ".join(self.rule(r) for r in rules) or "False"
        source = f"def policy(bag):\n    return {body}\n"
        namespace: dict[str, Any] = dict(self.constants)
        exec(compile(source, "<AuthorizationPolicy>", "exec"), namespace)
        test: Test = namespace["policy"]
        return test

    def rule(self, rule: Rule) -> str:
        parts = []
        if rule.conditions:
            parts.append(self.clause(rule.conditions))
        if rule.sources:
            parts.append(self.any_of(rule.sources))
        if rule.operations:
            parts.append(self.any_of(rule.operations))
        return "(" + " and ".join(parts) + ")" if parts else "True"

    def any_of(self, clauses: Sequence[Clause]) -> str:
        return "(" + " or ".join(self.clause(c) for c in clauses) + ")"

    def clause(self, clause: Clause) -> str:
        if not clause:
            return "True"
        return "(" + " and ".join(self.field(t) for t in clause) + ")"

    def field(self, test: FieldTest) -> str:
        # A missing value (None) fails a value list, while a not-list alone holds: Envoy RBAC's
        # not_id of a matcher that cannot match.
        read = test.read
        fetch = f"bag.get({read!r})" if isinstance(read, str) else f"{self.constant(read)}(bag)"
        if test.exclude is None:
            assert test.match is not None
            return f"((v := {fetch}) is not None and {self.matcher(test.match)})"
        if test.match is None:
            return f"((v := {fetch}) is None or not {self.matcher(test.exclude)})"
        return (
            f"((v := {fetch}) is not None and {self.matcher(test.match)}"
            f" and not {self.matcher(test.exclude)})"
        )

    def matcher(self, m: Matcher) -> str:
        """``v`` tested by m, inline for the common string forms."""
        if not isinstance(m, StringMatcher) or m.ignore_case:
            return f"{self.constant(m)}(v)"
        if len(m.exact) == 1 and not (m.prefixes or m.suffixes or m.present):
            (only,) = m.exact
            return f"v == {only!r}"
        tests = []
        if m.exact:
            tests.append(f"v in {self.constant(m.exact)}")
        if m.prefixes:
            tests.append(f"v.startswith({m.prefixes!r})")
        if m.suffixes:
            tests.append(f"v.endswith({m.suffixes!r})")
        if m.present:
            tests.append("True" if m.header else "v != ''")
        # The type test first: a list in a bag must not reach a set lookup or startswith.
        return f"(v.__class__ is str and ({' or '.join(tests)}))"


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str  # name.namespace
    namespace: str
    action: str  # ALLOW | DENY | AUDIT | CUSTOM
    rules: tuple[Rule, ...]
    selector: tuple[tuple[str, str], ...] = ()  # matchLabels; empty selects every workload
    provider: str = ""  # CUSTOM only
    dry_run: bool = False
    tcp_rules: tuple[Rule, ...] = ()
    # Whether TCP traffic reads it differently (it uses an HTTP-only field).
    protocol_sensitive: bool = False
    referenced: frozenset[str] = frozenset()
    # The rules compiled, for HTTP and for TCP.
    http_test: Test = field(init=False, repr=False, compare=False)
    tcp_test: Test = field(init=False, repr=False, compare=False)
    # What the policy decides when it is the one that decides, made once.
    decision: AuthzDecision = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "http_test", compile_rules(self.rules))
        tcp = self.tcp_rules == self.rules
        object.__setattr__(
            self, "tcp_test", self.http_test if tcp else compile_rules(self.tcp_rules)
        )
        allowed = self.action != DENY
        reason = f"{'allowed' if allowed else 'denied'} by policy {self.name}"
        object.__setattr__(self, "decision", AuthzDecision(allowed, self.name, self.action, reason))

    @classmethod
    def build(
        cls,
        name: str,
        namespace: str,
        action: str,
        rules: Iterable[Rule],
        selector: Mapping[str, str] | None = None,
        provider: str = "",
        dry_run: bool = False,
    ) -> CompiledPolicy:
        http = tuple(rules)
        tcp = tuple(r for r in (rule.for_tcp(action) for rule in http) if r is not None)
        tests = [t for r in http for t in r.tests()]
        return cls(
            f"{name}.{namespace}",
            namespace,
            action,
            http,
            tuple(sorted((selector or {}).items())),
            provider,
            dry_run,
            tcp,
            any(t.http_only for t in tests),
            frozenset().union(*(t.attributes for t in tests)),
        )

    def matches(self, bag: Bag, tcp: bool = False) -> bool:
        return self.tcp_test(bag) if tcp else self.http_test(bag)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.selector)


@dataclass(frozen=True, slots=True)
class _Selected:
    """The policies that select one workload, by what they do."""

    custom: tuple[CompiledPolicy, ...] = ()
    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()
    dry_run: tuple[CompiledPolicy, ...] = ()
    # CUSTOM policies naming more than one provider for one workload: Istio cannot pick one and
    # turns them into DENY rules (builder "deny-due-to-bad-CUSTOM-action").
    bad_custom: tuple[CompiledPolicy, ...] = ()
    providers: tuple[str, ...] = ()
    protocol_sensitive: bool = False


# What a workload no policy selects gets; any other selection holds at least one policy.
_NOTHING: Final = _Selected()

# Distinct (namespace, labels) pairs remembered; past this the cache starts over. Workloads come
# from the proxies' own metadata, so a mesh has few of them.
_SELECTION_CACHE_SIZE: Final = 4096


class PolicySet:
    """Every AuthorizationPolicy of a snapshot, compiled; the default is an empty set."""

    __slots__ = (
        "_by_namespace", "_cache", "_root", "headers", "policies", "referenced", "root_namespace",
    )  # fmt: skip

    def __init__(
        self, policies: Iterable[CompiledPolicy] = (), root_namespace: str = ROOT_NAMESPACE
    ) -> None:
        # Root namespace first, then by namespace and name: a stable order for reports.
        self.policies = tuple(
            sorted(policies, key=lambda p: (p.namespace != root_namespace, p.namespace, p.name))
        )
        self.root_namespace = root_namespace
        self._root = tuple(p for p in self.policies if p.namespace == root_namespace)
        by_namespace: dict[str, list[CompiledPolicy]] = {}
        for p in self.policies:
            if p.namespace != root_namespace:
                by_namespace.setdefault(p.namespace, []).append(p)
        self._by_namespace = {ns: tuple(ps) for ns, ps in by_namespace.items()}
        referenced: set[str] = set()
        for p in self.policies:
            referenced |= p.referenced
            if p.protocol_sensitive:
                referenced.add("context.protocol")
        self.referenced = frozenset(referenced)
        # The header names the policies read from request.headers, or None when something reads
        # the map otherwise: what a decision depends on, finer than the whole map.
        tests = [t for p in self.policies for r in p.rules for t in r.tests()]
        readers = [t.read for t in tests if "request.headers" in t.attributes]
        self.headers: frozenset[str] | None = (
            frozenset(r.name for r in readers if isinstance(r, HeaderReader))
            if all(isinstance(r, HeaderReader) for r in readers)
            else None
        )
        self._cache: dict[tuple[str, frozenset[tuple[str, str]]], _Selected] = {}

    def __repr__(self) -> str:
        return f"PolicySet({len(self.policies)} policies)"

    def applies(self, workload: WorkloadIdentity) -> bool:
        """Whether any policy (of any action, dry-run included) selects the workload."""
        return self.policies != () and self._select(workload) is not _NOTHING

    def evaluate(self, workload: WorkloadIdentity, bag: Bag) -> AuthzDecision:
        if not self.policies:
            return NO_POLICY
        selected = self._select(workload)
        if selected is _NOTHING:
            return NO_POLICY
        tcp = selected.protocol_sensitive and bag.get("context.protocol") == "tcp"
        custom: tuple[str, ...] = ()
        if selected.custom:
            custom = tuple(
                dict.fromkeys(p.provider for p in selected.custom if p.matches(bag, tcp))
            )
        audit: tuple[str, ...] = ()
        if selected.audit:
            audit = tuple(p.name for p in selected.audit if p.matches(bag, tcp))
        dry_run: tuple[tuple[str, str, bool], ...] = ()
        if selected.dry_run:
            dry_run = tuple((p.name, p.action, p.matches(bag, tcp)) for p in selected.dry_run)
        decision = self._decide(selected, bag, tcp)
        if custom or audit or dry_run:
            return AuthzDecision(
                decision.allowed, decision.policy, decision.action, decision.reason,
                custom, audit, dry_run,
            )  # fmt: skip
        return decision

    @staticmethod
    def _decide(selected: _Selected, bag: Bag, tcp: bool) -> AuthzDecision:
        for p in selected.bad_custom:
            if p.matches(bag, tcp):
                reason = (
                    f"denied by policy {p.name}: the CUSTOM policies of this workload name more"
                    f" than one provider ({', '.join(selected.providers)})"
                )
                return AuthzDecision(False, p.name, DENY, reason)
        for p in selected.deny:
            if (p.tcp_test if tcp else p.http_test)(bag):
                return p.decision
        if not selected.allow:
            return NO_ALLOW_POLICY
        for p in selected.allow:
            if (p.tcp_test if tcp else p.http_test)(bag):
                return p.decision
        return NO_ALLOW_MATCHED

    def _select(self, workload: WorkloadIdentity) -> _Selected:
        key = (workload.namespace, frozenset(workload.labels.items()))
        selected = self._cache.get(key)
        if selected is None:
            selected = self._compute(workload.namespace, workload.labels)
            if len(self._cache) >= _SELECTION_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = selected
        return selected

    def _compute(self, namespace: str, labels: Mapping[str, str]) -> _Selected:
        candidates = self._root
        if namespace != self.root_namespace:
            candidates += self._by_namespace.get(namespace, ())
        chosen = [p for p in candidates if p.selects(labels)]
        if not chosen:
            return _NOTHING

        def enforced(action: str) -> tuple[CompiledPolicy, ...]:
            return tuple(p for p in chosen if p.action == action and not p.dry_run)

        custom = enforced(CUSTOM)
        # Istio counts the providers of dry-run CUSTOM policies too (builder.go providerSet).
        providers = tuple(sorted({p.provider for p in chosen if p.action == CUSTOM}))
        bad = len(providers) > 1
        return _Selected(
            custom=() if bad else custom,
            deny=enforced(DENY),
            allow=enforced(ALLOW),
            audit=enforced(AUDIT),
            dry_run=tuple(p for p in chosen if p.dry_run),
            bad_custom=custom if bad else (),
            providers=providers if bad else (),
            protocol_sensitive=any(p.protocol_sensitive for p in chosen),
        )

    def configz(self) -> list[dict[str, Any]]:
        """The policies as JSON-ready data, for /debug/configz."""
        return [
            {
                "name": p.name,
                "action": p.action,
                "selector": dict(p.selector),
                "rules": len(p.rules),
                **({"provider": p.provider} if p.provider else {}),
                **({"dryRun": True} if p.dry_run else {}),
            }
            for p in self.policies
        ]
