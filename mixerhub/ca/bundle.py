"""The CA's key material and the two ways a CA directory holds it (Istio's KeyCertBundle).

- Self-signed: ``ca-cert.pem`` (the root itself), ``ca-key.pem`` and ``root-cert.pem``, made on
  first start when the directory has none of them, and read back on every later start.
- Plugged in (Istio's ``cacerts`` secret): ``ca-cert.pem`` (an intermediate), ``ca-key.pem``,
  ``root-cert.pem`` and ``cert-chain.pem`` (``ca-cert.pem`` first, then its issuers up to a root
  in ``root-cert.pem``). Every issued chain carries the whole of ``cert-chain.pem``.

``root-cert.pem`` may hold several roots, as Istio's plug-in CA rotation does (old and new root
both trusted during the overlap); the chain must end at one of them. A directory that fits
neither layout, or whose key does not match its certificate, is refused with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes as PublicKeyTypes,
)
from cryptography.x509.oid import NameOID

from mixerhub.ca.keys import (
    KeyType,
    PrivateKey,
    describe,
    generate_private_key,
    private_key_pem,
    signature_hash,
)

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"

# Istio's self-signed root lives 10 years (security/pkg/pki/ca: selfSignedCACertTTL).
ROOT_TTL = datetime.timedelta(days=3650)


class CaDirError(ValueError):
    """The CA directory cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class KeyCertBundle:
    signing_cert: x509.Certificate
    signing_key: PrivateKey
    # From the signing certificate up to and including its root: what follows a leaf.
    chain: tuple[x509.Certificate, ...]
    # Every root in root-cert.pem (the trust bundle).
    roots: tuple[x509.Certificate, ...]
    layout: str  # "self-signed" | "plugged"

    @property
    def chain_pem(self) -> tuple[str, ...]:
        return tuple(_pem(c) for c in self.chain)

    @property
    def roots_pem(self) -> tuple[str, ...]:
        return tuple(_pem(c) for c in self.roots)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_or_create(
    ca_dir: Path,
    trust_domain: str,
    *,
    key_type: KeyType = KeyType.ECDSA_P256,
    create: bool = True,
) -> KeyCertBundle:
    """The CA directory's bundle; a self-signed root is made there if it holds no CA yet."""
    names = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)
    present = {name for name in names if (ca_dir / name).exists()}
    if not present:
        if not create:
            raise CaDirError(f"{ca_dir}: no CA there ({CA_CERT}, {CA_KEY}, {ROOT_CERT})")
        return create_self_signed(ca_dir, trust_domain, key_type=key_type)
    missing = [n for n in (CA_CERT, CA_KEY, ROOT_CERT) if n not in present]
    if missing:
        raise CaDirError(
            f"{ca_dir}: incomplete CA directory, {', '.join(missing)} missing (a self-signed CA"
            f" needs {CA_CERT}, {CA_KEY}, {ROOT_CERT}; a plugged-in CA needs {CERT_CHAIN} too;"
            " an empty directory gets a new self-signed root)"
        )
    return load(ca_dir)


def load(ca_dir: Path) -> KeyCertBundle:
    """Read and check an existing CA directory of either layout."""
    cert = _read_certs(ca_dir / CA_CERT)
    if len(cert) != 1:
        raise CaDirError(f"{ca_dir / CA_CERT}: expected one certificate, found {len(cert)}")
    signing_cert = cert[0]
    signing_key = _read_key(ca_dir / CA_KEY)
    roots = tuple(_read_certs(ca_dir / ROOT_CERT))
    if not roots:
        raise CaDirError(f"{ca_dir / ROOT_CERT}: no certificate in it")

    if _public(signing_key) != _public(signing_cert.public_key()):
        raise CaDirError(f"{ca_dir / CA_KEY} does not match the certificate in {ca_dir / CA_CERT}")
    _check_ca(ca_dir / CA_CERT, signing_cert)
    for root in roots:
        _check_ca(ca_dir / ROOT_CERT, root)
        if not _issued_by(root, root):
            raise CaDirError(
                f"{ca_dir / ROOT_CERT}: {root.subject.rfc4514_string()} is not self-signed"
            )

    if (ca_dir / CERT_CHAIN).exists():
        chain = tuple(_read_certs(ca_dir / CERT_CHAIN))
        _check_chain(ca_dir, signing_cert, chain, roots)
        layout = "plugged"
    else:
        if signing_cert not in roots:
            raise CaDirError(
                f"{ca_dir / CA_CERT} is not one of the roots in {ca_dir / ROOT_CERT}, and there is"
                f" no {CERT_CHAIN}: an intermediate CA needs {CERT_CHAIN} from {CA_CERT} to"
                " the root"
            )
        chain = (signing_cert,)
        layout = "self-signed"
    _warn_if_readable(ca_dir / CA_KEY)
    return KeyCertBundle(signing_cert, signing_key, chain, roots, layout)


