"""Prometheus metrics of the gateway (listed in docs/metrics.md).

Every call to an upstream is counted when it ends, by the code it ended with,
under the target it was configured with (`Upstreams` reports each one: its
unary calls and probes from the one place that makes them, Generate streams
from the call's done callback, so a stream that fails mid-way or is cancelled
counts too). Not a client interceptor: grpc.aio wraps every intercepted
streaming call in extra tasks per message, and on streams the server ends
first it leaves a pending task behind that asyncio later reports as destroyed.
Circuit states are read from the breakers at scrape time, through a callable
the app passes in (so this module needs nothing from upstreams.py, which
reports to it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmsuite.gateway.circuit_breaker import CircuitBreaker, CircuitState
from llmsuite.runtime.errors import LlmsuiteError

# Every upstream's circuit at this moment: (upstream kind, configured target, its breaker).
Circuits = Callable[[], Iterable[tuple[str, str, CircuitBreaker]]]


class GatewayMetrics:
    """The gateway's metric objects; `collectors()` goes to the server's registry.
    `circuits` lists the upstreams' circuits at scrape time (none before start-up)."""

    def __init__(self, circuits: Circuits) -> None:
        self.upstream_requests = Counter(
            "llmsuite_gateway_upstream_requests",
            "Calls to upstreams by how they ended; errors are grpc_code != OK (CANCELLED: the gateway ended "
            "the call itself).", ("upstream", "replica", "grpc_method", "grpc_code"),
            registry=None)
        self.rate_limited = Counter(
            "llmsuite_gateway_rate_limited",
            "Requests refused by the per-key rate limits, by reason (requests, tokens, token_burst).",
            ("reason",), registry=None)
        self.rate_limit_storage_errors = Counter(
            "llmsuite_gateway_rate_limit_storage_errors",
            "Calls to the shared rate-limit store (--rate-limit-storage Redis) that failed or outlasted "
            "--rate-limit-timeout, by operation (charge, refund).", ("operation",), registry=None)
        self.rate_limit_unchecked = Counter(
            "llmsuite_gateway_rate_limit_unchecked",
            "Requests the shared rate-limit store could not decide (it failed, or failed within the last second "
            "and was not asked), by what --rate-limit-fail did: admitted (open) or refused (closed).",
            ("outcome",), registry=None)
        self.spillovers = Counter(
            "llmsuite_gateway_spillovers",
            "Generations moved to another replica because this one refused before streaming anything.",
            ("replica", "grpc_code"), registry=None)
        self._circuits = _CircuitStates(circuits)

    def collectors(self) -> Sequence[Collector]:
        return (self.upstream_requests, self.rate_limited, self.rate_limit_storage_errors, self.rate_limit_unchecked,
                self.spillovers, self._circuits)

    def upstream_call(self, upstream: str, replica: str, method: str, code: grpc.StatusCode) -> None:
        """One finished call to `upstream` (tokenizer or inference) at its configured target."""
        self.upstream_requests.labels(upstream, replica, method, code.name).inc()

    def spilled_over(self, replica: str, code: grpc.StatusCode) -> None:
        self.spillovers.labels(replica, code.name).inc()

    def rate_limit_refused(self, error: LlmsuiteError) -> None:
        """Counts a refusal by the rate limiter (`error` is what it raised)."""
        if error.reason == "REQUEST_EXCEEDS_TOKEN_BURST":
            reason = "token_burst"
        elif "requests" in error.metadata.get("limit", "").split(","):
            reason = "requests"
        else:
            reason = "tokens"
        self.rate_limited.labels(reason).inc()

    def rate_limit_storage_failed(self, operation: str) -> None:
        """A call to the shared rate-limit store failed (`charge` or `refund`)."""
        self.rate_limit_storage_errors.labels(operation).inc()

    def rate_limit_undecided(self, outcome: str) -> None:
        """A request the shared store did not decide was `admitted` or `refused` (--rate-limit-fail)."""
        self.rate_limit_unchecked.labels(outcome).inc()


class _CircuitStates(Collector):
    def __init__(self, circuits: Circuits) -> None:
        self._list_circuits = circuits

    def describe(self) -> Iterable[Any]:
        return ()  # families depend on the configured replicas; collected only at scrape time

    def collect(self) -> Iterable[Any]:
        state = GaugeMetricFamily(
            "llmsuite_gateway_circuit_breaker_state",
            "Each upstream's circuit: 1 for its current state (closed, open, half_open), 0 for the others.",
            labels=("upstream", "replica", "state"))
        failures = GaugeMetricFamily(
            "llmsuite_gateway_circuit_breaker_consecutive_failures",
            "Consecutive failures counted against each upstream (its circuit opens at --breaker-failures).",
            labels=("upstream", "replica"))
        for kind, target, breaker in self._list_circuits():
            current = breaker.state
            for candidate in CircuitState:
                state.add_metric((kind, target, candidate.value), 1 if candidate is current else 0)
            failures.add_metric((kind, target), breaker.consecutive_failures)
        yield state
        yield failures
