"""A circuit breaker per upstream, so a dead tokenizer or inference service
fails requests fast with a retry hint instead of tying them up in timeouts.

CLOSED: calls flow; `failure_threshold` consecutive upstream failures open it.
OPEN: calls fail at once with Unavailable until `reset_timeout_s` has passed.
HALF_OPEN: exactly one probe call is let through; its success closes the
circuit, its failure opens it again for another `reset_timeout_s`.

Only outcomes that say the upstream itself is unwell count as failures (see
`counts_as_failure`); a caller's bad request proves the upstream is alive.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

import grpc

from llmsuite.runtime.errors import Unavailable

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

_UPSTREAM_DOWN = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    # The upstream refuses the gateway's own credentials: unusable until an
    # operator fixes the configuration, whatever the request.
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
})


def counts_as_failure(code: grpc.StatusCode) -> bool:
    """Whether a call ending with `code` is evidence the upstream is down.

    DEADLINE_EXCEEDED counts because it is what a connect attempt under
    `wait_for_ready` ends with; report it only for calls that never got a
    response, not for a long generation that simply ran out of time.
    """
    return code in _UPSTREAM_DOWN


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Guards calls to one upstream. Thread-safe and safe to use from asyncio
    (every method takes one short lock and never awaits).

    Protocol: `before_call()` before each call (raises Unavailable while
    open), then exactly one of `record_success()`, `record_failure()` or
    `record_abandoned()` once the outcome is known; `record_status(code)`
    picks for you. For streams,
    report success once the first response has arrived, not at the end.
    """

    def __init__(self, name: str, failure_threshold: int = 5, reset_timeout_s: float = 5.0,
                 clock: Clock = time.monotonic, *, public_name: str | None = None) -> None:
        """`name` is for logs (an address is fine); `public_name`, when given, is
        what callers see in errors instead, so internal addresses never leak."""
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be > 0")
        self.name = name
        self.public_name = public_name or name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started_at: float | None = None

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state

    @property
    def is_closed(self) -> bool:
        """Calls flow normally: fewer than `failure_threshold` consecutive failures
        since the last success (a probe in HALF_OPEN has not succeeded yet)."""
        with self._lock:
            return self._state is CircuitState.CLOSED

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures

    def before_call(self) -> None:
        with self._lock:
            if self._state is CircuitState.CLOSED:
                return
            now = self._clock()
            if self._state is CircuitState.OPEN:
                remaining = self._opened_at + self.reset_timeout_s - now
                if remaining > 0:
                    raise self._unavailable(remaining)
                self._transition(CircuitState.HALF_OPEN)
                self._probe_started_at = now
                return
            # HALF_OPEN: one probe at a time. A probe that never reports (its
            # caller was cancelled) must not wedge the circuit, so its slot
            # expires after reset_timeout_s and the next caller probes instead.
            assert self._probe_started_at is not None
            remaining = self._probe_started_at + self.reset_timeout_s - now
            if remaining > 0:
                raise self._unavailable(remaining)
            self._probe_started_at = now

    def record_success(self) -> None:
        with self._lock:
            if self._state is CircuitState.OPEN:
                # A call from before the circuit opened finishing late; the
                # probe, not a straggler, decides when to close.
                return
            self._failures = 0
            if self._state is CircuitState.HALF_OPEN:
                self._probe_started_at = None
                self._transition(CircuitState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            if self._state is CircuitState.OPEN:
                return
            self._failures += 1
            if self._state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                self._probe_started_at = None
                self._transition(CircuitState.OPEN)

    def trip(self) -> None:
        """The upstream itself says it cannot serve (health NOT_SERVING: draining,
        wedged, still loading): an answer, not a blip, so the circuit opens now."""
        with self._lock:
            self._opened_at = self._clock()
            self._probe_started_at = None
            if self._state is not CircuitState.OPEN:
                old, self._state = self._state, CircuitState.OPEN
                logger.warning("circuit for upstream %s %s -> open: it reports NOT_SERVING", self.name, old)

    def record_probe_success(self) -> None:
        """An out-of-band health probe (the gateway's periodic model listing)
        got an answer: the upstream is back, whatever the state. Unlike a
        request's success this also closes an OPEN circuit before its reset
        time, so recovery is seen at the next probe."""
        with self._lock:
            self._failures = 0
            self._probe_started_at = None
            if self._state is not CircuitState.CLOSED:
                self._transition(CircuitState.CLOSED)

    def record_abandoned(self) -> None:
        """The call ended without saying anything about the upstream (the caller
        cancelled it): free the probe slot so the next caller probes at once."""
        with self._lock:
            if self._state is CircuitState.HALF_OPEN:
                self._probe_started_at = self._clock() - self.reset_timeout_s

    def record_status(self, code: grpc.StatusCode) -> None:
        """Record a finished call by its status code: CANCELLED is neither outcome,
        OK and the caller's own errors are successes (the upstream answered)."""
        if code is grpc.StatusCode.CANCELLED:
            self.record_abandoned()
        elif counts_as_failure(code):
            self.record_failure()
        else:
            self.record_success()

    def _transition(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if new is CircuitState.OPEN:
            logger.warning("circuit for upstream %s %s -> open after %d consecutive failure(s)",
                           self.name, old, self._failures)
        else:
            logger.info("circuit for upstream %s %s -> %s", self.name, old, new)

    def _unavailable(self, retry_after_s: float) -> Unavailable:
        return Unavailable(
            message=(f"upstream {self.public_name} is unavailable (circuit open after {self._failures} "
                     f"consecutive failures); retry in {retry_after_s:.2f}s"),
            reason="UPSTREAM_CIRCUIT_OPEN",
            retry_after_s=retry_after_s,
            metadata={"upstream": self.public_name},
        )
