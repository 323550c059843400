"""The CA core: its directory layouts, the certificates it issues and the CSRs it refuses.

Every issued chain is checked by ``openssl verify`` against the root alone, for TLS client and
server use; the helpers here serve tests/test_ca_service.py and tests/test_ca_cli.py too.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mixerhub.ca import (
    Authority,
    CAConfig,
    CaDirError,
    CsrError,
    CsrIdentityError,
    KeyType,
    SpiffeId,
    TtlError,
)
from mixerhub.ca.identity import IdentityError

SLEEP = SpiffeId("cluster.local", "default", "sleep")
NOW = datetime.datetime.now(datetime.UTC)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    names: list[x509.GeneralName] | None = None,
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    )
    names = [x509.UniformResourceIdentifier(SLEEP.uri)] if names is None else names
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def openssl_verify(tmp: Path, roots: str, chain: tuple[str, ...]) -> None:
    """``openssl verify -CAfile root -untrusted chain leaf``, as a TLS client and a server."""
    (tmp / "roots.pem").write_text(roots)
    (tmp / "leaf.pem").write_text(chain[0])
    (tmp / "untrusted.pem").write_text("".join(chain[1:]))
    for purpose in ("sslclient", "sslserver"):
        result = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(tmp / "roots.pem"),
             "-untrusted", str(tmp / "untrusted.pem"), str(tmp / "leaf.pem")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith(": OK")


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    ca: bool = True,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def make_plugged_ca(ca_dir: Path, *, rsa_intermediate: bool = False) -> x509.Certificate:
    """An operator's root and an intermediate in Istio's cacerts layout; returns the root."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _ca_cert("Test Root CA", root_key, None, root_key)
    inter_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if rsa_intermediate
        else ec.generate_private_key(ec.SECP256R1())
    )
    inter = _ca_cert("Test Intermediate CA", inter_key, root, root_key)
    (ca_dir / "ca-cert.pem").write_bytes(pem(inter))
    (ca_dir / "ca-key.pem").write_bytes(key_pem(inter_key))
    os.chmod(ca_dir / "ca-key.pem", 0o600)
    (ca_dir / "root-cert.pem").write_bytes(pem(root))
    (ca_dir / "cert-chain.pem").write_bytes(pem(inter) + pem(root))
    return root


def authority(ca_dir: Path, **config: object) -> Authority:
    return Authority.from_config(CAConfig(ca_dir=ca_dir, **config))  # type: ignore[arg-type]


# The self-signed layout


def test_first_start_makes_a_private_root_and_a_restart_keeps_it(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    first = authority(ca_dir)
    assert first.bundle.layout == "self-signed"
    assert sorted(p.name for p in ca_dir.iterdir()) == [
        "ca-cert.pem",
        "ca-key.pem",
        "root-cert.pem",
    ]
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "ca-key.pem").stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.not_valid_after_utc - NOW > datetime.timedelta(days=3649)
    key_before = (ca_dir / "ca-key.pem").read_bytes()

    second = authority(ca_dir)
    assert second.trust_bundle() == first.trust_bundle()
    assert (ca_dir / "ca-key.pem").read_bytes() == key_before
    # A certificate from before the restart still verifies against the same root.
    openssl_verify(tmp_path, second.trust_bundle(), first.issue(SLEEP).cert_chain)


def test_the_key_file_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With umask 0 every file would be world-readable unless created with an explicit mode.
    old = os.umask(0)
    created: list[tuple[str, int, int]] = []
    seen_before_rename: list[int] = []
    real_open, real_replace = os.open, os.replace

    def spy_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & os.O_CREAT:
            created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    def spy_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.fspath(dst).endswith("ca-key.pem"):
            seen_before_rename.append(stat.S_IMODE(os.stat(src).st_mode))
        real_replace(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "replace", spy_replace)
    try:
        authority(tmp_path / "ca")
    finally:
        os.umask(old)
    key_creates = [c for c in created if "ca-key.pem" in c[0]]
    assert len(key_creates) == 1
    path, flags, mode = key_creates[0]
    assert not path.endswith("/ca-key.pem")  # a temporary name, renamed into place
    assert flags & os.O_EXCL
    assert mode == 0o600
    assert seen_before_rename == [0o600]
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [
        "ca-cert.pem", "ca-key.pem", "root-cert.pem"]  # fmt: skip


