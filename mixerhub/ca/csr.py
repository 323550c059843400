"""Certificate signing requests: parsed and checked before anything is signed.

What a CSR may ask for follows Istio's CA: the certificate carries the caller's identity, never
names the CSR chose, so a CSR naming anything but that identity (another SPIFFE ID, a DNS name,
an IP, an email) is refused rather than quietly narrowed. A CSR with no subjectAltName is
accepted and gets the caller's identity, as Istio's CA gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from mixerhub.ca.identity import SpiffeId
from mixerhub.ca.keys import PublicKey, check_public_key

# A CSR for a 8192-bit RSA key is under 4 KiB of PEM; anything far larger is not a CSR.
MAX_CSR_BYTES = 64 * 1024


class CsrError(ValueError):
    """The CSR cannot be signed: malformed, badly signed, or an unsupported key."""


class CsrIdentityError(CsrError):
    """The CSR asks for a name its caller may not hold."""


@dataclass(frozen=True)
class CheckedCsr:
    public_key: PublicKey
    requested_names: tuple[str, ...]


def check_csr(csr_pem: str | bytes, caller: SpiffeId) -> CheckedCsr:
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR of {len(data)} bytes: at most {MAX_CSR_BYTES} accepted")
    if not data.strip():
        raise CsrError("empty CSR")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CsrError(f"malformed CSR: not a PEM certificate request ({e})") from None
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # cryptography raises for algorithms it cannot check
        raise CsrError(f"CSR signature cannot be checked: {e}") from None
    if not valid:
        raise CsrError("CSR signature does not verify with its own public key")
    try:
        public = check_public_key(csr.public_key())
    except ValueError as e:
        raise CsrError(f"unsupported key: {e}") from None
    names = _requested_names(csr)
    wrong = [n for n in names if n != f"URI:{caller.uri}"]
    if wrong:
        raise CsrIdentityError(
            f"the CSR asks for {', '.join(wrong)}; the caller {caller.uri} may only hold its own"
            " identity"
        )
    return CheckedCsr(public, names)


def _requested_names(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    except ValueError as e:
        raise CsrError(f"malformed CSR extensions: {e}") from None
    names: list[str] = []
    for general in san:
        if isinstance(general, x509.UniformResourceIdentifier):
            names.append(f"URI:{general.value}")
        elif isinstance(general, x509.DNSName):
            names.append(f"DNS:{general.value}")
        elif isinstance(general, x509.IPAddress):
            names.append(f"IP:{general.value}")
        elif isinstance(general, x509.RFC822Name):
            names.append(f"email:{general.value}")
        else:
            names.append(f"{type(general).__name__}")
    return tuple(names)
