"""Istio's AuthorizationPolicy (security.istio.io/v1 and v1beta1): spec, validation, compile step.

The spec follows istio/api security/v1beta1/authorization_policy.proto; validation follows
istiod's webhook (pkg/config/validation ValidateAuthorizationPolicy, pkg/config/security), with
each error at its field path (``spec.rules[0].from[0].source.ipBlocks[1]``). Every value is
compiled into a matcher here (mixerhub.security.matching), so a request only runs them; the
compiled policies and their evaluation are in mixerhub.security.enforcement (a module of its
own because the snapshot holds a ``PolicySet`` and the store, imported here, imports the
snapshot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field

from mixerhub.security.enforcement import (
    CUSTOM,
    DENY,
    AuthzDecision,
    Clause,
    CompiledPolicy,
    FieldTest,
    PolicySet,
    Reader,
    Rule,
    claim,
    header,
)
from mixerhub.security.matching import (
    AnyElement,
    CommaSeparated,
    IPMatcher,
    Matcher,
    PortMatcher,
    RequestPrincipalMatcher,
    ServiceAccountMatcher,
    StringMatcher,
    namespace_matcher,
    parse_ip_block,
    parse_port,
    path_matcher,
    path_template_problem,
)
from mixerhub.store.compilation import Compilation
from mixerhub.store.documents import Document
from mixerhub.store.errors import join_path
from mixerhub.store.kinds import Kind
from mixerhub.types import Params

GROUP: Final = "security.istio.io"
VERSIONS: Final = ("v1", "v1beta1")
DRY_RUN_ANNOTATION: Final = "istio.io/dry-run"

__all__ = ["AUTHORIZATION_POLICY", "AuthorizationPolicySpec", "AuthzDecision", "PolicySet"]


def _text(value: object) -> object:
    # YAML reads `ports: [8080]` or `values: [443]` as numbers; they mean the same strings.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_text)]
Values = list[Text] | None


class WorkloadSelector(Params):
    match_labels: dict[str, str] = Field(default_factory=dict)


class ExtensionProvider(Params):
    name: str = ""


class Source(Params):
    principals: Values = None
    not_principals: Values = None
    request_principals: Values = None
    not_request_principals: Values = None
    namespaces: Values = None
    not_namespaces: Values = None
    service_accounts: Values = None
    not_service_accounts: Values = None
    ip_blocks: Values = None
    not_ip_blocks: Values = None
    remote_ip_blocks: Values = None
    not_remote_ip_blocks: Values = None


class Operation(Params):
    hosts: Values = None
    not_hosts: Values = None
    ports: Values = None
    not_ports: Values = None
    methods: Values = None
    not_methods: Values = None
    paths: Values = None
    not_paths: Values = None


class From(Params):
    source: Source | None = None


class To(Params):
    operation: Operation | None = None


class Condition(Params):
    key: str = ""
    values: Values = None
    not_values: Values = None


class RuleSpec(Params):
    from_: list[From] | None = Field(default=None, alias="from")
    to: list[To] | None = None
    when: list[Condition] | None = None


class AuthorizationPolicySpec(Params):
    selector: WorkloadSelector | None = None
    target_ref: dict[str, Any] | None = None
    target_refs: list[dict[str, Any]] | None = None
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: ExtensionProvider | None = None
    rules: list[RuleSpec] | None = None


Path = tuple[str | int, ...]
# Compiles a field's values (recording errors at their paths); None when one was bad.
ValueCompiler = Callable[[Sequence[str], Path], Matcher | None]


class _FieldKind:
    """What one field reads (an attribute, or a header or claim inside ``attribute``), whether
    Istio calls it HTTP-only, and how its values compile."""

    __slots__ = ("attribute", "compile", "http_only", "read")

    def __init__(
        self, read: Reader, http_only: bool, compile: ValueCompiler, attribute: str = ""
    ) -> None:
        self.read = read
        self.attribute = attribute or str(read)
        self.http_only = http_only
        self.compile = compile


# Source fields and condition keys istiod's validation refuses with action CUSTOM.
_CUSTOM_UNSUPPORTED_SOURCE = (
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
)
_CUSTOM_UNSUPPORTED_KEYS = ("source.namespace", "source.serviceAccount", "source.principal")

# What istiod says of the Istio attributes it knows but does not take in a `when`.
_RETIRED_KEYS = {
    "destination.namespace": "attribute destination.namespace is replaced by metadata.namespace",
    "destination.name": "deprecated attribute destination.name: only supported in v1alpha1",
    "destination.user": "deprecated attribute destination.user: only supported in v1alpha1",
}
_SUPPORTED_KEYS = (
    "request.headers[<name>], source.ip, remote.ip, source.namespace, source.serviceAccount,"
    " source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter,"
    " request.auth.claims[<name>], destination.ip, destination.port, connection.sni"
)


class _PolicyCompiler:
    """Validates one policy's spec and compiles its rules, collecting every error."""

    def __init__(self, doc: Document, spec: AuthorizationPolicySpec, c: Compilation) -> None:
        self.doc, self.spec, self.c = doc, spec, c
        self.failed = False

    def fail(self, path: Path, reason: str) -> None:
        self.failed = True
        self.c.error(self.doc, join_path(*path), reason)

    # --- value compilers -------------------------------------------------------------------

    def _nonempty(self, values: Sequence[str], path: Path) -> bool:
        ok = True
        for i, v in enumerate(values):
            if v == "":
                self.fail((*path, i), "empty value not allowed")
                ok = False
        return ok

    def strings(self, values: Sequence[str], path: Path) -> Matcher | None:
        return StringMatcher.of(values) if self._nonempty(values, path) else None

    def headers(self, values: Sequence[str], path: Path) -> Matcher | None:
        # Istio matches methods and request.headers[...] as HTTP headers.
        ok = self._nonempty(values, path)
        return StringMatcher.of(values, header=True) if ok else None

    def hosts(self, values: Sequence[str], path: Path) -> Matcher | None:
        # The :authority header, compared case-insensitively since Istio 1.11.1 (RFC 4343).
        ok = self._nonempty(values, path)
        return StringMatcher.of(values, ignore_case=True, header=True) if ok else None

    def namespaces(self, values: Sequence[str], path: Path) -> Matcher | None:
        return namespace_matcher(values) if self._nonempty(values, path) else None

    def elements(self, values: Sequence[str], path: Path) -> Matcher | None:
        return AnyElement(StringMatcher.of(values)) if self._nonempty(values, path) else None

    def inline_header(self, values: Sequence[str], path: Path) -> Matcher | None:
        ok = self._nonempty(values, path)
        return CommaSeparated(StringMatcher.of(values, header=True)) if ok else None

    def request_principals(self, values: Sequence[str], path: Path) -> Matcher | None:
        return RequestPrincipalMatcher(values) if self._nonempty(values, path) else None

    def ip_blocks(self, values: Sequence[str], path: Path) -> Matcher | None:
        networks = []
        ok = self._nonempty(values, path)
        for i, v in enumerate(values):
            if not v:
                continue
            try:
                networks.append(parse_ip_block(v))
            except ValueError as e:
                self.fail((*path, i), str(e))
                ok = False
        return IPMatcher(networks) if ok else None

    def ports(self, values: Sequence[str], path: Path) -> Matcher | None:
        ports = []
        ok = self._nonempty(values, path)
        for i, v in enumerate(values):
            if not v:
                continue
            try:
                ports.append(parse_port(v))
            except ValueError as e:
                self.fail((*path, i), str(e))
                ok = False
        return PortMatcher(ports) if ok else None

    def paths(self, values: Sequence[str], path: Path) -> Matcher | None:
        ok = self._nonempty(values, path)
        for i, v in enumerate(values):
            problem = path_template_problem(v) if v else None
            if problem:
                self.fail((*path, i), problem)
                ok = False
        return path_matcher(values) if ok else None

    def service_accounts(self, values: Sequence[str], path: Path) -> Matcher | None:
        ok = self._nonempty(values, path)
        if len(values) > 16:  # istiod's bound (CheckServiceAccount)
            self.fail(path, f"may not have more than 16 values, found {len(values)}")
            ok = False
        for i, v in enumerate(values):
            problem = ""
            if "*" in v:
                problem = "wildcard not allowed"
            elif len(v) > 320:
                problem = "value cannot exceed 320 characters"
            elif v.count("/") > 1 or (v and "" in v.split("/")):
                problem = (
                    f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {v!r}"
                )
            if problem:
                self.fail((*path, i), problem)
                ok = False
        return ServiceAccountMatcher(values, self.doc.namespace) if ok else None

    # --- fields ----------------------------------------------------------------------------

    def field(
        self,
        kind: _FieldKind,
        values: Sequence[str] | None,
        not_values: Sequence[str] | None,
        path: Path,
        names: tuple[str, str],
    ) -> FieldTest | None:
        """One field pair (``principals``/``notPrincipals``, ``values``/``notValues``)."""
        match = kind.compile(values, (*path, names[0])) if values else None
        exclude = kind.compile(not_values, (*path, names[1])) if not_values else None
        if (values and match is None) or (not_values and exclude is None):
            return None
        if match is None and exclude is None:
            return None
        return FieldTest(
            kind.read, match, exclude, attributes=(kind.attribute,), http_only=kind.http_only
        )

    def source(self, src: Source, path: Path) -> Clause:
        kinds = {
            "principals": _FieldKind("source.principal", False, self.strings),
            "request_principals": _FieldKind(
                "request.auth.principal", True, self.request_principals
            ),
            "namespaces": _FieldKind("source.namespace", False, self.namespaces),
            "service_accounts": _FieldKind("source.principal", False, self.service_accounts),
            "ip_blocks": _FieldKind("source.ip", False, self.ip_blocks),
            "remote_ip_blocks": _FieldKind("remote.ip", False, self.ip_blocks),
        }
        set_fields = {name for name, value in src if value}
        if not set_fields:
            self.fail(path, "`source` must not be empty")
        if set_fields & {"service_accounts", "not_service_accounts"} and set_fields & {
            "principals",
            "not_principals",
            "namespaces",
            "not_namespaces",
        }:
            self.fail((*path, "serviceAccounts"), "cannot be set with namespaces or principals")
        if self.spec.action == CUSTOM:
            for name in _CUSTOM_UNSUPPORTED_SOURCE:
                if name in set_fields:
                    self.fail((*path, _camel(name)), "not supported with action CUSTOM")
        tests = []
        for name, kind in kinds.items():
            test = self.field(
                kind,
                getattr(src, name),
                getattr(src, "not_" + name),
                path,
                (_camel(name), _camel("not_" + name)),
            )
            if test is not None:
                tests.append(test)
        return tuple(tests)

    def operation(self, op: Operation, path: Path) -> Clause:
        kinds = {
            "hosts": _FieldKind("request.host", True, self.hosts),
            "ports": _FieldKind("destination.port", False, self.ports),
            "methods": _FieldKind("request.method", True, self.headers),
            "paths": _FieldKind("request.url_path", True, self.paths),
        }
        if not any(value for _, value in op):
            self.fail(path, "`operation` must not be empty")
        tests = []
        for name, kind in kinds.items():
            test = self.field(
                kind,
                getattr(op, name),
                getattr(op, "not_" + name),
                path,
                (name, _camel("not_" + name)),
            )
            if test is not None:
                tests.append(test)
        return tuple(tests)

    def condition_kind(self, key: str, path: Path) -> _FieldKind | None:
        """The ``when`` key's reader and value compiler (istio.io conditions reference)."""
        simple = {
            "source.ip": _FieldKind("source.ip", False, self.ip_blocks),
            "remote.ip": _FieldKind("remote.ip", False, self.ip_blocks),
            "source.namespace": _FieldKind("source.namespace", False, self.namespaces),
            "source.serviceAccount": _FieldKind("source.principal", False, self.service_accounts),
            "source.principal": _FieldKind("source.principal", False, self.strings),
            "request.auth.principal": _FieldKind(
                "request.auth.principal", True, self.request_principals
            ),
            "request.auth.audiences": _FieldKind("request.auth.audiences", True, self.elements),
            "request.auth.presenter": _FieldKind("request.auth.presenter", True, self.strings),
            "destination.ip": _FieldKind("destination.ip", False, self.ip_blocks),
            "destination.port": _FieldKind("destination.port", False, self.ports),
            "connection.sni": _FieldKind("connection.requested_server_name", False, self.strings),
        }
        kind = simple.get(key)
        if kind is not None:
            return kind
        key_path = (*path, "key")
        if key.startswith("request.headers["):
            name = _bracketed(key[len("request.headers") :])
            if name is None:
                self.fail(key_path, f"bad key ({key}): should have format request.headers[name]")
                return None
            return _FieldKind(header(name.lower()), True, self.headers, "request.headers")
        if key.startswith("request.experimental.inline.headers["):
            name = _bracketed(key[len("request.experimental.inline.headers") :])
            if name is None:
                self.fail(key_path, f"bad key ({key}): should have format a[b]")
                return None
            return _FieldKind(header(name.lower()), True, self.inline_header, "request.headers")
        if key.startswith("request.auth.claims["):
            claims = _nested(key[len("request.auth.claims") :])
            if claims is None:
                self.fail(
                    key_path,
                    f"bad key ({key}): should have format request.auth.claims[name]"
                    " or request.auth.claims[a][b]",
                )
                return None
            return _FieldKind(claim(claims), True, self.elements, "request.auth.claims")
        if key == "":
            self.fail(key_path, "`key` must not be empty")
        elif key in _RETIRED_KEYS:
            self.fail(key_path, _RETIRED_KEYS[key])
        elif key.startswith("destination.labels"):
            self.fail(key_path, f"attribute {key} is replaced by the workload selector")
        elif key.startswith("experimental.envoy.filters."):
            self.fail(key_path, f"attribute {key} is not supported: it reads Envoy filter metadata")
        else:
            self.fail(key_path, f"unknown attribute: {key}; supported: {_SUPPORTED_KEYS}")
        return None

    def conditions(self, when: Sequence[Condition], path: Path) -> Clause:
        tests = []
        for i, cond in enumerate(when):
            cpath = (*path, i)
            kind = self.condition_kind(cond.key, cpath)
            if self.spec.action == CUSTOM and (
                cond.key in _CUSTOM_UNSUPPORTED_KEYS or cond.key.startswith("request.auth.")
            ):
                self.fail((*cpath, "key"), f"{cond.key} is not supported with action CUSTOM")
            if not cond.values and not cond.not_values:
                self.fail(
                    cpath, f"at least one of values or notValues must be set for key {cond.key}"
                )
                continue
            if kind is None:
                continue
            test = self.field(kind, cond.values, cond.not_values, cpath, ("values", "notValues"))
            if test is not None:
                tests.append(test)
        return tuple(tests)

    def rule(self, rule: RuleSpec, path: Path) -> Rule:
        sources: list[Clause] = []
        operations: list[Clause] = []
        if rule.from_ is not None and not rule.from_:
            self.fail((*path, "from"), "`from` must not be empty")
        for j, f in enumerate(rule.from_ or ()):
            if f.source is None:
                self.fail((*path, "from", j, "source"), "required field is missing")
                continue
            sources.append(self.source(f.source, (*path, "from", j, "source")))
        if rule.to is not None and not rule.to:
            self.fail((*path, "to"), "`to` must not be empty")
        for j, t in enumerate(rule.to or ()):
            if t.operation is None:
                self.fail((*path, "to", j, "operation"), "required field is missing")
                continue
            operations.append(self.operation(t.operation, (*path, "to", j, "operation")))
        conditions = self.conditions(rule.when or (), (*path, "when"))
        return Rule(tuple(sources), tuple(operations), conditions)

    def policy(self) -> CompiledPolicy | None:
        spec, doc = self.spec, self.doc
        if spec.target_ref is not None or spec.target_refs is not None:
            field = "targetRef" if spec.target_ref is not None else "targetRefs"
            self.fail(
                ("spec", field),
                "targetRef selects a Kubernetes Gateway or Service, and the hub has no"
                " Kubernetes: select workloads with spec.selector.matchLabels",
            )
        labels = spec.selector.match_labels if spec.selector else {}
        for k, v in labels.items():
            if not k:
                self.fail(("spec", "selector", "matchLabels"), "empty key is not supported")
            elif "*" in k or "*" in v:
                self.fail(
                    ("spec", "selector", "matchLabels", k),
                    f"wildcard is not supported in selector: {k}={v}",
                )
        provider = spec.provider.name if spec.provider else ""
        # As in protobuf, `rules: []` is no rules at all.
        if spec.action == CUSTOM:
            if not spec.rules:
                self.fail(
                    ("spec", "rules"),
                    "CUSTOM action without rules is meaningless as it will never be triggered;"
                    " add an empty rule {} to trigger it for every request",
                )
            elif not provider:
                self.fail(("spec", "provider", "name"), "required with action CUSTOM")
        elif spec.provider is not None:
            self.fail(("spec", "provider"), f"only for action CUSTOM, not {spec.action}")
        if spec.action == DENY and not spec.rules:
            self.fail(
                ("spec", "rules"),
                "DENY action without rules is meaningless as it will never be triggered;"
                " add an empty rule {} to deny every request",
            )
        dry_run = self.dry_run()
        rules = [self.rule(r, ("spec", "rules", i)) for i, r in enumerate(spec.rules or ())]
        if self.failed:
            return None
        return CompiledPolicy.build(
            doc.name, doc.namespace, spec.action, rules, labels, provider, dry_run
        )

    def dry_run(self) -> bool:
        text = self.doc.annotations.get(DRY_RUN_ANNOTATION)
        if text is None:
            return False
        # Go's strconv.ParseBool, which istiod uses; istiod only logs a bad value and enforces
        # the policy, but a typo must not silently change what a policy does.
        if text in ("1", "t", "T", "TRUE", "true", "True"):
            return True
        if text in ("0", "f", "F", "FALSE", "false", "False"):
            return False
        self.fail(
            (f"metadata.annotations[{DRY_RUN_ANNOTATION}]",),
            f"not a boolean: {text!r} (true or false)",
        )
        return False


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _bracketed(text: str) -> str | None:
    """``[name]`` -> ``name``; None unless the whole text is one non-empty bracketed name."""
    if len(text) > 2 and text[0] == "[" and text[-1] == "]" and "[" not in text[1:-1]:
        return text[1:-1]
    return None


def _nested(text: str) -> tuple[str, ...] | None:
    """``[a][b]`` -> ``(a, b)`` (istio's extractNameInNestedBrackets); None if malformed."""
    names: list[str] = []
    rest = text
    while rest:
        if not rest.startswith("["):
            return None
        end = rest.find("]")
        name = rest[1:end] if end > 0 else ""
        if end < 0 or not name or "[" in name:
            return None
        names.append(name)
        rest = rest[end + 1 :]
    return tuple(names) or None


def compile_authorization_policy(
    doc: Document, spec: AuthorizationPolicySpec, c: Compilation
) -> None:
    if not c.claim("AuthorizationPolicy", doc):
        return
    policy = _PolicyCompiler(doc, spec, c).policy()
    if policy is not None:
        c.authorization.append(policy)


AUTHORIZATION_POLICY: Final = Kind(
    GROUP,
    VERSIONS,
    "AuthorizationPolicy",
    AuthorizationPolicySpec,
    40,
    compile_authorization_policy,
)
