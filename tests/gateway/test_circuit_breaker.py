from __future__ import annotations

import threading

import grpc
import pytest

from llmsuite.gateway.circuit_breaker import CircuitBreaker, CircuitState, counts_as_failure
from llmsuite.runtime.errors import Unavailable


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_breaker(clock: FakeClock, threshold: int = 3, reset: float = 5.0) -> CircuitBreaker:
    breaker = CircuitBreaker("inference", failure_threshold=threshold, reset_timeout_s=reset, clock=clock)
    for _ in range(threshold):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    return breaker


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker("tokenizer", failure_threshold=3, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN


def test_success_resets_the_failure_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker("tokenizer", failure_threshold=3, clock=clock)
    for _ in range(10):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 0


def test_open_circuit_fails_fast_with_remaining_time(clock: FakeClock) -> None:
    breaker = open_breaker(clock, reset=5.0)
    clock.advance(2.0)
    with pytest.raises(Unavailable) as err:
        breaker.before_call()
    assert err.value.reason == "UPSTREAM_CIRCUIT_OPEN"
    assert err.value.retry_after_s == pytest.approx(3.0)
    assert err.value.message.startswith("upstream inference is unavailable")
    assert err.value.metadata == {"upstream": "inference"}


def test_after_reset_timeout_exactly_one_probe_goes_through(clock: FakeClock) -> None:
    breaker = open_breaker(clock, reset=5.0)
    clock.advance(5.0)
    breaker.before_call()
    assert breaker.state is CircuitState.HALF_OPEN
    with pytest.raises(Unavailable):
        breaker.before_call()


def test_successful_probe_closes(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(5.0)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    breaker.before_call()
    breaker.before_call()


def test_failed_probe_reopens_for_a_full_timeout(clock: FakeClock) -> None:
    breaker = open_breaker(clock, reset=5.0)
    clock.advance(7.0)
    breaker.before_call()
    clock.advance(1.0)
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(Unavailable) as err:
        breaker.before_call()
    assert err.value.retry_after_s == pytest.approx(5.0)


def test_probe_that_never_reports_does_not_wedge_the_circuit(clock: FakeClock) -> None:
    breaker = open_breaker(clock, reset=5.0)
    clock.advance(5.0)
    breaker.before_call()  # this probe's caller vanishes without reporting
    clock.advance(4.0)
    with pytest.raises(Unavailable) as err:
        breaker.before_call()
    assert err.value.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    breaker.before_call()  # a new probe
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED


def test_cancelled_probe_frees_the_slot_without_deciding(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(5.0)
    breaker.before_call()
    breaker.record_status(grpc.StatusCode.CANCELLED)
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.before_call()  # next caller probes immediately


def test_late_results_while_open_change_nothing(clock: FakeClock) -> None:
    breaker = open_breaker(clock, reset=5.0)
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    clock.advance(5.0)
    breaker.before_call()  # the open period was not extended by the late failure


@pytest.mark.parametrize("code", [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    # The gateway calls upstreams with its own credentials, never the caller's: a
    # refusal means the upstream is unusable until an operator fixes the config.
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
])
def test_upstream_down_codes_count(code: grpc.StatusCode) -> None:
    assert counts_as_failure(code)


@pytest.mark.parametrize("code", [
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.OUT_OF_RANGE,
])
def test_caller_mistakes_do_not_count(code: grpc.StatusCode) -> None:
    assert not counts_as_failure(code)


def test_caller_mistakes_never_trip_the_breaker(clock: FakeClock) -> None:
    breaker = CircuitBreaker("tokenizer", failure_threshold=2, clock=clock)
    for _ in range(10):
        breaker.before_call()
        breaker.record_status(grpc.StatusCode.INVALID_ARGUMENT)
    assert breaker.state is CircuitState.CLOSED
    breaker.record_status(grpc.StatusCode.UNAVAILABLE)
    breaker.record_status(grpc.StatusCode.UNAVAILABLE)
    assert breaker.state is CircuitState.OPEN


def test_probe_answered_with_caller_error_closes(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(5.0)
    breaker.before_call()
    breaker.record_status(grpc.StatusCode.NOT_FOUND)
    assert breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, 0.0)])
def test_rejects_nonsense_configuration(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=threshold, reset_timeout_s=reset)


def test_concurrent_callers_get_a_single_probe(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(5.0)
    allowed = []
    barrier = threading.Barrier(16)

    def caller() -> None:
        barrier.wait()
        try:
            breaker.before_call()
        except Unavailable:
            return
        allowed.append(1)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 1


def test_a_health_probe_that_is_answered_closes_an_open_circuit_at_once(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    with pytest.raises(Unavailable):
        breaker.before_call()  # requests still fail fast: the reset time has not passed
    breaker.record_probe_success()
    assert breaker.state is CircuitState.CLOSED and breaker.is_closed
    breaker.before_call()
