"""End-to-end stacks: Envoy, the hub on a configuration folder it hot-reloads, the echo upstream,
and the services a configuration points the hub at (an OIDC issuer process, a list provider).

A :class:`Stack` is started once and reconfigured by :meth:`Stack.apply`, which writes the
folder's files and returns once ``/debug/configz`` shows exactly those bytes active, so a test
never sleeps in the hope that a reload happened. Every process belongs to a harness
:class:`~tests.harness.ProcessGroup`; :func:`show_logs_on_failure` attaches a longer-lived group's
logs to a test's failure report, as the ``processes`` fixture does for its own.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest

from mixerhub.bootstrap import Workload
from mixerhub.store import documents
from tests.conftest import _PROCESSES
from tests.harness import (
    LOOPBACK,
    Envoy,
    Hub,
    ManagedProcess,
    ProcessError,
    ProcessGroup,
    Response,
    Upstream,
    free_port,
    http_probe,
    http_request,
    loopback_options,
    start_envoy,
    start_hub,
    start_upstream,
)

ISSUER_SCRIPT = Path(__file__).with_name("oidc_issuer.py")
CONFIG_TIMEOUT = 10.0
# The hub notices a change within one poll and lets writes settle for up to 0.2 s.
POLL_INTERVAL = "0.1"

_T = TypeVar("_T")


def show_logs_on_failure(request: pytest.FixtureRequest, group: ProcessGroup) -> None:
    """Have conftest's report hook show ``group``'s logs if this test fails (for processes
    shared by a module, which the per-test ``processes`` fixture does not hold)."""
    request.node.stash[_PROCESSES] = group


def until(probe: Callable[[], _T], done: Callable[[_T], bool], timeout: float = 10.0) -> _T:
    """Call ``probe`` every 0.1 s until ``done`` holds for its result or ``timeout`` passes; the
    last result either way, for the caller to assert on."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result) or time.monotonic() >= deadline:
            return result
        time.sleep(0.1)


# --- the hub's configuration, hot-swapped ------------------------------------------------------


