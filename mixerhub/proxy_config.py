"""`mixerhub proxy-config secret NODE_ID`: the certificates the hub serves a proxy, like istioctl.

It reads the hub's /debug/config_dump?proxy=NODE_ID (private keys are redacted there) and
/debug/syncz, and prints one row per secret: RESOURCE NAME, TYPE (Cert Chain for ``default``, CA
for ``ROOTCA``), STATUS (ACTIVE once the proxy ACKed what was sent, WARMING before, REJECTED when
it NACKed it), VALID CERT (now within the certificate's validity), SERIAL NUMBER, NOT AFTER and
NOT BEFORE of the leaf (of the first root for ROOTCA).
"""

from __future__ import annotations

import base64
import datetime
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from mixerhub import proxy_status
from mixerhub.xds.resources import SECRET

_STATUS = {"SYNCED": "ACTIVE", "STALE": "WARMING", "NACKED": "REJECTED", "NOT SENT": "WARMING"}


def fetch(admin: str, node_id: str, timeout: float = 5.0) -> tuple[dict[str, Any], str]:
    """The proxy's config dump and its SDS sync state; OSError when the hub or proxy is unknown."""
    query = urllib.parse.urlencode({"proxy": node_id})
    dump: dict[str, Any] = proxy_status.get_json(
        f"http://{admin}/debug/config_dump?{query}", timeout
    )
    state = "NOT SENT"
    for row in proxy_status.fetch(admin, timeout):
        if row.get("node_id") == node_id:
            state = str(row.get("types", {}).get("SDS", {}).get("state", state))
    return dump, state


def secret_rows(
    dump: Mapping[str, Any], sds_state: str, now: datetime.datetime | None = None
) -> list[tuple[str, ...]]:
    now = now or datetime.datetime.now(datetime.UTC)
    rows: list[tuple[str, ...]] = []
    for secret in dump.get("resources", {}).get(SECRET, []):
        name = str(secret.get("name", ""))
        if "tlsCertificate" in secret:
            kind = "Cert Chain"
            pem = secret["tlsCertificate"].get("certificateChain", {}).get("inlineBytes", "")
        else:
            kind = "CA"
            pem = secret.get("validationContext", {}).get("trustedCa", {}).get("inlineBytes", "")
        certs = x509.load_pem_x509_certificates(base64.b64decode(pem)) if pem else []
        if not certs:
            rows.append((name, kind, _STATUS.get(sds_state, sds_state), "false", "", "", ""))
            continue
        cert = certs[0]
        valid = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
        rows.append(
            (
                name,
                kind,
                _STATUS.get(sds_state, sds_state),
                "true" if valid else "false",
                f"{cert.serial_number:x}",
                cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        )
    return rows


def render(rows: Sequence[tuple[str, ...]]) -> str:
    table = [
        (
            "RESOURCE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
        ),
        *rows,
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines) + "\n"
