"""Fixtures that run real processes: the echo upstream, ``mixerhub serve`` and Envoy.

Every process a test starts belongs to its ``processes`` group: it is stopped when the test ends,
pass or fail, and when the test fails its log tail is attached to the report under
"process logs". A process that dies or never becomes ready fails the fixture with its log tail.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from mixerhub.bootstrap import BootstrapOptions
from tests.harness import (
    Envoy,
    EnvoyFactory,
    Hub,
    HubFactory,
    ProcessGroup,
    Upstream,
    process_group,
    start_envoy,
    start_hub,
    start_upstream,
)

_PROCESSES = pytest.StashKey[ProcessGroup]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    group = item.stash.get(_PROCESSES, None)
    if report.failed and group is not None and group.processes:
        report.sections.append(("process logs", group.logs_report()))
    return report


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessGroup]:
    """This test's processes, logging to ``tmp_path/logs``; all stopped at teardown."""
    with process_group(tmp_path / "logs") as group:
        request.node.stash[_PROCESSES] = group
        yield group


@pytest.fixture
def upstream(processes: ProcessGroup) -> Upstream:
    """The echo server (tests/upstream.py) on a free 127.0.0.1 port."""
    return start_upstream(processes)


@pytest.fixture
def hub_config() -> Path | None:
    """The config directory ``hub`` serves; None is the shipped default. Override per module."""
    return None


@pytest.fixture
def make_hub(processes: ProcessGroup) -> HubFactory:
    """``make_hub(config=None, *, extra_args=())`` starts another ``mixerhub serve``."""

    def make(config: Path | None = None, *, extra_args: Sequence[str] = ()) -> Hub:
        return start_hub(processes, config, extra_args=extra_args)

    return make


@pytest.fixture
def hub(make_hub: HubFactory, hub_config: Path | None) -> Hub:
    """``mixerhub serve --config hub_config`` on free gRPC and HTTP ports, ready on /readyz."""
    return make_hub(hub_config)


@pytest.fixture
def envoy(processes: ProcessGroup) -> EnvoyFactory:
    """``envoy(options, *, extra_args=(), log_level="info", repick_ports=True)`` starts an Envoy.

    It runs on ``render_yaml(options)`` and is ready once admin ``/ready`` says LIVE. Build the
    options with ``harness.loopback_options(upstream, hub, **fields)`` (free ports); should a port
    be taken meanwhile, Envoy is restarted on fresh ones, so read them from the returned Envoy.
    """

    def make(
        options: BootstrapOptions,
        *,
        extra_args: Sequence[str] = (),
        log_level: str = "info",
        repick_ports: bool = True,
    ) -> Envoy:
        return start_envoy(
            processes,
            options,
            extra_args=extra_args,
            log_level=log_level,
            repick_ports=repick_ports,
        )

    return make
