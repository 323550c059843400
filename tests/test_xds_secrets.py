"""SDS secrets: one certificate per workload, renewed at half its life, the trust bundle current;
and how `mixerhub proxy-config secret` and /debug/config_dump show them."""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
from pathlib import Path

from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format

from mixerhub import admin, proxy_config
from mixerhub.ca.authority import Authority, CAConfig
from mixerhub.xds.proxy import Proxy
from mixerhub.xds.resources import SECRET
from mixerhub.xds.secrets import SecretIssuer


def authority(tmp_path: Path, name: str = "ca") -> Authority:
    return Authority.from_config(CAConfig(ca_dir=tmp_path / name))


def leaf(secret: object) -> x509.Certificate:
    assert isinstance(secret, secret_pb2.Secret)
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    return x509.load_pem_x509_certificates(chain)[0]


async def test_one_certificate_per_workload_for_its_spiffe_identity(tmp_path: Path) -> None:
    issuer = SecretIssuer(authority(tmp_path))
    web = Proxy("web-1", namespace="shop", workload="web", service_account="web-sa")
    first = issuer.secrets("web", web)
    assert first is not None
    again = issuer.secrets("web", Proxy("web-2", namespace="shop", service_account="web-sa"))
    assert again is first  # replicas share it
    cert = leaf(first.resources["default"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/web-sa"
    ]
    root = first.resources["ROOTCA"]
    assert isinstance(root, secret_pb2.Secret)
    assert root.validation_context.trusted_ca.inline_bytes.decode() == first.trust_bundle
    # A service account that is no SPIFFE path segment gets no certificate, and no crash.
    assert issuer.secrets("bad", Proxy("x", namespace="shop", service_account="a/b")) is None
    issuer.close()


async def test_certificates_renew_at_half_their_life_and_are_pushed(tmp_path: Path) -> None:
    renewed = asyncio.Event()
    issuer = SecretIssuer(
        authority(tmp_path), ttl=datetime.timedelta(seconds=2), on_renewal=renewed.set
    )
    first = issuer.secrets("web", Proxy("web-1", namespace="shop", service_account="web"))
    assert first is not None
    await asyncio.wait_for(renewed.wait(), 3)  # at 1 s, plus at most 5% jitter
    second = issuer.secrets("web", Proxy("web-1", namespace="shop", service_account="web"))
    assert second is not None
    assert second is not first
    old, new = leaf(first.resources["default"]), leaf(second.resources["default"])
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc > old.not_valid_after_utc
    issuer.close()


async def test_roots_added_for_a_rotation_reach_the_next_push(tmp_path: Path) -> None:
    ca = authority(tmp_path)
    issuer = SecretIssuer(ca)
    proxy = Proxy("web-1", namespace="shop", service_account="web")
    before = issuer.secrets("web", proxy)
    ca.add_trusted_roots(authority(tmp_path, "next").root_cert_pem)
    after = issuer.secrets("web", proxy)
    assert before is not None
    assert after is not None
    assert after.trust_bundle.count("BEGIN CERTIFICATE") == 2
    assert after.certificate is before.certificate  # the workload keeps its certificate
    issuer.close()


async def test_proxy_config_shows_them_and_the_dump_never_holds_the_key(tmp_path: Path) -> None:
    issuer = SecretIssuer(authority(tmp_path))
    secrets = issuer.secrets("web", Proxy("web-1", namespace="shop", service_account="web"))
    assert secrets is not None
    issuer.close()
    dump = {
        "resources": {
            SECRET: [
                admin._redacted(json_format.MessageToDict(s)) for s in secrets.resources.values()
            ]
        }
    }
    assert "PRIVATE KEY" not in str(dump)
    encoded = dump["resources"][SECRET][0]["tlsCertificate"]["certificateChain"]["inlineBytes"]
    assert base64.b64decode(encoded).decode() == secrets.certificate.cert_chain_pem
    rows = {r[0]: r for r in proxy_config.secret_rows(dump, "SYNCED")}
    cert = secrets.certificate
    assert rows["default"] == (
        "default",
        "Cert Chain",
        "ACTIVE",
        "true",
        f"{cert.serial:x}",
        cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        cert.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    assert rows["ROOTCA"][1:4] == ("CA", "ACTIVE", "true")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    assert proxy_config.secret_rows(dump, "STALE", later)[0][2:4] == ("WARMING", "false")
    table = proxy_config.render(list(rows.values())).splitlines()
    assert table[0].split("  ")[0] == "RESOURCE NAME"


async def test_rsa_on_request(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mixerhub.ca import cli as ca_cli
    from mixerhub.ca.keys import KeyType

    parser = argparse.ArgumentParser()
    ca_cli.add_serve_arguments(parser)
    args = parser.parse_args(["--ca-dir", str(tmp_path / "ca"), "--workload-key-type", "RSA"])
    config = ca_cli.config_from_args(args)
    assert config is not None
    assert config.workload_key_type is KeyType.RSA_2048
    issuer = SecretIssuer(Authority.from_config(config), key_type=config.workload_key_type)
    secrets = issuer.secrets("web", Proxy("web-1", namespace="shop", service_account="web"))
    assert secrets is not None
    key = leaf(secrets.resources["default"]).public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048
    issuer.close()
