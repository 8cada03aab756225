"""Inference metrics scraped from a live server: they move as requests run and
agree with what GetModelInfo reports."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from metrics_scrape import Scrape, scrape, scrape_until
from prometheus_client import CollectorRegistry
from support import ServerThread

from llmsuite.common.v1 import common_pb2
from llmsuite.inference.engine import EngineSettings, EngineStats
from llmsuite.inference.metrics import InferenceMetrics
from llmsuite.inference.service import InferenceApp
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc
from llmsuite.runtime.settings import ServerSettings

PROMPT = [1, *range(40, 59)]  # 20 ids: long enough (a 16-token block) for the prefix cache to keep


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    engine = EngineSettings(device="cpu", intra_op_threads=1, max_running=2, max_queued=2, max_sessions=1,
                            session_idle_timeout_s=60)
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text",
                              metrics_listen="127.0.0.1:0")
    with ServerThread(InferenceApp({"tiny": tiny_model_dir}, engine), settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch)


def start(max_new_tokens: int = 8, *, session: bool = False) -> pb.GenerateRequest:
    return pb.GenerateRequest(start=pb.GenerateStart(
        model="tiny", prompt_token_ids=PROMPT, session=session,
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)))


def model_stats(stub) -> pb.ModelStats:
    return stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info.stats


def tiny(result: Scrape, name: str) -> float:
    return result.get(name, model="tiny")


def assert_agrees_with_model_info(result: Scrape, stats: pb.ModelStats) -> None:
    assert tiny(result, "llmsuite_inference_running_requests") == stats.running
    assert tiny(result, "llmsuite_inference_queued_requests") == stats.queued
    assert tiny(result, "llmsuite_inference_sessions") == stats.sessions
    assert tiny(result, "llmsuite_inference_kv_cache_tokens") == stats.cached_tokens
    assert tiny(result, "llmsuite_inference_kv_cache_bytes") == stats.kv_cache_bytes
    assert tiny(result, "llmsuite_inference_requests_total") == stats.requests_total
    assert tiny(result, "llmsuite_inference_requests_cancelled_total") == stats.cancelled_total
    assert tiny(result, "llmsuite_inference_requests_time_limited_total") == stats.time_limited_total
    assert tiny(result, "llmsuite_inference_kv_cache_budget_bytes") == stats.kv_cache_budget_bytes > 0
    assert tiny(result, "llmsuite_inference_kv_cache_usage_ratio") == pytest.approx(
        stats.kv_cache_reserved_bytes / stats.kv_cache_budget_bytes)
    assert tiny(result, "llmsuite_inference_prefix_cache_entries") == stats.prefix_cache_entries
    assert tiny(result, "llmsuite_inference_prefix_cache_hit_tokens_total") == stats.prefix_cache_hit_tokens_total
    assert tiny(result, "llmsuite_inference_prefix_cache_evictions_total") == stats.prefix_cache_evictions_total


class Conversation:
    """A session stream driven message by message from the test thread."""

    def __init__(self, stub) -> None:
        self._outbox: queue.Queue[pb.GenerateRequest | None] = queue.Queue()
        self.responses = stub.Generate(iter(self._outbox.get, None))

    def send(self, request: pb.GenerateRequest) -> None:
        self._outbox.put(request)

    def until_final(self) -> pb.GenerateFinal:
        for response in self.responses:
            if response.WhichOneof("kind") == "final":
                return response.final
        raise AssertionError("the stream ended without a final message")

    def close(self) -> None:
        self._outbox.put(None)
        for _ in self.responses:
            pass


def test_generation_moves_the_per_request_metrics(server, stub):
    port = server.running.metrics_port
    before = scrape(port)
    for _ in range(2):
        finals = [r.final for r in stub.Generate(iter([start(8)])) if r.WhichOneof("kind") == "final"]
        assert finals[0].usage.completion_tokens == 8
    after = scrape_until(port, lambda r: r.get("llmsuite_grpc_server_handled_total", grpc_method="Generate",
                                               grpc_code="OK") >= before.get(
        "llmsuite_grpc_server_handled_total", grpc_method="Generate", grpc_code="OK") + 2)

    def moved(name: str) -> float:
        return tiny(after, name) - tiny(before, name)

    assert moved("llmsuite_inference_generation_tokens_total") == 16
    # The second run of the same prompt reuses its KV: computed + cached is the whole prompt both times.
    assert moved("llmsuite_inference_prompt_tokens_total") + moved("llmsuite_inference_cached_tokens_total") == \
        2 * len(PROMPT)
    assert moved("llmsuite_inference_cached_tokens_total") == len(PROMPT) - 1
    assert moved("llmsuite_inference_time_to_first_token_seconds_count") == 2
    assert moved("llmsuite_inference_inter_token_latency_seconds_count") == 2 * 7  # between 8 tokens: 7 gaps
    assert moved("llmsuite_inference_request_duration_seconds_count") == 2
    assert moved("llmsuite_inference_queue_time_seconds_count") == 2
    assert moved("llmsuite_inference_requests_total") == 2
    assert moved("llmsuite_inference_requests_completed_total") == 2
    assert moved("llmsuite_inference_time_to_first_token_seconds_sum") > 0
    assert tiny(after, "llmsuite_inference_request_duration_seconds_sum") >= \
        tiny(after, "llmsuite_inference_time_to_first_token_seconds_sum")
    info = after.samples_named("llmsuite_inference_model_info")
    assert [s.labels["model"] for s in info] == ["tiny"] and info[0].labels["execution_provider"]
    assert (info[0].labels["layout"], info[0].labels["precision"], info[0].labels["quantization"],
            info[0].labels["attention"]) == ("optimum", "fp32", "none", "unfused")
    assert_agrees_with_model_info(after, model_stats(stub))


def test_sessions_kv_cache_and_rejections_agree_with_model_info(server, stub):
    port = server.running.metrics_port
    conversation = Conversation(stub)
    try:
        conversation.send(start(4, session=True))
        conversation.until_final()
        held = scrape(port)
        stats = model_stats(stub)
        assert stats.sessions == 1 and stats.kv_cache_bytes > 0
        assert_agrees_with_model_info(held, stats)

        # max_sessions=1: a second session is refused, and counted by its reason.
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(iter([start(4, session=True)])))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert scrape(port).get("llmsuite_inference_requests_rejected_total", model="tiny",
                                reason="TOO_MANY_SESSIONS") == 1

        cached_before = tiny(scrape(port), "llmsuite_inference_cached_tokens_total")
        conversation.send(pb.GenerateRequest(turn=pb.GenerateTurn(token_ids=[50, 51])))
        final = conversation.until_final()
        assert final.usage.cached_tokens > 0
        assert tiny(scrape(port), "llmsuite_inference_cached_tokens_total") == cached_before + \
            final.usage.cached_tokens
    finally:
        conversation.close()
    closed = scrape_until(port, lambda r: tiny(r, "llmsuite_inference_sessions") == 0)
    assert_agrees_with_model_info(closed, model_stats(stub))


def test_a_cancelled_turn_is_counted_as_cancelled(server, stub):
    port = server.running.metrics_port
    before = tiny(scrape(port), "llmsuite_inference_requests_cancelled_total")
    conversation = Conversation(stub)
    try:
        conversation.send(start(400))
        first = next(conversation.responses)
        assert first.WhichOneof("kind") == "tokens"
        conversation.send(pb.GenerateRequest(cancel=pb.GenerateCancel()))
        final = conversation.until_final()
        assert final.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    finally:
        conversation.close()
    after = scrape_until(port, lambda r: tiny(r, "llmsuite_inference_requests_cancelled_total") > before)
    assert tiny(after, "llmsuite_inference_requests_cancelled_total") == before + 1
    assert_agrees_with_model_info(after, model_stats(stub))


@dataclass
class _StubEngine:
    """Just enough of InferenceEngine for the scrape-time collector."""

    stats_by_model: dict[str, EngineStats]

    def list_models(self):
        return [_Info(name) for name in self.stats_by_model]

    def stats(self, name: str) -> EngineStats:
        return self.stats_by_model[name]


@dataclass
class _Info:
    name: str
    architecture: str = "llama"
    execution_provider: str = "CPUExecutionProvider"
    device: str = "cpu"
    layout: str = "onnxruntime-genai"
    precision: str = "int4"
    quantization: str = "MatMulNBits int4, block 32"
    attention: str = "GroupQueryAttention"
    kv_slots: int = 16
    kv_slot_tokens: int = 512


def _stats(**changes: Any) -> EngineStats:
    """An engine stats snapshot for the scrape-time collector."""
    fields: dict[str, Any] = dict(
        model="m", running=3, queued=2, sessions=1, cached_tokens=100, kv_bytes=6400, kv_budget_bytes=64000,
        kv_reserved_bytes=16000, prefix_cache_entries=4, total_requests=9, completed=4, cancelled=1,
        time_limited=1, rejected_overloaded=0, prefix_cache_evictions=2, prefix_cache_hit_tokens=30,
        prefix_cache_query_tokens=120, steps=50, decode_rows=3, free_kv_slots=13)
    return EngineStats(**{**fields, **changes})


def registry_for(metrics: InferenceMetrics) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in metrics.collectors():
        registry.register(collector)
    return registry


def test_queue_gauges_and_kv_budget_come_from_engine_stats():
    engine = _StubEngine({"m": _stats()})
    value = registry_for(InferenceMetrics(lambda: engine)).get_sample_value
    assert value("llmsuite_inference_running_requests", {"model": "m"}) == 3
    assert value("llmsuite_inference_queued_requests", {"model": "m"}) == 2
    assert value("llmsuite_inference_kv_cache_bytes", {"model": "m"}) == 6400
    assert value("llmsuite_inference_kv_cache_budget_bytes", {"model": "m"}) == 64000
    assert value("llmsuite_inference_kv_cache_reserved_bytes", {"model": "m"}) == 16000
    assert value("llmsuite_inference_kv_cache_usage_ratio", {"model": "m"}) == pytest.approx(0.25)
    assert value("llmsuite_inference_prefix_cache_evictions_total", {"model": "m"}) == 2
    assert value("llmsuite_inference_prefix_cache_hit_tokens_total", {"model": "m"}) == 30
    assert value("llmsuite_inference_prefix_cache_query_tokens_total", {"model": "m"}) == 120
    assert value("llmsuite_inference_kv_cache_slots", {"model": "m"}) == 16
    assert value("llmsuite_inference_kv_cache_slot_tokens", {"model": "m"}) == 512
    assert value("llmsuite_inference_kv_cache_free_slots", {"model": "m"}) == 13


def test_nothing_is_reported_for_models_before_they_load():
    registry = registry_for(InferenceMetrics(lambda: None))
    assert registry.get_sample_value("llmsuite_inference_running_requests", {"model": "m"}) is None


@dataclass(frozen=True)
class _Step:
    model: str
    decode_rows: int
    prefill_tokens: int
    seconds: float


def test_scheduler_steps_are_observed_from_any_thread():
    metrics = InferenceMetrics(lambda: None)
    value = registry_for(metrics).get_sample_value
    decoding = [threading.Thread(target=metrics.observe_step, args=(_Step("m", 4, 100, 0.01),)) for _ in range(8)]
    for t in decoding:
        t.start()
    for t in decoding:
        t.join()
    metrics.observe_step(_Step("m", 0, 256, 0.2))  # a prefill-only step has no decode batch
    assert value("llmsuite_inference_batch_size_count", {"model": "m"}) == 8
    assert value("llmsuite_inference_batch_size_sum", {"model": "m"}) == 32
    assert value("llmsuite_inference_step_tokens_count", {"model": "m"}) == 9
    assert value("llmsuite_inference_step_tokens_sum", {"model": "m"}) == 8 * 104 + 256
    assert value("llmsuite_inference_step_duration_seconds_bucket", {"model": "m", "le": "0.01"}) == 8
