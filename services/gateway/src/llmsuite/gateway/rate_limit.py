"""Per-API-key rate limits: token buckets on requests and on model tokens.

A generation is charged `prompt_tokens + max_new_tokens` up front, because
the gateway cannot know how long it will run; what it did not use is refunded
when it finishes. The clock is injectable so tests never sleep.

The buckets here live in the gateway's memory, so each gateway replica
limits on its own. `shared_rate_limit.py` keeps the same limits in Redis for
several replicas; `build_rate_limiter` picks one from the settings, and the
servicer only sees the `RateLimiter` protocol.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted

Clock = Callable[[], float]


class RateLimiter(Protocol):
    """What admission needs from a per-key limiter, in process or shared."""

    async def charge(self, key: str, tokens: int) -> None:
        """Admit one request for `key` costing `tokens`, or raise (see KeyedRateLimiter.check)."""

    def give_back(self, key: str, tokens: int, charged_at: float) -> None:
        """Return tokens a finished request did not use; `charged_at` is time.monotonic()
        once its `charge` had returned. Never blocks: it runs in `finally` blocks, also
        while the request is being cancelled."""

    def report_to(self, metrics: StoreFailureMetrics) -> None:
        """Where a shared store's failures are counted (the gateway's metrics)."""

    async def close(self) -> None:
        """Finish pending refunds (bounded) and release connections."""


class StoreFailureMetrics(Protocol):
    """What a shared limiter counts (GatewayMetrics implements it)."""

    def rate_limit_storage_failed(self, operation: str) -> None: ...

    def rate_limit_undecided(self, outcome: str) -> None: ...


class StorageFailureMode(enum.StrEnum):
    """What a shared limiter does when its store does not answer in time."""

    OPEN = "open"  # admit the request unlimited, log and count the error
    CLOSED = "closed"  # refuse it with UNAVAILABLE (RATE_LIMIT_STORAGE_UNAVAILABLE)


@dataclass(frozen=True)
class RateLimitSettings:
    """The gateway's per-key limits (`--rate-limit-*`, `--token-*` flags). A rate of 0
    disables that limit. `storage` empty: buckets in this process; a redis:// URL:
    limits shared by every gateway using that Redis (shared_rate_limit.py)."""

    requests_per_s: float = 0.0
    request_burst: float = 20.0
    tokens_per_s: float = 0.0
    token_burst: float = 65536.0
    storage: str = ""
    storage_failure: StorageFailureMode = StorageFailureMode.OPEN
    storage_timeout_s: float = 0.25


def build_rate_limiter(settings: RateLimitSettings) -> RateLimiter:
    """The limiter the settings ask for. Raises ValueError for an unusable
    configuration (an unsupported storage URL, the `redis` extra missing)."""
    if not settings.storage:
        return KeyedRateLimiter(settings.requests_per_s, settings.request_burst, settings.tokens_per_s,
                                settings.token_burst)
    # Imported only here: a gateway without shared limits never loads limits or redis.
    try:
        from llmsuite.gateway.shared_rate_limit import SharedRateLimiter
    except ImportError as exc:
        raise ValueError(f"--rate-limit-storage needs the gateway's `redis` extra: pip install "
                         f"'llmsuite-gateway[redis]' ({exc.name} is missing)") from exc
    return SharedRateLimiter(settings)


class TokenBucket:
    """Holds up to `burst` tokens, refilled continuously at `rate_per_s`; starts full. Thread-safe."""

    def __init__(self, rate_per_s: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or burst <= 0:
            raise ValueError(f"a token bucket needs rate_per_s > 0 and burst > 0, got {rate_per_s}, {burst}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._level = self.burst
        self._updated = clock()
        self._lock = threading.Lock()

    def _refill(self) -> float:
        now = self._clock()
        # max(): a clock that steps backwards must not drain the bucket.
        elapsed = max(0.0, now - self._updated)
        self._level = min(self.burst, self._level + elapsed * self.rate_per_s)
        self._updated = now
        return self._level

    def wait_time(self, n: float) -> float:
        """Seconds until `n` tokens are available (0.0 if now; inf if never)."""
        with self._lock:
            return self._wait_time(n)

    def _wait_time(self, n: float) -> float:
        if n > self.burst:
            return math.inf
        missing = n - self._refill()
        return 0.0 if missing <= 0 else missing / self.rate_per_s

    def try_take(self, n: float) -> float:
        """Take `n` tokens and return 0.0, or take nothing and return the wait in seconds."""
        with self._lock:
            wait = self._wait_time(n)
            if wait == 0.0:
                self._level -= n
            return wait

    def give_back(self, n: float) -> None:
        """Return unused tokens (never above `burst`)."""
        with self._lock:
            self._level = min(self.burst, self._refill() + n)

    def is_full(self) -> bool:
        with self._lock:
            return self._refill() >= self.burst


@dataclass
class _KeyBuckets:
    requests: TokenBucket | None
    tokens: TokenBucket | None

    def idle(self) -> bool:
        """Full again: dropping it changes nothing, a new one would start full too."""
        return all(b is None or b.is_full() for b in (self.requests, self.tokens))


class KeyedRateLimiter:
    """Request and token budgets per API key; a rate of 0 disables that limit.

    `check` charges one request and `tokens` tokens atomically: either both
    are taken or neither is. Memory is bounded by `max_keys`: buckets that
    have refilled are dropped first (that is lossless), and past the cap the
    least recently used key is forgotten (it starts over with a full bucket).
    Thread-safe; every method holds one short lock and never blocks on I/O.
    """

    def __init__(self, requests_per_s: float, request_burst: float, tokens_per_s: float,
                 token_burst: float, clock: Clock = time.monotonic, *, max_keys: int = 10_000) -> None:
        check_limits(requests_per_s, request_burst, tokens_per_s, token_burst)
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.requests_per_s = requests_per_s
        self.request_burst = request_burst
        self.tokens_per_s = tokens_per_s
        self.token_burst = token_burst
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, _KeyBuckets] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.requests_per_s > 0 or self.tokens_per_s > 0

    def __len__(self) -> int:
        """Keys currently tracked (for tests and metrics)."""
        return len(self._keys)

    def check(self, key: str, tokens: int) -> None:
        """Admit one request for `key` costing `tokens`, or raise.

        ResourceExhausted (RATE_LIMITED, with `retry_after_s`) when a budget is
        spent for now; InvalidArgument (REQUEST_EXCEEDS_TOKEN_BURST) when the
        request costs more than the token bucket can ever hold.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if not self.enabled:
            return
        check_token_burst(tokens, self.tokens_per_s, self.token_burst)
        with self._lock:
            buckets = self._buckets_for(key)
            request_wait = buckets.requests.wait_time(1) if buckets.requests else 0.0
            token_wait = buckets.tokens.wait_time(tokens) if buckets.tokens else 0.0
            if request_wait == 0.0 and token_wait == 0.0:
                if buckets.requests:
                    buckets.requests.try_take(1)
                if buckets.tokens:
                    buckets.tokens.try_take(tokens)
                return
        raise self._exhausted(request_wait, token_wait)

    def refund(self, key: str, tokens: int) -> None:
        """Return tokens a finished request charged but did not use."""
        if tokens <= 0:
            return
        with self._lock:
            buckets = self._keys.get(key)
            # A key that was dropped would start full anyway: nothing to return to.
            if buckets is not None and buckets.tokens is not None:
                buckets.tokens.give_back(tokens)

    def _buckets_for(self, key: str) -> _KeyBuckets:
        buckets = self._keys.get(key)
        if buckets is not None:
            self._keys.move_to_end(key)
            return buckets
        self._evict()
        buckets = _KeyBuckets(
            requests=TokenBucket(self.requests_per_s, self.request_burst, self._clock)
            if self.requests_per_s > 0 else None,
            tokens=TokenBucket(self.tokens_per_s, self.token_burst, self._clock)
            if self.tokens_per_s > 0 else None,
        )
        self._keys[key] = buckets
        return buckets

    def _evict(self) -> None:
        # Least recently used first; stop at the first bucket still refilling so
        # the sweep stays O(expired) per call.
        while self._keys:
            oldest = next(iter(self._keys.values()))
            if not oldest.idle():
                break
            self._keys.popitem(last=False)
        while len(self._keys) >= self.max_keys:
            self._keys.popitem(last=False)

    def _exhausted(self, request_wait: float, token_wait: float) -> ResourceExhausted:
        return rate_limited(request_wait, token_wait, requests_per_s=self.requests_per_s,
                            request_burst=self.request_burst, tokens_per_s=self.tokens_per_s,
                            token_burst=self.token_burst)

    # -- RateLimiter ---------------------------------------------------------------------------------------

    async def charge(self, key: str, tokens: int) -> None:
        self.check(key, tokens)

    def give_back(self, key: str, tokens: int, charged_at: float) -> None:
        self.refund(key, tokens)  # a bucket takes tokens back whenever they were taken

    def report_to(self, metrics: StoreFailureMetrics) -> None:
        return None  # no store, nothing to fail

    async def close(self) -> None:
        return None


