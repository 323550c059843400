"""`mixerhub proxy-status`'s table, from /debug/syncz rows."""

from __future__ import annotations

import re

import pytest

from mixerhub import proxy_status


def row(node_id: str, cluster: str, **states: str) -> dict[str, object]:
    types = {t: {"state": states.get(t, "SYNCED")} for t in proxy_status.COLUMNS}
    return {"node_id": node_id, "proxy": {"cluster": cluster}, "types": types}


def test_one_row_per_proxy_sorted_with_aligned_columns() -> None:
    nacked = row("b~node", "details", RDS="NACKED", SDS="NOT SENT")
    nacked["types"]["RDS"] |= {"nacked": "abc123", "error": "route: bad regex"}  # type: ignore[index]
    out = proxy_status.render([nacked, row("a~node", "productpage", EDS="STALE")])
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "CLUSTER", "CDS", "LDS", "EDS", "RDS", "SDS"]
    assert lines[1].split() == ["a~node", "productpage", "SYNCED", "SYNCED", "STALE", "SYNCED",
                                "SYNCED"]  # fmt: skip
    assert lines[2].startswith("b~node")
    # Columns line up: each state starts where its header does.
    assert lines[2].index("NACKED") == lines[0].index("RDS")
    assert lines[2].index("NOT SENT") == lines[0].index("SDS")
    assert lines[-2:] == ["rejected:", "  b~node RDS version abc123: route: bad regex"]


def test_no_proxy_is_just_the_header() -> None:
    assert proxy_status.render([]).split() == ["NAME", "CLUSTER", "CDS", "LDS", "EDS", "RDS", "SDS"]


def test_a_hub_that_is_not_there_is_a_readable_error() -> None:
    with pytest.raises(
        OSError, match=re.escape("cannot reach the hub at http://127.0.0.1:1/debug/syncz")
    ):
        proxy_status.fetch("127.0.0.1:1", timeout=2)
