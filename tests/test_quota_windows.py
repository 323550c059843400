"""The rate-limit algorithms: exact behaviour at window edges, with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixerhub.quota import FixedWindow, RollingWindow, Take, TokenBucket


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# Fixed window


def test_fixed_window_admits_the_limit_then_resets_exactly_at_the_edge() -> None:
    w = FixedWindow(10.0)
    assert w.take("k", 7, 10, 0.0) == Take(7, 3, 10.0)
    assert w.take("k", 4, 10, 5.0) == Take(0, 3, 5.0)  # all or nothing
    assert w.take("k", 3, 10, 9.999) == Take(3, 0, pytest.approx(0.001))
    assert w.take("k", 1, 10, 9.999) == Take(0, 0, pytest.approx(0.001))
    assert w.take("k", 1, 10, 10.0) == Take(1, 9, 10.0)  # the window began at the first charge


def test_fixed_window_can_pass_twice_the_limit_across_an_edge() -> None:
    w = FixedWindow(1.0)
    assert w.take("k", 5, 5, 0.999).granted == 5
    assert w.take("k", 5, 5, 1.999).granted == 5  # its own window started at 0.999
    assert w.take("k", 1, 5, 1.998).granted == 0


def test_fixed_window_aligned_to_the_clock() -> None:
    w = FixedWindow(60.0, aligned=True)
    assert w.take("k", 1, 2, 125.0) == Take(1, 1, 55.0)  # window [120, 180)
    assert w.take("k", 1, 2, 179.5) == Take(1, 0, 0.5)
    assert w.take("k", 1, 2, 180.0) == Take(1, 1, 60.0)


def test_fixed_window_best_effort_grants_what_is_left() -> None:
    w = FixedWindow(1.0)
    assert w.take("k", 3, 5, 0.0).granted == 3
    assert w.take("k", 3, 5, 0.1, best_effort=True) == Take(2, 0, 0.9)
    assert w.take("k", 3, 5, 0.2, best_effort=True) == Take(0, 0, 0.8)


def test_fixed_window_keys_and_limits_are_separate() -> None:
    w = FixedWindow(1.0)
    assert w.take("a", 1, 1, 0.0).granted == 1
    assert w.take("b", 2, 2, 0.0).granted == 2
    assert w.take("a", 1, 1, 0.5).granted == 0
    assert w.take("c", 3, 2, 0.0) == Take(0, 2, 0.0)  # more than the limit, never granted
    assert "c" not in w  # and nothing remembered for it


# Rolling window (Mixer's memquota: 100 ms ticks)


def test_rolling_window_releases_a_charge_when_its_bucket_leaves_the_window() -> None:
    w = RollingWindow(1.0, 0.1)
    assert w.buckets == 10
    assert w.take("k", 10, 10, 0.05) == Take(10, 0, pytest.approx(0.95))
    assert w.take("k", 1, 10, 0.999).granted == 0  # bucket 9: bucket 0 still inside
    assert w.take("k", 1, 10, 1.0) == Take(1, 9, 1.0)  # bucket 10: bucket 0 has left


def test_rolling_window_slides_bucket_by_bucket() -> None:
    w = RollingWindow(1.0, 0.1)
    for i in range(5):  # 2 in each of buckets 0..4
        assert w.take("k", 2, 10, i / 10).granted == 2
    assert w.take("k", 1, 10, 0.95).granted == 0
    assert w.take("k", 2, 10, 1.0).granted == 2  # bucket 0's 2 came back, no more
    assert w.take("k", 1, 10, 1.05).granted == 0
    assert w.take("k", 3, 10, 1.1, best_effort=True) == Take(2, 0, pytest.approx(1.0))
    assert w.take("k", 10, 10, 2.0).granted == 0  # buckets 10 and 11 still inside
    assert w.take("k", 10, 10, 2.2).granted == 10


def test_rolling_window_with_buckets_that_do_not_divide_it() -> None:
    w = RollingWindow(1.0, 0.3)  # 4 buckets: 1.2 s of history
    assert w.buckets == 4
    assert w.take("k", 1, 1, 0.0).granted == 1
    assert w.take("k", 1, 1, 1.19).granted == 0
    assert w.take("k", 1, 1, 1.2).granted == 1


def test_rolling_window_release_gives_back_newest_first() -> None:
    w = RollingWindow(1.0, 0.1)
    w.take("k", 3, 10, 0.0)
    w.take("k", 4, 10, 0.5)
    assert w.release("k", 5, 0.6) == 5  # 4 from bucket 5, 1 from bucket 0
    assert w.take("k", 8, 10, 0.6).granted == 8
    assert w.take("k", 3, 10, 1.0).granted == 0  # bucket 0's remaining 2 left: 2 free, not 3
    assert w.take("k", 2, 10, 1.0).granted == 2
    assert w.release("k", 100, 1.0) == 10
    assert "k" not in w
    assert w.release("nobody", 1, 1.0) == 0


def test_rolling_window_rejects_impossible_shapes() -> None:
    with pytest.raises(ValueError, match="bucket"):
        RollingWindow(1.0, 0.0)
    with pytest.raises(ValueError, match="at least one bucket"):
        RollingWindow(0.5, 1.0)
    with pytest.raises(ValueError, match="amount"):
        RollingWindow(1.0, 0.1).take("k", -1, 1)


# Token bucket (GCRA)


def test_gcra_allows_a_burst_of_the_limit_then_one_per_emission_interval() -> None:
    b = TokenBucket(1.0)  # 10 per second: one every 100 ms
    assert b.take("k", 10, 10, 0.0) == Take(10, 0, 1.0)
    assert b.take("k", 1, 10, 0.099).granted == 0
    assert b.take("k", 1, 10, 0.1) == Take(1, 0, 1.0)
    assert b.take("k", 2, 10, 0.3) == Take(2, 0, 1.0)
    assert b.take("k", 1, 10, 0.3) == Take(0, 0, 1.0)  # a denial changes nothing
    assert b.take("k", 1, 10, 1.3) == Take(1, 9, 0.1)  # full again after a whole period


def test_gcra_single_charges_never_lose_capacity_to_rounding() -> None:
    b = TokenBucket(1.0)
    assert [b.take("k", 1, 3, 0.0).granted for _ in range(4)] == [1, 1, 1, 0]
    assert b.take("k", 3, 3, 1.0).granted == 3


def test_gcra_best_effort_and_more_than_the_burst() -> None:
    b = TokenBucket(2.0)
    assert b.take("k", 5, 4, 0.0) == Take(0, 4, 0.0)
    assert b.take("k", 5, 4, 0.0, best_effort=True) == Take(4, 0, 2.0)
    assert b.take("k", 5, 4, 1.0, best_effort=True) == Take(2, 0, 2.0)


def test_gcra_a_changed_limit_rescales_the_key() -> None:
    b = TokenBucket(1.0)
    assert b.take("k", 5, 10, 0.0).granted == 5  # half used
    assert b.take("k", 2, 2, 0.0) == Take(0, 1, 0.5)  # at limit 2, half used leaves 1
    assert b.take("k", 1, 2, 0.0) == Take(1, 0, 1.0)
    assert TokenBucket(1.0).take("k", 1, 0, 0.0) == Take(0, 0, 0.0)


# Shared behaviour


@pytest.mark.parametrize(
    "limiter",
    [FixedWindow(1.0), RollingWindow(1.0, 0.1), TokenBucket(1.0)],
    ids=["fixed", "rolling", "gcra"],
)
def test_memory_stays_bounded_under_many_keys(
    limiter: FixedWindow | RollingWindow | TokenBucket,
) -> None:
    t = 0.0
    for i in range(100_000):  # a new key every 0.1 ms: 10,000 per second
        t = i / 10_000
        assert limiter.take(f"source-{i}", 1, 5, t).granted == 1
    assert len(limiter) <= 10_000 + 2  # only the keys charged within the last window
    assert limiter.sweep(t + 1.1) >= 10_000
    assert len(limiter) == 0


@pytest.mark.parametrize(
    "limiter",
    [
        FixedWindow(1.0, max_keys=3),
        RollingWindow(1.0, 0.1, max_keys=3),
        TokenBucket(1.0, max_keys=3),
    ],
    ids=["fixed", "rolling", "gcra"],
)
def test_max_keys_evicts_the_least_recently_charged(
    limiter: FixedWindow | RollingWindow | TokenBucket,
) -> None:
    for key in "abcd":
        assert limiter.take(key, 1, 1, 0.0).granted == 1
    assert len(limiter) == 3
    assert limiter.evicted == 1
    assert "a" not in limiter
    assert limiter.take("a", 1, 1, 0.0).granted == 1  # forgotten, so it starts afresh


def test_the_injected_clock_is_read_when_no_time_is_given() -> None:
    clock = Clock(100.0)
    w = RollingWindow(1.0, 0.1, clock=clock)
    assert w.take("k", 1, 1).granted == 1
    clock.now = 100.95
    assert w.take("k", 1, 1).granted == 0
    clock.now = 101.0
    assert w.take("k", 1, 1).granted == 1


# Properties

_charges = st.lists(
    st.tuples(st.integers(0, 2_000), st.integers(1, 4), st.booleans()), min_size=1, max_size=80
)


@settings(max_examples=200, deadline=None)
@given(_charges)
def test_rolling_window_never_exceeds_the_limit_within_a_window(
    charges: list[tuple[int, int, bool]],
) -> None:
    w = RollingWindow(1.0, 0.1)
    granted: list[tuple[int, int]] = []  # (bucket, amount)
    for ms, amount, best in sorted(charges):
        g = w.take("k", amount, 5, ms / 1000, best_effort=best).granted
        granted.append((ms // 100, g))
    for first in range(0, 21):
        assert sum(g for b, g in granted if first <= b < first + 10) <= 5


@settings(max_examples=200, deadline=None)
@given(_charges)
def test_gcra_never_exceeds_burst_plus_rate(charges: list[tuple[int, int, bool]]) -> None:
    b = TokenBucket(1.0)  # limit 5 per second
    granted: list[tuple[int, int]] = []
    for ms, amount, best in sorted(charges):
        granted.append((ms, b.take("k", amount, 5, ms / 1000, best_effort=best).granted))
    for start in range(0, 2_001, 50):
        for length in (0, 200, 1_000, 2_000):
            total = sum(g for ms, g in granted if start <= ms <= start + length)
            assert total <= 5 + 5 * length // 1000


def test_rolling_window_drops_each_key_when_its_last_bucket_leaves() -> None:
    w = RollingWindow(1.0, 0.1)
    assert w.charge("a", 1, 5, 0.0) == 1
    assert w.charge("b", 1, 5, 0.25) == 1
    assert w.charge("a", 1, 5, 0.5) == 1  # a is now the latest to expire
    assert w.charge("c", 1, 5, 1.0) == 1  # a's first bucket has left, a itself has not
    assert all(k in w for k in "abc")
    assert w.charge("c", 1, 5, 1.3) == 1  # bucket 13: b's bucket 2 left at 12
    assert "b" not in w
    assert "a" in w
    assert w.release("c", 2, 1.35) == 2  # c has nothing charged any more: forgotten
    assert "c" not in w
    assert w.charge("d", 1, 5, 1.5) == 1  # bucket 15: a's bucket 5 has left
    assert "a" not in w
    assert len(w) == 1


_keyed_charges = st.lists(
    st.tuples(st.integers(0, 3_000), st.sampled_from("abc"), st.integers(0, 4), st.booleans()),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(_keyed_charges)
def test_rolling_window_charge_grants_what_take_does_and_keeps_only_live_keys(
    charges: list[tuple[int, str, int, bool]],
) -> None:
    taking, charging = RollingWindow(1.0, 0.1), RollingWindow(1.0, 0.1)
    grants: list[tuple[str, int, int]] = []  # (key, bucket, amount)
    for ms, key, amount, best in sorted(charges):
        taken = taking.take(key, amount, 5, ms / 1000, best_effort=best)
        assert charging.charge(key, amount, 5, ms / 1000, best) == taken.granted
        bucket = ms // 100
        if taken.granted:
            grants.append((key, bucket, taken.granted))
        inside = [(k, a) for k, b, a in grants if b > bucket - 10]
        # A key is held exactly while one of its grants is inside the window.
        assert {k for k in "abc" if k in charging} == {k for k, _ in inside}
        assert taken.remaining == 5 - sum(a for k, a in inside if k == key)
