"""Real Redis processes on free 127.0.0.1 ports (never 6379), without persistence, registered in
a test's ProcessGroup so they are stopped whatever happens: a single ``redis-server`` (over TCP,
or TLS only with a certificate made for the test), a replica, a Sentinel (``redis-server
--sentinel`` with a generated config), and a Redis Cluster (nodes with ``cluster-enabled yes``,
joined by ``redis-cli --cluster create``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def redis_available() -> bool:
    return Path(REDIS_SERVER).exists()


# Elsewhere a missing redis-server is a skip; in CI (.ci/run installs it) the tests run and fail.
requires_redis = pytest.mark.skipif(
    not redis_available() and not os.environ.get("CI"),
    reason="redis-server is not installed: apt-get install redis-server",
)
# A Redis Cluster of several nodes is created by redis-cli (redis-tools).
requires_redis_cli = pytest.mark.skipif(
    not (redis_available() and Path(REDIS_CLI).exists()) and not os.environ.get("CI"),
    reason="redis-server or redis-cli is not installed: apt-get install redis-server redis-tools",
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
        self.process = _start(
            self.group, "redis", _argv(self.port), self.port, self.group.directory
        )


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


@dataclass
class TLSRedisServer:
    """redis-server listening with TLS only, its certificate signed by a CA of the test's."""

    process: ManagedProcess
    port: int
    ca_file: Path  # the CA that signed the server's certificate (for 127.0.0.1)

    def url(self, ca_file: Path | None = None) -> str:
        """A ``rediss://`` URL trusting ``ca_file`` (the server's CA by default)."""
        return f"rediss://{LOOPBACK}:{self.port}/0?ssl_ca_certs={ca_file or self.ca_file}"


def make_ca_and_server_cert(directory: Path, name: str = "redis") -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, Any] | None
    ) -> x509.Certificate:
        signer_name, signer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if issuer is not None:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(f"{name} test CA", ca_key, None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(LOOPBACK, key, (f"{name} test CA", ca_key))
    paths = directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def start_tls_redis(group: ProcessGroup, directory: Path) -> TLSRedisServer:
    """redis-server on a free port that speaks TLS only (clients need no certificate)."""
    ca, cert, key = make_ca_and_server_cert(directory)

    def argv(port: int) -> list[str]:
        return [
            *_argv(0),  # --port 0: no plain TCP listener
            *("--tls-port", str(port)),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
        ]

    process, port = _start_on_free_port(group, "redis-tls", argv)
    return TLSRedisServer(process, port, ca)


def _start(
    group: ProcessGroup, name: str, argv: list[str], port: int, cwd: Path | None = None
) -> ManagedProcess:
    """``argv`` started as ``name``, once it accepts connections on ``port``."""
    process = group.start(name, argv, cwd=cwd)
    try:
        process.wait_ready(tcp_probe(LOOPBACK, port), timeout=10.0)
    except ProcessError:
        process.stop()
        raise
    return process


def _start_on_free_port(
    group: ProcessGroup, name: str, argv: Callable[[int], list[str]], cwd: Path | None = None
) -> tuple[ManagedProcess, int]:
    """``argv(port)`` started as ``name`` on a free port (never Redis's default one), and on
    another when that one was taken meanwhile."""

    def attempt() -> tuple[ManagedProcess, int]:
        port = free_port()
        if port == 6379:
            raise ProcessError("address already in use: refusing Redis's default port")
        return _start(group, name, argv(port), port, cwd), port

    return _retry_port_clash(attempt)


def start_redis(group: ProcessGroup) -> RedisServer:
    """redis-server on a free port, registered in ``group`` so it is stopped with the test."""
    # A master writes an RDB for a replica's full sync, --save "" or not: into the test's
    # directory (its cwd), not the one pytest runs in.
    process, port = _start_on_free_port(group, "redis", _argv, group.directory)
    return RedisServer(group, port, process)


def _cluster_argv(port: int, directory: Path) -> list[str]:
    return [
        *_argv(port),
        *("--cluster-enabled", "yes"),
        *("--cluster-config-file", str(directory / f"nodes-{port}.conf")),
        # Not port + 10000, which may be over 65535; redis-cli --cluster learns it from the node.
        *("--cluster-port", str(free_port())),
        # A failing test must not wait on cluster-node-timeout's default 15 s.
        *("--cluster-node-timeout", "2000"),
    ]


def _start_cluster_process(group: ProcessGroup, directory: Path) -> RedisServer:
    process, port = _start_on_free_port(
        group, "redis-cluster", lambda port: _cluster_argv(port, directory), directory
    )
    return RedisServer(group, port, process)


def _cluster_ok(port: int, nodes: int) -> bool:
    import redis

    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return False
    finally:
        client.close()
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text and f"cluster_known_nodes:{nodes}" in text


def start_cluster_node(group: ProcessGroup, directory: Path) -> RedisServer:
    """A one-node Redis Cluster holding every slot, on a free port."""
    import redis

    server = _start_cluster_process(group, directory)
    client = redis.Redis(host=LOOPBACK, port=server.port)
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
    finally:
        client.close()
    server.process.wait_ready(lambda: _cluster_ok(server.port, 1), timeout=10.0)
    return server


@dataclass
class RedisClusterNodes:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)


