"""Per-key limits shared through a real Redis (`--rate-limit-storage`).

Two limiters on one Redis stand for two gateway replicas; the last tests run
two real `llmsuite-gateway` processes. Each test starts its own redis-server
(tests/redis_server.py) and skips only where it is not installed. Windows are
long (a tiny rate), so no test depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from metrics_scrape import metrics_port, scrape
from prometheus_client import Counter
from redis_server import RedisServer
from scripted_inference import ScriptedInference
from support import BIN, ServerThread, ServiceProcess, processes

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.metrics import GatewayMetrics
from llmsuite.gateway.rate_limit import KeyedRateLimiter, RateLimitSettings, StorageFailureMode, build_rate_limiter
from llmsuite.gateway.shared_rate_limit import KEY_PREFIX, SharedRateLimiter, WindowLimit, key_id, storage_uri
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable

T = TypeVar("T")
TINY_RATE = 1e-4  # windows of hours: nothing refills while a test runs


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def settings(server: RedisServer | str, **overrides: Any) -> RateLimitSettings:
    url = server if isinstance(server, str) else server.url
    return RateLimitSettings(**{"requests_per_s": 0.0, "tokens_per_s": 0.0, "storage": url,
                                "storage_timeout_s": 5.0, **overrides})


METRICS: weakref.WeakKeyDictionary[SharedRateLimiter, GatewayMetrics] = weakref.WeakKeyDictionary()


def run(body: Callable[..., Awaitable[T]], *limits: RateLimitSettings) -> T:
    """Runs `body(limiter, ...)` with one SharedRateLimiter per settings (replicas), each
    counting into its own gateway metrics (METRICS), closed after."""
    async def main() -> T:
        limiters = [SharedRateLimiter(s) for s in limits]
        for limiter in limiters:
            METRICS[limiter] = GatewayMetrics(lambda: None)
            limiter.report_to(METRICS[limiter])
        try:
            return await body(*limiters)
        finally:
            for limiter in limiters:
                await limiter.close()
    return asyncio.run(main())


async def admitted(limiter: SharedRateLimiter, key: str, tokens: int) -> bool:
    try:
        await limiter.charge(key, tokens)
    except ResourceExhausted:
        return False
    return True


# --- the window a (rate, burst) limit becomes ---------------------------------------------------

@pytest.mark.parametrize(("rate", "burst", "amount", "window"), [
    (0.01, 2, 2, 200),
    (1, 2, 2, 2),
    (2, 5, 6, 3),  # 5 / 2 s rounds up to 3 s: 6 per 3 s keeps the rate, allows the burst
    (100, 20, 100, 1),  # a burst under one second of rate: one second of rate
    (10, 65536, 65540, 6554),
    (0.7, 1, 1, 2),
])
def test_a_bucket_becomes_a_window_that_keeps_its_rate_and_burst(rate: float, burst: float, amount: int,
                                                                   window: int) -> None:
    limit = WindowLimit.for_bucket(rate, burst)
    assert (limit.amount, limit.window_s) == (amount, window)
    assert limit.amount / limit.window_s <= rate, "never more than the rate over time"
    assert limit.amount >= math.floor(burst), "never less than the burst at once"


def test_wait_follows_the_sliding_window_counter() -> None:
    limit = WindowLimit(amount=10, window_s=100)
    assert limit.seconds_until_fits(3, previous=0, previous_ttl_s=0, current=7, current_ttl_s=150) == 0.0
    assert limit.seconds_until_fits(11, previous=0, previous_ttl_s=0, current=0, current_ttl_s=0) == math.inf
    # The current window is full: it rolls over in 50 s, then fades at 10 per 100 s.
    assert limit.seconds_until_fits(1, previous=0, previous_ttl_s=0, current=10, current_ttl_s=150) \
        == pytest.approx(50 + 10)
    # Room in the current window; the previous one's 20 (weight 0.4 now: 8) must fade to 5:
    # 20 x (40 - t) / 100 <= 10 - 3 - 2.
    assert limit.seconds_until_fits(3, previous=20, previous_ttl_s=40, current=2, current_ttl_s=140) \
        == pytest.approx(15)


def test_only_redis_urls_are_taken_and_the_error_hides_the_url() -> None:
    assert storage_uri("redis://h:6379/0") == "async+redis://h:6379/0"
    assert storage_uri("rediss://h:6380/1") == "async+rediss://h:6380/1"
    with pytest.raises(ValueError, match="redis://") as err:
        storage_uri("memcached://user:s3cret@h:11211")
    assert "s3cret" not in str(err.value)


def test_no_storage_means_the_in_process_buckets() -> None:
    assert isinstance(build_rate_limiter(RateLimitSettings(requests_per_s=1)), KeyedRateLimiter)
    with pytest.raises(ValueError, match="rate-limit-timeout"):
        SharedRateLimiter(settings("redis://127.0.0.1:1/0", storage_timeout_s=0))


# --- against a real Redis -----------------------------------------------------------------------

def test_two_replicas_together_admit_one_keys_request_burst(redis_server: RedisServer) -> None:
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=5)

    async def body(a: SharedRateLimiter, b: SharedRateLimiter) -> None:
        outcomes = [await admitted(replica, "alice", 1) for _ in range(6) for replica in (a, b)]
        assert outcomes.count(True) == 5 and outcomes[:5] == [True] * 5
        with pytest.raises(ResourceExhausted) as err:
            await b.charge("alice", 1)
        assert err.value.reason == "RATE_LIMITED" and err.value.metadata["limit"] == "requests"
        assert err.value.retry_after_s > 0
        assert await admitted(a, "bob", 1), "another key has its own budget"

    run(body, config, config)


def test_tokens_are_shared_and_unused_ones_come_back(redis_server: RedisServer) -> None:
    config = settings(redis_server, tokens_per_s=TINY_RATE, token_burst=100)

    async def body(a: SharedRateLimiter, b: SharedRateLimiter) -> None:
        await a.charge("k", 80)
        charged_at = time.monotonic()
        with pytest.raises(ResourceExhausted) as err:
            await b.charge("k", 40)
        assert err.value.metadata["limit"] == "tokens" and err.value.retry_after_s > 0
        a.give_back("k", 60, charged_at)  # the request used 20 of its 80
        await a.settled()
        await b.charge("k", 40)
        assert not await admitted(a, "k", 41)
        await a.charge("k", 40)
        assert not await admitted(b, "k", 1)

    run(body, config, config)


def test_refunds_never_return_more_than_was_charged(redis_server: RedisServer) -> None:
    config = settings(redis_server, tokens_per_s=TINY_RATE, token_burst=100)

    async def body(a: SharedRateLimiter) -> None:
        await a.charge("k", 10)
        charged_at = time.monotonic()
        a.give_back("k", 1000, charged_at)
        a.give_back("unknown", 50, charged_at)
        await a.settled()
        await a.charge("k", 100)
        assert not await admitted(a, "k", 1)

    run(body, config)


def test_a_charge_from_a_window_that_rolled_over_stays_charged(redis_server: RedisServer) -> None:
    """Its tokens fade with the previous window; the current count holds other requests' tokens."""
    config = settings(redis_server, tokens_per_s=TINY_RATE, token_burst=100)

    async def body(a: SharedRateLimiter) -> None:
        await a.charge("k", 60)
        assert a.tokens is not None
        a.give_back("k", 60, time.monotonic() - 3 * a.tokens.window_s)  # charged before this window began
        await a.settled()
        assert not await admitted(a, "k", 41)
        await a.charge("k", 40)

    run(body, config)


