"""The `mixerhub` command's subcommands, called as a user calls them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from mixerhub import __version__
from mixerhub.cli import main
from mixerhub.store.compile import default_config_dir
from tests.harness import sibling_executable
from tests.test_store import DENY, write


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_accepts_the_shipped_config_and_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    examples = str(Path(default_config_dir()).parent / "examples")
    code, out, _ = run(capsys, "validate", default_config_dir(), examples)
    assert code == 0
    assert out.startswith("valid: ")


def test_validate_prints_every_error_in_the_documented_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = DENY.replace("code: 7", "code: 77").replace("[nothing]", "[nothing, ghost]")
    path = write(tmp_path, "deny.yaml", bad)
    write(tmp_path, "broken.yaml", "kind: : :\n")
    code, out, err = run(capsys, "validate", str(tmp_path))
    assert code == 1
    lines = out.splitlines()
    assert (
        f"{path}: document 1 (handler/deny): spec.params.status.code: "
        "not a google.rpc.Code: 77 (0 to 16)" in lines
    )
    assert any(
        line.startswith(
            f"{path}: document 3 (rule/deny-v3): spec.actions[0].instances[1]: unknown instance"
        )
        for line in lines
    )
    assert any(
        line.startswith(f"{tmp_path / 'broken.yaml'}: document 1 (?): invalid YAML")
        for line in lines
    )
    assert len(lines) == 3
    assert "3 error(s) in 2 file(s)" in err


def test_validate_a_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "validate", str(tmp_path / "nope"))
    assert code == 1
    assert out.strip() == f"{tmp_path / 'nope'}: no such file or directory"


def test_eval_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    attrs = json.dumps(
        {"request.path": "/api/v1", "source.labels": {"app": "web"}, "response.code": 503}
    )
    code, out, _ = run(capsys, "eval", 'source.labels["app"] + request.path', "--attributes", attrs)
    assert (code, json.loads(out)) == (0, "web/api/v1")
    code, out, _ = run(
        capsys,
        "eval",
        'response.code >= 500 && match(request.path, "/api/*")',
        "--attributes",
        attrs,
    )
    assert (code, json.loads(out)) == (0, True)
    code, out, _ = run(capsys, "eval", 'request.headers["x"] | "none"', "--attributes", "{}")
    assert (code, json.loads(out)) == (0, "none")
    code, out, _ = run(capsys, "eval", 'source.ip | ip("10.0.0.1")', "--attributes", "{}")
    assert (code, json.loads(out)) == (0, "10.0.0.1")


def test_eval_errors_exit_one_with_position_and_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "eval", "request.path == ", "--attributes", "{}")
    assert code == 1
    assert err.startswith("error: position ")
    code, _, err = run(capsys, "eval", "request.path == 3", "--attributes", "{}")
    assert code == 1
    assert "error: position" in err
    code, _, err = run(capsys, "eval", "no.such.attribute", "--attributes", "{}")
    assert code == 1
    assert "no.such.attribute" in err
    code, _, err = run(capsys, "eval", "request.path", "--attributes", "{}")
    assert code == 1
    assert "request.path" in err
    code, _, err = run(capsys, "eval", "request.path", "--attributes", '{"response.code": "x"}')
    assert code == 1
    assert "--attributes" in err


def test_adapters_lists_each_with_templates(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "adapters")
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert rows["stdio"] == "logentry,metric"
    assert rows["denier"] == "checknothing,listentry,quota"


def test_bootstrap_prints_yaml_and_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bootstrap", "--upstream", "127.0.0.1:8080", "--workload", "web")
    assert code == 0
    assert yaml.safe_load(out)["node"]["metadata"]["WORKLOAD_NAME"] == "web"
    code, _, err = run(capsys, "bootstrap", "--upstream", "127.0.0.1")
    assert code == 2
    assert err.startswith("error: ")


def test_the_installed_command_runs() -> None:
    out = subprocess.run(
        [sibling_executable("mixerhub"), "version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"mixerhub {__version__}"
