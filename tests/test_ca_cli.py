"""``mixerhub ca root-cert`` and ``mixerhub ca sign``, and the serve flags, through argparse as
mixerhub/cli.py wires them."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import pytest
from cryptography import x509

from mixerhub.ca import Authority, CAConfig
from mixerhub.ca.cli import add_ca_command, add_serve_arguments, config_from_args
from tests.test_ca import SLEEP, make_csr, make_plugged_ca, openssl_verify, pem


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mixerhub")
    add_ca_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code: int = args.run(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_root_cert_prints_the_trust_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = Authority.from_config(CAConfig(ca_dir=tmp_path / "ca"))
    code, out, _ = run(["ca", "root-cert", "--ca-dir", str(tmp_path / "ca")], capsys)
    assert code == 0
    assert out == ca.trust_bundle() == (tmp_path / "ca" / "root-cert.pem").read_text()

    root = make_plugged_ca(tmp_path / "cacerts")
    code, out, _ = run(["ca", "root-cert", "--ca-dir", str(tmp_path / "cacerts")], capsys)
    assert (code, out) == (0, pem(root).decode())


def test_operator_commands_never_make_a_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["ca", "root-cert", "--ca-dir", str(tmp_path / "typo")], capsys)
    assert (code, out) == (1, "")
    assert "no CA there" in err
    assert not (tmp_path / "typo").exists()


def test_sign_prints_the_chain_for_the_csrs_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_plugged_ca(tmp_path / "cacerts")
    (tmp_path / "req.pem").write_text(make_csr())
    argv = ["ca", "sign", "--ca-dir", str(tmp_path / "cacerts"), "--csr", str(tmp_path / "req.pem")]
    code, out, err = run([*argv, "--ttl", "2h"], capsys)
    assert code == 0, err
    chain = x509.load_pem_x509_certificates(out.encode())
    assert len(chain) == 3
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SLEEP.uri]
    lifetime = chain[0].not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert abs(lifetime - datetime.timedelta(hours=2)) < datetime.timedelta(seconds=30)
    roots = (tmp_path / "cacerts" / "root-cert.pem").read_text()
    openssl_verify(tmp_path, roots, tuple(pem(c).decode() for c in chain))

    # --identity must agree with what the CSR asks for.
    code, out, err = run([*argv, "--identity", "prod/payments"], capsys)
    assert (code, out) == (1, "")
    assert "may only hold its own identity" in err
    code, _, err = run([*argv, "--ttl", "100d"], capsys)
    assert code == 1
    assert "greater than the max allowed TTL" in err
    (tmp_path / "bad.pem").write_text("junk")
    code, _, err = run([*argv[:-1], str(tmp_path / "bad.pem")], capsys)
    assert code == 1
    assert "malformed CSR" in err


def test_serve_flags_make_a_ca_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args([])) is None
    args = parser.parse_args(
        ["--ca-dir", str(tmp_path), "--trust-domain", "example.org", "--ca-port", "0",
         "--ca-tokens", "t.yaml", "--workload-cert-ttl", "1h", "--max-workload-cert-ttl", "48h"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config == CAConfig(
        ca_dir=tmp_path,
        trust_domain="example.org",
        workload_cert_ttl=datetime.timedelta(hours=1),
        max_workload_cert_ttl=datetime.timedelta(hours=48),
        port=0,
        tokens_file=Path("t.yaml"),
    )
    defaults = config_from_args(parser.parse_args(["--ca-dir", str(tmp_path)]))
    assert defaults is not None
    assert (defaults.trust_domain, defaults.port) == ("cluster.local", 15012)
    assert defaults.workload_cert_ttl == datetime.timedelta(hours=24)
    assert defaults.max_workload_cert_ttl == datetime.timedelta(days=90)
    too_long = ["--ca-dir", "x", "--workload-cert-ttl", "72h", "--max-workload-cert-ttl", "48h"]
    with pytest.raises(ValueError, match="above the maximum"):
        config_from_args(parser.parse_args(too_long))
    with pytest.raises(SystemExit):
        parser.parse_args(["--trust-domain", "Bad Domain"])