def _check_chain(
    ca_dir: Path,
    signing_cert: x509.Certificate,
    chain: tuple[x509.Certificate, ...],
    roots: tuple[x509.Certificate, ...],
) -> None:
    where = ca_dir / CERT_CHAIN
    if not chain:
        raise CaDirError(f"{where}: no certificate in it")
    if chain[0] != signing_cert:
        raise CaDirError(f"{where} must start with the certificate in {CA_CERT}")
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        _check_ca(where, parent)
        if not _issued_by(child, parent):
            raise CaDirError(
                f"{where}: certificate {i} ({child.subject.rfc4514_string()}) is not signed by"
                f" certificate {i + 1} ({parent.subject.rfc4514_string()})"
            )
    if chain[-1] not in roots:
        raise CaDirError(
            f"{where} does not end at a root in {ROOT_CERT} (its last certificate is"
            f" {chain[-1].subject.rfc4514_string()}, issued by"
            f" {chain[-1].issuer.rfc4514_string()})"
        )


def _check_ca(where: Path, cert: x509.Certificate) -> None:
    name = cert.subject.rfc4514_string() or "(empty subject)"
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaDirError(f"{where}: {name} is not a CA certificate (basicConstraints CA:TRUE)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CaDirError(f"{where}: {name} may not sign certificates (keyUsage lacks keyCertSign)")
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise CaDirError(f"{where}: {name} expired at {cert.not_valid_after_utc.isoformat()}")


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public(key: PrivateKey | PublicKeyTypes) -> bytes:
    public = key.public_key() if isinstance(key, PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaDirError(f"{path}: {e.strerror}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaDirError(f"{path}: not PEM certificates ({e})") from None


def _read_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CaDirError(f"{path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CaDirError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, PrivateKey):
        raise CaDirError(f"{path}: {describe(key)} keys cannot sign here: RSA or ECDSA")
    return key


def _warn_if_readable(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is open to other users (mode %o); 0600 is expected", path, mode & 0o777)


def create_self_signed(
    ca_dir: Path, trust_domain: str, *, key_type: KeyType = KeyType.ECDSA_P256
) -> KeyCertBundle:
    """Make a self-signed root and keep it in ``ca_dir`` (created 0700 if missing).

    The key is written first: a start that dies half way leaves a directory ``load_or_create``
    refuses as incomplete rather than a certificate whose key is lost.
    """
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_private_key(key_type)
    now = datetime.datetime.now(datetime.UTC)
    # Istio's self-signed root names the trust domain as its organization.
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=2))
        .not_valid_after(now + ROOT_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, signature_hash(key))
    )
    write_private(ca_dir / CA_KEY, private_key_pem(key))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    write_public(ca_dir / CA_CERT, cert_pem)
    write_public(ca_dir / ROOT_CERT, cert_pem)
    log.info("made a self-signed root CA in %s for trust domain %s", ca_dir, trust_domain)
    return KeyCertBundle(cert, key, (cert,), (cert,), "self-signed")


def write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte: the file is created 0600 under a
    temporary name (O_EXCL, so nobody else's file is reused), then renamed into place."""
    _write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        # The umask can only take bits away; fchmod makes the mode exactly what was asked.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