# Workload certificates


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.RSA_2048])
def test_issued_certificates_are_spiffe_workload_certificates(
    tmp_path: Path, key_type: KeyType
) -> None:
    ca = authority(tmp_path / "ca")
    issued = ca.issue(SLEEP, key_type=key_type)
    assert len(issued.cert_chain) == 2
    assert issued.cert_chain[-1] == ca.root_cert_pem
    assert issued.root_cert_pem == ca.trust_bundle()
    openssl_verify(tmp_path, ca.trust_bundle(), issued.cert_chain)

    leaf = x509.load_pem_x509_certificate(issued.cert_chain[0].encode())
    key = serialization.load_pem_private_key(issued.private_key_pem.encode(), None)
    if key_type is KeyType.RSA_2048:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
    assert leaf.public_key() == key.public_key()

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/sleep")
    ]
    assert leaf.subject == x509.Name([])
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment
    assert not usage.key_cert_sign
    assert not usage.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root = x509.load_pem_x509_certificate(ca.root_cert_pem.encode())
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    now = datetime.datetime.now(datetime.UTC)
    assert leaf.not_valid_before_utc == issued.not_before
    assert leaf.not_valid_after_utc == issued.not_after
    # Backdated for clock skew, valid for the default 24 h from now.
    assert (
        datetime.timedelta(minutes=1)
        < now - leaf.not_valid_before_utc
        < datetime.timedelta(minutes=5)
    )
    assert abs(leaf.not_valid_after_utc - now - datetime.timedelta(hours=24)) < datetime.timedelta(
        seconds=30
    )
    assert leaf.serial_number == issued.serial > 0


def test_serial_numbers_are_random_and_wide(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    serials = {ca.issue(SLEEP).serial for _ in range(20)}
    assert len(serials) == 20
    # 159 random bits each: twenty below 2**64 would mean far fewer bits of entropy.
    assert max(s.bit_length() for s in serials) > 140
    assert all(s > 0 for s in serials)


def test_ttl_is_configurable_with_a_maximum(tmp_path: Path) -> None:
    ca = authority(
        tmp_path / "ca",
        workload_cert_ttl=datetime.timedelta(hours=1),
        max_workload_cert_ttl=datetime.timedelta(hours=48),
    )
    now = datetime.datetime.now(datetime.UTC)
    assert abs(ca.issue(SLEEP).not_after - now - datetime.timedelta(hours=1)).total_seconds() < 30
    longer = ca.issue(SLEEP, ttl=datetime.timedelta(hours=48))
    assert abs(longer.not_after - now - datetime.timedelta(hours=48)).total_seconds() < 30
    with pytest.raises(TtlError, match=re.escape("greater than the max allowed TTL 172800s")):
        ca.issue(SLEEP, ttl=datetime.timedelta(hours=49))
    with pytest.raises(TtlError, match=re.escape("not positive")):
        ca.issue(SLEEP, ttl=datetime.timedelta(0))
    with pytest.raises(ValueError, match=re.escape("above the maximum")):
        CAConfig(ca_dir=tmp_path, workload_cert_ttl=datetime.timedelta(days=91))


def test_identities_outside_the_trust_domain_are_not_issued(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca", trust_domain="example.org")
    with pytest.raises(ValueError, match=re.escape("outside this CA's trust domain example.org")):
        ca.issue(SLEEP)
    leaf = x509.load_pem_x509_certificate(
        ca.issue(SpiffeId("example.org", "a", "b")).leaf_pem.encode()
    )
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/ns/a/sa/b"]  # fmt: skip


def test_spiffe_ids_parse_and_refuse_other_forms() -> None:
    assert SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep") == SLEEP
    assert SLEEP.principal == "cluster.local/ns/default/sa/sleep"
    for bad in ("https://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a",
                "spiffe://Cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/../sa/b",
                "spiffe://cluster.local/ns/a/sa/b/c"):  # fmt: skip
        with pytest.raises(IdentityError):
            SpiffeId.parse(bad)


async def test_issuing_from_async_code_runs_on_a_worker_thread(tmp_path: Path) -> None:
    import threading

    ca = authority(tmp_path / "ca")
    threads: list[str] = []
    original = ca._sign

    def recording(*args: object, **kw: object) -> object:
        threads.append(threading.current_thread().name)
        return original(*args, **kw)  # type: ignore[arg-type]

    ca._sign = recording  # type: ignore[method-assign,assignment]
    issued = await ca.issue_async(SLEEP, key_type=KeyType.RSA_2048)
    signed = await ca.sign_csr_async(make_csr(), SLEEP)
    assert issued.identity == signed.identity == SLEEP
    assert threads
    assert threading.main_thread().name not in threads


# The plugged-in intermediate layout


@pytest.mark.parametrize("rsa_intermediate", [False, True])
@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.RSA_2048])
def test_a_plugged_in_intermediate_serves_the_whole_chain(
    tmp_path: Path, key_type: KeyType, rsa_intermediate: bool
) -> None:
    root = make_plugged_ca(tmp_path / "cacerts", rsa_intermediate=rsa_intermediate)
    ca = authority(tmp_path / "cacerts")
    assert ca.bundle.layout == "plugged"
    assert ca.trust_bundle() == pem(root).decode()
    issued = ca.issue(SLEEP, key_type=key_type)
    chain = [x509.load_pem_x509_certificate(c.encode()) for c in issued.cert_chain]
    assert [c.subject.rfc4514_string() for c in chain[1:]] == [
        "CN=Test Intermediate CA", "CN=Test Root CA"]  # fmt: skip
    assert chain[-1] == root
    openssl_verify(tmp_path, pem(root).decode(), issued.cert_chain)
    openssl_verify(tmp_path, pem(root).decode(), ca.sign_csr(make_csr(), SLEEP).cert_chain)


