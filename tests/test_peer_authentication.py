"""PeerAuthentication: validation with field paths, and the effective mode of a workload's port
as Istio composes it (workload selector > namespace > mesh in istio-system > PERMISSIVE)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from mixerhub import registry
from mixerhub.security.peer_authentication import PeerAuthentications
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot

REGISTRY = registry.default_registry()
FINANCE = {"app": "finance", "version": "v1"}


def to_documents(text: str) -> str:
    """Short form (name, namespace, the rest is the spec) as full documents."""
    docs = []
    for item in yaml.safe_load(textwrap.dedent(text)) or []:
        spec = dict(item)
        metadata = {"name": spec.pop("name"), "namespace": spec.pop("namespace", "foo")}
        api_version = spec.pop("apiVersion", "security.istio.io/v1")
        docs.append(
            {
                "apiVersion": api_version,
                "kind": "PeerAuthentication",
                "metadata": metadata,
                "spec": spec,
            }
        )
    return yaml.safe_dump_all(docs)


def compile_policies(text: str) -> PeerAuthentications:
    docs, errors = documents.parse("policies.yaml", to_documents(text))
    source = documents.Source(tuple(docs), tuple(errors), ("policies.yaml",), "test")
    snapshot = compile_snapshot(source, REGISTRY, build_handlers=False)
    return snapshot.peer_authentication


def errors_of(text: str) -> list[str]:
    with pytest.raises(Rejected) as e:
        compile_policies(text)
    return [f"{err.path}: {err.reason}" for err in e.value.errors]


def test_no_policy_at_all_is_permissive() -> None:
    policies = compile_policies("[]")
    assert policies.mode("foo", FINANCE, 8080) == "PERMISSIVE"
    assert PeerAuthentications().mode("istio-system", {}, 1) == "PERMISSIVE"


def test_the_mesh_policy_applies_everywhere() -> None:
    policies = compile_policies(
        """
        - {name: default, namespace: istio-system, mtls: {mode: STRICT}}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == "STRICT"
    assert policies.mode("bar", {}, 80) == "STRICT"
    assert policies.mode("istio-system", {}, 80) == "STRICT"


