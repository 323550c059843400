"""xDS push: N simulated Envoys on ADS, one service changed, time until every one has ACKed.

The hub runs a mesh of 20 services (ServiceEntries with static endpoints, a VirtualService each,
one Sidecar giving every proxy an egress listener) and N simulated ADS clients in a separate
process (bench/ads_clients.py) connect to it. Then one VirtualService's weights change. Printed
per N: the time from the file change until the last client got (and ACKed) its new config, the
hub's CPU for that push, and the hub's memory per connected proxy; side by side with a baseline
server that pushes precomputed bytes to every stream with no per-proxy work (bench/trivial_ads.py).
The hub polls its files every 50 ms here, so up to 50 ms of its time is the file watch.

    python bench/xds.py [--clients 100 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

# This script shares its name with xds-protos' `xds` package: keep bench/ off the import path,
# and the repository on it.
sys.path.remove(str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import ProcessGroup, free_port, process_group, start_hub, tcp_probe

SERVICES = 20
HERE = Path(__file__).resolve().parent


def mesh() -> str:
    docs = [
        textwrap.dedent(
            """\
            apiVersion: networking.istio.io/v1
            kind: Sidecar
            metadata: {name: default, namespace: bench}
            spec:
              egress:
              - port: {number: 15001, protocol: HTTP, name: egress-http}
                hosts: ["./*"]
            """
        )
    ]
    for i in range(SERVICES):
        docs.append(
            textwrap.dedent(
                f"""\
                apiVersion: networking.istio.io/v1
                kind: ServiceEntry
                metadata: {{name: svc-{i}, namespace: bench}}
                spec:
                  hosts: [svc-{i}.bench.svc]
                  ports: [{{number: 80, name: http, protocol: HTTP}}]
                  resolution: STATIC
                  endpoints:
                  - {{address: 127.0.0.{i + 2}, ports: {{http: 8080}}, labels: {{version: v1}}}}
                  - {{address: 127.0.1.{i + 2}, ports: {{http: 8080}}, labels: {{version: v2}}}}
                ---
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {{name: svc-{i}, namespace: bench}}
                spec:
                  host: svc-{i}.bench.svc
                  subsets:
                  - {{name: v1, labels: {{version: v1}}}}
                  - {{name: v2, labels: {{version: v2}}}}
                """
            )
        )
        docs.append(virtual_service(i, 90))
    return "---\n".join(docs)


def virtual_service(i: int, v1_weight: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: svc-{i}, namespace: bench}}
        spec:
          hosts: [svc-{i}.bench.svc]
          http:
          - match: [{{headers: {{x-canary: {{exact: "1"}}}}}}]
            route: [{{destination: {{host: svc-{i}.bench.svc, subset: v2}}}}]
          - route:
            - {{destination: {{host: svc-{i}.bench.svc, subset: v1}}, weight: {v1_weight}}}
            - {{destination: {{host: svc-{i}.bench.svc, subset: v2}}, weight: {100 - v1_weight}}}
        """
    )


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

    def __init__(self, target: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ads_clients.py"), "--target", target, "--clients", str(n)],
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


def round_trip(pid: int, target: str, n: int, change: Any) -> dict[str, Any]:
    rss_before = rss_bytes(pid)
    clients = Clients(target, n)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    results: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, process_group(Path(tmp) / "logs") as group:
        config = Path(tmp) / "config"
        config.mkdir()
        (config / "mesh.yaml").write_text(mesh())
        hub = start_hub(
            group, config, extra_args=["--log-level", "warning", "--poll-interval", "0.05"]
        )
        hub_pid = hub.process.pid
        weight = [90]

        def change_hub() -> None:
            weight[0] = 170 - weight[0]  # 90 <-> 80
            (config / "svc-0.yaml").write_text(virtual_service(0, weight[0]))

        # svc-0's VirtualService moves to its own file so that one change is one file write.
        docs = mesh().split("---\n")
        rest = [d for d in docs if d != virtual_service(0, 90)]
        (config / "mesh.yaml").write_text("---\n".join(rest))
        (config / "svc-0.yaml").write_text(virtual_service(0, 90))
        time.sleep(0.5)

        dump = baseline_resources(hub.http_port, f"{hub.grpc_port}", Path(tmp))
        base_port = free_port()
        baseline = start_baseline(group, base_port, dump)
        for n in args.clients:
            ours = round_trip(hub_pid, f"127.0.0.1:{hub.grpc_port}", n, change_hub)
            base = round_trip(
                baseline.pid,
                f"127.0.0.1:{base_port}",
                n,
                lambda: os.kill(baseline.pid, signal.SIGUSR1),
            )
            results[n] = (ours, base)
    report(results)


def baseline_resources(http_port: int, grpc_port: str, tmp: Path) -> Path:
    """What the hub sends one proxy, for the baseline to serve to all of them."""
    clients = Clients(f"127.0.0.1:{grpc_port}", 1)
    try:
        node_id = "sidecar~127.0.0.1~client-0-0.bench~bench.svc.cluster.local"
        dump = config_dump(http_port, node_id)
    finally:
        clients.close()
    path = tmp / "resources.json"
    path.write_text(json.dumps(dump))
    return path


def start_baseline(group: ProcessGroup, port: int, resources: Path) -> Any:
    process = group.start(
        "trivial-ads",
        [
            sys.executable,
            str(HERE / "trivial_ads.py"),
            "--port",
            str(port),
            "--resources",
            str(resources),
        ],
    )
    process.wait_ready(tcp_probe("127.0.0.1", port), 30)
    return process


def report(results: dict[int, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    print(f"one VirtualService changed in a mesh of {SERVICES} services; every client ACKs")
    print(f"{'':8} {'':28} {'converged s':>11} {'updated':>8} {'CPU s':>7} {'KiB/proxy':>10}")
    for n, (ours, base) in results.items():
        for name, r in (("mixerhub", ours), ("baseline (precomputed bytes)", base)):
            print(
                f"{n:>8} {name:28} {r['converged']:>11.3f} {r['updated']:>8}"
                f" {r['cpu']:>7.2f} {r['memory_per_proxy'] / 1024:>10.1f}"
            )
        print(
            f"{'':8} ratio: mixerhub converges in {ours['converged'] / base['converged']:.1f}x"
            " the baseline's time"
        )
    print("target: 1,000 proxies converge within 2 s of a one-service change")


if __name__ == "__main__":
    main()
