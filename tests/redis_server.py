"""A real ``redis-server`` on a free 127.0.0.1 port (never 6379), without persistence, always
stopped: for the Redis rate-limit backend's tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import (
    LOOPBACK,
    ManagedProcess,
    ProcessError,
    ProcessGroup,
    _retry_port_clash,
    free_port,
    tcp_probe,
)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    return Path(REDIS_SERVER).exists()


# Elsewhere a missing redis-server is a skip; in CI (.ci/run installs it) the tests run and fail.
requires_redis = pytest.mark.skipif(
    not redis_available() and not os.environ.get("CI"),
    reason="redis-server is not installed: apt-get install redis-server",
)


@dataclass
class RedisServer:
    group: ProcessGroup
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.stop(timeout=5.0)

    def restart(self) -> None:
        """Start again on the same port (empty: nothing is saved)."""
        self.process = _start(self.group, self.port)


def _argv(port: int) -> list[str]:
    return [
        REDIS_SERVER,
        "--port", str(port),
        "--bind", LOOPBACK,
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--daemonize", "no",
    ]  # fmt: skip


def _start(group: ProcessGroup, port: int) -> ManagedProcess:
    process = group.start("redis", _argv(port))
    try:
        process.wait_ready(tcp_probe(LOOPBACK, port), timeout=10.0)
    except ProcessError:
        process.stop()
        raise
    return process


def start_redis(group: ProcessGroup) -> RedisServer:
    """redis-server on a free port, registered in ``group`` so it is stopped with the test."""

    def attempt() -> RedisServer:
        port = free_port()
        if port == 6379:
            raise ProcessError("address already in use: refusing Redis's default port")
        return RedisServer(group, port, _start(group, port))

    return _retry_port_clash(attempt)


def start_cluster_node(group: ProcessGroup, directory: Path) -> RedisServer:
    """A one-node Redis Cluster holding every slot, on a free port."""
    import redis

    def attempt() -> RedisServer:
        port = free_port()
        config = directory / f"nodes-{port}.conf"
        argv = [
            *_argv(port),
            *("--cluster-enabled", "yes", "--cluster-config-file", str(config)),
            *("--cluster-port", str(free_port())),  # not port + 10000, which may be over 65535
        ]
        process = group.start("redis-cluster", argv, cwd=directory)
        process.wait_ready(tcp_probe(LOOPBACK, port), timeout=10.0)
        return RedisServer(group, port, process)

    server = _retry_port_clash(attempt)
    client = redis.Redis(host=LOOPBACK, port=server.port)
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        server.process.wait_ready(
            lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),  # type: ignore[no-untyped-call]
            timeout=10.0,
        )
    finally:
        client.close()
    return server


def start_sentinel(
    group: ProcessGroup, master: RedisServer, directory: Path, service: str = "mymaster"
) -> RedisServer:
    """A Sentinel on a free port monitoring ``master`` as ``service`` (quorum 1)."""

    def attempt() -> RedisServer:
        port = free_port()
        config = directory / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind {LOOPBACK}\ndaemonize no\n"
            f"sentinel monitor {service} {LOOPBACK} {master.port} 1\n"
        )
        process = group.start("redis-sentinel", [REDIS_SERVER, str(config), "--sentinel"])
        process.wait_ready(tcp_probe(LOOPBACK, port), timeout=10.0)
        return RedisServer(group, port, process)

    return _retry_port_clash(attempt)
