"""Global rate limits with a real Envoy: its ratelimit filter asks the hub, which answers from an
envoyproxy/ratelimit configuration.

Envoy gives the hub 20 ms per call and lets the request through when that runs out
(failure_mode_deny is false), so on a loaded machine a call may be missed: the tests send a few
extra requests rather than expect the limit on an exact one, and check Envoy's own counters.
"""

from __future__ import annotations

import re
from pathlib import Path

from mixerhub.bootstrap import Workload
from tests.harness import Envoy, EnvoyFactory, Hub, HubFactory, Response, Upstream, loopback_options

WORKLOAD = Workload("ratelimited", "shop", {"app": "ratelimited"})
LIMIT = 5
EXTRA = 20  # requests allowed past the limit for calls Envoy timed out
# A rolling window: a fixed one aligned on the minute could reset half way through the test.
CONFIG = f"""
domain: mixerhub
descriptors:
  - key: workload
    value: {WORKLOAD.name}
    shadow_mode: {{shadow}}
    rate_limit:
      unit: minute
      requests_per_unit: {LIMIT}
      algorithm: rolling_window
"""
LABELS = 'descriptor="workload_ratelimited",domain="mixerhub"'  # as exposed: sorted


def start(
    tmp_path: Path, upstream: Upstream, make_hub: HubFactory, envoy: EnvoyFactory, *, shadow: bool
) -> tuple[Hub, Envoy]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "ratelimit.yaml").write_text(CONFIG.format(shadow=str(shadow).lower()))
    hub = make_hub(config)
    return hub, envoy(loopback_options(upstream.address, hub.grpc_address, workload=WORKLOAD))


def hub_metric(hub: Hub, name: str) -> float:
    text = hub.get("/metrics").body.decode()
    match = re.search(rf"^{name}_total\{{{re.escape(LABELS)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def ratelimit_stats(envoy: Envoy) -> dict[str, int]:
    stats = envoy.stats()
    names = ("ok", "over_limit", "error", "failure_mode_allowed")
    return {n: stats.get(f"cluster.upstream.ratelimit.{n}", 0) for n in names}


def test_requests_over_the_limit_get_429_with_envoys_ratelimit_headers(
    tmp_path: Path, upstream: Upstream, make_hub: HubFactory, envoy: EnvoyFactory
) -> None:
    hub, proxy = start(tmp_path, upstream, make_hub, envoy, shadow=False)
    answers: list[Response] = []
    for _ in range(LIMIT + EXTRA):
        answers.append(proxy.get("/limited"))
        if answers[-1].status == 429:
            break
    statuses = [a.status for a in answers]
    assert statuses[-1] == 429, statuses
    assert statuses[:LIMIT] == [200] * LIMIT, statuses
    assert set(statuses[:-1]) == {200}, statuses

    limited = answers[-1]
    assert limited.headers["x-ratelimit-limit"].startswith(f"{LIMIT}, {LIMIT};w=60"), limited
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert 0 < int(limited.headers["x-ratelimit-reset"]) <= 60
    # The hub's own, unprefixed headers ride along; Envoy's X- ones are not duplicated.
    assert limited.headers["ratelimit-limit"] == str(LIMIT)
    assert "," not in limited.headers["x-ratelimit-remaining"]

    # Every request got an answer from the hub or fell through on a timeout: none is unaccounted.
    assert proxy.wait_for_stat("cluster.upstream.ratelimit.over_limit") == 1
    counted = ratelimit_stats(proxy)
    assert counted["ok"] + counted["over_limit"] + counted["error"] == len(answers), counted
    assert counted["failure_mode_allowed"] == counted["error"], counted
    # The hub charged a call Envoy gave up on too, so at most LIMIT answers reached Envoy as OK.
    assert 1 <= counted["ok"] <= LIMIT, counted
    assert hub_metric(hub, "mixerhub_ratelimit_over_limit") >= 1
    assert hub_metric(hub, "mixerhub_ratelimit_total_hits") >= LIMIT + 1


def test_a_shadow_mode_limit_passes_everything_but_counts_what_is_over(
    tmp_path: Path, upstream: Upstream, make_hub: HubFactory, envoy: EnvoyFactory
) -> None:
    hub, proxy = start(tmp_path, upstream, make_hub, envoy, shadow=True)
    statuses = [proxy.get("/shadow").status for _ in range(LIMIT + EXTRA)]
    assert set(statuses) == {200}, statuses
    counted = ratelimit_stats(proxy)
    assert counted["over_limit"] == 0, counted
    assert counted["ok"] > LIMIT, counted  # the hub answered beyond the limit, and said OK
    assert hub_metric(hub, "mixerhub_ratelimit_over_limit") >= counted["ok"] - LIMIT
    assert hub_metric(hub, "mixerhub_ratelimit_shadow_mode") >= counted["ok"] - LIMIT


def test_an_unconfigured_domain_lets_everything_through(
    upstream: Upstream, hub: Hub, envoy: EnvoyFactory
) -> None:
    proxy = envoy(loopback_options(upstream.address, hub.grpc_address, workload=WORKLOAD))
    assert {proxy.get("/a").status for _ in range(LIMIT + 2)} == {200}
    assert ratelimit_stats(proxy)["over_limit"] == 0
