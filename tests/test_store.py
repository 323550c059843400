"""The config store: documents -> kinds -> compiled snapshot, and every error at once."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from mixerhub import registry
from mixerhub.adapter import CheckResult
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot, default_config_dir
from mixerhub.store.watch import ConfigStore
from mixerhub.templates import LogEntryInstance

REGISTRY = registry.default_registry()

DENY = """
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: deny, namespace: default}
spec:
  compiledAdapter: denier
  params: {status: {code: 7, message: Not allowed}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: nothing, namespace: default}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-v3, namespace: default}
spec:
  match: source.labels["version"] == "v3"
  actions:
  - handler: deny
    instances: [nothing]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def compile_dir(folder: Path, build: bool = False):  # type: ignore[no-untyped-def]
    return compile_snapshot(documents.read([folder]), REGISTRY, build_handlers=build)


def errors_of(folder: Path) -> list[str]:
    with pytest.raises(Rejected) as e:
        compile_dir(folder)
    return [str(err) for err in e.value.errors]


def test_the_shipped_default_compiles() -> None:
    snapshot = compile_dir(Path(default_config_dir()))
    assert {r.name for r in snapshot.rules} == {
        "stdio.rule.istio-system",
        "stdiotcp.rule.istio-system",
        "promhttp.rule.istio-system",
        "promtcp.rule.istio-system",
        "promtcpconnectionclosed.rule.istio-system",
    }
    assert "request.time" in snapshot.referenced


