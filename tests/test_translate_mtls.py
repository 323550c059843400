"""The server side of mTLS: inbound listeners follow PeerAuthentication (STRICT, PERMISSIVE,
DISABLE, per port), checked field by field and by a real Envoy's validate mode."""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mixerhub.ca.authority import Authority, CAConfig
from mixerhub.ca.identity import SpiffeId
from mixerhub.snapshot import Snapshot
from mixerhub.xds.resources import CLUSTER, ENDPOINT, LISTENER
from mixerhub.xds.translate import translate, translate_data
from tests.harness import (
    LOOPBACK,
    envoy_ready_probe,
    envoy_validate,
    free_port,
    http_request,
    next_base_id,
    process_group,
    sibling_executable,
    start_upstream,
)
from tests.test_translate import PRODUCTPAGE, compile_text, sds_from_the_hub, static_bootstrap

TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)

SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: productpage, namespace: shop}
spec:
  workloadSelector: {labels: {app: productpage}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 9081, protocol: HTTP, name: http-admin}
    defaultEndpoint: 127.0.0.1:8081
  - port: {number: 9090, protocol: TCP, name: tcp}
    defaultEndpoint: 127.0.0.1:8090
  egress:
  - port: {number: 15001, protocol: HTTP, name: http-egress}
    hosts: ["./*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 7001}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"""

HTTP, ADMIN, TCP = "127.0.0.1_9080", "127.0.0.1_9081", "127.0.0.1_9090"


def peer_authentication(namespace: str, spec: str, name: str = "default") -> str:
    return (
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )


def listeners(tmp_path: Path, policies: str = "", *, certificates: bool = True) -> dict[str, Any]:
    snapshot = compile_text(tmp_path, SIDECAR + policies)
    data = translate_data(PRODUCTPAGE, snapshot, certificates=certificates)
    found: dict[str, Any] = data[LISTENER]
    return found


def matches(listener: dict[str, Any]) -> list[str | None]:
    return [
        c.get("filter_chain_match", {}).get("transport_protocol") for c in listener["filter_chains"]
    ]


def tls_context(chain: dict[str, Any]) -> dict[str, Any]:
    socket = chain["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context: dict[str, Any] = socket["typed_config"]
    assert context["@type"] == DOWNSTREAM_TLS
    return context


def network_filter(chain: dict[str, Any]) -> dict[str, Any]:
    [only] = chain["filters"]
    config: dict[str, Any] = only["typed_config"]
    return config


def assert_mtls_chain(chain: dict[str, Any]) -> None:
    assert chain["filter_chain_match"] == {"transport_protocol": "tls"}
    context = tls_context(chain)
    assert context["require_client_certificate"] is True
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["istio-peer-exchange", "h2", "http/1.1"]
    # The same SDS form as ISTIO_MUTUAL clusters: the hub serves both on the ADS stream.
    assert common["tls_certificate_sds_secret_configs"] == [
        {"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
    ]
    assert common["validation_context_sds_secret_config"] == {
        "name": "ROOTCA",
        "sds_config": {"ads": {}, "resource_api_version": "V3"},
    }


def inspector_names(listener: dict[str, Any]) -> list[str]:
    return [f["name"] for f in listener.get("listener_filters", [])]


def test_no_policy_is_permissive_plaintext_and_mtls(tmp_path: Path) -> None:
    found = listeners(tmp_path)
    for name in (HTTP, ADMIN, TCP):
        assert matches(found[name]) == ["tls", "raw_buffer"], name
        assert inspector_names(found[name]) == [TLS_INSPECTOR]
        assert_mtls_chain(found[name]["filter_chains"][0])
        assert "transport_socket" not in found[name]["filter_chains"][1]
    # Outbound listeners are the client side: not PeerAuthentication's business.
    assert matches(found["127.0.0.1_15001"]) == [None]


def test_strict_has_only_the_mtls_chain(tmp_path: Path) -> None:
    found = listeners(tmp_path, peer_authentication("shop", "{mtls: {mode: STRICT}}"))
    listener = found[HTTP]
    assert matches(listener) == ["tls"]
    assert inspector_names(listener) == [TLS_INSPECTOR]
    assert_mtls_chain(listener["filter_chains"][0])


def test_disable_is_plaintext_as_before(tmp_path: Path) -> None:
    found = listeners(tmp_path, peer_authentication("istio-system", "{mtls: {mode: DISABLE}}"))
    for name in (HTTP, ADMIN, TCP):
        assert "listener_filters" not in found[name]
        [chain] = found[name]["filter_chains"]
        assert chain.keys() == {"filters"}
    assert "forward_client_cert_details" not in network_filter(found[HTTP]["filter_chains"][0])


def test_the_mtls_hcm_forwards_the_verified_peer_identity(tmp_path: Path) -> None:
    found = listeners(tmp_path)
    mtls, plaintext = (network_filter(c) for c in found[HTTP]["filter_chains"])
    assert mtls["forward_client_cert_details"] == "SANITIZE_SET"
    assert mtls["set_current_client_cert_details"] == {"uri": True}
    assert "forward_client_cert_details" not in plaintext  # Envoy's default: SANITIZE
    # Otherwise the two chains serve the same routes with the same filters.
    rest = {k: v for k, v in mtls.items() if not k.endswith("client_cert_details")}
    assert rest == plaintext


def test_ext_authz_asks_for_the_peer_certificate_on_mtls_chains(tmp_path: Path) -> None:
    deny = peer_authentication("shop", "{mtls: {mode: STRICT}}") + (
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: only-reviews, namespace: shop}\n"
        "spec:\n  selector: {matchLabels: {app: productpage}}\n"
        "  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/reviews]}}]}]\n"
    )
    found = listeners(tmp_path, deny)
    hcm = network_filter(found[HTTP]["filter_chains"][0])
    [ext_authz] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    assert ext_authz["typed_config"]["include_peer_certificate"] is True


def test_port_level_mtls_overrides_the_workload_mode(tmp_path: Path) -> None:
    policies = peer_authentication(
        "shop",
        "{selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT},"
        " portLevelMtls: {9081: {mode: DISABLE}, 9090: {mode: PERMISSIVE}}}",
    )
    found = listeners(tmp_path, policies)
    assert matches(found[HTTP]) == ["tls"]
    assert matches(found[ADMIN]) == [None]
    assert matches(found[TCP]) == ["tls", "raw_buffer"]


def test_the_workload_selector_wins_over_the_namespace(tmp_path: Path) -> None:
    policies = peer_authentication("shop", "{mtls: {mode: STRICT}}") + peer_authentication(
        "shop", "{selector: {matchLabels: {app: productpage}}, mtls: {mode: DISABLE}}", "pp"
    )
    found = listeners(tmp_path, policies)
    assert matches(found[HTTP]) == [None]


def test_tcp_ingress_gets_tls_on_its_tcp_proxy_chain(tmp_path: Path) -> None:
    found = listeners(tmp_path, peer_authentication("shop", "{mtls: {mode: STRICT}}"))
    listener = found[TCP]
    assert matches(listener) == ["tls"]
    [chain] = listener["filter_chains"]
    assert_mtls_chain(chain)
    [tcp_proxy] = chain["filters"]
    assert tcp_proxy["name"] == "envoy.filters.network.tcp_proxy"
    assert tcp_proxy["typed_config"]["cluster"] == "inbound|9090||"


def test_without_certificates_permissive_is_plaintext_and_strict_stays_strict(
    tmp_path: Path,
) -> None:
    # A hub without a CA serves no secrets: a TLS chain would only hold the listener warming.
    found = listeners(tmp_path, certificates=False)
    assert matches(found[HTTP]) == [None]
    strict = peer_authentication("shop", "{mtls: {mode: STRICT}}")
    found = listeners(tmp_path, strict, certificates=False)
    assert matches(found[HTTP]) == ["tls"]  # fails closed


AUTO = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-meshed, namespace: shop}
spec:
  address: 127.0.0.1
  ports: {http: 7101}
  labels: {app: ratings, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-plain, namespace: shop}
spec:
  address: 127.0.0.1
  ports: {http: 7102}
  labels: {app: ratings}
"""
RATINGS_CLUSTER = "outbound|9080||ratings.shop.svc.cluster.local"


def test_auto_mtls_talks_mtls_to_endpoints_with_a_sidecar(tmp_path: Path) -> None:
    """Istio's auto mTLS: without TLS settings in a DestinationRule, mTLS goes to the
    endpoints labelled security.istio.io/tlsMode=istio, plaintext to the others."""
    data = translate_data(PRODUCTPAGE, compile_text(tmp_path, SIDECAR + "---\n" + AUTO),
                          certificates=True)  # fmt: skip
    cluster = data[CLUSTER][RATINGS_CLUSTER]
    assert "transport_socket" not in cluster
    meshed, plain = cluster["transport_socket_matches"]
    assert meshed["match"] == {"tlsMode": "istio"}
    tls = meshed["transport_socket"]["typed_config"]
    assert tls["sni"] == "outbound_.9080_._.ratings.shop.svc.cluster.local"
    assert tls["common_tls_context"]["alpn_protocols"] == ["istio-peer-exchange", "istio"]
    assert plain["match"] == {}
    assert plain["transport_socket"]["name"] == "envoy.transport_sockets.raw_buffer"
    endpoints = data[ENDPOINT][RATINGS_CLUSTER]["endpoints"][0]["lb_endpoints"]
    by_port = {e["endpoint"]["address"]["socket_address"]["port_value"]: e for e in endpoints}
    assert by_port[7101]["metadata"] == {
        "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}
    }
    assert "metadata" not in by_port[7102]
    # The protobuf form takes them too (RawBuffer's type is known to the translation).
    message: Any = translate(PRODUCTPAGE, compile_text(tmp_path, SIDECAR + "---\n" + AUTO),
                             certificates=True)[CLUSTER][RATINGS_CLUSTER]  # fmt: skip
    assert [m.name for m in message.transport_socket_matches] == [
        "tlsMode-istio", "tlsMode-disabled"
    ]  # fmt: skip
    assert message.transport_socket_matches[1].transport_socket.typed_config.type_url.endswith(
        "RawBuffer"
    )


def test_auto_mtls_needs_the_ca_and_yields_to_the_destination_rule(tmp_path: Path) -> None:
    without_ca = translate_data(
        PRODUCTPAGE, compile_text(tmp_path, SIDECAR + "---\n" + AUTO), certificates=False
    )
    assert "transport_socket_matches" not in without_ca[CLUSTER][RATINGS_CLUSTER]
    disable = (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: ratings, namespace: shop}\n"
        "spec: {host: ratings, trafficPolicy: {tls: {mode: DISABLE}}}\n"
    )
    data = translate_data(
        PRODUCTPAGE, compile_text(tmp_path, SIDECAR + "---\n" + AUTO + disable), certificates=True
    )
    cluster = data[CLUSTER][RATINGS_CLUSTER]
    assert "transport_socket_matches" not in cluster
    assert "transport_socket" not in cluster
    # ISTIO_MUTUAL in the rule: every endpoint, as before.
    reviews = data[CLUSTER]["outbound|9080||reviews.shop.svc.cluster.local"]
    assert "transport_socket" in reviews
    assert "transport_socket_matches" not in reviews


def test_translate_makes_protobuf_listeners(tmp_path: Path) -> None:
    snapshot = compile_text(tmp_path, SIDECAR)
    resources = translate(PRODUCTPAGE, snapshot, certificates=True)
    listener: Any = resources[LISTENER][HTTP]
    assert [c.filter_chain_match.transport_protocol for c in listener.filter_chains] == [
        "tls",
        "raw_buffer",
    ]
    assert listener.listener_filters[0].name == TLS_INSPECTOR


# --- Envoy's own verdict -------------------------------------------------------------------


# As in tests/test_translate.py: `envoy --mode validate` (1.40) crashes on ADS config sources
# for SDS, so the secrets are asked of the hub's cluster directly.
def _sds_from_the_hub(listener: dict[str, Any]) -> None:
    for chain in listener["filter_chains"]:
        sds_from_the_hub(chain.get("transport_socket"))


@pytest.mark.parametrize(
    "policies",
    [
        "",
        peer_authentication("shop", "{mtls: {mode: STRICT}}"),
        peer_authentication(
            "shop",
            "{selector: {matchLabels: {app: productpage}}, mtls: {mode: STRICT},"
            " portLevelMtls: {9081: {mode: DISABLE}}}",
        ),
    ],
    ids=["permissive", "strict", "port-level"],
)
def test_envoy_validates_the_inbound_listeners(tmp_path: Path, policies: str) -> None:
    snapshot: Snapshot = compile_text(tmp_path, SIDECAR + policies)
    data = translate_data(PRODUCTPAGE, snapshot, certificates=True)
    config = static_bootstrap(data)
    for listener in config["static_resources"]["listeners"]:
        _sds_from_the_hub(listener)
    text = json.dumps(config)
    assert '"ads"' not in text
    envoy_validate(yaml.safe_dump(config, sort_keys=False), tmp_path)


# --- A real Envoy serving the translated listener ------------------------------------------


def _static_secrets(listener: dict[str, Any]) -> None:
    """Secrets named without a config source are the bootstrap's static ones."""
    for chain in listener["filter_chains"]:
        socket = chain.get("transport_socket")
        if socket is None:
            continue
        common = socket["typed_config"]["common_tls_context"]
        del common["validation_context_sds_secret_config"]["sds_config"]
        for secret in common["tls_certificate_sds_secret_configs"]:
            del secret["sds_config"]


@dataclass(frozen=True)
class Served:
    port: int
    ca: Authority
    directory: Path

    def client_context(self, ca: Authority | None, service_account: str = "reviews") -> Any:
        """A client TLS context with a certificate from ``ca`` (None: no certificate)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # workload certificates name a SPIFFE ID, no host
        context.load_verify_locations(cadata=self.ca.trust_bundle())
        context.set_alpn_protocols(["istio-peer-exchange", "istio", "http/1.1"])
        if ca is not None:
            issued = ca.issue(SpiffeId("cluster.local", "shop", service_account))
            cert = self.directory / f"{service_account}-{id(ca)}.pem"
            key = self.directory / f"{service_account}-{id(ca)}.key"
            cert.write_text(issued.cert_chain_pem)
            key.write_text(issued.private_key_pem)
            context.load_cert_chain(cert, key)
        return context

    def https_get(self, context: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        connection = http.client.HTTPSConnection(LOOPBACK, self.port, context=context, timeout=5)
        try:
            connection.request("GET", "/mtls", headers=headers or {})
            response = connection.getresponse()
            assert response.status == 200, response.status
            body: dict[str, Any] = json.loads(response.read())
            return body
        finally:
            connection.close()

    def plain_get(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = http_request(LOOPBACK, self.port, "GET", "/plain", headers=headers)
        assert response.status == 200, response
        body: dict[str, Any] = response.json()
        return body


@contextlib.contextmanager
def served(tmp_path: Path, policies: str) -> Iterator[Served]:
    ca = Authority.from_config(CAConfig(tmp_path / "ca"))
    with process_group(tmp_path) as group:
        app = start_upstream(group, name="productpage")
        port = free_port()
        sidecar = (
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
            "metadata: {name: productpage, namespace: shop}\n"
            "spec:\n  ingress:\n"
            f"  - port: {{number: {port}, protocol: HTTP, name: http}}\n"
            f"    defaultEndpoint: 127.0.0.1:{app.port}\n"
        )
        snapshot = compile_text(tmp_path, sidecar + policies)
        data = translate_data(PRODUCTPAGE, snapshot, certificates=True)
        config = static_bootstrap(data)
        for listener in config["static_resources"]["listeners"]:
            _static_secrets(listener)
        proxy = ca.issue(SpiffeId("cluster.local", "shop", "bookinfo-productpage"))
        config["static_resources"]["secrets"] = [
            {
                "name": "default",
                "tls_certificate": {
                    "certificate_chain": {"inline_string": proxy.cert_chain_pem},
                    "private_key": {"inline_string": proxy.private_key_pem},
                },
            },
            {
                "name": "ROOTCA",
                "validation_context": {"trusted_ca": {"inline_string": ca.trust_bundle()}},
            },
        ]
        admin = free_port()
        config["admin"]["address"]["socket_address"]["port_value"] = admin
        path = tmp_path / "envoy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sibling_executable("envoy"), "-c", str(path), "--base-id", str(next_base_id())]
        argv += ["--disable-hot-restart", "--concurrency", "1"]
        envoy = group.start("envoy", argv)
        envoy.wait_ready(envoy_ready_probe(admin))
        yield Served(port, ca, tmp_path)


def test_strict_serves_mesh_clients_and_refuses_everyone_else(tmp_path: Path) -> None:
    other = Authority.from_config(CAConfig(tmp_path / "other-ca"))
    with served(tmp_path, peer_authentication("shop", "{mtls: {mode: STRICT}}")) as s:
        forged = {"x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/shop/sa/admin"}
        body = s.https_get(s.client_context(s.ca), forged)
        xfcc = body["headers"]["x-forwarded-client-cert"]
        assert "URI=spiffe://cluster.local/ns/shop/sa/reviews" in xfcc
        assert "sa/admin" not in xfcc  # SANITIZE_SET: only what Envoy verified
        for refused in (
            s.plain_get,
            lambda: s.https_get(s.client_context(other)),  # a certificate from another CA
            lambda: s.https_get(s.client_context(None)),  # no client certificate at all
        ):
            # Plaintext matches no filter chain; a TLS client is dropped at the handshake.
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                refused()


def test_permissive_serves_mtls_and_plaintext(tmp_path: Path) -> None:
    with served(tmp_path, "") as s:
        body = s.https_get(s.client_context(s.ca))
        assert "sa/reviews" in body["headers"]["x-forwarded-client-cert"]
        forged = {"x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/shop/sa/admin"}
        plain = s.plain_get(forged)
        assert "x-forwarded-client-cert" not in plain["headers"]