def start_cluster(group: ProcessGroup, directory: Path, masters: int = 3) -> RedisClusterNodes:
    """A Redis Cluster of ``masters`` nodes on free ports, slots spread by ``redis-cli --cluster
    create``; ready when every node sees every other and all slots are served."""
    nodes = [_start_cluster_process(group, directory) for _ in range(masters)]
    create = [
        REDIS_CLI, "--cluster", "create",
        *(f"{LOOPBACK}:{n.port}" for n in nodes),
        "--cluster-replicas", "0", "--cluster-yes",
    ]  # fmt: skip
    result = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise ProcessError(f"{' '.join(create)} failed:\n{result.stdout}{result.stderr}")
    for n in nodes:
        n.process.wait_ready(lambda n=n: _cluster_ok(n.port, masters), timeout=20.0)  # type: ignore[misc]
    return RedisClusterNodes(nodes)


def _info(port: int, section: str) -> dict[str, Any]:
    import redis

    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        info: dict[str, Any] = client.info(section)
        return info
    except redis.RedisError:
        return {}
    finally:
        client.close()


def start_replica(group: ProcessGroup, master: RedisServer) -> RedisServer:
    """A replica of ``master`` on a free port, ready once its link to the master is up."""

    def argv(port: int) -> list[str]:
        # A replica writes the snapshot of its first sync to its --dir: the test's, not the cwd.
        return [
            *_argv(port),
            *("--replicaof", LOOPBACK, str(master.port)),
            *("--dir", str(group.directory)),
        ]

    process, port = _start_on_free_port(group, "redis-replica", argv)
    replica = RedisServer(group, port, process)
    replica.process.wait_ready(
        lambda: _info(replica.port, "replication").get("master_link_status") == "up",
        timeout=10.0,
    )
    return replica


def start_sentinel(
    group: ProcessGroup,
    master: RedisServer,
    directory: Path,
    service: str = "mymaster",
    *,
    replicas: int = 0,
) -> RedisServer:
    """A Sentinel on a free port monitoring ``master`` as ``service`` (quorum 1), quick to fail
    over (the master is down after 500 ms); ready once it knows ``replicas`` replicas."""

    def argv(port: int) -> list[str]:
        config = directory / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind {LOOPBACK}\ndaemonize no\n"
            f"sentinel monitor {service} {LOOPBACK} {master.port} 1\n"
            f"sentinel down-after-milliseconds {service} 500\n"
            f"sentinel failover-timeout {service} 5000\n"
        )
        return [REDIS_SERVER, str(config), "--sentinel"]

    process, port = _start_on_free_port(group, "redis-sentinel", argv)
    sentinel = RedisServer(group, port, process)
    if replicas:
        # Sentinel finds replicas in the master's INFO, which it reads every few seconds.
        sentinel.process.wait_ready(
            lambda: _sentinel_replicas(sentinel.port, service) >= replicas, timeout=30.0
        )
    return sentinel


def _sentinel_replicas(port: int, service: str) -> int:
    import redis

    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        found = client.execute_command("SENTINEL", "REPLICAS", service)  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return 0
    finally:
        client.close()
    return len(found)


def sentinel_master(port: int, service: str = "mymaster") -> int | None:
    """The master's port as the Sentinel at ``port`` names it now."""
    import redis

    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        address = client.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service
        )
    except redis.RedisError:
        return None
    finally:
        client.close()
    return int(address[1]) if address else None
