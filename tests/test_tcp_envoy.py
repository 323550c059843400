"""Istio's TCP metrics from a real Envoy's TCP access log (``mixerhub bootstrap --tcp``).

Envoy proxies plain TCP to an echo upstream (tests/tcp_upstream.py) and streams one TCP access-log
entry per connection, when it closes, to the hub on its default configuration. The hub's /metrics
must then count every connection once as opened and once as closed, and every byte once:
``istio_tcp_received_bytes_total`` what Envoy received from the client (the downstream),
``istio_tcp_sent_bytes_total`` what it sent back. The upstream greets each connection before it
echoes, so the two directions differ and a swap would show.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mixerhub.bootstrap import Workload
from tests.harness import (
    Envoy,
    EnvoyFactory,
    Hub,
    ManagedProcess,
    ProcessGroup,
    loopback_options,
)
from tests.tcp_upstream import DEFAULT_GREETING

TCP_UPSTREAM_SCRIPT = Path(__file__).with_name("tcp_upstream.py")
GREETING = DEFAULT_GREETING.encode()
WORKLOAD = Workload("mysql-v1", "db", {"app": "mysql", "version": "v1"}, "mysql")
K = 8
# A different, known size per connection, so a lost or doubled entry changes the sums.
SIZES = [1000 * (i + 1) + 7 * i for i in range(K)]
METRICS = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
)
TIMEOUT = 20.0

Sample = tuple[dict[str, str], float]


@dataclass(frozen=True)
class TcpUpstream:
    process: ManagedProcess
    port: int
    host: str = "127.0.0.1"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def start_tcp_upstream(group: ProcessGroup) -> TcpUpstream:
    """The echo server as a process of the test's group: stopped with it, whatever happens."""
    port_file = group.directory / "tcp-upstream.port"
    argv = [sys.executable, str(TCP_UPSTREAM_SCRIPT), "--port-file", str(port_file)]
    process = group.start("tcp-upstream", argv)
    process.wait_ready(port_file.exists)
    return TcpUpstream(process, int(port_file.read_text()))


def samples(hub: Hub, name: str) -> list[Sample]:
    """Every sample of a metric on the hub's /metrics, with its labels."""
    out = []
    for line in hub.get("/metrics").body.decode().splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out


def totals(hub: Hub) -> dict[str, float]:
    return {name: sum(value for _, value in samples(hub, name)) for name in METRICS}


def tcp_log_lines(hub: Hub) -> list[str]:
    """The hub's stdout access log of TCP entries (Istio 1.4's tcpaccesslog, default config)."""
    return [line for line in hub.log().splitlines() if "tcpaccesslog" in line]


def report(hub: Hub) -> str:
    metrics = "\n".join(f"{name}: {samples(hub, name)}" for name in METRICS)
    entries = "\n".join(tcp_log_lines(hub))
    return f"/metrics samples:\n{metrics}\nTCP access-log entries:\n{entries}"


def wait_for(condition: Callable[[], bool], describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached after {TIMEOUT:g}s\n{describe()}")
        time.sleep(0.2)


def echo_through(proxy: Envoy, payload: bytes) -> bytes:
    """One connection: send ``payload``, half-close, read until Envoy closes; what came back."""
    address = (proxy.options.listen_address, proxy.listen_port)
    with socket.create_connection(address, timeout=5.0) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


@pytest.fixture
def tcp_upstream(processes: ProcessGroup) -> TcpUpstream:
    return start_tcp_upstream(processes)


@pytest.fixture
def proxy(tcp_upstream: TcpUpstream, hub: Hub, envoy: EnvoyFactory) -> Envoy:
    options = loopback_options(
        tcp_upstream.address, hub.grpc_address, workload=WORKLOAD, protocol="tcp"
    )
    return envoy(options)


def test_istio_tcp_metrics_count_every_connection_and_byte(proxy: Envoy, hub: Hub) -> None:
    for i, size in enumerate(SIZES):
        payload = bytes([65 + i]) * size
        assert echo_through(proxy, payload) == GREETING + payload
    expected = {
        "istio_tcp_connections_opened_total": K,
        "istio_tcp_connections_closed_total": K,
        # received_bytes: from the downstream (the client); sent_bytes: to it.
        "istio_tcp_received_bytes_total": sum(SIZES),
        "istio_tcp_sent_bytes_total": sum(SIZES) + K * len(GREETING),
    }
    # Envoy's own view of the same bytes: rx from the downstream, tx to it.
    assert proxy.wait_for_stat("tcp.inbound.downstream_cx_total", lambda v: v == K) == K
    stats = proxy.stats()
    assert stats["tcp.inbound.downstream_cx_rx_bytes_total"] == sum(SIZES)
    assert stats["tcp.inbound.downstream_cx_tx_bytes_total"] == sum(SIZES) + K * len(GREETING)
    # Envoy logs each connection as it closes and flushes its logger's buffer every second.
    wait_for(
        lambda: all(totals(hub)[name] >= value for name, value in expected.items()),
        lambda: f"expected {expected}\n{report(hub)}",
    )
    # Exactly, not at least: give a late duplicate a couple of flush intervals to show up.
    time.sleep(2.5)
    assert totals(hub) == expected, report(hub)
    for name in METRICS:
        found = samples(hub, name)
        assert found, f"{name}: no samples\n{report(hub)}"
        for labels, _ in found:
            wanted = {
                "request_protocol": "tcp",
                "reporter": "destination",
                "destination_workload": WORKLOAD.name,
            }
            assert {key: labels.get(key) for key in wanted} == wanted, f"{name}\n{report(hub)}"
