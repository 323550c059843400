"""Command-line pieces of the CA, for mixerhub/cli.py to wire in.

- ``add_serve_arguments(parser)`` adds ``--ca-dir``, ``--trust-domain``, ``--ca-port``,
  ``--ca-tokens``, ``--workload-cert-ttl``, ``--max-workload-cert-ttl`` and
  ``--ca-extra-roots`` to ``mixerhub serve``; ``config_from_args(args)`` turns them into a
  ``CAConfig`` (None when ``--ca-dir`` is not given: no CA).
- ``add_ca_command(subparsers)`` adds ``mixerhub ca root-cert`` (the trust bundle, what Istio
  publishes as the istio-ca-root-cert ConfigMap) and ``mixerhub ca sign`` (an operator signs a
  CSR for a named identity and gets the chain, leaf first, root last).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from mixerhub.ca.authority import (
    DEFAULT_CA_PORT,
    DEFAULT_MAX_WORKLOAD_CERT_TTL,
    DEFAULT_WORKLOAD_CERT_TTL,
    Authority,
    CAConfig,
    TtlError,
)
from mixerhub.ca.bundle import CaDirError
from mixerhub.ca.csr import CsrError
from mixerhub.ca.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, check_trust_domain
from mixerhub.ca.keys import KeyType
from mixerhub.types import parse_duration


def _duration(text: str) -> datetime.timedelta:
    # Go durations as Istio's flags take them (24h, 2160h, 90m); "d" for days is a convenience.
    try:
        if text.endswith("d") and text[:-1].isdigit():
            return datetime.timedelta(days=int(text[:-1]))
        value = parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= datetime.timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r}: a positive duration such as 24h")
    return value


def _trust_domain(text: str) -> str:
    try:
        return check_trust_domain(text)
    except IdentityError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_type(text: str) -> KeyType:
    try:
        return KeyType.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def _add_trust_domain(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=DEFAULT_TRUST_DOMAIN,
        help=f"the SPIFFE trust domain of workload identities (default {DEFAULT_TRUST_DOMAIN})",
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("certificate authority")
    group.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        help="run the mesh CA with the key material in DIR: Istio's cacerts layout for a"
        " plugged-in intermediate, else a self-signed root made there on first start",
    )
    _add_trust_domain(group)
    group.add_argument(
        "--ca-port",
        type=_port,
        default=DEFAULT_CA_PORT,
        help=f"TLS port of IstioCertificateService (default {DEFAULT_CA_PORT}; 0: none)",
    )
    group.add_argument(
        "--ca-tokens",
        type=Path,
        metavar="FILE",
        help="bootstrap tokens (YAML/JSON: token -> {namespace, serviceAccount})",
    )
    group.add_argument(
        "--workload-cert-ttl",
        type=_duration,
        default=DEFAULT_WORKLOAD_CERT_TTL,
        metavar="DURATION",
        help="lifetime of workload certificates (default 24h)",
    )
    group.add_argument(
        "--max-workload-cert-ttl",
        type=_duration,
        default=DEFAULT_MAX_WORKLOAD_CERT_TTL,
        metavar="DURATION",
        help="longest lifetime a CSR may ask for; longer requests are refused (default 2160h)",
    )
    group.add_argument(
        "--workload-key-type",
        type=_key_type,
        default=KeyType.ECDSA_P256,
        metavar="ECDSA|RSA",
        help="the key of SDS certificates: ECDSA P-256 (default) or RSA 2048",
    )
    group.add_argument(
        "--ca-extra-roots",
        type=Path,
        metavar="FILE",
        help="PEM roots trusted besides root-cert.pem (the overlap of a root rotation)",
    )


def config_from_args(args: argparse.Namespace) -> CAConfig | None:
    """The CA configuration, or None without --ca-dir. Raises ValueError with the reason."""
    if getattr(args, "ca_dir", None) is None:
        return None
    return CAConfig(
        ca_dir=args.ca_dir,
        trust_domain=args.trust_domain,
        workload_cert_ttl=args.workload_cert_ttl,
        max_workload_cert_ttl=args.max_workload_cert_ttl,
        extra_roots_file=args.ca_extra_roots,
        port=args.ca_port,
        tokens_file=args.ca_tokens,
        workload_key_type=args.workload_key_type,
    )


def add_ca_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ca`` to ``parser.add_subparsers()``; each leaf sets ``run``, which returns the
    exit status."""
    ca: argparse.ArgumentParser = subparsers.add_parser("ca", help="the mesh certificate authority")
    sub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)

    root = sub.add_parser("root-cert", help="print the trusted root certificates (PEM)")
    root.add_argument("--ca-dir", type=Path, required=True, metavar="DIR")
    _add_trust_domain(root)
    root.set_defaults(run=_root_cert)

    sign = sub.add_parser("sign", help="sign a CSR and print the chain, leaf first, root last")
    sign.add_argument("--ca-dir", type=Path, required=True, metavar="DIR")
    sign.add_argument(
        "--csr", type=Path, required=True, metavar="FILE", help="PEM CSR ('-': stdin)"
    )
    sign.add_argument(
        "--identity",
        metavar="NAMESPACE/SERVICE_ACCOUNT|SPIFFE_ID",
        help="the identity to certify; default: the SPIFFE ID the CSR asks for",
    )
    sign.add_argument(
        "--ttl", type=_duration, default=DEFAULT_WORKLOAD_CERT_TTL, metavar="DURATION"
    )
    sign.add_argument(
        "--max-ttl", type=_duration, default=DEFAULT_MAX_WORKLOAD_CERT_TTL, metavar="DURATION"
    )
    _add_trust_domain(sign)
    sign.set_defaults(run=_sign)
    return ca


def _load(args: argparse.Namespace, **overrides: Any) -> Authority:
    # An operator command never makes a CA: a mistyped --ca-dir must not mint a new root.
    return Authority.from_config(
        CAConfig(ca_dir=args.ca_dir, trust_domain=args.trust_domain, **overrides), create=False
    )


def _root_cert(args: argparse.Namespace) -> int:
    try:
        authority = _load(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(authority.trust_bundle())
    return 0


def _sign(args: argparse.Namespace) -> int:
    try:
        csr_pem = sys.stdin.read() if str(args.csr) == "-" else args.csr.read_text()
    except OSError as e:
        print(f"error: {args.csr}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        ttl = args.ttl
        authority = _load(args, workload_cert_ttl=min(ttl, args.max_ttl),
                          max_workload_cert_ttl=args.max_ttl)  # fmt: skip
        identity = _identity(args, csr_pem)
        signed = authority.sign_csr(csr_pem, identity, ttl=ttl)
    except (CaDirError, CsrError, TtlError, IdentityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(signed.cert_chain_pem)
    return 0


def _identity(args: argparse.Namespace, csr_pem: str) -> SpiffeId:
    """--identity as ns/sa or a SPIFFE ID, else the one SPIFFE ID the CSR names."""
    if args.identity:
        if args.identity.startswith("spiffe://"):
            return SpiffeId.parse(args.identity)
        namespace, slash, account = args.identity.partition("/")
        if not slash:
            raise IdentityError("--identity: NAMESPACE/SERVICE_ACCOUNT or a spiffe:// ID")
        return SpiffeId(args.trust_domain, namespace, account)
    from cryptography import x509

    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except ValueError as e:
        raise CsrError(f"malformed CSR: {e}") from None
    except x509.ExtensionNotFound:
        raise CsrError("the CSR names no identity: give --identity") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    if len(uris) != 1:
        raise CsrError(f"the CSR names {len(uris)} URIs: give --identity")
    return SpiffeId.parse(uris[0])
