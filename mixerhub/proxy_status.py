"""`mixerhub proxy-status`: every connected proxy's sync state per xDS type, like istioctl's.

It reads the hub's /debug/syncz and prints one row per proxy: SYNCED (the proxy ACKed what was
sent last), NOT SENT (nothing of that type sent), STALE (sent, not ACKed yet) or NACKED (the
proxy rejected the last version; the error follows the table).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

COLUMNS = ("CDS", "LDS", "EDS", "RDS", "SDS")


def fetch(admin: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The hub's /debug/syncz; raises OSError with a readable message when the hub is not there."""
    rows: list[dict[str, Any]] = get_json(f"http://{admin}/debug/syncz", timeout)
    return rows


def get_json(url: str, timeout: float) -> Any:
    """One of the hub's debug pages, as JSON; OSError with a readable message otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        raise OSError(f"{url} answered {e.code}: {detail}".rstrip(": ")) from e
    except (urllib.error.URLError, TimeoutError) as e:
        raise OSError(f"cannot reach the hub at {url}: {getattr(e, 'reason', e)}") from e


def render(rows: Sequence[Mapping[str, Any]]) -> str:
    table: list[tuple[str, ...]] = [("NAME", "CLUSTER", *COLUMNS)]
    errors: list[str] = []
    for row in sorted(rows, key=lambda r: str(r.get("node_id", ""))):
        node_id = str(row.get("node_id", ""))
        types: Mapping[str, Mapping[str, Any]] = row.get("types", {})
        states = []
        for short in COLUMNS:
            status = types.get(short, {})
            states.append(str(status.get("state", "NOT SENT")))
            if status.get("state") == "NACKED":
                rejected = status.get("nacked")
                errors.append(f"{node_id} {short} version {rejected}: {status.get('error')}")
        table.append((node_id, str(row.get("proxy", {}).get("cluster", "")), *states))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    if errors:
        lines += ["", "rejected:", *(f"  {e}" for e in errors)]
    return "\n".join(lines) + "\n"
