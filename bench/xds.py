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
import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

from bench.ads_rounds import baseline_resources, round_trip, start_baseline
from tests.harness import free_port, process_group, start_hub

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

        dump = baseline_resources(hub.http_port, hub.grpc_port, Path(tmp))
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
