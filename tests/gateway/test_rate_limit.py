from __future__ import annotations

import math
import threading

import pytest

from llmsuite.gateway.rate_limit import KeyedRateLimiter, TokenBucket
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_bucket_starts_full_and_refills_at_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=4.0, clock=clock)
    assert bucket.try_take(4) == 0.0
    assert bucket.try_take(1) == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.try_take(1) == 0.0
    assert bucket.try_take(2) == pytest.approx(1.0)


def test_bucket_never_exceeds_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=3.0, clock=clock)
    clock.advance(3600)
    assert bucket.try_take(3) == 0.0
    assert bucket.try_take(1) > 0.0


def test_bucket_failed_take_takes_nothing(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=5.0, clock=clock)
    assert bucket.try_take(3) == 0.0
    assert bucket.try_take(3) == pytest.approx(1.0)
    assert bucket.try_take(2) == 0.0


def test_bucket_request_larger_than_burst_never_fits(clock: FakeClock) -> None:
    assert TokenBucket(rate_per_s=1.0, burst=5.0, clock=clock).try_take(6) == math.inf


def test_bucket_give_back_is_capped_at_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=5.0, clock=clock)
    bucket.try_take(2)
    bucket.give_back(10)
    assert bucket.try_take(5) == 0.0
    assert bucket.try_take(1) > 0.0


def test_bucket_survives_a_clock_stepping_backwards(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=2.0, clock=clock)
    bucket.try_take(2)
    clock.advance(-50)
    assert bucket.try_take(1) == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1)])
def test_bucket_rejects_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_request_limit_names_requests_and_says_when_to_retry(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=2, tokens_per_s=0, token_burst=0, clock=clock)
    limiter.check("k", 10)
    limiter.check("k", 10)
    with pytest.raises(ResourceExhausted) as err:
        limiter.check("k", 10)
    assert err.value.reason == "RATE_LIMITED"
    assert "requests" in err.value.message and "tokens" not in err.value.message
    assert err.value.metadata["limit"] == "requests"
    assert err.value.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    limiter.check("k", 10)


def test_token_limit_names_tokens(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=100, request_burst=100, tokens_per_s=10, token_burst=100, clock=clock)
    limiter.check("k", 80)
    with pytest.raises(ResourceExhausted) as err:
        limiter.check("k", 40)
    assert err.value.metadata["limit"] == "tokens"
    assert "tokens" in err.value.message
    assert err.value.retry_after_s == pytest.approx(2.0)


def test_denied_request_charges_neither_budget(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=2, tokens_per_s=1, token_burst=100, clock=clock)
    limiter.check("k", 100)
    with pytest.raises(ResourceExhausted):
        limiter.check("k", 50)  # tokens spent; the request budget must not be touched
    limiter.check("k", 0)  # second of two burst requests still available


def test_both_limits_spent_are_both_named_and_wait_is_the_longer(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=1, tokens_per_s=1, token_burst=10, clock=clock)
    limiter.check("k", 10)
    with pytest.raises(ResourceExhausted) as err:
        limiter.check("k", 5)
    assert err.value.metadata["limit"] == "requests,tokens"
    assert err.value.retry_after_s == pytest.approx(5.0)


def test_keys_are_limited_independently(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=1, tokens_per_s=0, token_burst=0, clock=clock)
    limiter.check("alice", 1)
    limiter.check("bob", 1)
    with pytest.raises(ResourceExhausted):
        limiter.check("alice", 1)


def test_message_does_not_leak_the_api_key(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=1, tokens_per_s=0, token_burst=0, clock=clock)
    limiter.check("sk-secret", 1)
    with pytest.raises(ResourceExhausted) as err:
        limiter.check("sk-secret", 1)
    assert "sk-secret" not in err.value.message and "sk-secret" not in str(err.value.metadata)


def test_request_larger_than_token_burst_is_invalid_not_retryable(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=1, tokens_per_s=10, token_burst=100, clock=clock)
    with pytest.raises(InvalidArgument) as err:
        limiter.check("k", 101)
    assert err.value.reason == "REQUEST_EXCEEDS_TOKEN_BURST"
    limiter.check("k", 100)  # the rejected request charged nothing


def test_refund_returns_unused_tokens(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=0, request_burst=0, tokens_per_s=1, token_burst=100, clock=clock)
    limiter.check("k", 100)
    limiter.refund("k", 60)
    limiter.check("k", 60)
    with pytest.raises(ResourceExhausted):
        limiter.check("k", 1)


def test_refund_never_exceeds_burst_and_ignores_unknown_keys(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=0, request_burst=0, tokens_per_s=1, token_burst=100, clock=clock)
    limiter.refund("nobody", 50)
    assert len(limiter) == 0
    limiter.check("k", 10)
    limiter.refund("k", 1000)
    limiter.check("k", 100)
    with pytest.raises(ResourceExhausted):
        limiter.check("k", 1)


def test_zero_rates_disable_limits(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=0, request_burst=0, tokens_per_s=0, token_burst=0, clock=clock)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check("k", 10**9)
    assert len(limiter) == 0


def test_only_token_limit(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=0, request_burst=0, tokens_per_s=1, token_burst=5, clock=clock)
    for _ in range(5):
        limiter.check("k", 1)
    for _ in range(100):
        limiter.check("k", 0)  # requests are unlimited
    with pytest.raises(ResourceExhausted):
        limiter.check("k", 1)


def test_refilled_buckets_are_forgotten(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=2, tokens_per_s=10, token_burst=100, clock=clock)
    for i in range(50):
        limiter.check(f"key-{i}", 100)
    assert len(limiter) == 50
    clock.advance(10.0)  # every bucket has refilled
    limiter.check("fresh", 1)
    assert len(limiter) == 1


def test_key_count_is_capped_least_recently_used_first(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=1, tokens_per_s=0, token_burst=0, clock=clock,
                               max_keys=3)
    for key in ("a", "b", "c"):
        limiter.check(key, 1)
    clock.advance(0.5)
    with pytest.raises(ResourceExhausted):
        limiter.check("a", 1)  # touches "a": now "b" is the least recently used
    limiter.check("d", 1)
    assert len(limiter) == 3
    with pytest.raises(ResourceExhausted):
        limiter.check("a", 1)  # "a" kept its drained bucket
    limiter.check("b", 1)  # "b" was evicted and starts over full


def test_check_rejects_negative_tokens(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=1, tokens_per_s=1, token_burst=1, clock=clock)
    with pytest.raises(ValueError):
        limiter.check("k", -1)


@pytest.mark.parametrize("kwargs", [
    {"requests_per_s": -1, "request_burst": 1, "tokens_per_s": 0, "token_burst": 0},
    {"requests_per_s": 1, "request_burst": 0, "tokens_per_s": 0, "token_burst": 0},
    {"requests_per_s": 0, "request_burst": 0, "tokens_per_s": 1, "token_burst": 0},
])
def test_limiter_rejects_unusable_configuration(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        KeyedRateLimiter(**kwargs)


def test_concurrent_checks_never_over_admit(clock: FakeClock) -> None:
    limiter = KeyedRateLimiter(requests_per_s=1, request_burst=100, tokens_per_s=1, token_burst=1000, clock=clock)
    admitted = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            try:
                limiter.check("shared", 3)
            except ResourceExhausted:
                continue
            with lock:
                admitted.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The clock is frozen: exactly the burst of requests gets through.
    assert len(admitted) == 100