def wait_for_version(hub: Hub, digest: str, timeout: float = CONFIG_TIMEOUT) -> None:
    """Poll ``/debug/configz`` until the configuration with this digest is active; fail at once,
    with the errors, if the hub rejected it."""
    deadline = time.monotonic() + timeout
    while True:
        configz = hub.get("/debug/configz").json()
        active, rejected = configz["active"], configz["rejected"]
        if active is not None and active["version"] == digest:
            return
        if rejected is not None and rejected["digest"] == digest:
            errors = "\n".join(e["message"] for e in rejected["errors"])
            raise AssertionError(f"the hub rejected configuration {digest}:\n{errors}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"configuration {digest} not active after {timeout:g}s (active:"
                f" {active and active['version']})\n{hub.process.log_tail()}"
            )
        time.sleep(0.05)


def _write_atomically(path: Path, text: str) -> None:
    # The hub reads only *.yaml and *.yml, so it never sees the partial file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


@dataclass(frozen=True)
class Stack:
    """Envoy in front of the echo upstream, calling a hub that watches ``config``."""

    upstream: Upstream
    hub: Hub
    envoy: Envoy
    config: Path

    def apply(self, files: Mapping[str, str]) -> str:
        """Make the folder hold exactly ``files`` (name -> YAML, dedented); return the digest
        once the hub runs that configuration."""
        digest = write_config(self.config, files)
        wait_for_version(self.hub, digest)
        return digest

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.envoy.get(path, headers)

    def request(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.envoy.request(method, path, headers=headers)


def write_config(folder: Path, files: Mapping[str, str]) -> str:
    """Write ``files`` into ``folder`` and remove the other YAML files; the digest the hub will
    report as the configuration's version."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        _write_atomically(folder / name, textwrap.dedent(text))
    for path in [*folder.glob("*.yaml"), *folder.glob("*.yml")]:
        if path.name not in files:
            path.unlink()
    return documents.read([str(folder)]).digest


def start_stack(
    group: ProcessGroup,
    config: Path,
    files: Mapping[str, str],
    workload: Workload,
    *,
    hub_command: list[str] | None = None,
) -> Stack:
    """The upstream, a hub polling ``config`` every 0.1 s (started on ``files``) and Envoy."""
    digest = write_config(config, files)
    upstream = start_upstream(group)
    hub = start_hub(
        group, config, command=hub_command, extra_args=["--poll-interval", POLL_INTERVAL]
    )
    wait_for_version(hub, digest)
    envoy = start_envoy(
        group, loopback_options(upstream.address, hub.grpc_address, workload=workload)
    )
    return Stack(upstream, hub, envoy, config)


def jwks_tuned_hub_command(*, min_refetch_interval: float, retry_interval: float) -> list[str]:
    """``mixerhub`` (the same CLI, so ``... serve --config ...``) with its process-wide key set
    cache refetching sooner than the built-in 30 s (unknown kid) and 60 s (after a failure).

    No flag sets those intervals, and the cache's own API (``jwks.set_default_cache``) is how
    they are configured, so rotation and outage tests need not wait minutes."""
    code = textwrap.dedent(
        f"""
        import sys
        from mixerhub import cli
        from mixerhub.security import jwks
        jwks.set_default_cache(jwks.JwksCache(
            min_refetch_interval={min_refetch_interval!r}, retry_interval={retry_interval!r}))
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    return [sys.executable, "-c", code]


# --- an OIDC issuer as a process (tests/oidc_issuer.py) ----------------------------------------


@dataclass(frozen=True)
class IssuerProcess:
    """``python tests/oidc_issuer.py --port N``: discovery, JWKS, and its control endpoints."""

    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        """The issuer (``iss``), also where discovery starts."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks.json"

    def token(self, sub: str = "alice", aud: str | None = None, exp_in: float = 600) -> str:
        """A token signed with the issuer's current key."""
        query = {"sub": sub, "exp_in": str(exp_in)} | ({"aud": aud} if aud else {})
        return self._call("GET", "/token?" + urllib.parse.urlencode(query)).body.decode()

    def rotate(self) -> str:
        """A new current signing key (the old ones stay published); its kid."""
        kid: str = self._call("POST", "/control/rotate").json()["kid"]
        return kid

    def fail(self, status: int = 503) -> None:
        """Answer discovery and JWKS with ``status`` until :meth:`recover`."""
        self._call("POST", f"/control/fail?status={status}")

    def recover(self) -> None:
        self._call("POST", "/control/recover")

    def fetches(self) -> dict[str, int]:
        """How often each document was asked for, failed answers included."""
        counts: dict[str, int] = self._call("GET", "/control/fetches").json()
        return counts

    def _call(self, method: str, path: str) -> Response:
        response = http_request(LOOPBACK, self.port, method, path)
        assert response.status == 200, (path, response)
        return response


def start_issuer(group: ProcessGroup, alg: str = "RS256") -> IssuerProcess:
    """The test issuer on a free port; ready once its control endpoint answers (a probe that
    does not count as a fetch of discovery or JWKS)."""
    for remaining in reversed(range(3)):
        port = free_port()
        argv = [sys.executable, str(ISSUER_SCRIPT), "--port", str(port), "--alg", alg]
        process = group.start("oidc-issuer", argv)
        try:
            process.wait_ready(http_probe(LOOPBACK, port, "/control/fetches"))
        except ProcessError as error:
            # free_port() only says the port was free a moment ago.
            if remaining and "address already in use" in str(error).lower():
                continue
            raise
        return IssuerProcess(process, port)
    raise AssertionError("unreachable")


# --- a list provider for listchecker's providerUrl ---------------------------------------------


class ListProvider:
    """A list served over HTTP from a thread on 127.0.0.1, one entry per line (the format
    listchecker reads for STRINGS); a test changes ``entries`` while the hub runs."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = list(entries)
        self.requests = 0
        provider = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.requests += 1
                body = "".join(f"{entry}\n" for entry in provider.entries).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the hub's log says what it fetched

        self._server = ThreadingHTTPServer((LOOPBACK, 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="list-provider", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/list"

    def __enter__(self) -> ListProvider:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
