"""IstioCertificateService/CreateCertificate over a real grpc.aio TLS channel: callers proving
their identity by bootstrap token or by a client certificate from the CA, and the refusals."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mixerhub.ca import Authority, CAConfig, SpiffeId, proto
from mixerhub.ca.service import CaServer, start_ca_server
from mixerhub.ca.tokens import BootstrapTokens, TokenFileError
from tests.test_ca import SLEEP, make_csr, make_plugged_ca, openssl_verify

TOKEN = "sleep-bootstrap-token-0123456789"
PAYMENTS = x509.UniformResourceIdentifier("spiffe://cluster.local/ns/prod/sa/payments")


@pytest.fixture
async def ca_server(tmp_path: Path) -> AsyncIterator[CaServer]:
    (tmp_path / "tokens.yaml").write_text(
        f"{TOKEN}: {{namespace: default, serviceAccount: sleep}}\n"
    )
    authority = Authority.from_config(
        CAConfig(ca_dir=tmp_path / "ca", max_workload_cert_ttl=datetime.timedelta(hours=48))
    )
    tokens = BootstrapTokens.from_file(tmp_path / "tokens.yaml", authority.trust_domain)
    server = await start_ca_server(authority, "127.0.0.1", 0, tokens)
    yield server
    await server.stop(None)


async def create(
    server: CaServer,
    csr: str,
    *,
    validity: int = 3600,
    token: str | None = TOKEN,
    client: tuple[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[str]:
    """One CreateCertificate call; ``client`` is (chain PEM, key PEM) for mTLS."""
    credentials = grpc.ssl_channel_credentials(
        server.authority.trust_bundle().encode(),
        client[1].encode() if client else None,
        client[0].encode() if client else None,
    )
    request = proto.IstioCertificateRequest(csr=csr, validity_duration=validity)
    if metadata:
        request.metadata.update(metadata)
    call_metadata = [("authorization", f"Bearer {token}")] if token else None
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
        call = channel.unary_unary(
            proto.CREATE_CERTIFICATE,
            request_serializer=proto.IstioCertificateRequest.SerializeToString,
            response_deserializer=proto.IstioCertificateResponse.FromString,
        )
        response = await call(request, metadata=call_metadata, timeout=10)
    return list(response.cert_chain)


async def refused(server: CaServer, csr: str, **kw: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(server, csr, **kw)
    return e.value.code(), e.value.details() or ""


def leaf_uris(chain: list[str]) -> list[str]:
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


async def test_a_bootstrap_token_gets_its_workload_a_certificate(
    ca_server: CaServer, tmp_path: Path
) -> None:
    chain = await create(ca_server, make_csr(), validity=7200)
    assert len(chain) == 2
    assert chain[-1] == ca_server.authority.root_cert_pem
    assert leaf_uris(chain) == [SLEEP.uri]
    openssl_verify(tmp_path, ca_server.authority.trust_bundle(), tuple(chain))
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert abs(lifetime - datetime.timedelta(hours=2)) < datetime.timedelta(seconds=30)


async def test_an_unset_validity_gets_the_default_ttl(ca_server: CaServer) -> None:
    # proto3 cannot tell 0 from unset; Istio's CA gives the default TTL then.
    chain = await create(ca_server, make_csr(), validity=0)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert abs(lifetime - datetime.timedelta(hours=24)) < datetime.timedelta(seconds=30)


async def test_a_client_certificate_from_the_ca_proves_the_identity(
    ca_server: CaServer, tmp_path: Path
) -> None:
    # How a proxy renews: its current certificate is its credential, no token.
    current = ca_server.authority.issue(SLEEP)
    client = (current.cert_chain_pem, current.private_key_pem)
    chain = await create(ca_server, make_csr(), token=None, client=client)
    assert leaf_uris(chain) == [SLEEP.uri]
    openssl_verify(tmp_path, ca_server.authority.trust_bundle(), tuple(chain))
    # The certificate holder may not ask for another identity either.
    code, details = await refused(ca_server, make_csr(names=[PAYMENTS]), token=None, client=client)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://cluster.local/ns/prod/sa/payments" in details


async def test_mtls_works_with_a_plugged_in_intermediate(tmp_path: Path) -> None:
    root = make_plugged_ca(tmp_path / "cacerts")
    authority = Authority.from_config(CAConfig(ca_dir=tmp_path / "cacerts"))
    server = await start_ca_server(authority, "127.0.0.1", 0, None)
    try:
        current = authority.issue(SLEEP)
        chain = await create(
            server, make_csr(), token=None, client=(current.cert_chain_pem, current.private_key_pem)
        )
    finally:
        await server.stop(None)
    assert len(chain) == 3
    assert x509.load_pem_x509_certificate(chain[-1].encode()) == root
    openssl_verify(tmp_path, authority.trust_bundle(), tuple(chain))


async def test_a_client_certificate_from_another_ca_is_refused(
    ca_server: CaServer, tmp_path: Path
) -> None:
    stranger = Authority.from_config(CAConfig(ca_dir=tmp_path / "other-ca"))
    forged = stranger.issue(SLEEP)
    code, _ = await refused(
        ca_server, make_csr(), token=None, client=(forged.cert_chain_pem, forged.private_key_pem)
    )
    # The TLS handshake fails: the certificate does not chain to a trusted root.
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


async def test_callers_without_a_valid_identity_are_refused(ca_server: CaServer) -> None:
    code, details = await refused(ca_server, make_csr(), token="not-a-token-anyone-was-given")
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "bootstrap token not recognised")
    code, details = await refused(ca_server, make_csr(), token=None)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate issued by this CA" in details


async def test_a_san_for_another_identity_is_refused(ca_server: CaServer) -> None:
    code, details = await refused(ca_server, make_csr(names=[PAYMENTS]))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == (
        "the CSR asks for URI:spiffe://cluster.local/ns/prod/sa/payments; the caller"
        " spiffe://cluster.local/ns/default/sa/sleep may only hold its own identity"
    )
    mine = x509.UniformResourceIdentifier(SLEEP.uri)
    code, details = await refused(ca_server, make_csr(names=[mine, x509.DNSName("evil.com")]))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "DNS:evil.com" in details
    code, details = await refused(ca_server, make_csr(), metadata={"ImpersonatedIdentity": "x"})
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_malformed_csrs_and_weak_keys_are_invalid_arguments(ca_server: CaServer) -> None:
    from tests.test_ca import tampered_csr

    for csr, expected in (
        ("not a csr", "malformed CSR"),
        ("", "empty CSR"),
        (tampered_csr(), "CSR signature does not verify"),
        (make_csr(rsa.generate_private_key(65537, 1024)), "RSA key of 1024 bits"),
        (make_csr(ec.generate_private_key(ec.SECP521R1())), "ECDSA key on secp521r1"),
        ("x" * 100_000, "CSR of 100000 bytes"),
    ):
        code, details = await refused(ca_server, csr)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (csr[:40], details)
        assert expected in details


async def test_absurd_validity_is_refused(ca_server: CaServer) -> None:
    code, details = await refused(ca_server, make_csr(), validity=-1)
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "validity_duration -1s is negative",
    )
    code, details = await refused(ca_server, make_csr(), validity=48 * 3600 + 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "requested TTL 172801s is greater than the max allowed TTL 172800s"
    code, details = await refused(ca_server, make_csr(), validity=2**62)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_server_certificate_names_the_address(ca_server: CaServer) -> None:
    cert = ca_server._certificate
    assert cert is not None
    leaf = x509.load_pem_x509_certificate(cert.leaf_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "istiod.istio-system.svc" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/istio-system/sa/mixerhub"]  # fmt: skip


async def test_the_server_certificate_is_renewed_at_half_life(tmp_path: Path) -> None:
    authority = Authority.from_config(
        CAConfig(ca_dir=tmp_path / "ca", workload_cert_ttl=datetime.timedelta(seconds=3))
    )
    tokens = BootstrapTokens({TOKEN: SLEEP})
    server = await start_ca_server(authority, "127.0.0.1", 0, tokens)
    try:
        first = server._certificate
        assert first is not None
        await create(server, make_csr(), validity=0)
        assert server._certificate is first
        for _ in range(100):
            if server._certificate is not first:
                break
            await asyncio.sleep(0.05)
        # A new connection after half the lifetime gets a new certificate, and works.
        await create(server, make_csr(), validity=0)
        second = server._certificate
        assert second is not None
        assert second.serial != first.serial
        assert second.not_after > first.not_after
    finally:
        await server.stop(None)


def test_token_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"short": {"namespace": "a", "serviceAccount": "b"}}')
    with pytest.raises(TokenFileError, match="16"):
        BootstrapTokens.from_file(path, "cluster.local")
    path.write_text('{"0123456789abcdef": {"namespace": "a"}}')
    with pytest.raises(TokenFileError, match="serviceAccount are required"):
        BootstrapTokens.from_file(path, "cluster.local")
    path.write_text('{"0123456789abcdef": {"namespace": "a/b", "serviceAccount": "c"}}')
    with pytest.raises(TokenFileError, match="invalid namespace"):
        BootstrapTokens.from_file(path, "cluster.local")
    path.write_text('{"0123456789abcdef": {"namespace": "a", "serviceAccount": "c"}}')
    tokens = BootstrapTokens.from_file(path, "example.org")
    assert tokens.identity("0123456789abcdef") == SpiffeId("example.org", "a", "c")
    assert tokens.identity("0123456789abcdeF") is None
    # Edits are picked up; a broken edit leaves the previous tokens in force.
    path.write_text('{"fedcba9876543210": {"namespace": "x", "serviceAccount": "y"}}')
    assert tokens.identity("fedcba9876543210") == SpiffeId("example.org", "x", "y")
    assert tokens.identity("0123456789abcdef") is None
    path.write_text("[not, a, mapping]")
    assert tokens.identity("fedcba9876543210") == SpiffeId("example.org", "x", "y")


async def test_a_taken_port_is_an_error_and_leaves_nothing_running(ca_server: CaServer) -> None:
    with pytest.raises(OSError, match="address already in use"):
        await start_ca_server(ca_server.authority, "127.0.0.1", ca_server.port, None)
