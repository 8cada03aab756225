"""Per-key rate limits shared by every gateway replica, kept in Redis.

With `--rate-limit-storage redis://...` every gateway counts a key's requests
and tokens in the same Redis, through the `limits` library's async Redis
storage and its sliding-window-counter strategy, so N replicas together
admit what one would, not N times as much.

Why a window and not the in-process token bucket: `limits` keeps windows,
not buckets. A limit of `rate` per second with `burst` becomes `amount` per
`window_s` seconds (see `WindowLimit.for_bucket`), which allows the same burst
at once and the same rate over time. The sliding-window counter is the
strategy that fits: it accepts a cost per hit (a request's tokens) and keeps
two counters per key; the moving window would keep one list entry per token.
Refunds are a negative-cost hit on the current window, for charges made in
it; what a request was charged in a window that has since rolled over fades
out with it as if it had been used (docs/design.md).

The store is asked with a bounded time (`--rate-limit-timeout`, retries
included). When it fails or does not answer, `--rate-limit-fail` decides:
`open` admits the request (logged and counted), `closed` refuses it with
UNAVAILABLE. After a failure the store is left alone for a second (one probe
then), so a down Redis costs at most one timeout a second, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from llmsuite.gateway.circuit_breaker import CircuitBreaker
from llmsuite.gateway.rate_limit import (
    RateLimitSettings,
    StorageFailureMode,
    StoreFailureMetrics,
    check_limits,
    check_token_burst,
    rate_limited,
)
from llmsuite.runtime.errors import ResourceExhausted, Unavailable

log = logging.getLogger("llmsuite.gateway.rate_limit")

KEY_PREFIX = "llmsuite-rate-limit"
SCHEMES = ("redis", "rediss")
# After a store failure, requests skip the store this long; then one probes it.
STORE_RETRY_S = 1.0
# A refusal whose computed wait is 0 (another replica took the room meanwhile) still says "later".
MIN_RETRY_AFTER_S = 0.05
# Redis keeps TTLs in whole milliseconds, so a window created by a charge can look up
# to a millisecond younger than the charge's reply; this much older still counts as in it.
WINDOW_AGE_SLACK_S = 0.01
# What a failing or silent store raises: redis-py's errors, `limits`' wrapper, our time bound, sockets.
STORE_ERRORS = (redis.exceptions.RedisError, StorageError, TimeoutError, OSError)


@dataclass(frozen=True)
class WindowLimit:
    """One (rate, burst) limit as `limits` can keep it: `amount` per `window_s` whole seconds.

    `window_s` is burst / rate rounded up to whole seconds (at least one), and
    `amount` is what the rate allows in that window: never more than the rate
    over time, and never less than the burst at once (a burst under one second
    of rate becomes one second of rate).
    """

    amount: int
    window_s: int

    @classmethod
    def for_bucket(cls, rate_per_s: float, burst: float) -> WindowLimit:
        # round(): 2 / 0.01 must be a 200 s window, not 201 because of a float's last bit.
        window_s = max(1, math.ceil(round(burst / rate_per_s, 9)))
        return cls(amount=max(1, math.floor(round(rate_per_s * window_s, 9))), window_s=window_s)

    def item(self, namespace: str) -> RateLimitItem:
        return RateLimitItemPerSecond(self.amount, self.window_s, namespace=namespace)

    def seconds_until_fits(self, cost: int, previous: int, previous_ttl_s: float, current: int,
                           current_ttl_s: float) -> float:
        """When `cost` fits, by the sliding-window counter's own arithmetic, given its
        state (`get_sliding_window`): 0.0 if now, inf if never; assuming no other hits.

        The count is previous x (its remaining life / window) + current. In Redis the
        current window rolls over when its TTL falls to one window; its count then
        fades out over the next window as the previous one.
        """
        room = self.amount - cost
        if room < 0:
            return math.inf
        if current <= room:
            if previous == 0:
                return 0.0
            # previous x (previous_ttl - t) / window <= room - current
            return max(0.0, previous_ttl_s - (room - current) * self.window_s / previous)
        rollover_s = max(0.0, current_ttl_s - self.window_s)
        return rollover_s + self.window_s * (1 - room / current)


def storage_uri(url: str) -> str:
    """`limits`' URI for a redis:// or rediss:// URL. The error never repeats the
    URL: it may hold a password."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"--rate-limit-storage must be a {', '.join(s + '://' for s in SCHEMES)} URL "
                         f"(scheme {scheme!r} is not supported)")
    return f"async+{url}"