def check_limits(requests_per_s: float, request_burst: float, tokens_per_s: float, token_burst: float) -> None:
    """Raises ValueError for limits no limiter can keep."""
    if requests_per_s < 0 or tokens_per_s < 0:
        raise ValueError("rates must be >= 0 (0 disables the limit)")
    if requests_per_s > 0 and request_burst < 1:
        raise ValueError("request_burst must be >= 1 when requests are limited")
    if tokens_per_s > 0 and token_burst <= 0:
        raise ValueError("token_burst must be > 0 when tokens are limited")


def check_token_burst(tokens: int, tokens_per_s: float, token_burst: float) -> None:
    """A request costing more than the token bucket can ever hold is the caller's
    mistake (INVALID_ARGUMENT), not something to retry."""
    if tokens_per_s > 0 and tokens > token_burst:
        raise InvalidArgument(
            message=(f"this request needs {tokens} tokens (prompt + max_new_tokens) but the token "
                     f"limit allows at most {token_burst:g} at once; lower max_new_tokens "
                     f"or shorten the prompt"),
            reason="REQUEST_EXCEEDS_TOKEN_BURST",
            metadata={"tokens": str(tokens), "token_burst": f"{token_burst:g}"},
        )


def rate_limited(request_wait: float, token_wait: float, *, requests_per_s: float, request_burst: float,
                 tokens_per_s: float, token_burst: float) -> ResourceExhausted:
    """RATE_LIMITED naming each spent budget (a wait > 0), retry after the longer wait."""
    limits: dict[str, str] = {}
    if request_wait > 0:
        limits["requests"] = f"{requests_per_s:g}/s, burst {request_burst:g}"
    if token_wait > 0:
        limits["tokens"] = f"{tokens_per_s:g}/s, burst {token_burst:g}"
    retry_after = max(request_wait, token_wait)
    spent = " and ".join(f"{name} ({desc})" for name, desc in limits.items())
    return ResourceExhausted(
        message=f"rate limit exceeded for this API key: {spent}; retry in {retry_after:.2f}s",
        reason="RATE_LIMITED",
        retry_after_s=retry_after,
        metadata={"limit": ",".join(limits)},
    )