def test_a_refused_request_charges_neither_budget(redis_server: RedisServer) -> None:
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=2, tokens_per_s=TINY_RATE,
                      token_burst=100)

    async def body(a: SharedRateLimiter, b: SharedRateLimiter) -> None:
        await a.charge("k", 100)
        with pytest.raises(ResourceExhausted) as err:
            await b.charge("k", 50)  # tokens spent: the request it took goes back
        assert err.value.metadata["limit"] == "tokens"
        await b.charge("k", 0)  # the second of two requests is still there
        with pytest.raises(ResourceExhausted) as err:
            await a.charge("k", 1)
        assert err.value.metadata["limit"] == "requests,tokens", "both spent: both named"

    run(body, config, config)


def test_a_request_larger_than_the_token_burst_is_invalid(redis_server: RedisServer) -> None:
    config = settings(redis_server, tokens_per_s=TINY_RATE, token_burst=100)

    async def body(a: SharedRateLimiter) -> None:
        with pytest.raises(InvalidArgument) as err:
            await a.charge("k", 101)
        assert err.value.reason == "REQUEST_EXCEEDS_TOKEN_BURST"
        await a.charge("k", 100)  # the refused request charged nothing

    run(body, config)


def test_api_keys_never_reach_redis(redis_server: RedisServer) -> None:
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=1, tokens_per_s=TINY_RATE,
                      token_burst=10)
    run(lambda a: a.charge("sk-secret-key", 5), config)
    with redis_server.client() as client:
        keys = [k.decode() for k in client.keys("*")]
    assert keys and all(k.startswith(KEY_PREFIX + ":") for k in keys)
    assert not [k for k in keys if "sk-secret-key" in k]
    assert any(key_id("sk-secret-key") in k for k in keys)


