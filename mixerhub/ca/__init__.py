"""The mesh CA (Citadel's job): workload certificates for SPIFFE identities, signed with the key
of a CA directory, handed to proxies over SDS and to CSRs over IstioCertificateService.

Modules: identity (SPIFFE IDs), keys (key types), bundle (the CA directory's two layouts),
csr (CSR checks), authority (signing), tokens (bootstrap tokens), proto (istio.v1.auth
messages), service (CreateCertificate over TLS), cli (flags and ``mixerhub ca``).
"""

from mixerhub.ca.authority import (
    Authority,
    CAConfig,
    IssuedCertificate,
    SignedCertificate,
    TtlError,
)
from mixerhub.ca.bundle import CaDirError
from mixerhub.ca.csr import CsrError, CsrIdentityError
from mixerhub.ca.identity import SpiffeId
from mixerhub.ca.keys import KeyType

__all__ = [
    "Authority",
    "CAConfig",
    "CaDirError",
    "CsrError",
    "CsrIdentityError",
    "IssuedCertificate",
    "KeyType",
    "SignedCertificate",
    "SpiffeId",
    "TtlError",
]
