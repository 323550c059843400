"""Global rate limits: envoyproxy/ratelimit's configuration, its matching, the algorithms and the
ShouldRateLimit answers, with an injected clock."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from mixerhub import registry
from mixerhub.monitoring import REGISTRY
from mixerhub.rate_limit import RateLimitService
from mixerhub.ratelimit.backend import Charge, MemoryBackend
from mixerhub.ratelimit.matching import Algorithm, RateLimits
from mixerhub.snapshot import Snapshot
from mixerhub.store import documents
from mixerhub.store.compile import Rejected, compile_snapshot

ADAPTERS = registry.default_registry()
Response = rls_pb2.RateLimitResponse
OK, OVER = Response.Code.OK, Response.Code.OVER_LIMIT

# envoyproxy/ratelimit README, "Example 2", unchanged.
MESSAGING = """
domain: messaging
descriptors:
  # Only allow 5 marketting messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
"""


class Clock:
    def __init__(self, now: float = 1200.0) -> None:  # on a minute, hour... edge
        self.now = now

    def __call__(self) -> float:
        return self.now


def compile_texts(*texts: str) -> Snapshot:
    docs: list[documents.Document] = []
    errors: list[object] = []
    for i, text in enumerate(texts):
        d, e = documents.parse(f"rl{i}.yaml", textwrap.dedent(text))
        docs += d
        errors += e
    assert not errors
    files = tuple(f"rl{i}.yaml" for i in range(len(texts)))
    source = documents.Source(tuple(docs), (), files, "test")
    return compile_snapshot(source, ADAPTERS, build_handlers=False, base_attributes={})


def limits(*texts: str) -> RateLimits:
    return compile_texts(*texts).rate_limits


def errors(*texts: str) -> list[str]:
    with pytest.raises(Rejected) as e:
        compile_texts(*texts)
    return [f"{x.path}: {x.reason}" for x in e.value.errors]


def service(text: str, clock: Clock) -> RateLimitService:
    s = RateLimitService(MemoryBackend(clock))
    s.activate(compile_texts(text))
    return s


def descriptor(*entries: tuple[str, str]) -> ratelimit_pb2.RateLimitDescriptor:
    return ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )


async def ask(
    s: RateLimitService,
    domain: str,
    *descriptors: Sequence[tuple[str, str]],
    hits: int = 0,
) -> rls_pb2.RateLimitResponse:
    request = rls_pb2.RateLimitRequest(
        domain=domain, descriptors=[descriptor(*d) for d in descriptors], hits_addend=hits
    )
    return await s.ShouldRateLimit(request, None)


def found(rl: RateLimits, domain: str, *entries: tuple[str, str]) -> tuple[int, str] | None:
    limit = rl.domains[domain].find(entries)
    return None if limit is None else (limit.requests_per_unit, limit.unit)


def sample(name: str, domain: str, descriptor: str) -> float:
    value = REGISTRY.get_sample_value(f"{name}_total", {"domain": domain, "descriptor": descriptor})
    return value or 0.0


# --- configuration and matching ---


def test_an_envoyproxy_ratelimit_example_loads_unchanged() -> None:
    rl = limits(MESSAGING)
    assert found(rl, "messaging", ("message_type", "marketing"), ("to_number", "2061111111")) == (
        5,
        "day",
    )
    assert found(rl, "messaging", ("to_number", "2061111111")) == (100, "day")
    assert found(rl, "messaging", ("message_type", "marketing")) is None  # no limit at level 1
    assert found(rl, "messaging", ("message_type", "other"), ("to_number", "1")) is None


def test_the_most_specific_match_wins_then_wildcards_then_any_value() -> None:
    rl = limits("""
        domain: edge
        descriptors:
          - key: remote_address
            rate_limit: {unit: second, requests_per_unit: 10}
          - key: remote_address
            value: 50.0.0.5
            rate_limit: {unit: second, requests_per_unit: 0}
          - key: path
            value: /api/*
            rate_limit: {unit: minute, requests_per_unit: 20}
          - key: path
            value: /api/admin
            rate_limit: {unit: minute, requests_per_unit: 1}
          - key: path
            value: /*
            rate_limit: {unit: minute, requests_per_unit: 99}
        """)
    assert found(rl, "edge", ("remote_address", "50.0.0.1")) == (10, "second")
    assert found(rl, "edge", ("remote_address", "50.0.0.5")) == (0, "second")
    assert found(rl, "edge", ("path", "/api/users")) == (20, "minute")
    assert found(rl, "edge", ("path", "/api/admin")) == (1, "minute")
    assert found(rl, "edge", ("path", "/web")) == (99, "minute")
    assert found(rl, "edge", ("other", "x")) is None


def test_nested_descriptors_match_only_at_their_own_depth() -> None:
    rl = limits("""
        domain: example4
        descriptors:
          - key: key
            value: value
            rate_limit: {requests_per_unit: 300, unit: second}
            descriptors:
              - key: subkey
                rate_limit: {requests_per_unit: 30, unit: SECOND}
        """)
    assert found(rl, "example4", ("key", "value")) == (300, "second")
    assert found(rl, "example4", ("key", "value"), ("subkey", "any")) == (30, "second")
    assert found(rl, "example4", ("key", "value"), ("subkey", "a"), ("deeper", "b")) is None
    assert found(rl, "example4", ("subkey", "any")) is None


def test_bad_configuration_is_reported_with_field_paths() -> None:
    got = errors("""
        domain: bad
        descriptors:
          - key: a
            rate_limit: {unit: fortnight, requests_per_unit: 1}
          - key: b
            rate_limit: {unit: second}
          - key: c
            value: x
          - key: c
            value: x
          - key: d
            rate_limit: {unlimited: true, unit: second}
          - key: e
            descriptors:
              - key: f
                rate_limit: {unit: second, requests_per_unit: -1}
              - key: g
                shadow: true
          - key: ""
        """)
    assert any(e.startswith("spec.descriptors[0].rate_limit.unit: ") for e in got), got
    assert "spec.descriptors[5].descriptors[0].rate_limit.requests_per_unit" in "".join(got)
    assert "spec.descriptors[5].descriptors[1].shadow: unknown field" in got
    # The semantic checks come once the shape is right.
    got = errors("""
        domain: bad
        descriptors:
          - key: b
            rate_limit: {unit: second}
          - key: c
            value: x
          - key: c
            value: x
          - key: d
            rate_limit: {unlimited: true, unit: second}
          - key: e
            rate_limit: {requests_per_unit: 1, unit: second, name: e, replaces: [{name: e}]}
          - key: ""
        """)
    assert got == [
        "spec.descriptors[0].rate_limit.requests_per_unit: required field is missing"
        " (or set unlimited)",
        "spec.descriptors[2]: duplicate descriptor c=x at this level",
        "spec.descriptors[3].rate_limit.unit: must not be set when the limit is unlimited",
        "spec.descriptors[4].rate_limit.replaces[0].name: a limit cannot replace itself",
        "spec.descriptors[5].key: must not be empty",
    ]


def test_two_files_for_one_domain_are_an_error() -> None:
    got = errors(MESSAGING, MESSAGING)
    assert got == ["spec.domain: domain 'messaging' is already defined in rl0.yaml: document 1"]


# --- the algorithms at their window edges ---

ALGORITHMS = """
domain: d
descriptors:
  - key: fixed
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: rolling
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: rolling_window}
  - key: bucket
    rate_limit: {unit: minute, requests_per_unit: 3, algorithm: token_bucket}
"""


async def test_fixed_window_is_aligned_on_the_clock_as_envoyproxy_ratelimit() -> None:
    clock = Clock(1230.0)  # half way through a minute
    s = service(ALGORITHMS, clock)
    for remaining in (2, 1, 0):
        r = await ask(s, "d", [("fixed", "k")])
        assert r.overall_code == OK
        assert r.statuses[0].limit_remaining == remaining
        assert r.statuses[0].duration_until_reset.seconds == 30
    r = await ask(s, "d", [("fixed", "k")])
    assert (r.overall_code, r.statuses[0].code, r.statuses[0].limit_remaining) == (OVER, OVER, 0)
    assert r.statuses[0].current_limit == Response.RateLimit(
        requests_per_unit=3, unit=Response.RateLimit.Unit.MINUTE
    )
    clock.now = 1259.999
    assert (await ask(s, "d", [("fixed", "k")])).overall_code == OVER
    clock.now = 1260.0  # the next minute: a fresh window
    r = await ask(s, "d", [("fixed", "k")])
    assert (r.overall_code, r.statuses[0].limit_remaining) == (OK, 2)
    # Each value of a value-less key has its own counter.
    assert (await ask(s, "d", [("fixed", "other")])).statuses[0].limit_remaining == 2


async def test_rolling_window_releases_hits_as_they_leave_the_window() -> None:
    clock = Clock(1200.0)
    s = service(ALGORITHMS, clock)
    assert (await ask(s, "d", [("rolling", "k")], hits=2)).overall_code == OK
    clock.now = 1230.0
    assert (await ask(s, "d", [("rolling", "k")])).overall_code == OK
    assert (await ask(s, "d", [("rolling", "k")])).overall_code == OVER
    clock.now = 1259.999  # the first two hits are still within the last minute
    assert (await ask(s, "d", [("rolling", "k")])).overall_code == OVER
    clock.now = 1260.0  # ...and now they are not
    r = await ask(s, "d", [("rolling", "k")], hits=2)
    assert (r.overall_code, r.statuses[0].limit_remaining) == (OK, 0)


async def test_token_bucket_refills_smoothly() -> None:
    clock = Clock(1200.0)
    s = service(ALGORITHMS, clock)
    assert (await ask(s, "d", [("bucket", "k")], hits=3)).overall_code == OK
    assert (await ask(s, "d", [("bucket", "k")])).overall_code == OVER
    clock.now = 1219.999  # one token every 20 s
    assert (await ask(s, "d", [("bucket", "k")])).overall_code == OVER
    clock.now = 1220.0
    r = await ask(s, "d", [("bucket", "k")])
    assert (r.overall_code, r.statuses[0].limit_remaining) == (OK, 0)
    assert r.statuses[0].duration_until_reset.seconds == 60


# --- ShouldRateLimit ---

SERVICE = """
domain: svc
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: tenant
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: canary
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
  - key: vip
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 100}
"""


async def test_unknown_domains_and_unmatched_descriptors_answer_ok() -> None:
    s = service(SERVICE, Clock())
    r = await ask(s, "nope", [("user", "a")])
    assert r.overall_code == OK
    assert not r.statuses[0].HasField("current_limit")
    r = await ask(s, "svc", [("nothing", "a")], [("user", "a"), ("deeper", "b")])
    assert [st.code for st in r.statuses] == [OK, OK]
    assert not r.response_headers_to_add


async def test_unlimited_answers_ok_with_maxuint32_remaining() -> None:
    s = service(SERVICE, Clock())
    for _ in range(10):
        r = await ask(s, "svc", [("internal", "x")])
        assert r.overall_code == OK
        assert r.statuses[0].limit_remaining == 2**32 - 1


async def test_shadow_mode_counts_but_answers_ok() -> None:
    s = service(SERVICE, Clock())
    before = sample("mixerhub_ratelimit_shadow_mode", "svc", "canary")
    over = sample("mixerhub_ratelimit_over_limit", "svc", "canary")
    for _ in range(3):
        assert (await ask(s, "svc", [("canary", "c")])).overall_code == OK
    assert sample("mixerhub_ratelimit_shadow_mode", "svc", "canary") == before + 2
    assert sample("mixerhub_ratelimit_over_limit", "svc", "canary") == over + 2


async def test_no_descriptor_is_charged_when_another_is_over() -> None:
    s = service(SERVICE, Clock())
    assert (await ask(s, "svc", [("user", "a")], hits=2)).overall_code == OK
    r = await ask(s, "svc", [("tenant", "t")], [("user", "a")])
    assert [st.code for st in r.statuses] == [OK, OVER]
    assert r.overall_code == OVER
    assert r.statuses[0].limit_remaining == 5  # the tenant was not charged
    # The same key twice in one request adds up.
    r = await ask(s, "svc", [("tenant", "t")], [("tenant", "t")], hits=3)
    assert [st.code for st in r.statuses] == [OK, OVER]
    r = await ask(s, "svc", [("tenant", "t")], hits=5)
    assert (r.overall_code, r.statuses[0].limit_remaining) == (OK, 0)


async def test_hits_addend_charges_that_many_and_zero_means_one() -> None:
    s = service(SERVICE, Clock())
    assert (await ask(s, "svc", [("tenant", "t")], hits=0)).statuses[0].limit_remaining == 4
    assert (await ask(s, "svc", [("tenant", "t")], hits=3)).statuses[0].limit_remaining == 1
    r = await ask(s, "svc", [("tenant", "t")], hits=2)
    assert (r.overall_code, r.statuses[0].limit_remaining) == (OVER, 0)


async def test_response_headers_come_from_the_tightest_limit() -> None:
    s = service(SERVICE, Clock(1230.0))
    r = await ask(s, "svc", [("tenant", "t")], [("user", "a")], [("nothing", "x")])
    headers = {h.key: h.value for h in r.response_headers_to_add}
    assert headers == {"RateLimit-Limit": "2", "RateLimit-Remaining": "1", "RateLimit-Reset": "30"}
    assert not any(k.lower().startswith("x-ratelimit") for k in headers)  # Envoy's own


async def test_replaced_limits_are_skipped() -> None:
    s = service(
        """
        domain: example7
        descriptors:
          - key: key_1
            value: value_1
            descriptors:
              - key: user
                value: bkthomps
                rate_limit: {name: specific_limit, requests_per_unit: 5, unit: second}
          - key: key_2
            value: value_2
            descriptors:
              - key: user
                value: bkthomps
                rate_limit:
                  replaces: [{name: specific_limit}]
                  requests_per_unit: 10
                  unit: second
        """,
        Clock(),
    )
    both = (
        [("key_1", "value_1"), ("user", "bkthomps")],
        [("key_2", "value_2"), ("user", "bkthomps")],
    )
    r = await ask(s, "example7", *both)
    assert not r.statuses[0].HasField("current_limit")
    assert r.statuses[1].current_limit.requests_per_unit == 10
    r = await ask(s, "example7", both[0])
    assert r.statuses[0].current_limit.requests_per_unit == 5


async def test_a_limit_override_from_envoy_wins() -> None:
    s = service(SERVICE, Clock())
    d = descriptor(("tenant", "t"))
    d.limit.requests_per_unit = 1
    d.limit.unit = Response.RateLimit.Unit.HOUR
    request = rls_pb2.RateLimitRequest(domain="svc", descriptors=[d])
    assert (await s.ShouldRateLimit(request, None)).overall_code == OK
    r = await s.ShouldRateLimit(request, None)
    assert r.overall_code == OVER
    assert r.statuses[0].current_limit.unit == Response.RateLimit.Unit.HOUR


async def test_metrics_follow_envoyproxy_ratelimit() -> None:
    s = service(SERVICE, Clock())

    def hits(descriptor: str) -> float:
        return sample("mixerhub_ratelimit_total_hits", "svc", descriptor)

    before = hits("tenant"), sample("mixerhub_ratelimit_near_limit", "svc", "tenant")
    over = sample("mixerhub_ratelimit_over_limit", "svc", "tenant")
    for _ in range(6):
        await ask(s, "svc", [("tenant", "metrics")])
    assert hits("tenant") == before[0] + 6
    # 4 of 5 and 5 of 5 are >= 80% used; the sixth is over.
    assert sample("mixerhub_ratelimit_near_limit", "svc", "tenant") == before[1] + 2
    assert sample("mixerhub_ratelimit_over_limit", "svc", "tenant") == over + 1
    # detailed_metric: the request's values, not the configuration path.
    await ask(s, "svc", [("vip", "alice")])
    assert hits("vip_alice") >= 1
    assert hits("vip") == 0


async def test_errors_answer_ok_and_are_counted() -> None:
    class Broken:
        async def take(self, charges: Sequence[Charge]) -> Sequence[object]:
            raise RuntimeError("backend down")

    s = RateLimitService(Broken())  # type: ignore[arg-type]
    s.activate(compile_texts(SERVICE))
    errors_before = REGISTRY.get_sample_value("mixerhub_ratelimit_errors_total") or 0.0
    r = await ask(s, "svc", [("user", "a")], [("tenant", "b")])
    assert r.overall_code == OK
    assert len(r.statuses) == 2
    assert REGISTRY.get_sample_value("mixerhub_ratelimit_errors_total") == errors_before + 1


async def test_counters_survive_a_reload() -> None:
    clock = Clock()
    s = service(SERVICE, clock)
    await ask(s, "svc", [("user", "a")], hits=2)
    s.activate(
        compile_texts(
            SERVICE + "  - key: extra\n    rate_limit: {unit: hour, requests_per_unit: 1}\n"
        )
    )
    assert (await ask(s, "svc", [("user", "a")])).overall_code == OVER


@pytest.mark.parametrize("algorithm", ["fixed_window", "rolling_window", "token_bucket"])
def test_a_lone_charge_is_decided_as_one_among_others(algorithm: Algorithm) -> None:
    # A lone charge skips the peek that several need: the outcomes must not differ.
    clock = Clock()
    lone, among = MemoryBackend(clock), MemoryBackend(clock)
    bystander = Charge(("d", (("other", "x"),)), 1, 10**9, 60, algorithm, enforced=False)
    for step in range(40):
        clock.now = 1200.0 + step * 1.7
        c = Charge(("d", (("k", "v"),)), step % 3, 5, 10, algorithm)
        assert lone.take_now([c]) == among.take_now([c, bystander])[:1], step
