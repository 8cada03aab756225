"""Prometheus metrics of the inference service (listed in docs/metrics.md).

Three sources, so nothing is counted twice and nothing can drift:
- per turn, in the servicer: each turn's TurnResult (latencies, token counts) and
  the arrival of each token (inter-token latency), via `observe_turn`;
- per scheduler step, from the scheduler's worker thread: `observe_step`;
- at scrape time, the engine's own stats (the numbers GetModelInfo reports):
  running and queued requests, sessions, KV cache, totals since load.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmsuite.inference.engine import EngineStats, GeneratedToken, ModelInfo, TurnResult
from llmsuite.inference.engine.types import StepReport
from llmsuite.runtime.errors import DeadlineExceeded, LlmsuiteError, ResourceExhausted, Unavailable

# A first token waits for the queue and the whole prefill: milliseconds to tens of seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
# One decode step apart: a few milliseconds, up to the occasional stall behind a prefill chunk.
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                       0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
                2.5)
BATCH_ROWS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
STEP_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# Errors the engine uses to refuse work it cannot take (by their stable reason).
_REJECTIONS = (ResourceExhausted, DeadlineExceeded, Unavailable)
# Reasons of turns the model or the engine failed (docs/errors.md), whenever they struck.
FAULT_REASONS = frozenset({"NUMERIC_ERROR", "MODEL_ERROR", "OUT_OF_MEMORY", "ENGINE_FAILED"})


class InferenceMetrics:
    """The inference service's metric objects; `collectors()` goes to the server's registry.

    `engine` returns the engine, read at scrape time (None until models are loaded).
    """

    def __init__(self, engine: Callable[[], Any]) -> None:
        model = ("model",)
        self.time_to_first_token = Histogram(
            "llmsuite_inference_time_to_first_token_seconds",
            "From a turn's submission to its first generated token (queue + prefill + first sample).",
            model, buckets=TTFT_BUCKETS, registry=None)
        self.inter_token_latency = Histogram(
            "llmsuite_inference_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a turn, as the servicer receives them.",
            model, buckets=INTER_TOKEN_BUCKETS, registry=None)
        self.request_latency = Histogram(
            "llmsuite_inference_request_duration_seconds",
            "From a turn's submission to its end, whatever ended it (end-to-end latency).",
            model, buckets=REQUEST_BUCKETS, registry=None)
        self.queue_time = Histogram(
            "llmsuite_inference_queue_time_seconds",
            "From a turn's submission to its first forward (time spent queued).",
            model, buckets=QUEUE_BUCKETS, registry=None)
        self.prefill_time = Histogram(
            "llmsuite_inference_prefill_seconds",
            "Time a turn spent in its prefill forwards.",
            model, buckets=QUEUE_BUCKETS, registry=None)
        self.prompt_tokens = Counter(
            "llmsuite_inference_prompt_tokens",
            "Prompt tokens finished turns computed (their context minus cached tokens).", model, registry=None)
        self.cached_tokens = Counter(
            "llmsuite_inference_cached_tokens",
            "Context tokens of finished turns whose KV cache was reused instead of recomputed.",
            model, registry=None)
        self.generated_tokens = Counter(
            "llmsuite_inference_generation_tokens", "Tokens generated, counted as they are produced.",
            model, registry=None)
        self.rejected = Counter(
            "llmsuite_inference_requests_rejected",
            "Turns or sessions refused before they ran, by reason (ENGINE_OVERLOADED, "
            "TOO_MANY_SESSIONS, DEADLINE_TOO_SHORT, ENGINE_STOPPING).", ("model", "reason"), registry=None)
        self.failed = Counter(
            "llmsuite_inference_requests_failed",
            "Turns the model or the engine failed, by reason (NUMERIC_ERROR, MODEL_ERROR, OUT_OF_MEMORY, "
            "ENGINE_FAILED), before or after their first token.", ("model", "reason"), registry=None)
        self.batch_size = Histogram(
            "llmsuite_inference_batch_size",
            "Rows (sequences) decoded together in one scheduler step, for steps that decoded.",
            model, buckets=BATCH_ROWS_BUCKETS, registry=None)
        self.step_tokens = Histogram(
            "llmsuite_inference_step_tokens",
            "Tokens fed in one scheduler step: prompt tokens prefilled plus one per decoding row.",
            model, buckets=STEP_TOKENS_BUCKETS, registry=None)
        self.step_duration = Histogram(
            "llmsuite_inference_step_duration_seconds", "Wall time of one scheduler step's model work.",
            model, buckets=STEP_BUCKETS, registry=None)
        self._engine_stats = EngineStatsCollector(engine)

    def collectors(self) -> Sequence[Collector]:
        return (self.time_to_first_token, self.inter_token_latency, self.request_latency, self.queue_time,
                self.prefill_time, self.prompt_tokens, self.cached_tokens, self.generated_tokens, self.rejected,
                self.failed, self.batch_size, self.step_tokens, self.step_duration, self._engine_stats)

    def observe_step(self, step: StepReport) -> None:
        """The engine's step observer: called on a scheduler's worker thread after
        every step that ran the model."""
        if step.decode_rows:
            self.batch_size.labels(step.model).observe(step.decode_rows)
        self.step_tokens.labels(step.model).observe(step.prefill_tokens + step.decode_rows)
        self.step_duration.labels(step.model).observe(step.seconds)

    def rejected_by_engine(self, model: str, error: LlmsuiteError) -> None:
        """Counts `error` if it is the engine refusing work (not a caller's mistake)."""
        if isinstance(error, _REJECTIONS):
            self.rejected.labels(model, error.reason).inc()

    async def observe_turn(self, model: str, items: AsyncIterator[GeneratedToken | TurnResult]
                           ) -> AsyncIterator[GeneratedToken | TurnResult]:
        """Passes a turn's items through, observing each token's arrival and the
        final TurnResult; a refusal raised before the first item is counted."""
        last_token_at: float | None = None
        started = False
        try:
            async for item in items:
                started = True
                if isinstance(item, TurnResult):
                    self._finished(model, item)
                else:
                    now = time.perf_counter()
                    if last_token_at is not None:
                        self.inter_token_latency.labels(model).observe(now - last_token_at)
                    last_token_at = now
                    self.generated_tokens.labels(model).inc()
                yield item
        except LlmsuiteError as exc:
            if exc.reason in FAULT_REASONS:
                self.failed.labels(model, exc.reason).inc()
            elif not started:
                self.rejected_by_engine(model, exc)
            raise

    def _finished(self, model: str, result: TurnResult) -> None:
        timings, usage = result.timings, result.usage
        if usage.completion_tokens:
            self.time_to_first_token.labels(model).observe(timings.time_to_first_token_s)
        self.request_latency.labels(model).observe(timings.total_s)
        self.queue_time.labels(model).observe(timings.queue_s)
        self.prefill_time.labels(model).observe(timings.prefill_s)
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.cached_tokens.labels(model).inc(usage.cached_tokens)


class EngineStatsCollector(Collector):
    """Gauges and totals read from `engine.stats(model)` at scrape time: the same
    snapshot GetModelInfo returns, so the two always agree."""

    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Any]:
        return ()  # families depend on the loaded models; collected only at scrape time

    def collect(self) -> Iterable[Any]:
        engine = self._engine()
        infos: list[ModelInfo] = sorted(engine.list_models(), key=lambda i: i.name) if engine is not None else []
        stats: list[EngineStats] = [engine.stats(i.name) for i in infos]

        def gauge(name: str, doc: str, value: Callable[[EngineStats], float | None]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=("model",))
            for s in stats:
                v = value(s)
                if v is not None:
                    family.add_metric((s.model,), v)
            return family

        def total(name: str, doc: str, value: Callable[[EngineStats], int]) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=("model",))
            for s in stats:
                family.add_metric((s.model,), value(s))
            return family

        info = GaugeMetricFamily("llmsuite_inference_model_info",
                                 "Loaded models, where they run and what their files hold (always 1).",
                                 labels=("model", "architecture", "execution_provider", "device", "layout",
                                         "precision", "quantization", "attention"))
        for i in infos:
            info.add_metric((i.name, i.architecture, i.execution_provider, i.device, i.layout, i.precision,
                             i.quantization, i.attention), 1)
        yield info
        yield gauge("llmsuite_inference_running_requests", "Turns generating now (rows in the running batch).",
                    lambda s: s.running)
        yield gauge("llmsuite_inference_queued_requests", "Turns waiting to be admitted.", lambda s: s.queued)
        yield gauge("llmsuite_inference_sessions", "Open multi-turn sessions.", lambda s: s.sessions)
        yield gauge("llmsuite_inference_kv_cache_tokens",
                    "Tokens whose KV is held now: running requests and the prefix cache.", lambda s: s.cached_tokens)
        yield gauge("llmsuite_inference_kv_cache_bytes", "Bytes of KV cache held now (batch padding included).",
                    lambda s: s.kv_bytes)
        yield gauge("llmsuite_inference_kv_cache_budget_bytes", "The KV cache budget admission works against.",
                    lambda s: s.kv_budget_bytes)
        yield gauge("llmsuite_inference_kv_cache_reserved_bytes",
                    "KV bytes reserved now: what admitted requests may grow to, plus the prefix cache.",
                    lambda s: s.kv_reserved_bytes)
        # Slot-buffer models only: a padded-layout model has no slots and no sample here.
        slotted = [i for i in infos if i.kv_slots]
        slots = GaugeMetricFamily("llmsuite_inference_kv_cache_slots",
                                  "KV slots of the preallocated slot buffer: the most requests running at once.",
                                  labels=("model",))
        slot_tokens = GaugeMetricFamily("llmsuite_inference_kv_cache_slot_tokens",
                                        "Tokens each KV slot holds (--max-model-len or the model's context).",
                                        labels=("model",))
        for i in slotted:
            slots.add_metric((i.name,), i.kv_slots)
            slot_tokens.add_metric((i.name,), i.kv_slot_tokens)
        yield slots
        yield slot_tokens
        has_slots = {i.name for i in slotted}
        yield gauge("llmsuite_inference_kv_cache_free_slots", "KV slots no request holds now (slot-buffer models).",
                    lambda s: s.free_kv_slots if s.model in has_slots else None)
        yield gauge("llmsuite_inference_prefix_cache_entries", "Finished sequences whose KV the prefix cache holds.",
                    lambda s: s.prefix_cache_entries)
        yield gauge("llmsuite_inference_kv_cache_usage_ratio",
                    "Reserved / budget: at 1, new requests wait in the queue.", _kv_usage)
        yield total("llmsuite_inference_requests", "Turns accepted since load.", lambda s: s.total_requests)
        yield total("llmsuite_inference_requests_completed",
                    "Turns that ended on their own (stop, length, context full).", lambda s: s.completed)
        yield total("llmsuite_inference_requests_cancelled", "Turns cancelled (by the client or a stop string).",
                    lambda s: s.cancelled)
        yield total("llmsuite_inference_requests_time_limited", "Turns ended by their deadline mid-generation.",
                    lambda s: s.time_limited)
        yield total("llmsuite_inference_prefix_cache_evictions", "Prefix-cache entries dropped (idle timeout or "
                    "room for other requests).", lambda s: s.prefix_cache_evictions)
        yield total("llmsuite_inference_prefix_cache_hit_tokens",
                    "Prompt tokens whose KV came from the prefix cache instead of a prefill.",
                    lambda s: s.prefix_cache_hit_tokens)
        yield total("llmsuite_inference_prefix_cache_query_tokens",
                    "Prompt tokens of admitted turns (hit rate = hit_tokens / query_tokens).",
                    lambda s: s.prefix_cache_query_tokens)


def _kv_usage(stats: EngineStats) -> float | None:
    return stats.kv_reserved_bytes / stats.kv_budget_bytes if stats.kv_budget_bytes else None
