"""The CA: certificates signed per second for ECDSA P-256 and RSA 2048, side by side with raw
``cryptography`` calls doing the same signing with none of our checks, in the same run.

Two paths, as the hub uses them:
- issue: the CA makes the key and the certificate (what SDS hands a proxy);
- CSR: the caller's CSR is parsed, checked (signature, key, SANs) and signed (CreateCertificate).

The baseline for issue is key generation plus a bare CertificateBuilder.sign; for CSR it is
loading the CSR plus the same bare sign. The ratio says what our checks and extensions cost.

Then SDS after a root rotation: N simulated proxies (bench/ads_clients.py --sds, 10 workloads)
hold their certificates from a hub running the CA; a second root is added to the extra roots
file, and the time until every proxy has ACKed its new ROOTCA is measured, with the hub's CPU;
side by side with a server pushing precomputed secrets (bench/trivial_ads.py).

    python bench/ca.py [--seconds 3] [--clients 100 1000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on the import path, where xds.py would shadow xds-protos'
# `xds` package: the repository root takes its place.
sys.path[0:1] = [str(Path(__file__).resolve().parent.parent)]

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.ads_rounds import SECRET, baseline_resources, round_trip, start_baseline
from mixerhub.ca import Authority, CAConfig, KeyType, SpiffeId
from mixerhub.ca.keys import generate_private_key
from tests.harness import free_port, process_group, start_hub

SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: bench}
spec:
  egress:
  - port: {number: 15001, protocol: HTTP, name: egress-http}
    hosts: ["./*"]
"""

IDENTITY = SpiffeId("cluster.local", "default", "bench")


def rate(seconds: float, work: Callable[[int], object]) -> float:
    """Calls per second of ``work`` over about ``seconds`` (after one warm-up call)."""
    work(0)
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        work(count)
        count += 1
    return count / (time.perf_counter() - started)


def csr_for(key_type: KeyType) -> str:
    key = generate_private_key(key_type)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(IDENTITY.uri)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


def bare_sign(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=24))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(IDENTITY.uri)]),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


KEY_TYPES = ((KeyType.ECDSA_P256, "ECDSA P-256"), (KeyType.RSA_2048, "RSA 2048"))


def issue_rates(ca: Authority, key_type: KeyType, seconds: float) -> tuple[float, float]:
    ca_cert, ca_key = ca.bundle.signing_cert, ca.bundle.signing_key
    ours = rate(seconds, lambda _: ca.issue(IDENTITY, key_type=key_type))
    base = rate(
        seconds, lambda _: bare_sign(ca_cert, ca_key, generate_private_key(key_type).public_key())
    )
    return ours, base


def csr_rates(ca: Authority, key_type: KeyType, seconds: float) -> tuple[float, float]:
    ca_cert, ca_key = ca.bundle.signing_cert, ca.bundle.signing_key
    csrs = [csr_for(key_type) for _ in range(16)]

    def raw(i: int) -> bytes:
        csr = x509.load_pem_x509_csr(csrs[i % 16].encode())
        return bare_sign(ca_cert, ca_key, csr.public_key())  # type: ignore[arg-type]

    ours = rate(seconds, lambda i: ca.sign_csr(csrs[i % 16], IDENTITY))
    return ours, rate(seconds, raw)


def sds_rounds(clients: list[int]) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """Per N: a root added for a rotation, until every proxy ACKed its new trust bundle."""
    results: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, process_group(Path(tmp) / "logs") as group:
        root = Path(tmp)
        (root / "config").mkdir()
        (root / "config" / "sidecar.yaml").write_text(SIDECAR)
        extra = root / "extra-roots.pem"
        extra.write_text("")
        roots = [Authority.from_config(CAConfig(ca_dir=root / f"next-{n}")) for n in range(2)]
        hub = start_hub(group, root / "config", extra_args=[
            "--log-level", "warning", "--poll-interval", "0.05", "--ca-dir", str(root / "ca"),
            "--ca-port", "0", "--ca-extra-roots", str(extra)])  # fmt: skip
        dump = baseline_resources(hub.http_port, hub.grpc_port, root, ["--sds"])
        base_port = free_port()
        baseline = start_baseline(group, base_port, dump, SECRET)
        rotation = iter(range(100))

        def rotate() -> None:  # the next rotation's root joins the bundle
            extra.write_text(roots[next(rotation) % 2].root_cert_pem)

        for n in clients:
            ours = round_trip(hub.process.pid, f"127.0.0.1:{hub.grpc_port}", n, rotate, ["--sds"])
            base = round_trip(baseline.pid, f"127.0.0.1:{base_port}", n,
                              lambda: os.kill(baseline.pid, signal.SIGUSR1), ["--sds"])  # fmt: skip
            results[n] = (ours, base)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ca = Authority.from_config(CAConfig(ca_dir=Path(tmp) / "ca"))
        for key_type, label in KEY_TYPES:
            ours, base = issue_rates(ca, key_type, args.seconds)
            rows.append((f"issue (key made by the CA), {label}", ours, base))
        for key_type, label in KEY_TYPES:
            ours, base = csr_rates(ca, key_type, args.seconds)
            rows.append((f"CSR signing, {label} CSR", ours, base))

    print(f"CA signing key: ECDSA P-256 (self-signed root); {args.seconds:g}s per measurement,"
          " one thread")  # fmt: skip
    print(f"{'':40} {'mixerhub/s':>11} {'bare cryptography/s':>20} {'ratio':>6}")
    for name, ours, base in rows:
        print(f"{name:40} {ours:>11.0f} {base:>20.0f} {ours / base:>6.0%}")
    print("(bare: key generation or CSR load plus CertificateBuilder.sign with a SAN only, no")
    print(" checks, no key usage/AKI extensions, no chain assembly, no PEM of the key)")
    print()
    print("SDS after a root rotation (a root added to --ca-extra-roots); every proxy ACKs ROOTCA")
    print(f"{'':8} {'':30} {'converged s':>11} {'updated':>8} {'CPU s':>7}")
    for n, (ours, base) in sds_rounds(args.clients).items():
        for name, r in (("mixerhub", ours), ("baseline (precomputed bytes)", base)):
            print(f"{n:>8} {name:30} {r['converged']:>11.3f} {r['updated']:>8} {r['cpu']:>7.2f}")
        print(f"{'':8} ratio: mixerhub converges in {ours['converged'] / base['converged']:.1f}x"
              " the baseline's time (the hub polls the roots file every 50 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
