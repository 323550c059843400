"""A real Envoy, started from mixerhub.bootstrap, with ``mixerhub serve`` in its request path.

Envoy's own stats are the witness that it called the hub:
- ``http.inbound.ext_authz.ok`` (the filter, under the HCM stat_prefix) and
  ``cluster.upstream.ext_authz.ok`` (Envoy counts ext_authz under the route's target cluster);
- ``cluster.upstream.ratelimit.ok`` likewise for the ratelimit filter;
- ``access_logs.grpc_access_log.logs_written`` (entries buffered) and ``.grpc_entries_flushed``
  (entries streamed to the hub) for the gRPC access logger.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mixerhub.bootstrap import STAT_PREFIX, UPSTREAM_CLUSTER, Workload
from tests.harness import Envoy, EnvoyFactory, Hub, Upstream, loopback_options

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass(frozen=True)
class Stack:
    upstream: Upstream
    hub: Hub
    envoy: Envoy


@pytest.fixture
def stack(upstream: Upstream, hub: Hub, envoy: EnvoyFactory) -> Stack:
    workload = Workload("productpage", "bookinfo", {"app": "productpage", "version": "v1"})
    options = loopback_options(upstream.address, hub.grpc_address, workload=workload)
    return Stack(upstream, hub, envoy(options))


def test_request_reaches_the_upstream_through_envoy(stack: Stack) -> None:
    response = stack.envoy.get("/productpage?user=jason", headers={"traceparent": TRACEPARENT})

    assert response.status == 200, response
    echoed = response.json()
    assert echoed["method"] == "GET"
    assert echoed["path"] == "/productpage?user=jason"
    assert echoed["headers"]["traceparent"] == TRACEPARENT
    assert echoed["headers"]["x-request-id"]  # generate_request_id


def test_envoy_checks_rate_limits_and_logs_through_the_hub(stack: Stack) -> None:
    for _ in range(3):
        assert stack.envoy.get("/reviews/1").status == 200

    stats = stack.envoy.stats()
    assert stats[f"http.{STAT_PREFIX}.ext_authz.ok"] >= 3
    assert stats[f"cluster.{UPSTREAM_CLUSTER}.ext_authz.ok"] >= 3
    assert stats.get(f"cluster.{UPSTREAM_CLUSTER}.ext_authz.error", 0) == 0
    # ShouldRateLimit has Envoy's 20 ms default timeout, which a busy test machine can miss (the
    # request then goes through: failure_mode_deny is false); one answer in time is enough here.
    assert stats[f"cluster.{UPSTREAM_CLUSTER}.ratelimit.ok"] >= 1
    # logs_written counts entries taken into the logger's buffer; grpc_entries_flushed those
    # streamed to the hub, once buffer_flush_interval (1 s) has passed.
    assert stats["access_logs.grpc_access_log.logs_written"] >= 3
    flushed = "access_logs.grpc_access_log.grpc_entries_flushed"
    assert stack.envoy.wait_for_stat(flushed, lambda value: value >= 3, timeout=10) >= 3
    assert stack.envoy.stats()["access_logs.grpc_access_log.grpc_entries_flush_failed"] == 0
    # ...and the hub's side of the same stream.
    metrics = stack.hub.get("/metrics").body.decode()
    assert 'mixerhub_accesslog_entries_total{type="http"} 3.0' in metrics
    assert 'mixerhub_check_total{result="ok",rule=""} 3.0' in metrics


def test_envoy_denies_when_the_hub_is_down(stack: Stack) -> None:
    assert stack.envoy.get("/details/1").status == 200
    assert stack.hub.process.stop() == 0  # SIGTERM is a clean shutdown

    # failure_mode_allow is false: a failed Check is a denial (403, Envoy's status_on_error).
    response = stack.envoy.get("/details/1")

    assert response.status == 403, response
    assert stack.envoy.stats()[f"cluster.{UPSTREAM_CLUSTER}.ext_authz.error"] >= 1
