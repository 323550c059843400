"""Root rotation: the extra roots file, re-read while the hub runs.

A rotation is an overlap: the new root is added to every proxy's trust bundle (``ROOTCA``) while
certificates from the old one are still in use, then the old one is dropped. The operator edits
the file given as ``--ca-extra-roots``; the hub notices within its poll interval, replaces the
extra roots and pushes the new bundle to every proxy. A file that is not PEM CA certificates is
refused with the reason and the roots stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from mixerhub.ca.authority import Authority

log = logging.getLogger("mixerhub.ca")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


async def watch_extra_roots(
    authority: Authority, path: Path, interval: float, on_change: Callable[[], None]
) -> None:
    """Until cancelled: reload ``path`` into the authority's extra roots whenever it changes."""
    seen = _stamp(path)
    while True:
        await asyncio.sleep(interval)
        stamp = _stamp(path)
        if stamp == seen:
            continue
        seen = stamp
        try:
            text = await asyncio.to_thread(path.read_text) if stamp is not None else ""
            authority.set_extra_roots(text)
        except (OSError, ValueError) as e:
            log.error("%s: extra roots not changed: %s", path, e)
            continue
        log.info("%s: trust bundle now holds %d roots", path,
                 authority.trust_bundle().count("BEGIN CERTIFICATE"))  # fmt: skip
        on_change()
