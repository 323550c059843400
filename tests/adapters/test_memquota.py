"""memquota: Mixer's in-memory quotas, with an injected clock."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from mixerhub.adapters.memquota import INFO, MemQuotaHandler, MemQuotaParams
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from mixerhub import adapter
from mixerhub.adapter import Env, InstanceSpec, QuotaArgs, QuotaResult
from mixerhub.attributes import ValueType
from mixerhub.templates import QuotaInstance

NAME = "requestcountquota.instance.istio-system"
SAMPLE = (
    Path(__file__).parent.parent
    / "data"
    / "istio-1.4"
    / "policy"
    / "mixer-rule-productpage-ratelimit.yaml"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def env() -> Env:
    return Env("memquota", "h.handler.ns", logging.getLogger("test"), CollectorRegistry())


def handler(clock: Clock, **params: Any) -> MemQuotaHandler:
    return MemQuotaHandler(MemQuotaParams.model_validate(params), env(), clock)


def sample_params() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(SAMPLE.read_text()) if d]
    params: dict[str, Any] = docs[0]["spec"]["params"]
    return params


def q(name: str = NAME, **dimensions: object) -> QuotaInstance:
    return QuotaInstance(name, dict(dimensions))


async def ask(h: MemQuotaHandler, inst: QuotaInstance, amount: int = 1, **kw: Any) -> QuotaResult:
    return await h.handle_quota(inst, QuotaArgs(amount=amount, **kw))


def spec(name: str = NAME) -> dict[str, InstanceSpec]:
    return {name: InstanceSpec(name, "quota", {"dimensions.destination": ValueType.STRING})}


def test_istio_sample_params_validate_and_declare_the_adapter() -> None:
    params = MemQuotaParams.model_validate(sample_params())
    assert list(INFO.validate(params, spec())) == []
    assert params.quotas[0].overrides[1].dimensions == {
        "destination": "productpage",
        "source": "10.28.11.20",
    }
    assert (INFO.name, INFO.templates) == ("memquota", ("quota",))
    assert INFO.default_params["minDeduplicationDuration"] == "1s"


async def test_the_first_matching_override_wins() -> None:
    clock = Clock()
    h = MemQuotaHandler(MemQuotaParams.model_validate(sample_params()), env(), clock)
    # reviews: 1 per 5 s
    assert (await ask(h, q(destination="reviews", source="a"))).amount == 1
    assert (await ask(h, q(destination="reviews", source="a"))).amount == 0
    # productpage from 10.28.11.20 (given as an IP address): 500 per 1 s, not the 2 per 5 s below
    ip = ipaddress.ip_address("10.28.11.20")
    granted = [(await ask(h, q(destination="productpage", source=ip))).amount for _ in range(3)]
    assert granted == [1, 1, 1]
    # productpage from elsewhere: 2 per 5 s
    results = [await ask(h, q(destination="productpage", source="x")) for _ in range(3)]
    assert [r.amount for r in results] == [1, 1, 0]
    assert results[0].valid_duration == 5.0
    assert results[2].valid_duration == 0.0  # nothing granted: nothing to hold
    # anything else: the quota's own 500 per 1 s
    assert (await ask(h, q(destination="ratings", source="x"), 500)).amount == 500
    assert (await ask(h, q(destination="ratings", source="x"))).amount == 0


async def test_each_combination_of_dimension_values_has_its_own_quota() -> None:
    clock = Clock()
    h = handler(clock, quotas=[{"name": NAME, "maxAmount": 1, "validDuration": "1s"}])
    assert (await ask(h, q(a="1", b="2"))).amount == 1
    assert (await ask(h, q(b="2", a="1"))).amount == 0  # same dimensions, any order
    assert (await ask(h, q(a="1", b="3"))).amount == 1
    assert (await ask(h, q(a="1", labels={"x": "y"}))).amount == 1  # map values too


async def test_a_rate_limit_is_a_rolling_window_of_100ms_ticks() -> None:
    clock = Clock()
    h = handler(clock, quotas=[{"name": NAME, "maxAmount": 2, "validDuration": "1s"}])
    clock.now = 1000.05
    assert (await ask(h, q())).amount == 1
    clock.now = 1000.55
    assert (await ask(h, q())) == QuotaResult(1, 1.0)
    clock.now = 1000.999
    assert (await ask(h, q())).amount == 0
    clock.now = 1001.0  # the tick of the first grant has left the window
    assert (await ask(h, q())).amount == 1
    assert (await ask(h, q())).amount == 0
    clock.now = 1001.5  # the tick of the second grant has left too
    assert (await ask(h, q())).amount == 1


async def test_valid_duration_is_rounded_up_to_whole_seconds_for_the_window() -> None:
    clock = Clock()
    h = handler(clock, quotas=[{"name": NAME, "maxAmount": 1, "validDuration": "500ms"}])
    assert await ask(h, q()) == QuotaResult(1, 0.5)  # the duration returned is as configured
    clock.now += 0.6
    assert (await ask(h, q())).amount == 0  # but the window is 1 s, as in Mixer
    clock.now += 0.4
    assert (await ask(h, q())).amount == 1


async def test_zero_valid_duration_is_an_allocation_counter() -> None:
    clock = Clock()
    h = handler(clock, quotas=[{"name": NAME, "maxAmount": 3}])
    assert await ask(h, q(), 2) == QuotaResult(2, 0.0)
    clock.now += 3600
    assert (await ask(h, q(), 2)).amount == 0  # no window: it never frees by itself
    assert (await ask(h, q(), -1)).amount == 1  # a negative amount releases
    assert (await ask(h, q(), 2)).amount == 2
    assert (await ask(h, q(), -10)).amount == 3  # releases what is held, no more
    assert h.keys == 0
    assert await ask(h, q(), 0) == QuotaResult(0)


async def test_best_effort_grants_what_is_left() -> None:
    clock = Clock()
    h = handler(
        clock,
        quotas=[
            {"name": NAME, "maxAmount": 5, "validDuration": "2s"},
            {"name": "counter.instance.ns", "maxAmount": 5},
        ],
    )
    assert await ask(h, q(), 3) == QuotaResult(3, 2.0)
    assert await ask(h, q(), 3) == QuotaResult(0, 0.0)  # all or nothing
    assert await ask(h, q(), 3, best_effort=True) == QuotaResult(2, 2.0)
    # Mixer answered best effort with the validDuration even when nothing was left.
    assert await ask(h, q(), 3, best_effort=True) == QuotaResult(0, 2.0)
    counter = q("counter.instance.ns")
    assert await ask(h, counter, 4) == QuotaResult(4, 0.0)
    assert await ask(h, counter, 4, best_effort=True) == QuotaResult(1, 0.0)


async def test_a_retried_request_gets_the_same_answer_and_counts_once() -> None:
    clock = Clock()
    h = handler(
        clock,
        quotas=[{"name": NAME, "maxAmount": 2, "validDuration": "10s"}],
        minDeduplicationDuration="1s",
    )
    first = await ask(h, q(), deduplication_id="req-1")
    assert first == QuotaResult(1, 10.0)
    clock.now += 0.5
    assert await ask(h, q(), deduplication_id="req-1") == QuotaResult(1, 9.5)
    assert (await ask(h, q(), deduplication_id="req-2")).amount == 1  # only 2 charged so far
    assert (await ask(h, q(), deduplication_id="req-3")).amount == 0
    assert (await ask(h, q(), deduplication_id="req-3")).amount == 0  # a denial is remembered
    # An id is remembered for at least minDeduplicationDuration and at most twice that.
    clock.now += 1.0
    assert (await ask(h, q(), deduplication_id="req-1")).amount == 1
    clock.now += 1.5
    assert (await ask(h, q(), deduplication_id="req-1")).amount == 0  # forgotten: charged anew
    # Without an id nothing is deduplicated.
    h2 = handler(clock, quotas=[{"name": NAME, "maxAmount": 2, "validDuration": "10s"}])
    assert [(await ask(h2, q())).amount for _ in range(3)] == [1, 1, 0]


async def test_ids_are_forgotten_on_mixers_grid_of_deduplication_periods() -> None:
    # Mixer turned its two maps every minDeduplicationDuration from the start: an id answered
    # in one period is remembered through the next, and forgotten when the one after begins.
    clock = Clock()
    start = clock.now
    h = handler(clock, quotas=[{"name": NAME, "maxAmount": 100, "validDuration": "10s"}])
    await ask(h, q(), deduplication_id="early")  # period 0 begins here
    clock.now = start + 0.9
    await ask(h, q(), deduplication_id="late")  # still period 0
    clock.now = start + 1.1
    await ask(h, q(), deduplication_id="next")  # period 1
    clock.now = start + 1.99
    for rid in ("early", "late", "next"):  # all remembered: no new charge
        await ask(h, q(), deduplication_id=rid)
    assert (await ask(h, q(), 100, best_effort=True)).amount == 97  # 3 charged, 97 left
    clock.now = start + 2.0  # period 2: period 0's ids are forgotten, period 1's are not
    assert (await ask(h, q(), deduplication_id="late")).amount == 0  # charged anew: none left
    assert (await ask(h, q(), deduplication_id="next")).amount == 1  # remembered answer
    clock.now = start + 3.0
    assert (await ask(h, q(), deduplication_id="next")).amount == 0  # forgotten


async def test_the_same_id_for_two_quotas_is_two_requests() -> None:
    clock = Clock()
    h = handler(
        clock,
        quotas=[
            {"name": NAME, "maxAmount": 1, "validDuration": "10s"},
            {"name": "other.instance.ns", "maxAmount": 1, "validDuration": "10s"},
        ],
    )
    assert (await ask(h, q(), deduplication_id="r")).amount == 1
    assert (await ask(h, q("other.instance.ns"), deduplication_id="r")).amount == 1


async def test_state_for_many_dimension_values_is_dropped_once_expired() -> None:
    clock = Clock()
    h = handler(clock, quotas=[{"name": NAME, "maxAmount": 1, "validDuration": "1s"}])
    for i in range(20_000):
        clock.now = 1000.0 + i / 10_000  # 20,000 sources in 2 s
        assert (await ask(h, q(source=f"10.0.{i // 256}.{i % 256}"))).amount == 1
    assert h.keys <= 10_000 + 1000  # those of the last window (and its current tick)
    clock.now += 1.0
    await ask(h, q(source="late"))
    assert h.keys == 1


async def test_an_unknown_quota_is_an_error_not_an_exception() -> None:
    h = handler(Clock(), quotas=[{"name": NAME, "maxAmount": 1}])
    result = await ask(h, q("ghost.instance.ns"))
    assert (result.amount, result.status) == (0, adapter.NOT_FOUND)
    assert "ghost.instance.ns" in result.message


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"quotas": [{"name": NAME, "maxAmount": -1}]}, ("quotas", "0", "maxAmount")),
        ({"quotas": [{"name": NAME, "validDuration": "soon"}]}, ("quotas", "0", "validDuration")),
        (
            {"quotas": [{"name": NAME, "overrides": [{"max_amount": -2}]}]},
            ("quotas", "0", "overrides", "0", "max_amount"),
        ),
        ({"quotas": [{"name": NAME, "bucketDuration": "1s"}]}, ("quotas", "0", "bucketDuration")),
        ({"minDeduplicationDuration": "-1s"}, ("minDeduplicationDuration",)),
    ],
)
def test_bad_params_name_the_field(params: dict[str, Any], path: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as e:
        MemQuotaParams.model_validate(params)
    assert tuple(str(p) for p in e.value.errors()[0]["loc"]) == path


def test_validation_names_the_field_and_the_missing_quota() -> None:
    params = MemQuotaParams.model_validate(
        {
            "quotas": [
                {"name": "requestcountquota", "maxAmount": 1},
                {"maxAmount": 1},
                {"name": "requestcountquota", "maxAmount": 2},
            ],
            "minDeduplicationDuration": "0s",
        }
    )
    errors = {(e.path, e.reason) for e in INFO.validate(params, spec())}
    assert errors == {
        ("minDeduplicationDuration", "deduplication window of 0s is invalid, must be > 0"),
        ("quotas[1].name", "required field is missing"),
        ("quotas[2].name", "duplicate quota 'requestcountquota' (first at quotas[0])"),
        (
            "quotas",
            f"did not find limit defined for quota {NAME}"
            " (a quota's name is the full name of the instance it serves)",
        ),
    }


async def test_override_dimensions_compare_as_text() -> None:
    params = MemQuotaParams.model_validate(
        {
            "quotas": [
                {
                    "name": NAME,
                    "maxAmount": 5,
                    "overrides": [{"dimensions": {"code": 200, "tls": True}, "maxAmount": 1}],
                }
            ]
        }
    )
    assert params.quotas[0].overrides[0].dimensions == {"code": "200", "tls": "true"}
    h = MemQuotaHandler(params, env(), Clock())
    assert (await ask(h, q(code=200, tls=True), 2)).amount == 0  # the override's 1
    assert (await ask(h, q(code=201, tls=True), 2)).amount == 2
    assert (await ask(h, q(code=200), 2)).amount == 2  # a dimension missing: no match
