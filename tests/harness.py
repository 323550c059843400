"""Real processes on free loopback ports for the end-to-end tests, always stopped.

A :class:`ManagedProcess` is one subprocess whose stdout and stderr go to a log file; it waits for
readiness with a probe (a TCP connect, an HTTP 200, Envoy's admin ``/ready``), fails early with the
log when the process exits, and is stopped on exit (SIGTERM, then SIGKILL). A
:class:`ProcessGroup` holds the processes of one test so their logs can be attached to a failure.
The starters (:func:`start_upstream`, :func:`start_hub`, :func:`start_envoy`) are what the fixtures
in conftest.py call; they work without pytest too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mixerhub.bootstrap import BootstrapOptions, render_yaml

LOOPBACK = "127.0.0.1"
UPSTREAM_SCRIPT = Path(__file__).with_name("upstream.py")
DEFAULT_READY_TIMEOUT = 20.0
# Envoy's shared-memory base id must differ between Envoys running at once; start from the pid so
# two test sessions on one machine do not collide either.
_BASE_IDS = itertools.count((os.getpid() % 1000) * 1000)

Probe = Callable[[], bool]
_T = TypeVar("_T")


class ProcessError(RuntimeError):
    """A managed process exited early or never became ready; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def next_base_id() -> int:
    """A fresh ``--base-id`` for Envoy."""
    return next(_BASE_IDS)


