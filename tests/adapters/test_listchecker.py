"""listchecker: Mixer's white and black lists, static and fetched from a real HTTP provider."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from mixerhub.adapters.listchecker import INFO, ListHandler, ListParams
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from mixerhub import adapter
from mixerhub.adapter import CheckResult, Env
from mixerhub.monitoring import REGISTRY
from mixerhub.templates import IPAddress, ListEntryInstance

POLICY = Path(__file__).parent.parent / "data" / "istio-1.4" / "policy"
OK, DENIED = adapter.OK, adapter.PERMISSION_DENIED


def env() -> Env:
    return Env("listchecker", "h.handler.ns", logging.getLogger("test"), CollectorRegistry())


def handler(**params: Any) -> ListHandler:
    built = INFO.build(ListParams.model_validate(params), {}, env())
    assert isinstance(built, ListHandler)
    return built


async def check(h: ListHandler, value: str | IPAddress) -> CheckResult:
    return await h.handle_listentry(ListEntryInstance("i.instance.ns", value))


async def statuses(h: ListHandler, *values: str | IPAddress) -> list[int]:
    return [(await check(h, v)).status for v in values]


def sample_params(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((POLICY / name).read_text()) if d]
    params: dict[str, Any] = docs[0]["spec"]["params"]
    return params


def errors_counted() -> float:
    value = REGISTRY.get_sample_value("mixerhub_adapter_errors_total", {"adapter": "listchecker"})
    return value or 0.0


# Static lists (overrides only)


async def test_istio_whitelist_sample_answers_as_mixer() -> None:
    params = ListParams.model_validate(sample_params("mixer-rule-deny-whitelist.yaml"))
    assert list(INFO.validate(params, {})) == []
    h = INFO.build(params, {}, env())
    assert isinstance(h, ListHandler)
    assert await check(h, "v1") == CheckResult(OK, "", 300.0, 10_000)  # Mixer's defaults
    assert await check(h, "v3") == CheckResult(DENIED, "v3 is not whitelisted", 300.0, 10_000)
    assert (await check(h, "V1")).status == DENIED  # STRINGS are case-sensitive


async def test_istio_ip_whitelist_sample_takes_ip_addresses_and_text() -> None:
    params = ListParams.model_validate(sample_params("mixer-rule-deny-ip.yaml"))
    assert list(INFO.validate(params, {})) == []
    h = INFO.build(params, {}, env())
    assert isinstance(h, ListHandler)
    inside, outside = ipaddress.ip_address("10.57.3.4"), ipaddress.ip_address("10.58.0.1")
    assert await statuses(h, inside, "10.57.255.255", outside) == [OK, OK, DENIED]
    assert (await check(h, outside)).message == "10.58.0.1 is not whitelisted"
    mapped = ipaddress.ip_address("::ffff:10.57.0.9")  # printed and matched as IPv4, as in Go
    assert await check(h, mapped) == CheckResult(OK, "", 300.0, 10_000)
    assert await check(h, "0.0.0.0") == CheckResult(
        DENIED, "0.0.0.0 is not whitelisted", 300.0, 10_000
    )


async def test_blacklist() -> None:
    h = handler(overrides=["v3"], blacklist=True, cachingInterval="10s", cachingUseCount=7)
    assert await check(h, "v3") == CheckResult(DENIED, "v3 is blacklisted", 10.0, 7)
    assert await check(h, "v1") == CheckResult(OK, "", 10.0, 7)


async def test_case_insensitive_strings() -> None:
    h = handler(overrides=["Reviews", "ratings"], entryType="CASE_INSENSITIVE_STRINGS")
    assert await statuses(h, "REVIEWS", "reviews", "Ratings", "details") == [OK, OK, OK, DENIED]
    assert (await check(h, "details")).message == "details is not whitelisted"


async def test_ip_ranges_v4_and_v6() -> None:
    h = handler(
        overrides=["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "fe80::1", "172.16.5.9/16"],
        entry_type="IP_ADDRESSES",
        blacklist=True,
    )
    listed = ["10.200.0.1", "192.168.1.7", "2001:db8:ffff::1", "fe80::1", "172.16.200.1"]
    unlisted = ["11.0.0.1", "192.168.1.8", "2001:db9::1", "fe80::2", "::ffff:11.0.0.1"]
    assert await statuses(h, *listed) == [DENIED] * 5
    assert await statuses(h, *unlisted) == [OK] * 5
    assert (await check(h, ipaddress.ip_address("2001:db8::5"))).message == (
        "2001:db8::5 is blacklisted"
    )


async def test_a_value_that_is_not_an_ip_address_is_an_invalid_argument() -> None:
    h = handler(overrides=["10.0.0.0/8"], entry_type=2)  # an enum by its number, as protobuf
    result = await check(h, "XYZ")
    assert result == CheckResult(
        adapter.INVALID_ARGUMENT, "XYZ is not a valid IP address", 300.0, 10_000
    )


async def test_an_ip_valued_instance_is_looked_up_by_its_text_in_a_string_list() -> None:
    h = handler(overrides=["10.1.2.3", "2001:db8::1"])
    assert await statuses(
        h, ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("2001:0db8::0001")
    ) == [OK, OK]


async def test_regex_entries_match_anywhere_in_the_value() -> None:
    h = handler(overrides=["^v[12]$", "canary", "(?i)^admin-"], entryType="REGEX")
    assert await statuses(h, "v1", "v2", "v3", "v10") == [OK, OK, DENIED, DENIED]
    assert await statuses(h, "my-canary-build", "ADMIN-tool", "tool-admin-") == [OK, OK, DENIED]


async def test_a_handler_never_raises() -> None:
    h = handler(overrides=["a"])
    result = await h.handle_listentry(ListEntryInstance("i", 42))  # type: ignore[arg-type]
    assert (result.status, result.message) == (
        adapter.INVALID_ARGUMENT,
        "42 is not a valid string or IP address",
    )


# Validation


def problems(**params: Any) -> dict[str, str]:
    return {e.path: e.reason for e in INFO.validate(ListParams.model_validate(params), {})}


def test_validation_names_each_bad_override_by_index() -> None:
    assert problems(
        entryType="IP_ADDRESSES", overrides=["10.0.0.0/8", "::1", "fe80::/10", "10.0.0.0/33"]
    ) == {
        "overrides[3]": "could not parse ip address override 10.0.0.0/33:"
        " '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"
    }
    bad = problems(entryType="REGEX", overrides=["ok", "a(b", "c"])
    assert list(bad) == ["overrides[1]"]
    assert bad["overrides[1]"].startswith("could not parse regex override a(b: missing )")
    assert problems(overrides=["a(b", "10.0.0.0/33"]) == {}  # plain strings: anything goes


def test_validation_of_the_provider_settings() -> None:
    url = "http://lists.example.com/allowed"
    assert problems(providerUrl=url, refreshInterval="1s", ttl="3s") == {}
    assert problems(providerUrl=url, refreshInterval="10s", ttl="10s") == {
        "ttl": "ttl must be > refreshInterval, ttl is 10s and refreshInterval is 10s"
    }
    assert problems(providerUrl=url, refreshInterval="500ms", ttl="3s") == {
        "refreshInterval": "refresh interval must be at least 1 second, it is 0.5s"
    }
    for bad in ("Foo", ":", "http:", "http://", "http:///FOO"):  # Mixer's own test cases
        assert problems(providerUrl=bad) == {"providerUrl": "URL scheme and host cannot be empty"}
    assert problems(providerUrl="ftp://lists.example.com/x") == {
        "providerUrl": "URL scheme must be http or https, not 'ftp'"
    }
    assert problems(refreshInterval="0s", ttl="0s") == {}  # no provider: not used


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"cachingUseCount": -1}, ("cachingUseCount",)),
        ({"entryType": "IPS"}, ("entryType",)),
        ({"ttl": "soon"}, ("ttl",)),
        ({"cachingInterval": "-1s"}, ("cachingInterval",)),
        ({"overrides": "v1"}, ("overrides",)),
        ({"blacklist": "sometimes"}, ("blacklist",)),
        ({"provider": "http://x"}, ("provider",)),
    ],
)
def test_bad_params_name_the_field(params: dict[str, Any], where: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as e:
        ListParams.model_validate(params)
    assert tuple(str(p) for p in e.value.errors()[0]["loc"]) == where


def test_a_provider_needs_the_hubs_event_loop() -> None:
    params = ListParams.model_validate({"providerUrl": "http://127.0.0.1:1/list"})
    with pytest.raises(RuntimeError, match="inside the hub's event loop"):
        INFO.build(params, {}, env())


# A real HTTP provider


class Provider:
    """An aiohttp server on 127.0.0.1 serving a list that a test changes, stops and restarts."""

    def __init__(self) -> None:
        self.body = b""
        self.status = 200
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(body=self.body, status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/list", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/list"


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    p = Provider()
    await p.start()
    yield p
    await p.stop()


async def eventually(
    probe: Callable[[], Awaitable[CheckResult]], status: int, timeout: float = 5.0
) -> CheckResult:
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result.status == status or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


# Tests build these handlers directly, without the validation that holds refreshInterval to 1 s,
# so that refreshing and expiring take a fraction of a second.
REFRESH, TTL = 0.1, 0.6


async def test_a_fetched_list_is_refreshed_kept_through_an_outage_until_ttl_and_recovers(
    provider: Provider,
) -> None:
    provider.body = b"alpha\nbeta\r\n\n"
    h = handler(
        providerUrl=provider.url,
        refreshInterval=f"{REFRESH}s",
        ttl=f"{TTL}s",
        overrides=["pinned"],
    )
    try:
        # The first check waits for the first fetch, as Mixer fetched while building.
        assert await check(h, "alpha") == CheckResult(OK, "", 300.0, 10_000)
        assert await statuses(h, "beta", "gamma", "pinned") == [OK, DENIED, OK]

        provider.body = b"gamma\n"  # the list changes: picked up at the next refresh
        assert (await eventually(lambda: check(h, "gamma"), OK)).status == OK
        assert await statuses(h, "alpha", "pinned") == [DENIED, OK]

        errors_before = errors_counted()
        await provider.stop()  # the provider goes down: the list is kept until its ttl
        down_at = time.monotonic()
        assert (await check(h, "gamma")).status == OK
        result = await eventually(lambda: check(h, "gamma"), adapter.UNAVAILABLE)
        kept_for = time.monotonic() - down_at
        assert result.status == adapter.UNAVAILABLE
        assert TTL - REFRESH <= kept_for < TTL + 1.0
        assert result.message.startswith(
            f"the list from {provider.url} was not refreshed within its ttl of {TTL:g}s:"
            f" could not fetch list from {provider.url}:"
        )
        assert (result.valid_duration, result.valid_use_count) == (0.0, 0)  # never cached
        assert errors_counted() - errors_before >= 3  # each failed fetch is counted
        assert await statuses(h, "pinned", "alpha") == [OK, adapter.UNAVAILABLE]

        provider.body = b"delta\n"
        await provider.start()  # back on the same port
        assert (await eventually(lambda: check(h, "delta"), OK)).status == OK
        assert await statuses(h, "gamma", "pinned") == [DENIED, OK]
        assert h.last_error == ""
    finally:
        await h.close()
    requests = provider.requests
    await asyncio.sleep(3 * REFRESH)
    assert provider.requests == requests  # close() stopped the refreshing


async def test_an_ip_list_from_a_provider_is_yaml_and_a_bad_one_keeps_the_last(
    provider: Provider,
) -> None:
    provider.body = b"whitelist:\n- 10.0.0.0/8\n- 2001:db8::1\n"
    h = handler(
        providerUrl=provider.url,
        refreshInterval=f"{REFRESH}s",
        ttl="60s",
        entryType="IP_ADDRESSES",
        blacklist=True,
    )
    try:
        assert await statuses(h, "10.1.1.1", "2001:db8::1", "11.0.0.1") == [DENIED, DENIED, OK]
        assert (await check(h, "10.1.1.1")).message == "10.1.1.1 is blacklisted"

        errors_before = errors_counted()
        provider.body = b"whitelist:\n- 10.0.0.0/8\n- not-an-ip\n"
        deadline = time.monotonic() + 5
        while not h.last_error and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert h.last_error == (
            f"could not parse data from {provider.url}: could not parse list entry not-an-ip:"
            " 'not-an-ip' does not appear to be an IPv4 or IPv6 network"
        )
        assert errors_counted() > errors_before
        assert await statuses(h, "10.1.1.1", "11.0.0.1") == [DENIED, OK]  # the last good list

        provider.body = b"- 10.0.0.0/8\n"  # not Mixer's format
        await asyncio.sleep(3 * REFRESH)
        assert h.last_error.startswith(
            f"could not parse data from {provider.url}: could not unmarshal data from list"
        )

        provider.body, provider.status = b"WhiteList: [11.0.0.0/8]\n", 503
        await asyncio.sleep(3 * REFRESH)
        assert h.last_error == f"could not fetch list from {provider.url}: 503"
        provider.status = 200  # the key is matched case-insensitively, as Go's JSON did
        assert (await eventually(lambda: check(h, "11.0.0.1"), DENIED)).status == DENIED
        assert (await check(h, "10.1.1.1")).status == OK
    finally:
        await h.close()


async def test_a_provider_that_never_answered_is_unavailable() -> None:
    h = handler(providerUrl="http://127.0.0.1:9/list", refreshInterval="1s", ttl="2s")
    try:
        result = await check(h, "anything")
        assert result.status == adapter.UNAVAILABLE
        assert result.message.startswith(
            "the list from http://127.0.0.1:9/list could not be fetched:"
            " could not fetch list from http://127.0.0.1:9/list:"
        )
    finally:
        await h.close()
