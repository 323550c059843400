"""Policy with a real Envoy: the hub as ext_authz, rules deciding, hostile input refused."""

from __future__ import annotations

import json
import socket
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from mixerhub.bootstrap import Workload
from tests.harness import Envoy, EnvoyFactory, Hub, HubFactory, Upstream, loopback_options
from tests.test_check import DENY


@dataclass(frozen=True)
class Stack:
    upstream: Upstream
    hub: Hub
    envoy: Envoy
    config: Path

    def write(self, text: str) -> None:
        (self.config / "policy.yaml").write_text(textwrap.dedent(text))


@pytest.fixture
def stack(upstream: Upstream, make_hub: HubFactory, envoy: EnvoyFactory, tmp_path: Path) -> Stack:
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text(DENY)
    hub = make_hub(config, extra_args=["--poll-interval", "0.1"])
    workload = Workload("productpage", "bookinfo", {"app": "productpage", "version": "v1"})
    return Stack(
        upstream,
        hub,
        envoy(loopback_options(upstream.address, hub.grpc_address, workload=workload)),
        config,
    )


def test_allowed_requests_reach_the_upstream_with_the_injected_headers(stack: Stack) -> None:
    response = stack.envoy.get("/productpage", headers={"x-secret": "s3cret"})
    assert response.status == 200, response
    echoed = response.json()["headers"]
    assert echoed["x-workload"] == "productpage"  # from the rule's requestHeaderOperations
    assert "x-secret" not in echoed  # REMOVE
    assert response.headers["x-served-by"] == "mixerhub"  # responseHeaderOperations


def test_denied_requests_get_the_status_body_and_headers(stack: Stack) -> None:
    response = stack.envoy.get("/admin/users")
    assert response.status == 403, response
    assert response.headers["x-mixerhub-denied-by"] == (
        "deny-admin.rule.istio-system/deny.handler.istio-system"
    )
    assert response.headers["x-policy"] == "admin-only"
    assert json.loads(response.body)["error"] == "Not allowed"
    assert stack.envoy.get("/admin/users", headers={"x-user": "root"}).status == 200


def test_a_hot_config_change_takes_effect_on_the_next_request(stack: Stack) -> None:
    assert stack.envoy.get("/reviews").status == 200
    before = stack.hub.get("/debug/configz").json()["active"]["version"]
    stack.write(DENY.replace('startsWith("/admin")', 'startsWith("/reviews")'))
    deadline = time.monotonic() + 10
    while stack.hub.get("/debug/configz").json()["active"]["version"] == before:
        assert time.monotonic() < deadline, stack.hub.log()
        time.sleep(0.05)
    assert stack.envoy.get("/reviews").status == 403
    assert stack.envoy.get("/admin").status == 200


def _raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_hostile_requests_through_envoy_get_a_clear_answer_and_the_hub_keeps_serving(
    stack: Stack,
) -> None:
    port = stack.envoy.listen_port
    # A 64 KiB header and thousands of headers: over Envoy's own limits, refused before the hub.
    huge = _raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 65536 + b"\r\n\r\n")
    assert huge.startswith(b"HTTP/1.1 431"), huge[:80]
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(5000))
    assert _raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(
        b"HTTP/1.1 431"
    )
    # Bytes that are not UTF-8 in a header value: Envoy makes them valid before the Check, and
    # the policy decides as for any request (unparseable bytes over gRPC: see the next test).
    binary = _raw_request(port, b"GET /x HTTP/1.1\r\nHost: x\r\nx-bin: \xff\xfe\xfd\r\n\r\n")
    assert binary.startswith(b"HTTP/1.1 200"), binary[:200]
    binary = _raw_request(port, b"GET /admin HTTP/1.1\r\nHost: x\r\nx-user: r\xffot\r\n\r\n")
    assert binary.startswith(b"HTTP/1.1 403"), binary[:200]
    # Large but legal: 40 KiB of headers and an absurd bearer token reach the hub and are judged.
    big = {f"x-pad-{i}": "p" * 1000 for i in range(40)}
    assert stack.envoy.get("/ok", headers=big).status == 200
    token = "Bearer " + "A" * 30000 + ".." + "B" * 10
    assert stack.envoy.get("/admin", headers={"authorization": token}).status == 403
    assert stack.envoy.get("/productpage").status == 200
    assert stack.hub.process.returncode is None
    assert "Traceback" not in stack.hub.log()


def test_hostile_messages_straight_over_grpc(stack: Stack) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.hub.grpc_port}") as channel:
        check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        for garbage in (b"\xff" * 64, b"\x0a\x80", b"\x12" + b"\xff" * 10, b""):
            response = external_auth_pb2.CheckResponse.FromString(check(garbage, timeout=5))
            assert response.status.code in (0, 3), garbage  # empty bytes are a valid empty request
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = external_auth_pb2.CheckRequest()
        request.attributes.request.http.path = "/admin/" + "a" * 100_000
        request.attributes.request.http.headers.update({f"h{i}": "v" * 10 for i in range(5000)})
        response = stub.Check(request, timeout=5)
        assert response.denied_response.status.code == 403
    assert stack.envoy.get("/productpage").status == 200
