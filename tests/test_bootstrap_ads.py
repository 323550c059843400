"""`mixerhub bootstrap --ads`: the node, the admin port and the hub; the rest comes over xDS."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2

# Imported for its descriptor: ParseDict resolves the cluster's protocol options through it.
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from mixerhub import cli
from mixerhub.bootstrap import (
    AdsOptions,
    Workload,
    add_arguments,
    ads_bootstrap,
    ads_options_from_args,
    render_ads_yaml,
)
from tests.harness import envoy_validate

REVIEWS = Workload("reviews-v1", "bookinfo", {"app": "reviews", "version": "v1"}, "reviews")


def _parse(*argv: str) -> AdsOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return ads_options_from_args(parser.parse_args(["--ads", *argv]))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_validate_accepts_it(delta: bool, tmp_path: Path) -> None:
    text = render_ads_yaml(AdsOptions(REVIEWS, hub=("127.0.0.1", 9091), delta=delta))
    envoy_validate(text, tmp_path)
    json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())
    assert "&id" not in text


def test_everything_but_the_hub_comes_over_ads() -> None:
    config = ads_bootstrap(AdsOptions(REVIEWS, hub=("hub.mesh", 15010), delta=True))
    dynamic = config["dynamic_resources"]
    assert dynamic["ads_config"]["api_type"] == "DELTA_GRPC"
    assert dynamic["ads_config"]["grpc_services"] == [{"envoy_grpc": {"cluster_name": "mixerhub"}}]
    assert (
        dynamic["cds_config"] == dynamic["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    )
    [hub] = config["static_resources"]["clusters"]
    assert "listeners" not in config["static_resources"]
    assert hub["name"] == "mixerhub"
    assert hub["type"] == "STRICT_DNS"  # a name, resolved through DNS
    protocol = hub["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(protocol.values()))["explicit_http_config"]
    assert config["node"] == {
        "id": "sidecar~127.0.0.1~reviews-v1.bookinfo~bookinfo.svc.cluster.local",
        "cluster": "reviews-v1",
        "metadata": {
            "NAMESPACE": "bookinfo",
            "WORKLOAD_NAME": "reviews-v1",
            "LABELS": {"app": "reviews", "version": "v1"},
            "SERVICE_ACCOUNT": "reviews",
        },
    }


def test_flags() -> None:
    options = _parse(
        "--node-id", "n1", "--workload", "web", "--namespace", "shop", "--labels", "app=web",
        "--service-account", "web-sa", "--hub", "127.0.0.1:15010", "--admin-port", "15001",
        "--delta",
    )  # fmt: skip
    assert options == AdsOptions(
        Workload("web", "shop", {"app": "web"}, "web-sa"),
        hub=("127.0.0.1", 15010),
        admin_port=15001,
        node_id="n1",
        delta=True,
    )
    assert (
        _parse().resolved_node_id == "sidecar~127.0.0.1~unknown.default~default.svc.cluster.local"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bootstrap", "--ads", "--upstream", "127.0.0.1:8080"], "--upstream: not with --ads"),
        (["bootstrap", "--ads", "--tcp"], "--tcp: not with --ads"),
        (["bootstrap", "--upstream", "127.0.0.1:8080", "--delta"], "--delta: only with --ads"),
        (["bootstrap"], "--upstream: required (or --ads"),
        (["bootstrap", "--ads", "--hub", "nowhere"], "--hub"),
    ],
)
def test_the_command_refuses_what_does_not_fit(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bootstrap", "--ads", "--workload", "web", "--namespace", "shop"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["node"]["metadata"]["WORKLOAD_NAME"] == "web"
    assert config["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