def key_id(key: str) -> str:
    """What identifies a key in Redis: a digest, so API keys never sit in the store."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class SharedRateLimiter:
    """Per-key request and token limits kept in Redis (see the module docstring).

    Implements rate_limit.RateLimiter. Each check is at most four round trips
    (take the request, take the tokens, and on refusal read the windows for the
    wait), bounded together by `storage_timeout_s`.
    """

    def __init__(self, settings: RateLimitSettings) -> None:
        check_limits(settings.requests_per_s, settings.request_burst, settings.tokens_per_s, settings.token_burst)
        if settings.storage_timeout_s <= 0:
            raise ValueError("--rate-limit-timeout must be > 0")
        self.settings = settings
        self.requests = (WindowLimit.for_bucket(settings.requests_per_s, settings.request_burst)
                         if settings.requests_per_s > 0 else None)
        self.tokens = (WindowLimit.for_bucket(settings.tokens_per_s, settings.token_burst)
                       if settings.tokens_per_s > 0 else None)
        # The amount and window are part of each key, so replicas configured
        # differently never mix their counts.
        self._request_item = self.requests.item("requests") if self.requests else None
        self._token_item = self.tokens.item("tokens") if self.tokens else None
        uri = storage_uri(settings.storage)
        # Our own pool, so `close` can release it (limits' storage has no close);
        # socket timeouts keep a hung connection from outliving the time bound.
        self._pool = redis.asyncio.ConnectionPool.from_url(
            settings.storage, socket_timeout=settings.storage_timeout_s,
            socket_connect_timeout=settings.storage_timeout_s)
        self._storage = RedisStorage(uri, implementation="redispy", key_prefix=KEY_PREFIX,
                                     connection_pool=self._pool)  # type: ignore[arg-type]
        self._strategy = SlidingWindowCounterRateLimiter(self._storage)
        self._breaker = CircuitBreaker("rate-limit storage", failure_threshold=1, reset_timeout_s=STORE_RETRY_S)
        self._refunds: set[asyncio.Task[None]] = set()
        self._metrics: StoreFailureMetrics = _Uncounted()
        where = urlsplit(settings.storage)  # host and port only: the URL may carry a password
        log.info("per-key rate limits are kept in Redis, shared with every gateway using it",
                 extra={"redis": f"{where.hostname}:{where.port or 6379}", "limited": self.enabled,
                        "fail": str(settings.storage_failure)})

    @property
    def enabled(self) -> bool:
        return self.requests is not None or self.tokens is not None

    # -- RateLimiter ---------------------------------------------------------------------------------------

    async def charge(self, key: str, tokens: int) -> None:
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if not self.enabled:
            return
        check_token_burst(tokens, self.settings.tokens_per_s, self.settings.token_burst)
        try:
            self._breaker.before_call()
        except Unavailable:
            self._undecided()
            return
        try:
            async with asyncio.timeout(self.settings.storage_timeout_s):
                refusal = await self._take(key_id(key), tokens)
        except STORE_ERRORS as exc:
            self._breaker.record_failure()
            self._metrics.rate_limit_storage_failed("charge")
            log.warning("rate-limit storage failed (%s: %s); --rate-limit-fail %s",
                        type(exc).__name__, exc, self.settings.storage_failure)
            self._undecided()
            return
        except asyncio.CancelledError:
            self._breaker.record_abandoned()
            raise
        self._breaker.record_success()
        if refusal is not None:
            raise refusal

    def give_back(self, key: str, tokens: int, charged_at: float) -> None:
        if tokens <= 0 or self._token_item is None or not self._breaker.is_closed:
            return  # nothing to return, or the store is down and the charge most likely went with it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._refund(key_id(key), tokens, charged_at))
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    def report_to(self, metrics: StoreFailureMetrics) -> None:
        self._metrics = metrics

    async def close(self) -> None:
        if self._refunds:
            await asyncio.wait(set(self._refunds), timeout=self.settings.storage_timeout_s)
        await self._pool.disconnect()

    async def settled(self) -> None:
        """Waits for the refunds started so far (tests; `close` does the same, bounded)."""
        while self._refunds:
            await asyncio.wait(set(self._refunds))

    # -- the store -----------------------------------------------------------------------------------------

    async def _take(self, ident: str, tokens: int) -> ResourceExhausted | None:
        """Takes one request and `tokens` tokens, or nothing and returns the refusal."""
        if self._request_item is not None and not await self._strategy.hit(self._request_item, ident):
            return self._refusal(await self._wait(self._request_item, ident, 1),
                                 await self._wait(self._token_item, ident, tokens))
        if self._token_item is not None and not await self._strategy.hit(self._token_item, ident, cost=tokens):
            if self._request_item is not None:
                # Neither or both: the request taken above goes back.
                await self._strategy.hit(self._request_item, ident, cost=-1)
            return self._refusal(0.0, await self._wait(self._token_item, ident, tokens))
        return None

    async def _wait(self, item: RateLimitItem | None, ident: str, cost: int) -> float:
        if item is None:
            return 0.0
        window = await self._storage.get_sliding_window(item.key_for(ident), item.get_expiry())
        limit = self.requests if item is self._request_item else self.tokens
        assert limit is not None
        return limit.seconds_until_fits(cost, *window)

    def _refusal(self, request_wait: float, token_wait: float) -> ResourceExhausted:
        s = self.settings
        if request_wait <= 0 and token_wait <= 0:
            # The window said no, the state read after it says yes: another
            # replica's refund or a rollover in between.
            token_wait = MIN_RETRY_AFTER_S
        return rate_limited(request_wait, token_wait, requests_per_s=s.requests_per_s,
                            request_burst=s.request_burst, tokens_per_s=s.tokens_per_s, token_burst=s.token_burst)

    async def _refund(self, ident: str, tokens: int, charged_at: float) -> None:
        assert self._token_item is not None and self.tokens is not None
        item = self._token_item
        try:
            async with asyncio.timeout(self.settings.storage_timeout_s):
                _, _, current, current_ttl_s = await self._storage.get_sliding_window(
                    item.key_for(ident), item.get_expiry())
                # The current window's key is created with a TTL of two windows, so its age
                # is what it lost of that. A charge older than the window sits in the
                # previous one, which only fades: taking it from the current count would
                # return other requests' tokens, so it stays charged (errs toward limiting).
                # Durations only: no clock is compared across hosts.
                window_age_s = 2 * self.tokens.window_s - current_ttl_s
                if time.monotonic() - charged_at > window_age_s + WINDOW_AGE_SLACK_S:
                    return
                back = min(tokens, current)
                if back > 0:
                    # A negative cost lowers the current window's count: limits has no
                    # other way to give back, and the script adds `cost` as it is.
                    await self._strategy.hit(item, ident, cost=-back)
        except STORE_ERRORS as exc:
            self._metrics.rate_limit_storage_failed("refund")
            log.warning("rate-limit storage failed to take back %d unused tokens (%s: %s)",
                        tokens, type(exc).__name__, exc)

    def _undecided(self) -> None:
        if self.settings.storage_failure is StorageFailureMode.OPEN:
            self._metrics.rate_limit_undecided("admitted")
            return
        self._metrics.rate_limit_undecided("refused")
        raise Unavailable(
            message="the shared rate-limit store is not answering and this gateway refuses requests it "
                    "cannot count (--rate-limit-fail closed); retry shortly",
            reason="RATE_LIMIT_STORAGE_UNAVAILABLE",
            retry_after_s=STORE_RETRY_S,
        )


class _Uncounted:
    """Until `report_to`: failures are still logged, just not counted."""

    def rate_limit_storage_failed(self, operation: str) -> None:
        return None

    def rate_limit_undecided(self, outcome: str) -> None:
        return None
