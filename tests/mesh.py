"""Envoys that get their whole configuration from the hub over ADS, for the xDS end-to-end tests.

Each is started from `mixerhub bootstrap --ads`'s output (mixerhub.xds.bootstrap) and is ready
once its admin /ready says LIVE, which Envoy only says after its first clusters and listeners
arrived: a ready Envoy has been configured by the hub.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixerhub.bootstrap import AdsOptions, Workload, render_ads_yaml
from tests.harness import (
    LOOPBACK,
    Hub,
    ManagedProcess,
    ProcessGroup,
    Response,
    envoy_ready_probe,
    free_port,
    http_request,
    hub_command,
    next_base_id,
    sibling_executable,
)


@dataclass(frozen=True)
class AdsEnvoy:
    process: ManagedProcess
    options: AdsOptions

    @property
    def admin_port(self) -> int:
        return self.options.admin_port

    @property
    def workload(self) -> str:
        return self.options.workload.name

    @property
    def node_id(self) -> str:
        return self.options.resolved_node_id

    def get(self, port: int, host: str, path: str = "/", **headers: str) -> Response:
        """A request to one of this Envoy's listeners (an egress port), for ``host``."""
        return http_request(LOOPBACK, port, "GET", path, headers={"host": host, **headers})

    def config_dump(self) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.admin_port}/config_dump"
        with urllib.request.urlopen(url, timeout=5) as response:
            dump: dict[str, Any] = json.load(response)
        return dump

    def stat(self, pattern: str) -> int:
        """The sum of the counters whose names match the regex ``pattern`` (Envoy's filter)."""
        query = urllib.parse.urlencode({"filter": pattern, "format": "json"})
        url = f"http://{LOOPBACK}:{self.admin_port}/stats?{query}"
        with urllib.request.urlopen(url, timeout=5) as response:
            stats = json.load(response)["stats"]
        return sum(int(s.get("value", 0)) for s in stats if "value" in s)


def node(workload: str, namespace: str = "shop", **labels: str) -> AdsOptions:
    """A proxy of ``workload``, with a node id of its own (several may run one workload)."""
    serial = next(_SERIAL)
    return AdsOptions(
        Workload(workload, namespace, {"app": workload, **labels}, service_account=workload),
        node_id=f"sidecar~127.0.0.1~{workload}-{serial}.{namespace}~{namespace}.svc.cluster.local",
    )


_SERIAL = itertools.count(1)


def start_ads_envoy(
    group: ProcessGroup, hub: Hub, node: AdsOptions, *, delta: bool = False, timeout: float = 30
) -> AdsEnvoy:
    """`mixerhub bootstrap --ads` for ``node``, pointed at ``hub``, on a free admin port."""
    options = dataclasses.replace(node, hub=hub.grpc_address, admin_port=free_port(), delta=delta)
    for n in itertools.count(1):
        path = group.directory / f"envoy-ads-{n}.yaml"
        if not path.exists():
            break
    Path(path).write_text(render_ads_yaml(options))
    argv = [
        sibling_executable("envoy"), "-c", str(path), "--base-id", str(next_base_id()),
        "--disable-hot-restart", "--log-level", "info", "--concurrency", "1",
    ]  # fmt: skip
    process = group.start(f"envoy-{options.workload.name}", argv)
    process.wait_ready(envoy_ready_probe(options.admin_port), timeout)
    return AdsEnvoy(process, options)


def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """Seconds until ``condition`` held; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        time.sleep(0.02)
    return time.monotonic() - started


def syncz(hub: Hub) -> list[dict[str, Any]]:
    url = f"http://{LOOPBACK}:{hub.http_port}/debug/syncz"
    with urllib.request.urlopen(url, timeout=5) as response:
        rows: list[dict[str, Any]] = json.load(response)
    return rows


def sync_of(hub: Hub, node_id: str) -> Mapping[str, Any] | None:
    for row in syncz(hub):
        if row.get("node_id") == node_id:
            return row
    return None


def run_proxy_status(hub: Hub) -> str:
    """`mixerhub proxy-status --admin` against ``hub``: its output."""
    return subprocess.run(
        [*hub_command(), "proxy-status", "--admin", f"{LOOPBACK}:{hub.http_port}"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip


def sidecar_egress(workload: str, port: int, namespace: str = "shop") -> str:
    """Istio's Sidecar for ``workload``: its Envoy's egress listener on 127.0.0.1:``port``,
    reaching every service of its namespace."""
    return _sidecar(
        workload,
        namespace,
        "egress",
        f"{{number: {port}, protocol: HTTP, name: http-egress}}",
        'hosts: ["./*"]',
    )


def sidecar_ingress(workload: str, port: int, app_port: int, namespace: str = "shop") -> str:
    """Istio's Sidecar for ``workload``: its Envoy's inbound listener on 127.0.0.1:``port``,
    forwarding to the application on 127.0.0.1:``app_port``."""
    return _sidecar(
        workload,
        namespace,
        "ingress",
        f"{{number: {port}, protocol: HTTP, name: http}}",
        f"defaultEndpoint: 127.0.0.1:{app_port}",
    )


def _sidecar(workload: str, namespace: str, side: str, port: str, target: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {{name: {workload}, namespace: {namespace}}}
        spec:
          workloadSelector: {{labels: {{app: {workload}}}}}
          {side}:
          - port: {port}
            {target}
        """
    )


def workload_entry(
    name: str,
    address: str,
    app: str,
    *,
    version: str = "v1",
    service_account: str = "",
    namespace: str = "shop",
) -> str:
    """A WorkloadEntry, which stands for a pod (kubernetesenv reads them as pods)."""
    account = service_account or f"bookinfo-{app}"
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata: {{name: {name}, namespace: {namespace}}}
        spec:
          address: {address}
          labels: {{app: {app}, version: {version}}}
          serviceAccount: {account}
        """
    )
