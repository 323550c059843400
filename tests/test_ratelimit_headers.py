"""Per-header and per-client-address rate limits: ``mixerhub bootstrap --ratelimit-header``
writes Envoy's ``request_headers`` action, and a real Envoy with the hub limits each header value
(and each client address) on its own.

As in test_ratelimit_envoy.py, Envoy gives the hub 20 ms per call and lets a request through
when that runs out, so the limit is looked for within a few extra requests.
"""

from __future__ import annotations

import argparse
import http.client
import re
from pathlib import Path
from typing import Any

import pytest

from mixerhub.bootstrap import (
    BootstrapOptions,
    Workload,
    add_arguments,
    options_from_args,
    parse_ratelimit_headers,
    render_yaml,
    static_bootstrap,
)
from tests.harness import (
    Envoy,
    EnvoyFactory,
    HubFactory,
    Response,
    Upstream,
    envoy_validate,
    loopback_options,
)

WORKLOAD = Workload("ratelimited", "shop", {"app": "ratelimited"})
LIMIT = 3
EXTRA = 20  # requests allowed past the limit for calls Envoy timed out
WORKLOAD_KEY = {"generic_key": {"descriptor_key": "workload", "descriptor_value": WORKLOAD.name}}


def rate_limits(options: BootstrapOptions) -> list[dict[str, Any]]:
    listener = static_bootstrap(options)["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    limits: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"][
        "rate_limits"
    ]
    return limits


def from_argv(*argv: str) -> BootstrapOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from_args(parser.parse_args(["--upstream", "127.0.0.1:8080", *argv]))


# --- the bootstrap ---


def test_each_header_adds_a_workload_and_header_descriptor() -> None:
    options = from_argv(
        "--workload", WORKLOAD.name, "--ratelimit-header", "X-User-Id=user",
        "--ratelimit-header", ":authority=host",
    )  # fmt: skip
    assert options.ratelimit_headers == (("x-user-id", "user"), (":authority", "host"))
    assert rate_limits(options) == [
        {"actions": [WORKLOAD_KEY]},
        {"actions": [WORKLOAD_KEY, {"remote_address": {}}]},
        {
            "actions": [
                WORKLOAD_KEY,
                {"request_headers": {"header_name": "x-user-id", "descriptor_key": "user"}},
            ]
        },
        {
            "actions": [
                WORKLOAD_KEY,
                {"request_headers": {"header_name": ":authority", "descriptor_key": "host"}},
            ]
        },
    ]


def test_without_the_flag_the_descriptors_are_unchanged() -> None:
    options = from_argv("--workload", WORKLOAD.name)
    assert options.ratelimit_headers == ()
    assert len(rate_limits(options)) == 2


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["x-user-id"], "is not HEADER=KEY"),
        (["=user"], "is not a lower-case request header name"),
        (["x user=user"], "is not a lower-case request header name"),
        (["x-user-id="], "descriptor key ''"),
        (["x-user-id=a b"], "descriptor key 'a b'"),
        (["x-user-id=a", "X-User-Id=b"], "header 'x-user-id' is given twice"),
    ],
)
def test_bad_header_flags_are_refused(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_ratelimit_headers(items)
    argv = [a for item in items for a in ("--ratelimit-header", item)]
    with pytest.raises(ValueError, match=rf"^--ratelimit-header: .*{re.escape(message)}"):
        from_argv(*argv)


def test_options_check_their_headers() -> None:
    with pytest.raises(ValueError, match=r"^ratelimit_headers: 'X-User' is not a lower-case"):
        BootstrapOptions(upstream=("127.0.0.1", 1), ratelimit_headers=(("X-User", "user"),))


def test_envoy_validate_accepts_header_descriptors(tmp_path: Path) -> None:
    options = from_argv("--ratelimit-header", "x-user-id=user", "--ratelimit-header", ":path=p")
    envoy_validate(render_yaml(options), tmp_path)


# --- a real Envoy and the hub ---

CONFIG = f"""
domain: mixerhub
descriptors:
  - key: workload
    value: {WORKLOAD.name}
    descriptors:
      # A rolling window: a fixed one aligned on the minute could reset half way through a test.
      - key: user
        rate_limit: {{unit: minute, requests_per_unit: {LIMIT}, algorithm: rolling_window}}
      - key: remote_address
        rate_limit: {{unit: minute, requests_per_unit: {LIMIT}, algorithm: rolling_window}}
"""


def start(
    tmp_path: Path,
    upstream: Upstream,
    make_hub: HubFactory,
    envoy: EnvoyFactory,
    config: str,
    **fields: Any,
) -> Envoy:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "ratelimit.yaml").write_text(config)
    hub = make_hub(directory)
    return envoy(loopback_options(upstream.address, hub.grpc_address, workload=WORKLOAD, **fields))


def until_limited(send: Any) -> list[int]:
    """Statuses of requests sent until the first 429 (or LIMIT + EXTRA of them)."""
    statuses: list[int] = []
    for _ in range(LIMIT + EXTRA):
        statuses.append(send().status)
        if statuses[-1] == 429:
            break
    return statuses


def test_a_limit_per_header_value(
    tmp_path: Path, upstream: Upstream, make_hub: HubFactory, envoy: EnvoyFactory
) -> None:
    # Only the user limit: the per-address one would stop every user at once.
    config = CONFIG.split("      - key: remote_address")[0]
    proxy = start(
        tmp_path, upstream, make_hub, envoy, config, ratelimit_headers=(("x-user-id", "user"),)
    )
    alice = until_limited(lambda: proxy.get("/a", {"x-user-id": "alice"}))
    assert alice[-1] == 429, alice
    assert alice[:LIMIT] == [200] * LIMIT, alice
    # Another value of the header has a count of its own; no header, no descriptor, no limit.
    assert [proxy.get("/b", {"x-user-id": "bob"}).status for _ in range(LIMIT)] == [200] * LIMIT
    assert {proxy.get("/c").status for _ in range(LIMIT + 2)} == {200}
    assert proxy.get("/a", {"x-user-id": "alice"}).status == 429


def request_from(proxy: Envoy, source: str, path: str) -> Response:
    """A GET to Envoy's listener from ``source`` (any 127/8 address is local on Linux)."""
    connection = http.client.HTTPConnection(
        proxy.options.listen_address, proxy.listen_port, timeout=5, source_address=(source, 0)
    )
    try:
        connection.request("GET", path)
        raw = connection.getresponse()
        return Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
    finally:
        connection.close()


def test_a_limit_per_client_address(
    tmp_path: Path, upstream: Upstream, make_hub: HubFactory, envoy: EnvoyFactory
) -> None:
    proxy = start(tmp_path, upstream, make_hub, envoy, CONFIG)
    first = until_limited(lambda: request_from(proxy, "127.0.0.1", "/a"))
    assert first[-1] == 429, first
    assert first[:LIMIT] == [200] * LIMIT, first
    # use_remote_address: the peer, not a forged X-Forwarded-For, is the descriptor's value.
    second = [request_from(proxy, "127.0.0.2", "/b").status for _ in range(LIMIT)]
    assert second == [200] * LIMIT
    forged = proxy.get("/a", {"x-forwarded-for": "10.9.8.7"})
    assert forged.status == 429