def test_a_denier_rule_compiles_into_a_snapshot(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", DENY)
    snapshot = compile_dir(tmp_path)
    (rule,) = snapshot.rules
    assert rule.name == "deny-v3.rule.default"
    assert rule.match is not None
    assert rule.match.evaluate({"source.labels": {"version": "v3"}}) is True
    assert rule.match.evaluate({"source.labels": {"version": "v1"}}) is False
    (action,) = rule.actions
    assert action.handler.name == "deny.handler.default"
    assert [i.name for i in action.instances] == ["nothing.instance.default"]
    assert rule.referenced == {"source.labels"}


async def test_built_handlers_answer_as_configured(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", DENY)
    snapshot = compile_dir(tmp_path, build=True)
    action = snapshot.rules[0].actions[0]
    handler = action.handler.handler
    assert handler is not None
    result = await handler.handle_checknothing(action.instances[0].build({}))  # type: ignore[attr-defined]
    assert result == CheckResult(7, "Not allowed", 5.0, 1000)
    await handler.close()


def test_instances_evaluate_their_fields(tmp_path: Path) -> None:
    snapshot = compile_dir(Path(default_config_dir()))
    accesslog = snapshot.instances["accesslog.instance.istio-system"]
    assert accesslog.spec.types["variables.responseCode"].name == "INT64"
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    entry = accesslog.build({"request.time": now, "response.time": now, "response.code": 404})
    assert isinstance(entry, LogEntryInstance)
    assert entry.name == "accesslog.instance.istio-system"
    assert entry.severity == "Info"
    assert entry.variables["responseCode"] == 404
    assert entry.variables["method"] == ""
    assert entry.variables["reporter"] == "destination"


def test_every_error_is_reported_at_once_with_file_document_and_path(tmp_path: Path) -> None:
    write(
        tmp_path,
        "bad.yaml",
        """
        apiVersion: config.istio.io/v1alpha2
        kind: handler
        metadata: {name: h}
        spec:
          compiledAdapter: denier
          params: {status: {code: "seven"}, valid_use_count: -1}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: nosuchkind
        metadata: {name: x}
        spec: {}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: handler
        metadata: {name: h2}
        spec: {compiledAdapter: nosuchadapter}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: instance
        metadata: {name: i}
        spec: {compiledTemplate: nosuchtemplate}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: instance
        metadata: {name: syntax}
        spec:
          compiledTemplate: listentry
          params: {value: 'request.path =='}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: instance
        metadata: {name: typed}
        spec:
          compiledTemplate: listentry
          params: {value: response.code}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: rule
        metadata: {name: r}
        spec:
          match: request.path
          actions:
          - {handler: missing, instances: [alsomissing]}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: rule
        metadata: {name: r}
        spec: {}
        """,
    )
    errors = errors_of(tmp_path)
    file = str(tmp_path / "bad.yaml")
    expected_prefixes = [
        f"{file}: document 1 (handler/h): spec.params.status.code: ",
        f"{file}: document 1 (handler/h): spec.params.valid_use_count: ",
        f"{file}: document 2 (nosuchkind/x): kind: unknown kind 'nosuchkind'",
        f"{file}: document 3 (handler/h2): spec.compiledAdapter: unknown adapter 'nosuchadapter'",
        f"{file}: document 4 (instance/i): spec.compiledTemplate: unknown template 'nosuch",
        f"{file}: document 5 (instance/syntax): spec.params.value: ",
        f"{file}: document 6 (instance/typed): spec.params.value: ",
        f"{file}: document 7 (rule/r): spec.match: ",
        f"{file}: document 7 (rule/r): spec.actions[0].handler: unknown handler",
        f"{file}: document 7 (rule/r): spec.actions[0].instances[0]: unknown instance",
        f"{file}: document 8 (rule/r): metadata.name: duplicate rule 'r'",
    ]
    for prefix in expected_prefixes:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)
    assert len(errors) == len(expected_prefixes), errors


def test_malformed_yaml_names_the_line_and_other_files_still_report(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: [unclosed\n")
    write(tmp_path, "b/c.yaml", "- just\n- a list\n")
    errors = errors_of(tmp_path)
    assert any(
        e.startswith(f"{tmp_path / 'a.yaml'}: document 1 (?): invalid YAML: line") for e in errors
    )
    assert (
        f"{tmp_path / 'b/c.yaml'}: document 1 (?): a document must be a mapping, not a list"
        in errors
    )


def test_missing_metadata_and_wrong_version(tmp_path: Path) -> None:
    write(
        tmp_path,
        "m.yaml",
        """
        apiVersion: config.istio.io/v1alpha2
        kind: rule
        spec: {}
        ---
        apiVersion: config.istio.io/v9
        kind: rule
        metadata: {name: r}
        """,
    )
    errors = errors_of(tmp_path)
    assert any(e.endswith("(rule/): metadata.name: required, a string") for e in errors)
    assert any("(rule/r): apiVersion: unsupported version 'v9'" in e for e in errors)


def test_a_handler_that_does_not_support_the_template(tmp_path: Path) -> None:
    write(
        tmp_path,
        "t.yaml",
        """
        apiVersion: config.istio.io/v1alpha2
        kind: handler
        metadata: {name: out}
        spec: {compiledAdapter: stdio}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: instance
        metadata: {name: nothing}
        spec: {compiledTemplate: checknothing}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: rule
        metadata: {name: r}
        spec:
          actions: [{handler: out, instances: [nothing]}]
        """,
    )
    (error,) = errors_of(tmp_path)
    assert "spec.actions[0].instances[0]: handler out.handler.istio-system (adapter stdio)" in error
    assert "does not support template 'checknothing'; it supports logentry, metric" in error


def test_references_resolve_as_mixer_did(tmp_path: Path) -> None:
    """Short names, name.namespace, name.kind.namespace and the old name.kind spelling."""
    write(
        tmp_path,
        "refs.yaml",
        """
        apiVersion: config.istio.io/v1alpha2
        kind: stdio
        metadata: {name: handler, namespace: istio-system}
        spec: {outputAsJson: false}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: logentry
        metadata: {name: accesslog, namespace: istio-system}
        spec:
          severity: '"Warning"'
          variables: {path: request.path | "/"}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: rule
        metadata: {name: old, namespace: istio-system}
        spec:
          actions: [{handler: handler.stdio, instances: [accesslog.logentry]}]
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: rule
        metadata: {name: qualified, namespace: apps}
        spec:
          actions:
          - handler: handler.istio-system
            instances: [accesslog.logentry.istio-system, accesslog.istio-system]
        """,
    )
    snapshot = compile_dir(tmp_path)
    by_name = {r.name: r for r in snapshot.rules}
    old = by_name["old.rule.istio-system"].actions[0]
    assert old.handler.name == "handler.stdio.istio-system"
    assert old.instances[0].name == "accesslog.logentry.istio-system"
    qualified = by_name["qualified.rule.apps"].actions[0]
    assert qualified.handler.name == "handler.stdio.istio-system"
    assert len(qualified.instances) == 2


def test_a_wrong_kind_in_a_reference_does_not_resolve(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", DENY.replace("handler: deny", "handler: deny.stdio"))
    (error,) = errors_of(tmp_path)
    assert "spec.actions[0].handler: unknown handler: 'deny.stdio'" in error


def test_attribute_manifests_extend_the_vocabulary_and_conflicts_are_errors(tmp_path: Path) -> None:
    write(
        tmp_path,
        "manifest.yaml",
        """
        apiVersion: config.istio.io/v1alpha2
        kind: attributemanifest
        metadata: {name: extra}
        spec:
          attributes:
            my.tenant: {valueType: STRING}
            request.path: {valueType: INT64}
            bad.type: {valueType: NUMBER}
        ---
        apiVersion: config.istio.io/v1alpha2
        kind: instance
        metadata: {name: tenant}
        spec:
          compiledTemplate: listentry
          params: {value: my.tenant}
        """,
    )
    errors = errors_of(tmp_path)
    assert any(
        "spec.attributes.request.path.valueType: 'request.path' is INT64 here but STRING" in e
        for e in errors
    )
    assert any(
        "spec.attributes.bad.type.valueType: unknown value type 'NUMBER'" in e for e in errors
    )
    assert len(errors) == 2, errors


def test_envoyproxy_ratelimit_files_are_recognised_as_their_own_kind(tmp_path: Path) -> None:
    write(tmp_path, "rl.yaml", "domain: mongo_cps\ndescriptors:\n- key: database\n  value: users\n")
    (doc,) = documents.read([tmp_path]).documents
    assert (doc.kind, doc.name) == ("RateLimitConfig", "mongo_cps")


async def test_store_keeps_the_last_good_snapshot_and_reuses_unchanged_handlers(
    tmp_path: Path,
) -> None:
    write(tmp_path, "deny.yaml", DENY)
    store = ConfigStore([str(tmp_path)], REGISTRY, poll_interval=0.05, close_grace=0.0)
    assert await store.load()
    first = store.snapshot
    assert first is not None
    handler = first.rules[0].actions[0].handler.handler

    write(tmp_path, "deny.yaml", DENY.replace('"v3"', '"v4"'))
    assert await store.load()
    second = store.snapshot
    assert second is not None
    assert second is not first
    assert second.rules[0].actions[0].handler.handler is handler  # same params: reused

    write(tmp_path, "deny.yaml", DENY.replace("code: 7", "code: 99"))
    assert not await store.load()
    assert store.snapshot is second
    assert store.rejected is not None
    assert "spec.params.status.code: not a google.rpc.Code: 99" in str(store.rejected.errors[0])

    # The watcher picks up a fix by itself.
    task = asyncio.create_task(store.run())
    write(tmp_path, "deny.yaml", DENY.replace("Not allowed", "Nope"))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if store.snapshot is not second:
            break
    task.cancel()
    assert store.snapshot is not second
    assert store.rejected is None
    assert store.snapshot is not None
    new_handler = store.snapshot.rules[0].actions[0].handler.handler
    assert new_handler is not handler  # params changed: rebuilt
    await store.close()
