"""The Pusher: debounced pushes, one translation per workload identity, what a failure costs."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from mixerhub.monitoring import REGISTRY
from mixerhub.snapshot import Snapshot
from mixerhub.xds.cache import SnapshotCache
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.push import Pusher
from mixerhub.xds.resources import CLUSTER, ENDPOINT, Resources
from tests.test_xds_cache import eds_cluster, load_assignment


class Config:
    """Stands in for a Snapshot: the translation below reads only its port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.version = str(port)


class Translation:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_for: set[str] = set()

    def __call__(self, proxy: Proxy, config: Snapshot) -> Resources:
        port = cast(Any, config).port
        self.calls.append((proxy.workload, port))
        if proxy.workload in self.fail_for:
            raise RuntimeError("a translation bug")
        if proxy.workload == "inconsistent":  # an EDS cluster without its endpoints
            return {CLUSTER: {"c": eds_cluster("c")}}
        return {CLUSTER: {"c": eds_cluster("c")}, ENDPOINT: {"c": load_assignment("c", port)}}


def proxy(node_id: str, workload: str) -> Proxy:
    return Proxy(node_id, namespace="shop", workload=workload, labels={"app": workload})


def setup(
    quiet: float = 0.05, max_delay: float = 10.0
) -> tuple[SnapshotCache, Pusher, Translation]:
    cache, translation = SnapshotCache(), Translation()
    pusher = Pusher(cache, translation, quiet=quiet, max_delay=max_delay)
    cache.hooks = pusher
    return cache, pusher, translation


def config(port: int) -> Snapshot:
    return cast(Snapshot, Config(port))


def port_of(cache: SnapshotCache, node_id: str) -> int:
    snapshot = cache.get_snapshot(node_id)
    assert snapshot is not None
    assignment: Any = snapshot.resources[ENDPOINT]["c"]
    return int(assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value)


async def test_a_burst_of_changes_is_one_push_after_the_quiet_period() -> None:
    cache, pusher, translation = setup(quiet=0.1)
    pusher.activate(config(1))
    watch = cache.watch(proxy("n1", "web"), lambda: None)
    assert port_of(cache, "n1") == 1  # a proxy that connects is served at once
    translation.calls.clear()
    for port in (2, 3, 4):
        pusher.activate(config(port))
        await asyncio.sleep(0.03)
    assert port_of(cache, "n1") == 1  # still within the quiet period
    await asyncio.sleep(0.2)
    assert port_of(cache, "n1") == 4
    assert translation.calls == [("web", 4)]  # the intermediate configurations were skipped
    watch.close()
    await pusher.close()


async def test_changes_that_never_stop_are_pushed_by_the_maximum_delay() -> None:
    cache, pusher, _ = setup(quiet=0.1, max_delay=0.25)
    cache.watch(proxy("n1", "web"), lambda: None)
    started = asyncio.get_running_loop().time()
    port = 0
    while port_of_or_none(cache, "n1") is None or port_of(cache, "n1") < 2:
        port += 1
        pusher.activate(config(port))
        await asyncio.sleep(0.05)  # always less quiet than asked for
        assert asyncio.get_running_loop().time() - started < 1.0
    await pusher.close()


def port_of_or_none(cache: SnapshotCache, node_id: str) -> int | None:
    return None if cache.get_snapshot(node_id) is None else port_of(cache, node_id)


async def test_proxies_of_one_workload_share_one_translation() -> None:
    cache, pusher, translation = setup()
    pusher.activate(config(7))
    for n in range(5):
        cache.watch(proxy(f"web-{n}", "web"), lambda: None)
    cache.watch(proxy("db-0", "db"), lambda: None)
    assert sorted(translation.calls) == [("db", 7), ("web", 7)]
    snapshots = {id(cache.get_snapshot(f"web-{n}")) for n in range(5)}
    assert len(snapshots) == 1
    translation.calls.clear()
    pusher.activate(config(8))
    await asyncio.sleep(0.15)
    assert sorted(translation.calls) == [("db", 8), ("web", 8)]
    assert {port_of(cache, f"web-{n}") for n in range(5)} == {8}
    await pusher.close()


@pytest.mark.parametrize(
    ("workload", "reason"), [("broken", "error"), ("inconsistent", "inconsistent")]
)
async def test_a_proxy_that_cannot_be_translated_keeps_what_it_had(
    workload: str, reason: str
) -> None:
    cache, pusher, translation = setup()
    translation.fail_for.add("broken")
    pusher.activate(config(1))
    cache.watch(proxy("bad", workload), lambda: None)
    cache.watch(proxy("good", "web"), lambda: None)
    before = (
        REGISTRY.get_sample_value("mixerhub_xds_translation_errors_total", {"reason": reason})
        or 0.0
    )
    assert cache.get_snapshot("bad") is None  # nothing consistent to serve yet
    translation.fail_for.add("web")
    pusher.activate(config(2))
    await asyncio.sleep(0.15)
    assert port_of(cache, "good") == 1  # its translation failed: the last good one stays
    after = REGISTRY.get_sample_value("mixerhub_xds_translation_errors_total", {"reason": reason})
    assert (after or 0.0) - before >= 1
    await pusher.close()


async def test_a_node_is_forgotten_when_its_last_stream_closes() -> None:
    cache, pusher, _ = setup()
    pusher.activate(config(1))
    first = cache.watch(proxy("n1", "web"), lambda: None)
    second = cache.watch(proxy("n1", "web"), lambda: None)
    first.close()
    assert cache.get_snapshot("n1") is not None  # another stream of the node is still open
    second.close()
    assert cache.get_snapshot("n1") is None
    await pusher.close()