def test_a_plugged_in_directory_must_be_consistent(tmp_path: Path) -> None:
    ca_dir = tmp_path / "cacerts"
    make_plugged_ca(ca_dir)
    good = {p.name: p.read_bytes() for p in ca_dir.iterdir()}

    def reset() -> None:
        for name, data in good.items():
            (ca_dir / name).write_bytes(data)

    other_key = ec.generate_private_key(ec.SECP256R1())
    (ca_dir / "ca-key.pem").write_bytes(key_pem(other_key))
    with pytest.raises(CaDirError, match=re.escape("ca-key.pem does not match the certificate")):
        authority(ca_dir)

    reset()
    stranger = _ca_cert("Stranger Root", other_key, None, other_key)
    (ca_dir / "cert-chain.pem").write_bytes(good["ca-cert.pem"] + pem(stranger))
    with pytest.raises(CaDirError, match=re.escape("is not signed by certificate 1")):
        authority(ca_dir)

    reset()
    (ca_dir / "cert-chain.pem").write_bytes(good["ca-cert.pem"])
    with pytest.raises(CaDirError, match=re.escape("does not end at a root in root-cert.pem")):
        authority(ca_dir)

    reset()
    (ca_dir / "root-cert.pem").write_bytes(pem(stranger))
    with pytest.raises(CaDirError, match=re.escape("does not end at a root")):
        authority(ca_dir)

    reset()
    leaf = _ca_cert("Not a CA", other_key, None, other_key, ca=False)
    (ca_dir / "ca-cert.pem").write_bytes(pem(leaf))
    (ca_dir / "ca-key.pem").write_bytes(key_pem(other_key))
    with pytest.raises(CaDirError, match=re.escape("is not a CA certificate")):
        authority(ca_dir)

    reset()
    (ca_dir / "ca-key.pem").unlink()
    with pytest.raises(CaDirError, match=re.escape("incomplete CA directory, ca-key.pem missing")):
        authority(ca_dir)

    reset()
    (ca_dir / "cert-chain.pem").unlink()
    with pytest.raises(CaDirError, match=re.escape("there is no cert-chain.pem")):
        authority(ca_dir)

    reset()
    (ca_dir / "ca-cert.pem").write_text("not a certificate")
    with pytest.raises(CaDirError, match=re.escape("ca-cert.pem: not PEM certificates")):
        authority(ca_dir)