def counted(counter: Counter, **labels: str) -> float:
    """A counter's value, read as a scrape would (0 before its first increment)."""
    return next((sample.value for metric in counter.collect() for sample in metric.samples
                 if sample.name.endswith("_total") and sample.labels == labels), 0.0)


def unchecked(limiter: SharedRateLimiter, outcome: str) -> float:
    return counted(METRICS[limiter].rate_limit_unchecked, outcome=outcome)


def storage_errors(limiter: SharedRateLimiter) -> float:
    return counted(METRICS[limiter].rate_limit_storage_errors, operation="charge")


def test_fail_open_admits_while_redis_is_down_and_counts_it(redis_server: RedisServer) -> None:
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=1,
                      storage_failure=StorageFailureMode.OPEN)
    redis_server.stop()

    async def body(a: SharedRateLimiter) -> None:
        for _ in range(5):
            await a.charge("k", 1)  # five past a burst of one: nobody can count them
        assert unchecked(a, "admitted") == 5 and unchecked(a, "refused") == 0
        assert storage_errors(a) >= 1

    run(body, config)


def test_fail_closed_refuses_with_unavailable_while_redis_is_down(redis_server: RedisServer) -> None:
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=10,
                      storage_failure=StorageFailureMode.CLOSED)
    redis_server.stop()

    async def body(a: SharedRateLimiter) -> None:
        for _ in range(3):
            with pytest.raises(Unavailable) as err:
                await a.charge("k", 1)
            assert err.value.reason == "RATE_LIMIT_STORAGE_UNAVAILABLE" and err.value.retry_after_s
            assert "closed" in err.value.message
        assert unchecked(a, "refused") == 3 and storage_errors(a) >= 1

    run(body, config)


@pytest.mark.parametrize("mode", list(StorageFailureMode))
def test_a_hung_redis_costs_the_timeout_not_the_request(redis_server: RedisServer, mode: StorageFailureMode) -> None:
    """A frozen Redis accepts connections and never answers: --rate-limit-timeout ends the wait."""
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=1, storage_failure=mode,
                      storage_timeout_s=0.2)

    async def body(a: SharedRateLimiter) -> None:
        redis_server.pause()  # the kernel still accepts the connection; the command is never answered
        try:
            if mode is StorageFailureMode.OPEN:
                await a.charge("k", 1)
            else:
                with pytest.raises(Unavailable):
                    await a.charge("k", 1)
            assert storage_errors(a) == 1
        finally:
            redis_server.resume()

    run(body, config)