def test_namespace_overrides_the_mesh_and_selector_overrides_the_namespace() -> None:
    policies = compile_policies(
        """
        - {name: default, namespace: istio-system, mtls: {mode: STRICT}}
        - {name: default, namespace: foo, mtls: {mode: PERMISSIVE}}
        - {name: finance, namespace: foo, selector: {matchLabels: {app: finance}},
           mtls: {mode: DISABLE}}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == "DISABLE"
    assert policies.mode("foo", {"app": "orders"}, 8080) == "PERMISSIVE"
    assert policies.mode("bar", FINANCE, 8080) == "STRICT"  # a selector is its namespace's only


def test_a_selector_in_the_root_namespace_is_not_mesh_wide() -> None:
    policies = compile_policies(
        """
        - {name: finance, namespace: istio-system, selector: {matchLabels: {app: finance}},
           mtls: {mode: STRICT}}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == "PERMISSIVE"
    assert policies.mode("istio-system", FINANCE, 8080) == "STRICT"


@pytest.mark.parametrize(
    ("mesh", "namespace", "workload", "expected"),
    [
        ("UNSET", "UNSET", "UNSET", "PERMISSIVE"),  # UNSET all the way up: Istio's default
        ("STRICT", "UNSET", "UNSET", "STRICT"),
        ("DISABLE", "STRICT", "UNSET", "STRICT"),
        ("STRICT", "DISABLE", "UNSET", "DISABLE"),
        ("STRICT", "UNSET", "PERMISSIVE", "PERMISSIVE"),
        ("DISABLE", "UNSET", "STRICT", "STRICT"),
    ],
)
def test_unset_inherits_from_the_level_above(
    mesh: str, namespace: str, workload: str, expected: str
) -> None:
    policies = compile_policies(
        f"""
        - {{name: default, namespace: istio-system, mtls: {{mode: {mesh}}}}}
        - {{name: default, namespace: foo, mtls: {{mode: {namespace}}}}}
        - {{name: finance, namespace: foo, selector: {{matchLabels: {{app: finance}}}},
           mtls: {{mode: {workload}}}}}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == expected


def test_no_mtls_field_is_unset() -> None:
    policies = compile_policies(
        """
        - {name: default, namespace: foo, mtls: {mode: STRICT}}
        - {name: finance, namespace: foo, selector: {matchLabels: {app: finance}}}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == "STRICT"


def test_port_level_mtls_overrides_its_port_only() -> None:
    policies = compile_policies(
        """
        - {name: default, namespace: foo, mtls: {mode: PERMISSIVE}}
        - name: finance
          selector: {matchLabels: {app: finance}}
          mtls: {mode: STRICT}
          portLevelMtls:
            8080: {mode: DISABLE}
            9090: {mode: UNSET}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == "DISABLE"
    assert policies.mode("foo", FINANCE, 9090) == "STRICT"  # UNSET: the workload's mode
    assert policies.mode("foo", FINANCE, 9443) == "STRICT"
    assert policies.mode("foo", {"app": "orders"}, 8080) == "PERMISSIVE"


def test_port_level_with_an_unset_workload_mode_inherits_the_namespace_elsewhere() -> None:
    # istio.io's example: "inherit mTLS mode from namespace (or mesh) settings, and overwrite
    # settings for port 8080".
    policies = compile_policies(
        """
        - {name: default, namespace: istio-system, mtls: {mode: STRICT}}
        - name: finance
          selector: {matchLabels: {app: finance}}
          mtls: {mode: UNSET}
          portLevelMtls: {"8080": {mode: DISABLE}}
        """
    )
    assert policies.mode("foo", FINANCE, 8080) == "DISABLE"
    assert policies.mode("foo", FINANCE, 8081) == "STRICT"


def test_the_first_loaded_of_one_level_stands() -> None:
    policies = compile_policies(
        """
        - {name: b, namespace: foo, mtls: {mode: STRICT}}
        - {name: a, namespace: foo, mtls: {mode: DISABLE}}
        - {name: y, selector: {matchLabels: {app: finance}}, mtls: {mode: DISABLE}}
        - {name: x, selector: {matchLabels: {version: v1}}, mtls: {mode: PERMISSIVE}}
        """
    )
    assert policies.mode("foo", {}, 80) == "STRICT"
    assert policies.mode("foo", FINANCE, 80) == "DISABLE"


def test_both_api_versions_are_accepted() -> None:
    policies = compile_policies(
        """
        - {name: default, apiVersion: security.istio.io/v1beta1, mtls: {mode: STRICT}}
        """
    )
    assert policies.mode("foo", {}, 80) == "STRICT"


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        (
            "- {name: p, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}",
            ["spec.portLevelMtls: requires a selector with matchLabels (spec.selector)"],
        ),
        (
            "- {name: p, selector: {matchLabels: {}}, portLevelMtls: {8080: {mode: DISABLE}}}",
            ["spec.portLevelMtls: requires a selector with matchLabels (spec.selector)"],
        ),
        (
            "- {name: p, selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: STRICT}}}",
            ["spec.portLevelMtls[0]: port must be 1..65535"],
        ),
        (
            "- {name: p, mtls: {mode: REQUIRED}}",
            [
                "spec.mtls.mode: Input should be 'UNSET', 'DISABLE', 'PERMISSIVE' or 'STRICT'"
                " (got 'REQUIRED')"
            ],
        ),
        (
            "- {name: p, selector: {matchLabels: {app: a}}, portLevelMtls: {8080: {mode: strict}}}",
            [
                "spec.portLevelMtls[8080].mode: Input should be 'UNSET', 'DISABLE', 'PERMISSIVE'"
                " or 'STRICT' (got 'strict')"
            ],
        ),
        ("- {name: p, mtls: {mode: STRICT, extra: 1}}", ["spec.mtls.extra: unknown field"]),
        (
            "- {name: p, selector: {matchLabels: {app: a}}, portLevelMtls: {http: {}}}",
            [
                "spec.portLevelMtls.http.[key]: Input should be a valid integer, unable to parse"
                " string as an integer (got 'http')"
            ],
        ),
        (
            "- {name: p, mtls: {mode: STRICT}}\n- {name: p, mtls: {mode: DISABLE}}",
            ["metadata.name: duplicate peerauthentication 'p' in namespace 'foo'"],
        ),
    ],
)
def test_config_errors_name_their_field(policies: str, expected: list[str]) -> None:
    errors = errors_of(policies)
    assert len(errors) == len(expected), errors
    for got, want in zip(errors, expected, strict=True):
        assert got.startswith(want), (got, want)
