"""The ADS servers with a real Envoy, state of the world and delta: traffic, changes, rejections."""

from __future__ import annotations

import asyncio
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import json_format

from mixerhub.xds.ads import AggregatedDiscoveryService
from mixerhub.xds.cache import SnapshotCache
from mixerhub.xds.resources import ROUTE, Resources
from mixerhub.xds.status import NACKED, SYNCED, syncz
from tests.harness import (
    LOOPBACK,
    ProcessGroup,
    Response,
    Upstream,
    envoy_ready_probe,
    free_port,
    http_request,
    next_base_id,
    sibling_executable,
)
from tests.test_xds_cache import mesh, route_config

NODE = "sidecar~127.0.0.1~productpage-v1.bookinfo~bookinfo.svc.cluster.local"
_T = TypeVar("_T")


class RecordingService(AggregatedDiscoveryService):
    """The service, noting which ADS variant each stream used."""

    methods: list[str]

    async def StreamAggregatedResources(self, *args: Any) -> AsyncIterator[Any]:
        self.methods.append("GRPC")
        async for response in super().StreamAggregatedResources(*args):
            yield response

    async def DeltaAggregatedResources(self, *args: Any) -> AsyncIterator[Any]:
        self.methods.append("DELTA_GRPC")
        async for response in super().DeltaAggregatedResources(*args):
            yield response