def envoy_validate(config: str, work: Path) -> None:
    """``envoy --mode validate`` on a configuration (YAML or JSON text) written into ``work``;
    fails the test with the configuration's end and Envoy's output unless Envoy says OK."""
    path = work / "envoy-validate.yaml"
    path.write_text(config)
    command = [sibling_executable("envoy"), "--mode", "validate", "-c", str(path)]
    command += ["--base-id", str(next_base_id()), "--disable-hot-restart"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{config[-3000:]}\n{output[-3000:]}"
    assert "OK" in output, output[-3000:]


def sibling_executable(name: str) -> str:
    """``name`` from the running interpreter's bin directory, else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is neither next to {sys.executable} nor on PATH")
    return found


class ManagedProcess:
    """One subprocess with its output in ``log_path``; a context manager that always stops it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = None if self._popen is None else self._popen.pid
        return f"<ManagedProcess {self.name} pid={pid} log={self.log_path}>"

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            # A session of its own, so stopping it also stops anything it spawned.
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def wait_ready(
        self, check: Probe, timeout: float = DEFAULT_READY_TIMEOUT, interval: float = 0.05
    ) -> None:
        """Poll ``check`` until true; ProcessError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            code = self._running().poll()
            if code is not None:
                raise ProcessError(self.describe(f"exited with status {code} before it was ready"))
            if check():
                return
            if time.monotonic() >= deadline:
                raise ProcessError(self.describe(f"was not ready after {timeout:g}s"))
            time.sleep(interval)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout``, then SIGKILL; returns the exit status. Safe to call twice."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                popen.wait()
        else:
            # The leader is gone; anything it left in its session goes too.
            self._signal(signal.SIGKILL)
        return popen.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def describe(self, what: str, lines: int = 60) -> str:
        """``what`` happened to this process, followed by the tail of its log."""
        return (
            f"{self.name} (pid {self.pid}) {what}\n"
            f"--- last {lines} lines of {self.log_path} ---\n{self.log_tail(lines)}"
        )

    def _running(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen

    def _signal(self, signum: signal.Signals) -> None:
        # Our child leads its own process group (start_new_session), so its id names the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._running().pid, signum)

    def __enter__(self) -> ManagedProcess:
        return self.start() if self._popen is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class ProcessGroup:
    """The processes one test started, stopped together in reverse order."""

    directory: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` logging to ``DIRECTORY/NAME.log`` (NAME-2.log... when taken)."""
        stem = name
        for n in itertools.count(2):
            if not (self.directory / f"{stem}.log").exists():
                break
            stem = f"{name}-{n}"
        process = ManagedProcess(stem, argv, self.directory / f"{stem}.log", env=env, cwd=cwd)
        self.processes.append(process)
        return process.start()

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs_report(self, lines: int = 200) -> str:
        """Every process's log tail, for a failed test's report."""
        return "\n\n".join(
            f"--- {p.name} (exit status {p.returncode}) {p.log_path} ---\n{p.log_tail(lines)}"
            for p in self.processes
        )


# Readiness probes -------------------------------------------------------------------------------


def tcp_probe(host: str, port: int) -> Probe:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def http_probe(host: str, port: int, path: str, expect_body: bytes | None = None) -> Probe:
    """True when GET ``path`` answers 200 (and the body starts with ``expect_body``, if given)."""

    def check() -> bool:
        try:
            response = http_request(host, port, "GET", path, timeout=1.0)
        except OSError:
            return False
        return response.status == 200 and (
            expect_body is None or response.body.startswith(expect_body)
        )

    return check


def envoy_ready_probe(admin_port: int) -> Probe:
    """Envoy's admin ``/ready`` says LIVE once its listeners are up."""
    return http_probe(LOOPBACK, admin_port, "/ready", expect_body=b"LIVE")


# HTTP without proxies or pooled connections -----------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> Response:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        raw = connection.getresponse()
        merged: dict[str, str] = {}
        for name, value in raw.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Response(raw.status, merged, raw.read())
    finally:
        connection.close()


# The processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """The echo server (tests/upstream.py)."""

    process: ManagedProcess
    port: int
    host: str = LOOPBACK

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return http_request(self.host, self.port, "GET", path, headers=headers)


def start_upstream(
    group: ProcessGroup,
    timeout: float = DEFAULT_READY_TIMEOUT,
    *,
    name: str = "",
    fail_every: int = 0,
) -> Upstream:
    """The echo server; it picks its own port and reports it in a file once listening."""
    for n in itertools.count(1):
        port_file = group.directory / f"upstream-{n}.port"
        if not port_file.exists():
            break
    argv = [sys.executable, str(UPSTREAM_SCRIPT), "--host", LOOPBACK, "--port-file", str(port_file)]
    argv += ["--name", name, "--fail-every", str(fail_every)]
    process = group.start("upstream", argv)
    process.wait_ready(port_file.exists, timeout)
    return Upstream(process, int(port_file.read_text()))


@dataclass(frozen=True)
class Hub:
    """``mixerhub serve`` as a subprocess."""

    process: ManagedProcess
    grpc_port: int
    http_port: int
    config: Path | None
    host: str = LOOPBACK

    @property
    def grpc_address(self) -> tuple[str, int]:
        """What BootstrapOptions.hub takes."""
        return (self.host, self.grpc_port)

    def get(self, path: str) -> Response:
        return http_request(self.host, self.http_port, "GET", path)

    def log(self) -> str:
        return self.process.log_text()


def hub_command() -> list[str]:
    """``mixerhub`` as installed next to the running interpreter."""
    return [sibling_executable("mixerhub")]


def start_hub(
    group: ProcessGroup,
    config: Path | None = None,
    *,
    command: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = DEFAULT_READY_TIMEOUT,
    ports: tuple[int, int] | None = None,
) -> Hub:
    """Start ``mixerhub serve``; no ``config`` means the shipped default configuration.

    ``ports`` (gRPC, HTTP) restarts a hub where its proxies expect it; by default both are free.
    """

    def attempt() -> Hub:
        grpc_port, http_port = ports or (free_port(), free_port())
        argv = [*(command or hub_command()), "serve"]
        if config is not None:
            argv += ["--config", str(config)]
        argv += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
        # Envoy's access-log stream stays open until Envoy goes, so a hub stopped first would
        # wait out its whole drain; a test needs no more than a second. extra_args win.
        argv += ["--drain-seconds", "1", *extra_args]
        process = group.start("hub", argv)
        process.wait_ready(http_probe(LOOPBACK, http_port, "/readyz"), timeout)
        return Hub(process, grpc_port, http_port, config)

    return attempt() if ports else _retry_port_clash(attempt)


@dataclass(frozen=True)
class Envoy:
    """A real Envoy started from :func:`mixerhub.bootstrap.render_yaml`."""

    process: ManagedProcess
    options: BootstrapOptions
    config_path: Path

    @property
    def listen_port(self) -> int:
        return self.options.listen_port

    @property
    def admin_port(self) -> int:
        return self.options.admin_port

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> Response:
        """A request to Envoy's listener."""
        return http_request(
            self.options.listen_address,
            self.listen_port,
            method,
            path,
            headers=headers,
            body=body,
            timeout=timeout,
        )

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.request("GET", path, headers=headers)

    def admin(self, path: str) -> Response:
        return http_request(LOOPBACK, self.admin_port, "GET", path)

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges by name (histograms left out)."""
        document = self.admin("/stats?format=json").json()
        return {
            entry["name"]: int(entry["value"])
            for entry in document["stats"]
            if "name" in entry and "value" in entry
        }

    def wait_for_stat(
        self,
        name: str,
        predicate: Callable[[int], bool] = lambda value: value > 0,
        timeout: float = 10.0,
    ) -> int:
        """Poll ``/stats`` until stat ``name`` satisfies ``predicate``; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.stats().get(name)
            if value is not None and predicate(value):
                return value
            if time.monotonic() >= deadline:
                related = sorted(
                    f"{key}: {val}"
                    for key, val in self.stats().items()
                    if key.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]
                )
                raise AssertionError(
                    f"Envoy stat {name} = {value} after {timeout:g}s; siblings:\n"
                    + "\n".join(related)
                )
            time.sleep(0.1)


