"""listchecker's handler: looks a listentry value up in a white or black list (Mixer's list.go).

The list is the overrides, consulted first, and, with a providerUrl, the list fetched from it:
in the background, every refreshInterval. A list that fails to fetch or to parse leaves the
previous one in use; one not refreshed for ttl is dropped (Mixer's purgeList), and from then on
until a fetch succeeds a value the overrides do not settle gets UNAVAILABLE, uncacheable: Mixer
returned an error there, which the proxy, failing closed by default, turned into a denial.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Mapping

import aiohttp

from mixerhub import adapter
from mixerhub.adapter import CheckResult, Env, Handler, InstanceSpec
from mixerhub.templates import ListEntryInstance

from . import lists
from .config import ListParams
from .lists import ListError, Matcher

# How long a check waits for the first fetch of a handler just built. Mixer fetched the first
# list synchronously while building, so that a handler could answer at once.
FIRST_FETCH_WAIT = 5.0
# Mixer read the provider's whole response without bound (a TODO said it could OOM).
MAX_LIST_BYTES = 64 * 1024 * 1024


class ListHandler(Handler):
    def __init__(self, params: ListParams, env: Env) -> None:
        self.params, self.env = params, env
        self._entry_type = params.entry_type
        # Validation has parsed every override already.
        self._overrides = lists.build(params.entry_type, params.overrides)
        self._url = params.provider_url
        self._refresh = params.refresh_interval.total_seconds()
        self._ttl = params.ttl.total_seconds()
        self._valid = params.caching_interval.total_seconds()
        self._uses = params.caching_use_count
        self._remote: Matcher | None = None
        self._fetched_at = 0.0  # time.monotonic() of the last good fetch
        self._digest = b""
        self.last_error = ""
        self._first_fetch = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start fetching the providerUrl, in a task of the running event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "listchecker fetches its providerUrl in the background and must be built"
                " inside the hub's event loop"
            ) from None
        self._task = loop.create_task(self._refresher(), name=f"listchecker {self._url}")

    async def handle_listentry(self, instance: ListEntryInstance) -> CheckResult:
        try:
            return await self._check(instance.value)
        except Exception as e:  # never into the dispatcher: count, log, answer
            self.env.count_error()
            self.env.logger.exception("listchecker: checking %r failed", instance.value)
            return CheckResult(adapter.INTERNAL, f"listchecker failed: {e}", 0.0, 0)

    async def _check(self, value: object) -> CheckResult:
        s = lists.subject(value, self._entry_type)
        if isinstance(s, str):
            return self._result(adapter.INVALID_ARGUMENT, s)
        found = self._overrides.contains(s)
        if not found and self._url:
            remote = self._current()
            if remote is None and not self._first_fetch.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._first_fetch.wait(), FIRST_FETCH_WAIT)
                remote = self._current()
            if remote is None:
                return CheckResult(adapter.UNAVAILABLE, self._unavailable(), 0.0, 0)
            found = remote.contains(s)
        # Statuses and messages are Mixer's (list.go HandleListEntry, Istio 1.1 and later).
        if self.params.blacklist:
            if found:
                return self._result(adapter.PERMISSION_DENIED, f"{s.text} is blacklisted")
            return self._result(adapter.OK, "")
        if found:
            return self._result(adapter.OK, "")
        return self._result(adapter.PERMISSION_DENIED, f"{s.text} is not whitelisted")

    def _result(self, status: int, message: str) -> CheckResult:
        return CheckResult(status, message, self._valid, self._uses)

    def _current(self) -> Matcher | None:
        """The fetched list, unless it has outlived its ttl (then it is dropped)."""
        if self._remote is not None and time.monotonic() - self._fetched_at >= self._ttl:
            self.env.logger.warning(
                "listchecker: dropping the list from %s, not refreshed within its ttl of %gs",
                self._url,
                self._ttl,
            )
            self._remote = None
        return self._remote

    def _unavailable(self) -> str:
        if not self._first_fetch.is_set():
            what = f"the list from {self._url} has not been fetched yet"
        elif self._fetched_at:
            what = f"the list from {self._url} was not refreshed within its ttl of {self._ttl:g}s"
        else:
            what = f"the list from {self._url} could not be fetched"
        return f"{what}: {self.last_error}" if self.last_error else what

    async def _refresher(self) -> None:
        timeout = aiohttp.ClientTimeout(total=min(max(self._refresh, 1.0), 30.0))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    await self._fetch(session)
                except Exception as e:  # keep refreshing whatever one fetch ran into
                    self.env.logger.exception("listchecker: fetching %s failed", self._url)
                    self._failed(f"could not fetch list from {self._url}: {e!r}")
                self._first_fetch.set()
                self._current()  # drop an outdated list even when no check asks
                await asyncio.sleep(self._refresh)

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        try:
            body = await self._download(session)
        except ListError as e:
            self._failed(str(e))
            return
        digest = hashlib.sha256(body).digest()
        if digest == self._digest and self._remote is not None:
            self._fetched_at = time.monotonic()  # unchanged: keep it, and for another ttl
            self.last_error = ""
            return
        try:
            # Parsing a long list (or compiling many patterns) must not hold up the loop.
            remote = await asyncio.to_thread(self._parse, body)
        except ListError as e:
            self._failed(f"could not parse data from {self._url}: {e}")
            return
        self._remote, self._digest = remote, digest
        self._fetched_at = time.monotonic()
        self.last_error = ""
        self.env.logger.info(
            "listchecker: installed the list from %s, %d entries", self._url, remote.size
        )

    async def _download(self, session: aiohttp.ClientSession) -> bytes:
        try:
            async with session.get(self._url) as response:
                if response.status != 200:
                    raise ListError(f"could not fetch list from {self._url}: {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_LIST_BYTES:
                        raise ListError(
                            f"could not fetch list from {self._url}:"
                            f" larger than {MAX_LIST_BYTES} bytes"
                        )
                return bytes(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            reason = str(e) or type(e).__name__
            raise ListError(f"could not fetch list from {self._url}: {reason}") from None

    def _parse(self, body: bytes) -> Matcher:
        return lists.build(self._entry_type, lists.provider_entries(self._entry_type, body))

    def _failed(self, reason: str) -> None:
        self.last_error = reason
        self.env.count_error()
        self.env.logger.warning("listchecker: %s", reason)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None


def build(params: ListParams, instances: Mapping[str, InstanceSpec], env: Env) -> ListHandler:
    handler = ListHandler(params, env)
    if params.provider_url:
        handler.start()
    return handler