class AdsThread:
    """The ADS service on its own event loop in a thread, so the test can block on Envoy."""

    def __init__(self) -> None:
        self.cache = SnapshotCache()
        self.service = RecordingService(self.cache)
        self.service.methods = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self.run(self._start)

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        self.service.add_to_server(self._server)
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")
        await self._server.start()

    async def _stop(self) -> None:
        self.service.close()
        if self._server is not None:
            await self._server.stop(1)

    def stop(self) -> None:
        try:
            self.run(self._stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def run(self, coroutine: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine(), self.loop).result(10)

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the service's loop: the cache belongs to that thread."""
        future: Future[_T] = Future()

        def target() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as error:
                future.set_exception(error)

        self.loop.call_soon_threadsafe(target)
        return future.result(10)

    def set(self, resources: Resources) -> None:
        self.call(self.cache.set_snapshot, NODE, resources)

    def route_status(self) -> dict[str, Any]:
        entries = self.call(syncz, self.cache)
        [entry] = [e for e in entries if e["node_id"] == NODE]
        rds: dict[str, Any] = entry["types"]["RDS"]
        return rds


@pytest.fixture
def ads_thread() -> Iterator[AdsThread]:
    ads = AdsThread()
    ads.start()
    try:
        yield ads
    finally:
        ads.stop()


def bootstrap(api_type: str, ads_port: int, admin_port: int) -> str:
    return textwrap.dedent(
        f"""\
        node:
          id: {NODE}
          cluster: productpage.bookinfo
          metadata:
            NAMESPACE: bookinfo
            WORKLOAD_NAME: productpage-v1
            SERVICE_ACCOUNT: bookinfo-productpage
            LABELS: {{app: productpage, version: v1}}
        admin:
          address: {{socket_address: {{address: {LOOPBACK}, port_value: {admin_port}}}}}
        dynamic_resources:
          ads_config:
            api_type: {api_type}
            transport_api_version: V3
            set_node_on_first_message_only: true
            grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
          cds_config: {{ads: {{}}, resource_api_version: V3}}
          lds_config: {{ads: {{}}, resource_api_version: V3}}
        static_resources:
          clusters:
          - name: xds
            type: STATIC
            connect_timeout: 1s
            load_assignment:
              cluster_name: xds
              endpoints:
              - lb_endpoints:
                - endpoint:
                    address: {{socket_address: {{address: {LOOPBACK}, port_value: {ads_port}}}}}
            typed_extension_protocol_options:
              envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
                "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
                explicit_http_config: {{http2_protocol_options: {{}}}}
        """
    )


@dataclass(frozen=True)
class AdsEnvoy:
    ads: AdsThread
    upstream: Upstream
    listen_port: int
    admin_port: int

    def resources(self, header: str) -> Resources:
        return mesh(port=self.upstream.port, header=header, listen_port=self.listen_port)

    def get(self) -> Response:
        return http_request(LOOPBACK, self.listen_port, "GET", "/productpage", timeout=2)

    def stat(self, name: str) -> int:
        text = http_request(LOOPBACK, self.admin_port, "GET", f"/stats?filter=^{name}$").body
        for line in text.decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


def _route_header(envoy: AdsEnvoy) -> str | None:
    try:
        response = envoy.get()
    except OSError:
        return None
    return response.headers.get("x-route") if response.status == 200 else None


def wait_for_route(envoy: AdsEnvoy, header: str, timeout: float) -> float:
    """Seconds until responses through Envoy carry ``x-route: header``."""
    started = time.monotonic()
    while (seen := _route_header(envoy)) != header:
        assert time.monotonic() - started < timeout, f"x-route still {seen!r}, not {header!r}"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture(params=["GRPC", "DELTA_GRPC"])
def ads_envoy(
    request: pytest.FixtureRequest,
    ads_thread: AdsThread,
    upstream: Upstream,
    processes: ProcessGroup,
    tmp_path: Path,
) -> AdsEnvoy:
    listen_port, admin_port = free_port(), free_port()
    envoy = AdsEnvoy(ads_thread, upstream, listen_port, admin_port)
    ads_thread.set(envoy.resources("v1"))
    config = tmp_path / "envoy-ads.yaml"
    config.write_text(bootstrap(request.param, ads_thread.port, admin_port))
    argv = [
        sibling_executable("envoy"),
        "-c",
        str(config),
        "--base-id",
        str(next_base_id()),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        "info",
    ]
    process = processes.start("envoy", argv)
    # LIVE only once the first CDS and LDS responses came over ADS.
    process.wait_ready(envoy_ready_probe(admin_port))
    assert ads_thread.service.methods == [request.param]
    return envoy


def test_traffic_flows_and_route_changes_take_effect_within_a_second(ads_envoy: AdsEnvoy) -> None:
    wait_for_route(ads_envoy, "v1", timeout=10)
    assert ads_envoy.get().json()["path"] == "/productpage"
    ads_envoy.ads.set(ads_envoy.resources("v2"))
    assert wait_for_route(ads_envoy, "v2", timeout=1.0) < 1.0
    deadline = time.monotonic() + 5
    while ads_envoy.ads.route_status()["state"] != SYNCED:
        assert time.monotonic() < deadline, ads_envoy.ads.route_status()
        time.sleep(0.05)
    [entry] = ads_envoy.ads.call(syncz, ads_envoy.ads.cache)
    assert entry["proxy"]["workload"] == "productpage-v1"
    assert entry["proxy"]["labels"] == {"app": "productpage", "version": "v1"}
    assert {t["state"] for t in entry["types"].values()} >= {SYNCED}


def test_a_route_envoy_rejects_is_nacked_recorded_and_not_resent(ads_envoy: AdsEnvoy) -> None:
    wait_for_route(ads_envoy, "v1", timeout=10)
    good = ads_envoy.resources("v1")
    bad = dict(good)
    # Valid protobuf, but RE2 cannot compile the regex: Envoy rejects the RouteConfiguration.
    broken = route_config("r1", "c1", "bad")
    json_format.ParseDict(
        {"safe_regex": {"regex": "(unclosed"}}, broken.virtual_hosts[0].routes[0].match
    )
    bad[ROUTE] = {"r1": broken}
    ads_envoy.ads.set(bad)
    deadline = time.monotonic() + 5
    while (status := ads_envoy.ads.route_status())["state"] != NACKED:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert "missing ): (unclosed" in status["error"], status  # RE2's own words, via Envoy
    assert status["acked"] is not None
    assert status["nacked"] == status["sent"]
    assert ads_envoy.stat("http.l1.rds.r1.update_rejected") == 1
    # Envoy keeps serving what it had.
    assert _route_header(ads_envoy) == "v1"
    # The same rejected content again: not sent, so Envoy rejects nothing more.
    ads_envoy.ads.set(bad)
    time.sleep(0.5)
    again = ads_envoy.ads.route_status()
    assert again["counts"] == status["counts"], again
    assert ads_envoy.stat("http.l1.rds.r1.update_rejected") == 1
    assert _route_header(ads_envoy) == "v1"
    # A fixed route is a new version: sent, accepted, served.
    ads_envoy.ads.set(ads_envoy.resources("v3"))
    wait_for_route(ads_envoy, "v3", timeout=2)
    deadline = time.monotonic() + 5
    while ads_envoy.ads.route_status()["state"] != SYNCED:
        assert time.monotonic() < deadline, ads_envoy.ads.route_status()
        time.sleep(0.05)