def loopback_options(
    upstream: tuple[str, int], hub: tuple[str, int], **fields: Any
) -> BootstrapOptions:
    """BootstrapOptions with Envoy's listener and admin on fresh free ports."""
    fields.setdefault("listen_port", free_port())
    fields.setdefault("admin_port", free_port())
    return BootstrapOptions(upstream=upstream, hub=hub, **fields)


def start_envoy(
    group: ProcessGroup,
    options: BootstrapOptions,
    *,
    extra_args: Sequence[str] = (),
    log_level: str = "info",
    timeout: float = DEFAULT_READY_TIMEOUT,
    repick_ports: bool = True,
) -> Envoy:
    """Write the bootstrap next to the logs and start Envoy on it; ready when admin says LIVE.

    When a listener or admin port turns out to be taken, Envoy is started again on fresh free
    ports (unless ``repick_ports`` is false): read the ports from the returned Envoy.
    """

    def attempt() -> Envoy:
        nonlocal options
        for n in itertools.count(1):
            config_path = group.directory / f"envoy-{n}.yaml"
            if not config_path.exists():
                break
        config_path.write_text(render_yaml(options))
        argv = [
            sibling_executable("envoy"),
            "-c",
            str(config_path),
            "--base-id",
            str(next_base_id()),
            "--disable-hot-restart",
            "--log-level",
            log_level,
            # Two workers are plenty for a test and keep startup quick.
            "--concurrency",
            "2",
            *extra_args,
        ]
        process = group.start("envoy", argv)
        try:
            process.wait_ready(envoy_ready_probe(options.admin_port), timeout)
        except ProcessError:
            if repick_ports:
                options = dataclasses.replace(
                    options, listen_port=free_port(), admin_port=free_port()
                )
            raise
        return Envoy(process, options, config_path)

    return _retry_port_clash(attempt) if repick_ports else attempt()


# free_port() only says a port was free a moment ago; another process (another test session)
# can take it before ours binds. Such a clash is retried on fresh ports; any other failure is not.
_PORT_CLASH = ("address already in use", "failed to bind", "cannot bind")
_PORT_ATTEMPTS = 3


def _retry_port_clash(attempt: Callable[[], _T]) -> _T:
    for remaining in reversed(range(_PORT_ATTEMPTS)):
        try:
            return attempt()
        except ProcessError as error:
            if not remaining or not any(m in str(error).lower() for m in _PORT_CLASH):
                raise
    raise AssertionError("unreachable")


# What the conftest factories return: make_hub(config=None, *, extra_args=()) and
# envoy(options, *, extra_args=(), log_level="info", repick_ports=True).
HubFactory = Callable[..., Hub]
EnvoyFactory = Callable[..., Envoy]


@contextlib.contextmanager
def process_group(directory: Path) -> Iterator[ProcessGroup]:
    """A ProcessGroup whose processes are stopped on exit, whatever happened."""
    group = ProcessGroup(directory)
    try:
        yield group
    finally:
        group.stop_all()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait on the event loop until ``condition()`` holds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
