"""Bad configuration, each kind of it, gives one clear error from `validate` and from a running
hub, which keeps serving its last good snapshot."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mixerhub.cli import main
from tests.harness import Hub
from tests.test_hub import wait_for
from tests.test_store import DENY, write

GOOD_RULE = """
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: extra}
spec:
  match: %s
  actions: [{handler: %s, instances: [%s]}]
"""

# name -> (bad.yaml's text, the expected "path: reason" start of the one error it causes)
CASES = {
    "malformed YAML": (
        "kind: [unclosed\n",
        ": invalid YAML: line 2, column 1: expected ',' or ']'",
    ),
    "unknown kind": (
        "apiVersion: config.istio.io/v1alpha2\nkind: gizmo\nmetadata: {name: g}\n",
        "kind: unknown kind 'gizmo'",
    ),
    "unknown adapter": (
        "apiVersion: config.istio.io/v1alpha2\nkind: handler\nmetadata: {name: h}\n"
        "spec: {compiledAdapter: carrier-pigeon}\n",
        "spec.compiledAdapter: unknown adapter 'carrier-pigeon'",
    ),
    "unknown template": (
        "apiVersion: config.istio.io/v1alpha2\nkind: instance\nmetadata: {name: i}\n"
        "spec: {compiledTemplate: telegram}\n",
        "spec.compiledTemplate: unknown template 'telegram'",
    ),
    "params field of the wrong type": (
        "apiVersion: config.istio.io/v1alpha2\nkind: handler\nmetadata: {name: h}\n"
        "spec: {compiledAdapter: stdio, params: {outputAsJson: sometimes}}\n",
        "spec.params.outputAsJson: Input should be a valid boolean",
    ),
    "expression syntax error": (
        GOOD_RULE % ('request.path == "/a" &&', "deny.default", "nothing.default"),
        "spec.match: position ",
    ),
    "expression type error": (
        GOOD_RULE % ('response.code == "200"', "deny.default", "nothing.default"),
        "spec.match: position ",
    ),
    "match that is not BOOL": (
        GOOD_RULE % ("request.path", "deny.default", "nothing.default"),
        "spec.match: position ",
    ),
    "dangling reference": (
        GOOD_RULE % ("true", "deny.default", "ghost.default"),
        "spec.actions[0].instances[0]: unknown instance: 'ghost.default'",
    ),
    "duplicate name": (
        "apiVersion: config.istio.io/v1alpha2\nkind: instance\n"
        "metadata: {name: nothing, namespace: default}\nspec: {compiledTemplate: checknothing}\n",
        "metadata.name: duplicate instance 'nothing' in namespace 'default'",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_validate_reports_it(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, expected = CASES[case]
    write(tmp_path, "deny.yaml", DENY)
    bad = write(tmp_path, "zz-bad.yaml", text)
    assert main(["validate", str(tmp_path)]) == 1
    # Only lines about this test's files: anything else on stdout is not validate's answer.
    out = capsys.readouterr().out.splitlines()
    (line,) = [line for line in out if line.startswith(str(tmp_path))]
    assert line.startswith(f"{bad}: document 1 (")
    assert expected in line, line


def test_a_running_hub_reports_each_and_keeps_serving(make_hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config"
    write(config, "deny.yaml", DENY)
    hub: Hub = make_hub(config, extra_args=["--poll-interval", "0.05"])
    good = hub.get("/debug/configz").json()["active"]["version"]
    for case, (text, expected) in CASES.items():
        (config / "zz-bad.yaml").write_text(textwrap.dedent(text))

        def rejected(case: str = case) -> str:
            body = hub.get("/debug/configz").json()
            assert body["active"]["version"] == good, case
            errors = (body["rejected"] or {}).get("errors", [])
            return errors[0]["message"] if len(errors) == 1 else ""

        wait_for(lambda: expected in rejected())  # noqa: B023 - called within this iteration
        assert hub.get("/readyz").status == 200
        (config / "zz-bad.yaml").unlink()
        wait_for(lambda: hub.get("/debug/configz").json()["rejected"] is None)
    assert "Traceback" not in hub.log()
