"""Key types the CA issues and accepts, and key generation."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# RSA keys below 2048 bits are refused (NIST SP 800-131A); above 8192 only cost CPU for nothing.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
# The curves Istio's CA and Envoy both handle.
ACCEPTED_CURVES = ("secp256r1", "secp384r1")


class KeyType(enum.Enum):
    """The key a certificate is issued for when the CA generates it (SDS)."""

    ECDSA_P256 = "ecdsa-p256"
    RSA_2048 = "rsa-2048"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        """Accepts our names and Istio's ECC_SIGNATURE_ALGORITHM spelling (``ECDSA``, ``RSA``)."""
        aliases = {"ecdsa": cls.ECDSA_P256, "ec": cls.ECDSA_P256, "rsa": cls.RSA_2048}
        key = text.strip().lower()
        if key in aliases:
            return aliases[key]
        try:
            return cls(key)
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown key type {text!r}: one of {names}") from None


def generate_private_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    # SHA-384 for P-384 keys keeps the hash as strong as the curve (RFC 5480 section 4).
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def describe(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__


def check_public_key(key: object) -> PublicKey:
    """The key a CSR carries, if the CA signs for that kind of key; ValueError says why not."""
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise ValueError(
                f"RSA key of {key.key_size} bits: {MIN_RSA_BITS} to {MAX_RSA_BITS} bits accepted"
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ACCEPTED_CURVES:
            raise ValueError(
                f"ECDSA key on {key.curve.name}: {', '.join(ACCEPTED_CURVES)} accepted"
            )
        return key
    raise ValueError(f"{describe(key)} keys are not accepted: RSA or ECDSA (P-256, P-384)")
