"""The adapter registry: built-ins by folder, third parties by entry point, each checked."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from mixerhub import registry
from mixerhub.adapter import AdapterInfo, Handler
from mixerhub.types import Params


def test_builtin_adapters_are_found_by_folder() -> None:
    reg = registry.default_registry()
    assert {"stdio", "denier"} <= set(reg.adapters)
    assert reg.problems == ()
    assert reg.supports("denier", "checknothing")
    assert not reg.supports("denier", "metric")


def test_third_party_adapters_plug_in_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real installed distribution (a dist-info folder on sys.path) declaring three entries."""
    (tmp_path / "thirdparty_adapter.py").write_text(
        textwrap.dedent(
            """
            from mixerhub.adapter import AdapterInfo, Handler, ExportResult
            from mixerhub.types import Params

            class P(Params):
                endpoint: str = "http://127.0.0.1:1"

            class H(Handler):
                def handle_metric(self, instances):
                    return ExportResult.SUCCESS

            INFO = AdapterInfo("thirdparty", "Sends metrics elsewhere", ("metric",), P,
                               lambda params, instances, env: H())
            NOT_AN_ADAPTER = {"name": "x"}
            """
        )
    )
    dist = tmp_path / "thirdparty_adapter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-adapter\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[mixerhub.adapters]\n"
        "thirdparty = thirdparty_adapter:INFO\n"
        "broken = thirdparty_adapter_missing:INFO\n"
        "wrongshape = thirdparty_adapter:NOT_AN_ADAPTER\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = registry.default_registry()
    assert reg.adapters["thirdparty"].templates == ("metric",)
    problems = "\n".join(reg.problems)
    assert "entry point 'broken' (thirdparty_adapter_missing:INFO)" in problems
    assert "ModuleNotFoundError" in problems
    assert "'wrongshape'" in problems
    assert "expected a mixerhub.adapter.AdapterInfo, got dict" in problems
    sys.modules.pop("thirdparty_adapter", None)


class _Model(Params):
    x: int = 1


class _Required(Params):
    x: int


def _build(params: object, instances: object, env: object) -> Handler:
    return Handler()


@pytest.mark.parametrize(
    ("info", "problem"),
    [
        (AdapterInfo("ok", "", ("nosuch",), _Model, _build), "unknown template 'nosuch'"),
        (AdapterInfo("ok", "", (), _Model, _build), "supports no template"),
        (
            AdapterInfo("bad name!", "", ("metric",), _Model, _build),
            "must be a non-empty identifier",
        ),
        (AdapterInfo("ok", "", ("metric",), _Required, _build), "no defaults for every field"),
    ],
)
def test_declarations_are_checked(info: AdapterInfo[Params], problem: str) -> None:
    reg = registry.build_registry([("test", info)])
    assert "ok" not in reg.adapters
    assert any(problem in p for p in reg.problems), reg.problems


def test_a_duplicate_name_is_left_out() -> None:
    a = AdapterInfo("same", "", ("metric",), _Model, _build)
    reg = registry.build_registry([("one", a), ("two", a)])
    assert list(reg.adapters) == ["same"]
    assert reg.problems == ("two: adapter name 'same' is already registered",)