def test_limits_hold_again_once_redis_answers_again(redis_server: RedisServer) -> None:
    config = settings(redis_server, requests_per_s=TINY_RATE, request_burst=1, storage_timeout_s=1.0)

    async def body(a: SharedRateLimiter) -> None:
        await a.charge("k", 1)
        redis_server.pause()
        await a.charge("k", 1)  # fail open
        redis_server.resume()
        # Redis is asked again a second after the failure: wait for that event, not for a time.
        async with asyncio.timeout(60):
            while await admitted(a, "k", 1):
                assert unchecked(a, "admitted") >= 1
                await asyncio.sleep(0.05)

    run(body, config)


# --- two real gateway processes ----------------------------------------------------------------

@pytest.fixture
def upstreams(tokenizer_server: ServerThread,
              scripted: tuple[ScriptedInference, ServerThread]) -> tuple[str, str]:
    return tokenizer_server.address, scripted[1].address


def gateway_process(upstreams: tuple[str, str], *flags: str) -> ServiceProcess:
    return ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", upstreams[0],
                           "--inference", upstreams[1], *flags],
                          env={"LLMSUITE_API_KEYS": "shared-key"})


KEY = (("authorization", "Bearer shared-key"),)
REQUEST = pb.GenerateRequest(model="tiny", prompt="hi", sampling=common_pb2.SamplingParams(max_new_tokens=1))


def generate(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            gateway_pb2_grpc.GatewayServiceStub(channel).Generate(REQUEST, metadata=KEY, timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_two_gateway_processes_share_one_keys_limit(redis_server: RedisServer, upstreams: tuple[str, str]) -> None:
    # A generous bound: on a busy machine a slow answer must not turn into a fail-open admission.
    flags = ("--rate-limit-rps", str(TINY_RATE), "--rate-limit-burst", "3", "--rate-limit-storage", redis_server.url,
             "--rate-limit-timeout", "30")
    with processes(gateway_process(upstreams, *flags), gateway_process(upstreams, *flags)) as (a, b):
        codes = [generate(gw.address) for _ in range(4) for gw in (a, b)]
        assert codes.count(grpc.StatusCode.OK) == 3, codes  # each alone would admit 3: 6 in all
        assert set(codes[3:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        with grpc.insecure_channel(b.address) as channel, pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayServiceStub(channel).Generate(REQUEST, metadata=KEY, timeout=60)
        details = error_details(err.value)
        assert details["reason"] == "RATE_LIMITED" and details["retry_after_s"] > 0


def test_a_gateway_failing_closed_answers_unavailable_with_the_reason(redis_server: RedisServer,
                                                                      upstreams: tuple[str, str]) -> None:
    redis_server.stop()
    flags = ("--rate-limit-rps", "1", "--rate-limit-storage", redis_server.url, "--rate-limit-fail", "closed")
    with processes(gateway_process(upstreams, *flags)) as (gw,):
        with grpc.insecure_channel(gw.address) as channel, pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayServiceStub(channel).Generate(REQUEST, metadata=KEY, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(err.value)["reason"] == "RATE_LIMIT_STORAGE_UNAVAILABLE"
        scraped = scrape(metrics_port(gw))
        assert scraped.get("llmsuite_gateway_rate_limit_unchecked_total", outcome="refused") == 1
        assert scraped.get("llmsuite_gateway_rate_limit_storage_errors_total", operation="charge") == 1
        assert scraped.value("llmsuite_gateway_rate_limited_total") is None, "not a refusal by the limits"


def test_a_gateway_refuses_to_start_with_a_storage_it_cannot_use() -> None:
    result = subprocess.run([str(BIN / "llmsuite-gateway"), "--rate-limit-rps", "1", "--rate-limit-storage",
                             "memcached://user:s3cret@h:1"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--rate-limit-storage must be a redis://" in result.stderr and "s3cret" not in result.stderr
