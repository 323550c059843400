"""One push measured: N simulated ADS clients (bench/ads_clients.py) connected to a server, one
change, the time until every client has its new config; for bench/xds.py and bench/ca.py.

Figures per round: when the last client got (and ACKed) what the change caused, how many
clients it reached, the server's CPU for it (from /proc), and its memory per connected client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.harness import ManagedProcess, ProcessGroup, tcp_probe

HERE = Path(__file__).resolve().parent
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Clients:
    """bench/ads_clients.py, connected and ready."""

    def __init__(self, target: str, n: int, extra: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ads_clients.py"),
                "--target",
                target,
                "--clients",
                str(n),
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError(f"clients did not get ready: {line!r}")

    def measure(self, t0: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"measure {t0}\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return result

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def round_trip(
    pid: int, target: str, n: int, change: Callable[[], object], extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Connect ``n`` clients to ``target`` (served by process ``pid``), call ``change``, measure."""
    rss_before = rss_bytes(pid)
    clients = Clients(target, n, extra)
    try:
        rss_after = rss_bytes(pid)
        cpu = cpu_seconds(pid)
        t0 = time.time()
        change()
        result = clients.measure(t0)
        result["cpu"] = cpu_seconds(pid) - cpu
        result["memory_per_proxy"] = (rss_after - rss_before) / n
    finally:
        clients.close()
    return result


def config_dump(http_port: int, node_id: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"proxy": node_id})
    url = f"http://127.0.0.1:{http_port}/debug/config_dump?{query}"
    with urllib.request.urlopen(url, timeout=5) as response:
        dump: dict[str, Any] = json.load(response)
    return dump


def baseline_resources(
    http_port: int, grpc_port: int, tmp: Path, extra: Sequence[str] = ()
) -> Path:
    """What the hub sends one proxy, for the baseline to serve to all of them."""
    clients = Clients(f"127.0.0.1:{grpc_port}", 1, extra)
    try:
        node_id = "sidecar~127.0.0.1~client-0-0.bench~bench.svc.cluster.local"
        dump = config_dump(http_port, node_id)
    finally:
        clients.close()
    path = tmp / "resources.json"
    path.write_text(json.dumps(dump))
    return path


def start_baseline(
    group: ProcessGroup, port: int, resources: Path, push_type: str = ROUTE
) -> ManagedProcess:
    """bench/trivial_ads.py: on SIGUSR1 it pushes ``push_type`` to every stream."""
    argv = [sys.executable, str(HERE / "trivial_ads.py"), "--port", str(port),
            "--resources", str(resources), "--push-type", push_type]  # fmt: skip
    process = group.start("trivial-ads", argv)
    process.wait_ready(tcp_probe("127.0.0.1", port), 30)
    return process
