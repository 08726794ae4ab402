"""Per-caller token buckets, on a clock the test moves."""

from __future__ import annotations

import threading

import pytest

from services.common.callers import RateLimitSpec
from services.common.rate_limit import CallerRateLimits, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_calls_come_back_at_the_steady_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(per_second=2.0, burst=3, clock=clock)

    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.25
    assert bucket.take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


def test_an_idle_bucket_refills_only_up_to_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(per_second=10.0, burst=2, clock=clock)
    bucket.take()
    bucket.take()

    clock.now += 3600

    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_a_clock_going_backwards_neither_refills_nor_drains() -> None:
    clock = FakeClock()
    bucket = TokenBucket(per_second=1.0, burst=1, clock=clock)
    assert bucket.take() == 0.0

    clock.now -= 50

    assert bucket.take() == pytest.approx(1.0)


def test_concurrent_takers_never_get_more_than_the_burst() -> None:
    bucket = TokenBucket(per_second=1e-6, burst=50, clock=FakeClock())
    granted: list[float] = []
    lock = threading.Lock()

    def take_many() -> None:
        for _ in range(40):
            wait = bucket.take()
            with lock:
                granted.append(wait)

    threads = [threading.Thread(target=take_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert granted.count(0.0) == 50


def test_each_caller_has_its_own_bucket_and_unlisted_callers_are_not_limited() -> None:
    clock = FakeClock()
    limits = CallerRateLimits(
        {"shop": RateLimitSpec(1.0, 1), "crm": RateLimitSpec(1.0, 1)}, clock=clock
    )

    assert limits.take("shop") == 0.0
    assert limits.take("shop") == pytest.approx(1.0)
    assert limits.take("crm") == 0.0
    assert all(limits.take("tagging") == 0.0 for _ in range(100))
