"""mixerhub.bootstrap: the static Envoy bootstrap, checked against the protos and a real Envoy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2

# Imported for their descriptors: ParseDict resolves each typed_config's @type through them.
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from mixerhub.bootstrap import (
    BootstrapOptions,
    Workload,
    add_arguments,
    options_from_args,
    render_yaml,
    static_bootstrap,
)
from tests.harness import envoy_validate

REVIEWS = Workload(
    name="reviews-v1",
    namespace="bookinfo",
    labels={"version": "v1", "app": "reviews"},
    service_account="bookinfo-reviews",
)

OPTION_SETS = {
    "ip-upstream": BootstrapOptions(upstream=("127.0.0.1", 8080)),
    "dns-upstream": BootstrapOptions(upstream=("localhost", 8080), hub=("mixerhub.local", 9091)),
    "labels": BootstrapOptions(upstream=("10.0.0.7", 9080), workload=REVIEWS),
    "custom-node-id": BootstrapOptions(
        upstream=("127.0.0.1", 8080),
        node_id="router~10.1.2.3~gateway.istio-system~istio-system.svc.cluster.local",
        listen_port=18080,
        admin_port=18000,
        ratelimit_domain="edge",
    ),
    "ipv6": BootstrapOptions(upstream=("::1", 8080), hub=("::1", 9091), listen_address="::1"),
}


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = _hcm(config)["http_filters"]
    return filters


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        f["typed_config"] for f in _http_filters(config) if f["name"] == name
    ]
    assert len(found) == 1, f"{len(found)} filters named {name}"
    return found[0]


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    clusters: list[dict[str, Any]] = config["static_resources"]["clusters"]
    found = [c for c in clusters if c["name"] == name]
    assert len(found) == 1, f"{len(found)} clusters named {name}"
    return found[0]


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_envoy_validate_accepts_the_bootstrap(options: BootstrapOptions, tmp_path: Path) -> None:
    envoy_validate(render_yaml(options), tmp_path)


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_bootstrap_parses_as_the_v3_proto(options: BootstrapOptions) -> None:
    # Every field name and enum value, including inside the typed_configs, must exist in v3.
    json_format.ParseDict(static_bootstrap(options), bootstrap_pb2.Bootstrap())


def test_render_yaml_is_the_bootstrap_without_aliases() -> None:
    options = OPTION_SETS["labels"]
    text = render_yaml(options)
    assert yaml.safe_load(text) == static_bootstrap(options)
    assert "&id" not in text


def test_node_carries_the_workload_identity() -> None:
    node = static_bootstrap(OPTION_SETS["labels"])["node"]
    assert node["id"] == "sidecar~127.0.0.1~reviews-v1.bookinfo~bookinfo.svc.cluster.local"
    assert node["cluster"] == "reviews-v1"
    assert node["metadata"] == {
        "NAMESPACE": "bookinfo",
        "WORKLOAD_NAME": "reviews-v1",
        "LABELS": {"app": "reviews", "version": "v1"},
        "SERVICE_ACCOUNT": "bookinfo-reviews",
    }


def test_custom_node_id_is_used_as_given() -> None:
    options = OPTION_SETS["custom-node-id"]
    assert static_bootstrap(options)["node"]["id"] == options.node_id


def test_http_filters_are_authz_then_ratelimit_then_router() -> None:
    names = [f["name"] for f in _http_filters(static_bootstrap(OPTION_SETS["ip-upstream"]))]
    assert names == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]


def test_ext_authz_and_ratelimit_calls_carry_the_identity() -> None:
    config = static_bootstrap(OPTION_SETS["labels"])
    expected = [
        {"key": "x-mixerhub-workload", "value": "reviews-v1"},
        {"key": "x-mixerhub-namespace", "value": "bookinfo"},
        {"key": "x-mixerhub-labels", "value": "app=reviews,version=v1"},
        {"key": "x-mixerhub-service-account", "value": "bookinfo-reviews"},
    ]
    authz = _filter(config, "envoy.filters.http.ext_authz")
    ratelimit = _filter(config, "envoy.filters.http.ratelimit")
    assert authz["grpc_service"]["initial_metadata"] == expected
    assert ratelimit["rate_limit_service"]["grpc_service"]["initial_metadata"] == expected


def test_ext_authz_calls_the_hub_and_fails_closed() -> None:
    authz = _filter(static_bootstrap(OPTION_SETS["ip-upstream"]), "envoy.filters.http.ext_authz")
    assert authz["grpc_service"]["envoy_grpc"] == {"cluster_name": "mixerhub"}
    assert authz["grpc_service"]["timeout"] == "0.2s"
    assert authz["transport_api_version"] == "V3"
    assert authz["failure_mode_allow"] is False
    assert authz["include_peer_certificate"] is True


def test_ratelimit_calls_the_hub_and_fails_open() -> None:
    config = static_bootstrap(OPTION_SETS["custom-node-id"])
    ratelimit = _filter(config, "envoy.filters.http.ratelimit")
    assert ratelimit["domain"] == "edge"
    assert ratelimit["timeout"] == "0.020s"
    assert ratelimit["failure_mode_deny"] is False
    assert ratelimit["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    service = ratelimit["rate_limit_service"]
    assert service["grpc_service"]["envoy_grpc"] == {"cluster_name": "mixerhub"}
    assert service["transport_api_version"] == "V3"


def test_route_sends_workload_and_remote_address_descriptors() -> None:
    hcm = _hcm(static_bootstrap(OPTION_SETS["labels"]))
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == "upstream"
    actions = [limit["actions"] for limit in route["route"]["rate_limits"]]
    workload_key = {"generic_key": {"descriptor_key": "workload", "descriptor_value": "reviews-v1"}}
    assert [workload_key] in actions
    assert any({"remote_address": {}} in descriptor for descriptor in actions)


def test_access_log_streams_to_the_hub_with_trace_headers() -> None:
    hcm = _hcm(static_bootstrap(OPTION_SETS["ip-upstream"]))
    assert hcm["codec_type"] == "AUTO"
    assert hcm["generate_request_id"] is True
    (log,) = hcm["access_log"]
    assert log["name"] == "envoy.access_loggers.http_grpc"
    common = log["typed_config"]["common_config"]
    assert common["log_name"] == "mixerhub"
    assert common["grpc_service"]["envoy_grpc"] == {"cluster_name": "mixerhub"}
    assert common["transport_api_version"] == "V3"
    assert common["buffer_flush_interval"] == "1s"
    assert common["buffer_size_bytes"] == 65536
    assert {"x-b3-traceid", "x-b3-spanid", "traceparent"} <= set(
        log["typed_config"]["additional_request_headers_to_log"]
    )


def test_listener_and_admin_bind_loopback() -> None:
    config = static_bootstrap(OPTION_SETS["custom-node-id"])
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 18000,
    }


def test_hub_cluster_speaks_http2_and_upstream_type_follows_the_host() -> None:
    ip = static_bootstrap(OPTION_SETS["ip-upstream"])
    dns = static_bootstrap(OPTION_SETS["dns-upstream"])
    hub = _cluster(ip, "mixerhub")
    assert hub["type"] == "STATIC"
    options = hub["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    assert _cluster(ip, "upstream")["type"] == "STATIC"
    assert _cluster(dns, "upstream")["type"] == "STRICT_DNS"
    assert _cluster(dns, "mixerhub")["type"] == "STRICT_DNS"
    assert "typed_extension_protocol_options" not in _cluster(dns, "upstream")


# options_from_args --------------------------------------------------------------------------------


def _parse(*argv: str) -> BootstrapOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from_args(parser.parse_args(list(argv)))


def test_options_from_args_defaults() -> None:
    assert _parse("--upstream", "127.0.0.1:8080") == BootstrapOptions(upstream=("127.0.0.1", 8080))


def test_options_from_args_reads_every_flag() -> None:
    options = _parse(
        "--upstream=reviews.bookinfo:9080",
        "--listen=10001",
        "--listen-address=::1",
        "--admin-port=15001",
        "--hub=[::1]:9092",
        "--workload=reviews-v1",
        "--namespace=bookinfo",
        "--labels=version=v1, app=reviews",
        "--service-account=bookinfo-reviews",
        "--node-id=sidecar~10.0.0.1~x.y~y.svc.cluster.local",
        "--ratelimit-domain=edge",
    )
    assert options == BootstrapOptions(
        upstream=("reviews.bookinfo", 9080),
        listen_port=10001,
        listen_address="::1",
        admin_port=15001,
        hub=("::1", 9092),
        workload=REVIEWS,
        node_id="sidecar~10.0.0.1~x.y~y.svc.cluster.local",
        ratelimit_domain="edge",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--upstream", "127.0.0.1"], r"--upstream: '127\.0\.0\.1' is not HOST:PORT"),
        (["--upstream", ":8080"], r"--upstream: ':8080' is not HOST:PORT"),
        (["--upstream", "127.0.0.1:"], r"--upstream: .* is not HOST:PORT"),
        (["--upstream", "127.0.0.1:http"], r"--upstream: 'http' is not a port number"),
        (["--upstream", "127.0.0.1:70000"], r"--upstream: .*70000 is out of range"),
        (["--upstream", "::1:80"], r"--upstream: .*IPv6 address in brackets"),
        (["--upstream", "bad_host!:80"], r"--upstream: .*neither an IP address nor a host name"),
        (["--listen", "0"], r"--listen: .*0 is out of range \(a port is 1 to 65535\)"),
        (["--listen", "65536"], r"--listen: .*65536 is out of range"),
        (["--admin-port", "-1"], r"--admin-port: .*-1 is out of range"),
        (["--hub", "hub.local"], r"--hub: 'hub\.local' is not HOST:PORT"),
        (["--listen-address", "localhost"], r"--listen-address: .*not an IP address"),
        (["--labels", "app"], r"--labels: label 'app' is not key=value"),
        (["--labels", "app=,v=1"], r"--labels: label 'app=' is not key=value"),
        (["--labels", "app=a,app=b"], r"--labels: label 'app' is given twice"),
        (["--labels", "app=a b"], r"--labels: .*not a valid label"),
        (["--workload=-x"], r"--workload: .*not a valid name"),
        (["--namespace", ""], r"--namespace: .*not a valid name"),
        (["--node-id", " "], r"--node-id: must not be empty"),
        (["--ratelimit-domain", ""], r"--ratelimit-domain: must not be empty"),
    ],
)
def test_options_from_args_rejects_bad_values(argv: list[str], message: str) -> None:
    argv = ["--upstream", "127.0.0.1:8080", *argv]
    with pytest.raises(ValueError, match=message):
        _parse(*argv)


def test_options_are_checked_when_built_directly() -> None:
    with pytest.raises(ValueError, match=r"listen_port: 0 is out of range"):
        BootstrapOptions(upstream=("127.0.0.1", 8080), listen_port=0)
    with pytest.raises(ValueError, match=r"workload.labels: 'a,b'='c' is not a valid label"):
        Workload(labels={"a,b": "c"})


# --tcp: a TCP proxy with the TCP access log ----------------------------------------------------

TCP_OPTION_SETS = {
    "tcp-ip-upstream": BootstrapOptions(upstream=("127.0.0.1", 8080), protocol="tcp"),
    "tcp-dns-upstream": BootstrapOptions(
        upstream=("localhost", 8080), hub=("mixerhub.local", 9091), protocol="tcp"
    ),
    "tcp-labels": BootstrapOptions(upstream=("10.0.0.7", 9080), workload=REVIEWS, protocol="tcp"),
    "tcp-ipv6": BootstrapOptions(
        upstream=("::1", 8080), hub=("::1", 9091), listen_address="::1", protocol="tcp"
    ),
}


def _network_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    (chain,) = config["static_resources"]["listeners"][0]["filter_chains"]
    filters: list[dict[str, Any]] = chain["filters"]
    return filters


@pytest.mark.parametrize("options", TCP_OPTION_SETS.values(), ids=TCP_OPTION_SETS.keys())
def test_envoy_validate_accepts_the_tcp_bootstrap(
    options: BootstrapOptions, tmp_path: Path
) -> None:
    envoy_validate(render_yaml(options), tmp_path)


@pytest.mark.parametrize("options", TCP_OPTION_SETS.values(), ids=TCP_OPTION_SETS.keys())
def test_tcp_bootstrap_parses_as_the_v3_proto(options: BootstrapOptions) -> None:
    json_format.ParseDict(static_bootstrap(options), bootstrap_pb2.Bootstrap())


def test_tcp_listener_proxies_to_the_upstream_and_logs_to_the_hub() -> None:
    config = static_bootstrap(TCP_OPTION_SETS["tcp-ip-upstream"])
    (tcp_filter,) = _network_filters(config)
    assert tcp_filter["name"] == "envoy.filters.network.tcp_proxy"
    proxy = tcp_filter["typed_config"]
    assert proxy["@type"] == (
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
    )
    assert proxy["stat_prefix"] == "inbound"
    assert proxy["cluster"] == "upstream"
    (log,) = proxy["access_log"]
    assert log["name"] == "envoy.access_loggers.tcp_grpc"
    assert log["typed_config"] == {
        "@type": "type.googleapis.com/"
        "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
        "common_config": {
            "log_name": "mixerhub",
            "grpc_service": {"envoy_grpc": {"cluster_name": "mixerhub"}},
            "transport_api_version": "V3",
            "buffer_flush_interval": "1s",
            "buffer_size_bytes": 65536,
        },
    }
    # No HTTP machinery: no connection manager, no ext_authz, no rate limits.
    assert "http_connection_manager" not in render_yaml(TCP_OPTION_SETS["tcp-ip-upstream"])
    assert "ext_authz" not in render_yaml(TCP_OPTION_SETS["tcp-ip-upstream"])


def test_tcp_bootstrap_keeps_node_clusters_admin_and_listener_address() -> None:
    for name in ("ip-upstream", "dns-upstream", "labels", "ipv6"):
        http = static_bootstrap(OPTION_SETS[name])
        tcp = static_bootstrap(TCP_OPTION_SETS[f"tcp-{name}"])
        assert tcp["node"] == http["node"]
        assert tcp["admin"] == http["admin"]
        assert tcp["static_resources"]["clusters"] == http["static_resources"]["clusters"]
        tcp_listener = tcp["static_resources"]["listeners"][0]
        http_listener = http["static_resources"]["listeners"][0]
        assert tcp_listener["name"] == http_listener["name"]
        assert tcp_listener["address"] == http_listener["address"]


def test_http_stays_the_default() -> None:
    options = BootstrapOptions(upstream=("127.0.0.1", 8080))
    assert options.protocol == "http"
    (hcm_filter,) = _network_filters(static_bootstrap(options))
    assert hcm_filter["name"] == "envoy.filters.network.http_connection_manager"
    assert static_bootstrap(options) == static_bootstrap(
        BootstrapOptions(upstream=("127.0.0.1", 8080), protocol="http")
    )


def test_options_from_args_tcp_flag() -> None:
    assert _parse("--upstream", "127.0.0.1:8080").protocol == "http"
    assert _parse("--upstream", "127.0.0.1:8080", "--tcp") == BootstrapOptions(
        upstream=("127.0.0.1", 8080), protocol="tcp"
    )
    options = _parse("--upstream=reviews.bookinfo:9080", "--workload=reviews-v1", "--tcp")
    assert options.protocol == "tcp"
    assert options.workload.name == "reviews-v1"


def test_protocol_is_checked_when_built_directly() -> None:
    with pytest.raises(ValueError, match=r"protocol: 'udp' is not one of http, tcp"):
        BootstrapOptions(upstream=("127.0.0.1", 8080), protocol="udp")  # type: ignore[arg-type]