def test_extra_roots_are_trusted_during_a_rotation(tmp_path: Path) -> None:
    new_root = make_plugged_ca(tmp_path / "new")
    (tmp_path / "extra.pem").write_bytes(pem(new_root))
    ca = authority(tmp_path / "ca", extra_roots_file=tmp_path / "extra.pem")
    bundle = x509.load_pem_x509_certificates(ca.trust_bundle().encode())
    assert len(bundle) == 2
    assert bundle[1] == new_root
    assert ca.issue(SLEEP).root_cert_pem == ca.trust_bundle()
    # The chain still ends at the root that signs it.
    assert ca.issue(SLEEP).cert_chain[-1] == ca.root_cert_pem != pem(new_root).decode()
    ca.set_extra_roots("")
    assert len(x509.load_pem_x509_certificates(ca.trust_bundle().encode())) == 1
    with pytest.raises(ValueError, match=re.escape("not a CA certificate")):
        ca.add_trusted_roots(ca.issue(SLEEP).leaf_pem)


# CSRs


def test_a_csr_for_the_callers_identity_is_signed(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    key = rsa.generate_private_key(65537, 3072)
    signed = ca.sign_csr(make_csr(key), SLEEP, ttl=datetime.timedelta(hours=2))
    openssl_verify(tmp_path, ca.trust_bundle(), signed.cert_chain)
    leaf = x509.load_pem_x509_certificate(signed.leaf_pem.encode())
    assert leaf.public_key() == key.public_key()
    # The CSR's subject is not copied: the certificate names the identity alone.
    assert leaf.subject == x509.Name([])
    # A CSR without a subjectAltName gets the caller's identity, as Istio's CA gives it.
    unnamed = ca.sign_csr(make_csr(names=[]), SLEEP)
    leaf = x509.load_pem_x509_certificate(unnamed.leaf_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SLEEP.uri]


def test_csrs_are_refused_with_the_reason(tmp_path: Path) -> None:
    ca = authority(tmp_path / "ca")
    other = x509.UniformResourceIdentifier("spiffe://cluster.local/ns/prod/sa/payments")
    with pytest.raises(
        CsrIdentityError, match=re.escape("asks for URI:spiffe://cluster.local/ns/prod/sa/payments")
    ):
        ca.sign_csr(make_csr(names=[other]), SLEEP)
    mine = x509.UniformResourceIdentifier(SLEEP.uri)
    with pytest.raises(CsrIdentityError, match=re.escape("DNS:payments.prod.svc")):
        ca.sign_csr(make_csr(names=[mine, x509.DNSName("payments.prod.svc")]), SLEEP)
    with pytest.raises(CsrError, match=re.escape("malformed CSR")):
        ca.sign_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", SLEEP
        )
    with pytest.raises(CsrError, match=re.escape("malformed CSR")):
        ca.sign_csr("hello", SLEEP)
    with pytest.raises(CsrError, match=re.escape("empty CSR")):
        ca.sign_csr("", SLEEP)
    small = rsa.generate_private_key(65537, 1024)
    with pytest.raises(CsrError, match="RSA key of 1024 bits: 2048 to 8192 bits accepted"):
        ca.sign_csr(make_csr(small), SLEEP)
    with pytest.raises(CsrError, match=re.escape("ECDSA key on secp521r1")):
        ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP521R1())), SLEEP)
    with pytest.raises(CsrError, match=re.escape("signature does not verify")):
        ca.sign_csr(tampered_csr(), SLEEP)
    with pytest.raises(TtlError, match=re.escape("greater than the max allowed TTL")):
        ca.sign_csr(make_csr(), SLEEP, ttl=datetime.timedelta(days=91))


def tampered_csr() -> str:
    """A well-formed CSR whose signature no longer matches: one signature byte flipped."""
    der = bytearray(x509.load_pem_x509_csr(make_csr().encode()).public_bytes(
        serialization.Encoding.DER))  # fmt: skip
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()
