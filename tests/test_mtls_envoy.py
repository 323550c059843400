"""Mutual TLS between real Envoys with certificates from the hub's CA over SDS.

Three workloads in namespace shop, each behind its own Envoy bootstrapped with `--ads`:
ratings serves (its inbound listener STRICT by PeerAuthentication, an AuthorizationPolicy
allowing only productpage's identity), productpage and reviews call it through their egress
ports with DestinationRule ISTIO_MUTUAL. What the server side sees as source.principal comes
from the client's certificate, so the policy tells the two clients apart.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import re
import socket
import ssl
import subprocess
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mixerhub.ca.authority import Authority, CAConfig
from mixerhub.ca.identity import SpiffeId
from mixerhub.xds.resources import SECRET
from tests.harness import (
    LOOPBACK,
    Hub,
    ProcessGroup,
    free_port,
    hub_command,
    start_hub,
    start_upstream,
)
from tests.mesh import (
    AdsEnvoy,
    node,
    sidecar_egress,
    sidecar_ingress,
    start_ads_envoy,
    sync_of,
    until,
)

RATINGS = "ratings.shop.svc"


def mesh_config(
    inbound: int, app_port: int, egress: dict[str, int], *, auto_mtls: bool = False
) -> str:
    """With ``auto_mtls``: no DestinationRule, and ratings' WorkloadEntry says it has a sidecar
    (security.istio.io/tlsMode: istio), so its clients use mTLS by Istio's auto mTLS."""
    sidecars = [sidecar_ingress("ratings", inbound, app_port)]
    sidecars += [sidecar_egress(workload, port) for workload, port in egress.items()]
    text = textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ratings, namespace: shop}}
        spec:
          hosts: [{RATINGS}]
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          resolution: STATIC
          workloadSelector: {{labels: {{app: ratings}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {{name: ratings-1, namespace: shop}}
        spec:
          address: 127.0.0.1
          ports: {{http: {inbound}}}
          labels: {{app: ratings}}
          serviceAccount: ratings
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: ratings, namespace: shop}}
        spec:
          host: {RATINGS}
          trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: ratings, namespace: shop}}
        spec:
          selector: {{matchLabels: {{app: ratings}}}}
          mtls: {{mode: STRICT}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: ratings-callers, namespace: shop}}
        spec:
          selector: {{matchLabels: {{app: ratings}}}}
          action: ALLOW
          rules:
          - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/productpage"]}}}}]
        """
    ) + "".join(f"---\n{sidecar}" for sidecar in sidecars)
    if auto_mtls:
        documents = text.split("---\n")
        documents = [d for d in documents if "kind: DestinationRule" not in d]
        text = "---\n".join(documents).replace(
            "labels: {app: ratings}\n  serviceAccount",
            "labels: {app: ratings, security.istio.io/tlsMode: istio}\n  serviceAccount",
        )
        assert "tlsMode" in text
    return text


@dataclass
class Mesh:
    group: ProcessGroup
    hub: Hub
    ca_dir: Path
    inbound: int
    egress: dict[str, int]
    envoys: dict[str, AdsEnvoy]

    def call(self, workload: str, path: str = "/") -> int:
        return self.envoys[workload].get(self.egress[workload], RATINGS, path).status


def start_mesh(
    processes: ProcessGroup, tmp_path: Path, *hub_args: str, auto_mtls: bool = False
) -> Mesh:
    app = start_upstream(processes, name="ratings")
    inbound = free_port()
    egress = {"productpage": free_port(), "reviews": free_port()}
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh_config(inbound, app.port, egress, auto_mtls=auto_mtls))
    ca_dir = tmp_path / "ca"
    hub = start_hub(
        processes, config, extra_args=["--ca-dir", str(ca_dir), "--ca-port", "0", *hub_args]
    )
    envoys = {w: start_ads_envoy(processes, hub, node(w)) for w in ("ratings", *egress)}
    mesh = Mesh(processes, hub, ca_dir, inbound, egress, envoys)
    until(lambda: mesh.call("productpage") == 200, timeout=15, what="mTLS traffic flows")
    return mesh


def test_the_server_side_sees_each_clients_spiffe_identity(
    processes: ProcessGroup, tmp_path: Path
) -> None:
    mesh = start_mesh(processes, tmp_path)
    response = mesh.envoys["productpage"].get(mesh.egress["productpage"], RATINGS, "/x")
    assert response.status == 200
    echoed = json.loads(response.body)
    assert echoed["server"] == "ratings"
    # Envoy's XFCC header names the peer it authenticated: productpage's SPIFFE ID.
    xfcc = echoed["headers"].get("x-forwarded-client-cert", "")
    assert "spiffe://cluster.local/ns/shop/sa/productpage" in xfcc, echoed["headers"]
    # The same request from reviews: its certificate says reviews, which the policy refuses.
    assert mesh.call("reviews") == 403
    # Both connections were mutual TLS, handshaken on ratings' inbound listener.
    assert mesh.envoys["ratings"].stat(r"listener\..*ssl\.handshake$") >= 2


def test_auto_mtls_without_a_destination_rule(processes: ProcessGroup, tmp_path: Path) -> None:
    """No DestinationRule: the clients talk mTLS to ratings because its WorkloadEntry says it
    has a sidecar, so its STRICT listener accepts them and its policy tells them apart."""
    mesh = start_mesh(processes, tmp_path, auto_mtls=True)
    response = mesh.envoys["productpage"].get(mesh.egress["productpage"], RATINGS, "/x")
    assert response.status == 200
    xfcc = json.loads(response.body)["headers"].get("x-forwarded-client-cert", "")
    assert "spiffe://cluster.local/ns/shop/sa/productpage" in xfcc
    assert mesh.call("reviews") == 403
    assert mesh.envoys["ratings"].stat(r"listener\..*ssl\.handshake$") >= 2


def test_plaintext_and_a_foreign_ca_are_refused_at_the_handshake(
    processes: ProcessGroup, tmp_path: Path
) -> None:
    mesh = start_mesh(processes, tmp_path)
    with pytest.raises(Refused):  # plaintext HTTP to a STRICT listener
        exchange(mesh.inbound, None)
    # A certificate for productpage's very identity, from another CA.
    other = Authority.from_config(CAConfig(ca_dir=tmp_path / "other-ca"))
    issued = other.issue(SpiffeId("cluster.local", "shop", "productpage"))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(issued.cert_chain_pem)
    key.write_text(issued.private_key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    with pytest.raises(Refused):
        exchange(mesh.inbound, context)
    before = mesh.envoys["ratings"].stat(r"listener\..*ssl\.fail_verify_error$")
    assert before >= 1
    assert mesh.call("productpage") == 200  # the mesh itself is unaffected


class Refused(Exception):
    """The connection ended without an HTTP answer, or TLS failed."""


def exchange(port: int, context: ssl.SSLContext | None) -> bytes:
    """One HTTP request on a fresh connection; Refused when it gets no HTTP answer."""
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=5))
            if context is not None:  # the TLS socket takes the connection over
                sock = stack.enter_context(context.wrap_socket(sock))
            sock.sendall(b"GET / HTTP/1.1\r\nhost: ratings\r\nconnection: close\r\n\r\n")
            data = sock.recv(65536)
    except (ssl.SSLError, ConnectionError) as e:
        raise Refused(repr(e)) from e
    if not data.startswith(b"HTTP/1.1 "):
        raise Refused(f"no HTTP answer: {data[:80]!r}")
    return data


def test_short_lived_certificates_rotate_under_traffic_without_a_failed_request(
    processes: ProcessGroup, tmp_path: Path
) -> None:
    mesh = start_mesh(processes, tmp_path, "--workload-cert-ttl", "6s")
    node_id = mesh.envoys["ratings"].node_id
    first = secret_serial(mesh, node_id)
    statuses: list[int] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # three renewals or more, at half of 6 s
        statuses.append(mesh.call("productpage"))
        # A fresh connection each time, so every request is also a new handshake.
        time.sleep(0.02)
    assert len(statuses) > 50
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert secret_serial(mesh, node_id) != first
    not_after = secret_not_after(mesh, node_id)
    assert not_after > datetime.datetime.now(datetime.UTC)


def secrets(mesh: Mesh, node_id: str) -> dict[str, dict[str, str]]:
    """`mixerhub proxy-config secret` for ``node_id``, its rows by resource name."""
    out = subprocess.run(
        [*hub_command(), "proxy-config", "secret", node_id, "--admin",
         f"{LOOPBACK}:{mesh.hub.http_port}"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    header, *lines = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    assert header == [
        "RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"
    ]  # fmt: skip
    return {row[0]: dict(zip(header, row, strict=True)) for row in lines}


def secret_serial(mesh: Mesh, node_id: str) -> str:
    rows = secrets(mesh, node_id)
    assert rows["ROOTCA"]["TYPE"] == "CA", rows
    default = rows["default"]
    assert (default["TYPE"], default["VALID CERT"]) == ("Cert Chain", "true"), rows
    return default["SERIAL NUMBER"]


def secret_not_after(mesh: Mesh, node_id: str) -> datetime.datetime:
    text = secrets(mesh, node_id)["default"]["NOT AFTER"]
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def test_a_root_added_for_a_rotation_reaches_every_proxy_while_traffic_flows(
    processes: ProcessGroup, tmp_path: Path
) -> None:
    extra = tmp_path / "extra-roots.pem"
    extra.write_text("")
    mesh = start_mesh(processes, tmp_path, "--ca-extra-roots", str(extra), "--poll-interval", "0.1")
    ratings = mesh.envoys["ratings"].node_id
    assert trusted_roots(mesh, ratings) == 1
    extra.write_text(Authority.from_config(CAConfig(ca_dir=tmp_path / "next-ca")).root_cert_pem)
    until(lambda: trusted_roots(mesh, ratings) == 2, what="the new root in ratings' ROOTCA")
    until(lambda: sync_state(mesh, ratings, "SDS") == "SYNCED", what="ratings ACKs the new bundle")
    assert mesh.call("productpage") == 200  # certificates from the old root still work
    assert mesh.call("reviews") == 403


def trusted_roots(mesh: Mesh, node_id: str) -> int:
    url = f"http://{LOOPBACK}:{mesh.hub.http_port}/debug/config_dump?proxy={node_id}"
    with urllib.request.urlopen(url, timeout=5) as response:
        dump = json.load(response)
    [root] = [s for s in dump["resources"][SECRET] if s["name"] == "ROOTCA"]
    pem = base64.b64decode(root["validationContext"]["trustedCa"]["inlineBytes"])
    return pem.count(b"BEGIN CERTIFICATE")


def sync_state(mesh: Mesh, node_id: str, short: str) -> str:
    row = sync_of(mesh.hub, node_id)
    return "" if row is None else str(row["types"][short]["state"])
