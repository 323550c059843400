"""The mesh CA: signs workload certificates with the key of a CA directory.

``Authority.issue`` makes a key and a certificate for an identity (what SDS hands a proxy);
``Authority.sign_csr`` signs a caller's CSR for the caller's own identity (CreateCertificate).
Both return the chain leaf first, root last, and run on the calling thread: from async code use
``issue_async``/``sign_csr_async``, which sign on a worker thread (an RSA key takes tens of
milliseconds to make).

Trust bundle and root rotation: ``trust_bundle()`` is every root of ``root-cert.pem``, then the
roots of the extra-roots file (``CAConfig.extra_roots_file``), then any added with
``add_trusted_roots``. To rotate, trust the new root everywhere first (extra roots), let every
proxy receive the bundle, switch the CA directory to the new key, and drop the old root once the
certificates it signed have expired.

Certificates follow Istio's workload certificates (security/pkg/pki/util GenCertFromCSR): an
empty subject with a critical URI subjectAltName holding the SPIFFE ID, keyUsage
digitalSignature and keyEncipherment, extendedKeyUsage serverAuth and clientAuth, CA:FALSE, an
authorityKeyIdentifier, a random positive serial, SHA-256 (SHA-384 under a P-384 CA key).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mixerhub.ca.bundle import KeyCertBundle, load_or_create
from mixerhub.ca.csr import check_csr
from mixerhub.ca.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, check_trust_domain
from mixerhub.ca.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    generate_private_key,
    private_key_pem,
    signature_hash,
)

log = logging.getLogger(__name__)

DEFAULT_WORKLOAD_CERT_TTL = datetime.timedelta(hours=24)
# Istio's --max-workload-cert-ttl default.
DEFAULT_MAX_WORKLOAD_CERT_TTL = datetime.timedelta(days=90)
# Proxies and the hub need not agree on the time to the second.
CLOCK_SKEW = datetime.timedelta(minutes=2)
DEFAULT_CA_PORT = 15012


class TtlError(ValueError):
    """A requested certificate lifetime is not acceptable."""


@dataclass(frozen=True)
class CAConfig:
    ca_dir: Path
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    workload_cert_ttl: datetime.timedelta = DEFAULT_WORKLOAD_CERT_TTL
    max_workload_cert_ttl: datetime.timedelta = DEFAULT_MAX_WORKLOAD_CERT_TTL
    # PEM roots trusted besides root-cert.pem, for the overlap of a root rotation.
    extra_roots_file: Path | None = None
    # The CreateCertificate server (start_ca_server); port 0 means no server.
    port: int = DEFAULT_CA_PORT
    tokens_file: Path | None = None
    # The key SDS certificates are issued for (the CA makes it): ECDSA P-256 unless RSA is asked.
    workload_key_type: KeyType = KeyType.ECDSA_P256

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if self.workload_cert_ttl <= datetime.timedelta(0):
            raise ValueError("the workload certificate TTL must be positive")
        if self.workload_cert_ttl > self.max_workload_cert_ttl:
            raise ValueError(
                f"the workload certificate TTL ({self.workload_cert_ttl}) is above the maximum"
                f" ({self.max_workload_cert_ttl})"
            )


@dataclass(frozen=True)
class SignedCertificate:
    identity: SpiffeId
    # PEM certificates, leaf first, root last.
    cert_chain: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    serial: int
    # When it was signed: not_before is earlier by the clock-skew allowance.
    issued_at: datetime.datetime

    @property
    def renew_at(self) -> datetime.datetime:
        """Half way through the lifetime, when Istio's proxies ask for a new one (SDS adds
        its own jitter)."""
        return self.issued_at + (self.not_after - self.issued_at) / 2

    @property
    def cert_chain_pem(self) -> str:
        return "".join(self.cert_chain)

    @property
    def leaf_pem(self) -> str:
        return self.cert_chain[0]


@dataclass(frozen=True)
class IssuedCertificate(SignedCertificate):
    private_key_pem: str = field(repr=False, default="")
    # The trust bundle at the time of issue (every trusted root, PEM).
    root_cert_pem: str = ""


class Authority:
    def __init__(
        self,
        bundle: KeyCertBundle,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        workload_cert_ttl: datetime.timedelta = DEFAULT_WORKLOAD_CERT_TTL,
        max_workload_cert_ttl: datetime.timedelta = DEFAULT_MAX_WORKLOAD_CERT_TTL,
    ) -> None:
        self.bundle = bundle
        self.trust_domain = check_trust_domain(trust_domain)
        self.workload_cert_ttl = workload_cert_ttl
        self.max_workload_cert_ttl = max_workload_cert_ttl
        self._extra_roots: tuple[x509.Certificate, ...] = ()
        self._lock = threading.Lock()
        self._aki = _authority_key_identifier(bundle.signing_cert)
        # Nothing issued may outlive a certificate above it in the chain.
        self._chain_expiry = min(c.not_valid_after_utc for c in bundle.chain)
        self._trust_bundle = ""
        self._update_trust_bundle()

    @classmethod
    def from_config(cls, config: CAConfig, *, create: bool = True) -> Authority:
        """Load the CA directory, making a self-signed root there on first start (unless
        ``create`` is false: then a directory without a CA is an error).

        Raises CaDirError (a ValueError) with the file and reason when the directory is unusable.
        """
        authority = cls(
            load_or_create(config.ca_dir, config.trust_domain, create=create),
            trust_domain=config.trust_domain,
            workload_cert_ttl=config.workload_cert_ttl,
            max_workload_cert_ttl=config.max_workload_cert_ttl,
        )
        if config.extra_roots_file is not None:
            try:
                data = config.extra_roots_file.read_text()
            except OSError as e:
                raise ValueError(f"{config.extra_roots_file}: {e.strerror}") from None
            if data.strip():  # an empty file: no rotation under way
                authority.add_trusted_roots(data)
        return authority

    # Trust

    def trust_bundle(self) -> str:
        """Every trusted root, PEM: what SDS sends as ROOTCA and istio-ca-root-cert holds."""
        return self._trust_bundle

    def _update_trust_bundle(self) -> None:
        seen: list[x509.Certificate] = []
        for cert in (*self.bundle.roots, *self._extra_roots):
            if cert not in seen:
                seen.append(cert)
        self._trust_bundle = "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in seen
        )

    @property
    def root_cert_pem(self) -> str:
        """The root the issued chains end at."""
        return self.bundle.chain_pem[-1]

    def add_trusted_roots(self, pem: str) -> None:
        """Trust more roots (a rotation's new or old root); ValueError if not PEM CA certs."""
        certs = _parse_roots(pem)
        with self._lock:
            self._extra_roots = (*self._extra_roots, *certs)
            self._update_trust_bundle()

    def set_extra_roots(self, pem: str) -> None:
        """Replace the extra roots (empty string: none), e.g. once a rotation's overlap ends."""
        certs = _parse_roots(pem) if pem.strip() else []
        with self._lock:
            self._extra_roots = tuple(certs)
            self._update_trust_bundle()

    # Issuing

    def check_ttl(self, ttl: datetime.timedelta | None) -> datetime.timedelta:
        """The lifetime to issue for; None means the configured workload TTL."""
        if ttl is None:
            return self.workload_cert_ttl
        if ttl <= datetime.timedelta(0):
            raise TtlError(f"requested TTL {_seconds(ttl)} is not positive")
        # Istio's CA refuses (it does not shorten) a TTL above its maximum.
        if ttl > self.max_workload_cert_ttl:
            raise TtlError(
                f"requested TTL {_seconds(ttl)} is greater than the max allowed TTL"
                f" {_seconds(self.max_workload_cert_ttl)}"
            )
        return ttl

    def issue(
        self,
        identity: SpiffeId,
        *,
        ttl: datetime.timedelta | None = None,
        key_type: KeyType = KeyType.ECDSA_P256,
    ) -> IssuedCertificate:
        """A new key and a certificate for it, for ``identity``. Raises TtlError."""
        lifetime = self.check_ttl(ttl)
        self._check_identity(identity)
        key = generate_private_key(key_type)
        signed = self._sign(key.public_key(), identity, lifetime)
        return IssuedCertificate(
            identity=identity,
            cert_chain=signed.cert_chain,
            not_before=signed.not_before,
            not_after=signed.not_after,
            serial=signed.serial,
            issued_at=signed.issued_at,
            private_key_pem=private_key_pem(key).decode(),
            root_cert_pem=self.trust_bundle(),
        )

    def sign_csr(
        self, csr_pem: str | bytes, identity: SpiffeId, *, ttl: datetime.timedelta | None = None
    ) -> SignedCertificate:
        """Sign a CSR for ``identity``, the caller's proven identity.

        Raises CsrError (malformed, bad signature, unsupported key), CsrIdentityError (a name
        the caller may not hold) or TtlError.
        """
        lifetime = self.check_ttl(ttl)
        self._check_identity(identity)
        checked = check_csr(csr_pem, identity)
        return self._sign(checked.public_key, identity, lifetime)

    async def issue_async(
        self,
        identity: SpiffeId,
        *,
        ttl: datetime.timedelta | None = None,
        key_type: KeyType = KeyType.ECDSA_P256,
    ) -> IssuedCertificate:
        return await asyncio.to_thread(self.issue, identity, ttl=ttl, key_type=key_type)

    async def sign_csr_async(
        self, csr_pem: str | bytes, identity: SpiffeId, *, ttl: datetime.timedelta | None = None
    ) -> SignedCertificate:
        return await asyncio.to_thread(self.sign_csr, csr_pem, identity, ttl=ttl)

    def issue_server_certificate(
        self,
        names: Sequence[str],
        identity: SpiffeId,
        *,
        ttl: datetime.timedelta | None = None,
    ) -> IssuedCertificate:
        """A certificate for the hub's own TLS servers: DNS names and IPs (istio-agent checks
        istiod.istio-system.svc) besides the hub's SPIFFE ID."""
        lifetime = self.check_ttl(ttl)
        self._check_identity(identity)
        general: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        for name in names:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                general.append(x509.DNSName(name))
        key = generate_private_key(KeyType.ECDSA_P256)
        signed = self._sign_names(key.public_key(), general, lifetime, identity)
        return IssuedCertificate(
            identity=signed.identity,
            cert_chain=signed.cert_chain,
            not_before=signed.not_before,
            not_after=signed.not_after,
            serial=signed.serial,
            issued_at=signed.issued_at,
            private_key_pem=private_key_pem(key).decode(),
            root_cert_pem=self.trust_bundle(),
        )

    def _check_identity(self, identity: SpiffeId) -> None:
        if identity.trust_domain != self.trust_domain:
            raise ValueError(
                f"{identity.uri} is outside this CA's trust domain {self.trust_domain}"
            )

    def _sign(
        self, public_key: PublicKey, identity: SpiffeId, lifetime: datetime.timedelta
    ) -> SignedCertificate:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        return self._sign_names(public_key, names, lifetime, identity)

    def _sign_names(
        self,
        public_key: PublicKey,
        names: list[x509.GeneralName],
        lifetime: datetime.timedelta,
        identity: SpiffeId,
    ) -> SignedCertificate:
        key: PrivateKey = self.bundle.signing_key
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        not_before = now - CLOCK_SKEW
        not_after = now + lifetime
        if not_after > self._chain_expiry:
            log.warning(
                "certificate for %s cut short to the CA chain's expiry %s",
                identity,
                self._chain_expiry.isoformat(),
            )
            not_after = self._chain_expiry
        # x509.random_serial_number: 159 random bits, positive (RFC 5280 allows 20 octets).
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            # RFC 5280 4.1.2.6: an empty subject requires a critical subjectAltName.
            .subject_name(x509.Name([]))
            .issuer_name(self.bundle.signing_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_WORKLOAD_KEY_USAGE, critical=True)
            .add_extension(_WORKLOAD_EXTENDED_KEY_USAGE, critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .sign(key, signature_hash(key))
        )
        leaf = cert.public_bytes(serialization.Encoding.PEM).decode()
        return SignedCertificate(
            identity=identity,
            cert_chain=(leaf, *self.bundle.chain_pem),
            not_before=not_before,
            not_after=not_after,
            serial=serial,
            issued_at=now,
        )


_WORKLOAD_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_WORKLOAD_EXTENDED_KEY_USAGE = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def _parse_roots(pem: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as e:
        raise ValueError(f"extra roots: not PEM certificates ({e})") from None
    for cert in certs:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ValueError(
                f"extra roots: {cert.subject.rfc4514_string()} is not a CA certificate"
            )
    return certs


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _seconds(ttl: datetime.timedelta) -> str:
    return f"{ttl.total_seconds():g}s"
