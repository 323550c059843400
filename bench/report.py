"""Access-log ingestion: Envoy at full speed (direct response) with its gRPC access logger pointed
at the hub running the default configuration, against the same Envoy pointed at a trivial
access-log server that only parses, in the same run on the same machine.

Prints Envoy's request rate in both, the hub's CPU time per entry (from /proc) against Envoy's
own CPU time per request in the same seconds, and Envoy's logs_dropped. Load comes from wrk
(`apt-get install wrk`).

    python bench/report.py [--seconds 10] [--connections 32] [--config DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

import yaml

from bench.check import wrk
from mixerhub.bootstrap import BootstrapOptions, static_bootstrap
from tests.harness import (
    ProcessGroup,
    envoy_ready_probe,
    free_port,
    http_request,
    next_base_id,
    process_group,
    sibling_executable,
    start_hub,
    tcp_probe,
)


def envoy_config(logs: tuple[str, int], listen: int, admin: int) -> dict[str, Any]:
    config = static_bootstrap(
        BootstrapOptions(upstream=("127.0.0.1", 9), listen_port=listen, admin_port=admin, hub=logs)
    )
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    typed = hcm["typed_config"]
    route = typed["route_config"]["virtual_hosts"][0]["routes"][0]
    route.pop("route")
    route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    route.pop("rate_limits", None)
    # Only the access log goes to the hub here: the Check path has its own benchmark.
    typed["http_filters"] = [f for f in typed["http_filters"] if "router" in f["name"]]
    return config


def start_envoy(
    group: ProcessGroup, logs: tuple[str, int], work: Path, name: str
) -> tuple[int, int, int]:
    """Envoy's listener and admin ports, and its pid."""
    listen, admin = free_port(), free_port()
    path = work / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(envoy_config(logs, listen, admin)))
    argv = [sibling_executable("envoy"), "-c", str(path), "--concurrency", "1", "--base-id",
            str(next_base_id()), "--disable-hot-restart", "--log-level", "warn"]  # fmt: skip
    envoy = group.start(f"envoy-{name}", argv)
    envoy.wait_ready(envoy_ready_probe(admin), 30)
    return listen, admin, envoy.pid


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stat(admin: int, name: str) -> int:
    body = http_request("127.0.0.1", admin, "GET", f"/stats?filter=^{name}$").body.decode()
    return int(body.split(":")[1]) if ":" in body else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--config", help="the hub's config folder (default: the shipped default)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    written, dropped = (
        "access_logs.grpc_access_log.logs_written",
        "access_logs.grpc_access_log.logs_dropped",
    )
    with tempfile.TemporaryDirectory() as tmp, process_group(Path(tmp) / "logs") as group:
        work = Path(tmp)
        hub = start_hub(group, Path(args.config) if args.config else None,
                        extra_args=["--log-level", "warning"])  # fmt: skip
        base_port = free_port()
        baseline = [sys.executable, str(Path(__file__).with_name("trivial_als.py"))]
        group.start("trivial", [*baseline, "--port", str(base_port)]).wait_ready(
            tcp_probe("127.0.0.1", base_port), 30
        )
        hub_listen, hub_admin, envoy = start_envoy(group, hub.grpc_address, work, "hub")
        base_listen, base_admin, _ = start_envoy(group, ("127.0.0.1", base_port), work, "trivial")
        wrk(hub_listen, "x", 2, args.connections)
        wrk(base_listen, "x", 2, args.connections)

        entries_before = stat(hub_admin, written)
        cpu_before = cpu_seconds(hub.process.pid)
        envoy_before = cpu_seconds(envoy)
        ours = wrk(hub_listen, "x", args.seconds, args.connections)
        time.sleep(2)  # the last buffered entries flush after 1 s
        cpu = cpu_seconds(hub.process.pid) - cpu_before
        envoy_cpu = cpu_seconds(envoy) - envoy_before
        entries = stat(hub_admin, written) - entries_before
        base = wrk(base_listen, "x", args.seconds, args.connections)
        hub_dropped, base_dropped = stat(hub_admin, dropped), stat(base_admin, dropped)

    print(f"Envoy (1 worker, direct response) with its gRPC access log, {args.seconds}s each")
    print(f"{'':34} {'req/s':>10} {'logs_dropped':>13}")
    print(f"{'to mixerhub (default config)':34} {ours['rps']:>10.0f} {hub_dropped:>13}")
    print(f"{'to a trivial parse-only server':34} {base['rps']:>10.0f} {base_dropped:>13}")
    print(f"ratio: {ours['rps'] / base['rps']:.0%} of the baseline's request rate")
    per_entry = cpu / entries * 1e6 if entries else float("nan")
    print(f"hub CPU: {cpu:.2f}s for {entries} entries = {per_entry:.1f} us per entry"
          f" = one core keeps up with {1e6 / per_entry:,.0f} entries/s")  # fmt: skip
    # Side by side in the same seconds, so that the machine's changing speed weighs on both.
    envoy_per_request = envoy_cpu / entries * 1e6 if entries else float("nan")
    print(f"Envoy's CPU in the same run: {envoy_per_request:.1f} us per request (1 worker):"
          f" the hub spends {per_entry / envoy_per_request:.2f}x what Envoy spends per"
          " request (at most 1: one hub core keeps up with one Envoy worker)")  # fmt: skip
    print("(Mixer in Istio 1.4: 0.6 vCPU per 1,000 requests/s = 600 us per request)")


if __name__ == "__main__":
    main()
