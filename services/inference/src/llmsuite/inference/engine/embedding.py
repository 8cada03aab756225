"""Per-model embedding queue: inputs from concurrent callers packed into shared forwards.

Callers submit jobs (a list of inputs each); the queue's own worker thread runs one
forward at a time. A round takes the oldest queued inputs in arrival order up to
`embed_batch_tokens` real tokens, sorts them by length so rows of one forward have similar
lengths (little padding), and cuts the sorted run into forwards of at most
`embed_batch_tokens` padded tokens (rows x longest row). Every input of the round is
embedded before the next round starts, so nothing is overtaken for ever, and a forward is
never bigger than the budget (one input longer than the budget runs alone). A job is
delivered when its last input is done.

The queue holds at most `embed_max_queued_inputs` inputs; beyond that a job is refused at
once with RESOURCE_EXHAUSTED and a retry delay estimated from recent forwards. Memory is
accounted where it is held: each queued input's id array, the finished vectors a job has
not delivered yet, and the current forward's input and output arrays report their bytes.
Nothing is cached between requests.

Embedding models and generation models on one replica each have their own worker; every
worker runs one forward at a time and each embedding forward is bounded by the budget, so
the cores are shared forward by forward and a large embedding request cannot hold a
generation step back by more than one forward's worth of contention.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmsuite.inference.engine.encoder import OnnxEncoder, PoolingOverride, normalized
from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.types import EngineSettings, EngineStats, ModelInfo, StepReport
from llmsuite.runtime.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

logger = logging.getLogger(__name__)

MAX_INPUTS_PER_REQUEST = 2048  # as OpenAI's embeddings endpoint


@dataclass(frozen=True)
class EmbeddingResult:
    """One job's vectors (float32 [inputs, dimensions]) and the tokens it fed the model."""

    vectors: np.ndarray
    prompt_tokens: int


EmbeddingDelivery = Callable[[EmbeddingResult | BaseException], None]


@dataclass(eq=False)
class EmbeddingJob:
    """One Embed call in flight: its inputs, the vectors finished so far, how to answer."""

    inputs: list[np.ndarray]
    dimensions: int
    deadline: float | None
    deliver: EmbeddingDelivery
    vectors: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    finished: bool = False


@dataclass(eq=False)
class _Row:
    job: EmbeddingJob
    index: int

    @property
    def ids(self) -> np.ndarray:
        return self.job.inputs[self.index]


def plan_forwards(lengths: Sequence[int], budget_tokens: int) -> list[list[int]]:
    """Indexes of `lengths` (one round, already within the budget in real tokens) grouped into
    forwards: shortest first, each group's rows x longest row <= budget_tokens (a row longer than
    the budget alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    forwards: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > budget_tokens:
            forwards.append(current)
            current = []
        current.append(i)
    if current:
        forwards.append(current)
    return forwards


def load_embedding_model(name: str, directory: Path, settings: EngineSettings, *,
                         step_observer: Callable[[StepReport], None] | None = None) -> EmbeddingQueue:
    """Loads an embedding export, warms it up and starts its queue; raises ModelLoadError naming the model."""
    try:
        spec = dict(settings.pooling).get(name)
        override = PoolingOverride.parse(spec) if spec is not None else None
        encoder = OnnxEncoder.load(directory, settings, override)
        if settings.warmup:
            encoder.embed([np.zeros(min(8, encoder.config.context_length), dtype=np.int64)])
    except (ModelLoadError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from exc
    queue = EmbeddingQueue(name, encoder, settings, step_observer=step_observer)
    queue.start()
    logger.info("loaded embedding model %s from %s on %s (%d dimensions, %s pooling%s, context %d)", name, directory,
                encoder.placement.execution_provider, encoder.dimensions, encoder.pooling.mode,
                ", normalized" if encoder.pooling.normalize else "", encoder.config.context_length)
    return queue


def embedding_model_info(name: str, encoder: OnnxEncoder) -> ModelInfo:
    config = encoder.config
    return ModelInfo(
        name=name, architecture=config.architecture, execution_provider=encoder.placement.execution_provider,
        device=encoder.placement.description, context_length=config.context_length, vocab_size=config.vocab_size,
        num_layers=config.num_layers, num_attention_heads=config.num_attention_heads, num_kv_heads=0, head_dim=0,
        kv_dtype="", uses_position_ids="position_ids" in encoder.signature.input_names, eos_token_ids=(),
        bos_token_id=None, tokenizer_hash=tokenizer_content_hash(encoder.directory), directory=encoder.directory,
        kind="embedding", embedding_dimensions=encoder.dimensions, pooling=encoder.pooling.mode,
        normalize=encoder.pooling.normalize)


class EmbeddingQueue:
    """Owns one embedding model's queue and worker thread; see the module docstring."""

    def __init__(self, name: str, encoder: OnnxEncoder, settings: EngineSettings, *,
                 step_observer: Callable[[StepReport], None] | None = None) -> None:
        self.name = name
        self.encoder = encoder
        self.info = embedding_model_info(name, encoder)
        self.settings = settings
        self.budget_tokens = settings.embed_batch_tokens
        self.max_queued = settings.embed_max_queued_inputs
        self._observer = step_observer
        self._cond = threading.Condition()
        self._queue: deque[_Row] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._forward_rows = 0  # rows of the forward running now
        self._forward_bytes = 0  # its input and output arrays
        self._pending_bytes = 0  # finished vectors not delivered yet
        self._queued_bytes = 0  # ids of queued inputs
        self._forward_s = 0.0  # moving average
        self._counters = dict(total_requests=0, completed=0, cancelled=0, time_limited=0, rejected_overloaded=0,
                              steps=0, last_rows=0)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"embedding-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking: lets the running forward finish, then fails every queued job with UNAVAILABLE."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            jobs = {id(row.job): row.job for row in self._queue}
            self._queue.clear()
            self._queued_bytes = 0
        for job in jobs.values():
            self._fail(job, Unavailable("the engine is shutting down", reason="ENGINE_STOPPING"))

    # ---- submitting ------------------------------------------------------------------

    def submit(self, inputs: Sequence[Sequence[int]], *, dimensions: int, truncate: bool, deadline: float | None,
               deliver: EmbeddingDelivery) -> EmbeddingJob:
        """Validates and queues a job; raises the caller-facing error instead when it cannot run."""
        arrays = self._validated(inputs, dimensions, truncate)
        job = EmbeddingJob(arrays, dimensions or self.encoder.dimensions, deadline, deliver,
                           vectors=[None] * len(arrays), remaining=len(arrays))
        with self._cond:
            if self._stopping:
                raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING")
            if deadline is not None and deadline <= time.monotonic():
                raise DeadlineExceeded("the deadline passed before the request was queued", reason="DEADLINE_TOO_SHORT")
            if len(self._queue) + len(arrays) > self.max_queued:
                self._counters["rejected_overloaded"] += 1
                raise ResourceExhausted(
                    f"model {self.name!r} has {len(self._queue)} inputs queued; {len(arrays)} more would pass "
                    f"its limit of {self.max_queued}",
                    reason="ENGINE_OVERLOADED", retry_after_s=self._retry_after_s(),
                    metadata={"model": self.name, "max_queued_inputs": str(self.max_queued)})
            self._queue.extend(_Row(job, i) for i in range(len(arrays)))
            self._queued_bytes += sum(a.nbytes for a in arrays)
            self._counters["total_requests"] += 1
            self._cond.notify_all()
        return job

    def _validated(self, inputs: Sequence[Sequence[int]], dimensions: int, truncate: bool) -> list[np.ndarray]:
        limit, vocab = self.encoder.config.context_length, self.encoder.config.vocab_size
        if not inputs:
            raise InvalidArgument.for_field("inputs", "at least one input is required", reason="EMPTY_INPUT")
        most = min(MAX_INPUTS_PER_REQUEST, self.max_queued)
        if len(inputs) > most:
            raise InvalidArgument.for_field("inputs", f"{len(inputs)} inputs exceeds the limit of {most} per request",
                                            reason="TOO_MANY_INPUTS", limit=str(most))
        if not 0 <= dimensions <= self.encoder.dimensions:
            raise InvalidArgument.for_field("dimensions", f"must be in [1, {self.encoder.dimensions}] (the model's "
                                            f"vector length), or 0 for all; got {dimensions}",
                                            reason="DIMENSIONS_OUT_OF_RANGE", limit=str(self.encoder.dimensions))
        arrays = []
        for i, ids in enumerate(inputs):
            array = np.asarray(ids, dtype=np.int64)
            if array.size == 0:
                raise InvalidArgument.for_field(f"inputs[{i}].token_ids", "an input needs at least one token id",
                                                reason="EMPTY_INPUT")
            if array.size > limit:
                if not truncate:
                    raise InvalidArgument.for_field(
                        f"inputs[{i}].token_ids", f"{array.size} tokens exceeds the model's maximum length {limit}; "
                        "shorten it or ask for truncation", reason="INPUT_TOO_LONG", limit=str(limit))
                array = array[:limit]
            if int(array.max()) >= vocab:
                raise InvalidArgument.for_field(f"inputs[{i}].token_ids", f"ids must be below the vocabulary size "
                                                f"{vocab}; got {int(array.max())}", reason="TOKEN_ID_OUT_OF_RANGE",
                                                limit=str(vocab))
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def cancel(self, job: EmbeddingJob) -> None:
        """Thread-safe: the job's queued inputs leave the queue; a forward already running finishes."""
        with self._cond:
            if job.finished:
                return
            job.cancelled = job.finished = True
            self._drop_queued(job)
            self._counters["cancelled"] += 1
            self._pending_bytes -= sum(v.nbytes for v in job.vectors if v is not None)
            job.vectors = []

    def _drop_queued(self, job: EmbeddingJob) -> None:
        kept = deque(row for row in self._queue if row.job is not job)
        self._queued_bytes -= sum(row.ids.nbytes for row in self._queue if row.job is job)
        self._queue = kept

    def _retry_after_s(self) -> float:
        rounds = max(1, len(self._queue) // 64)
        return min(60.0, max(0.1, rounds * max(self._forward_s, 0.01)))

    # ---- the worker ------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                rows = self._take_round()
            try:
                self._run_round(rows)
            except Exception:  # a bug here must not kill the worker silently
                logger.exception("embedding queue %s: round failed", self.name)

    def _take_round(self) -> list[_Row]:
        """The oldest queued inputs up to the token budget (at least one); expired jobs fail here."""
        now = time.monotonic()
        rows: list[_Row] = []
        tokens = 0
        while self._queue:
            row = self._queue[0]
            job = row.job
            if job.deadline is not None and job.deadline <= now and not job.finished:
                self._drop_queued(job)
                self._counters["time_limited"] += 1
                self._fail(job, DeadlineExceeded("the deadline passed while the request was queued",
                                                 reason="DEADLINE_TOO_SHORT"))
                continue
            if rows and tokens + len(row.ids) > self.budget_tokens:
                break
            self._queue.popleft()
            self._queued_bytes -= row.ids.nbytes
            rows.append(row)
            tokens += len(row.ids)
        return rows

    def _run_round(self, rows: list[_Row]) -> None:
        for group in plan_forwards([len(r.ids) for r in rows], self.budget_tokens):
            live = [rows[i] for i in group if not rows[i].job.finished]
            if not live:
                continue
            arrays = [row.ids for row in live]
            longest = max(len(a) for a in arrays)
            with self._cond:
                self._forward_rows = len(live)
                # ids, mask and type ids in, token states out: what this forward keeps alive.
                self._forward_bytes = len(live) * longest * (3 * 8 + 4 * self.encoder.dimensions)
            started = time.perf_counter()
            try:
                vectors = self.encoder.embed(arrays)
            except Exception as exc:  # the model failed: fail these jobs, keep serving the others
                logger.exception("model %s: embedding forward failed", self.name)
                with self._cond:
                    for job in {id(r.job): r.job for r in live}.values():
                        self._drop_queued(job)
                        self._fail(job, exc)
                continue
            finally:
                with self._cond:
                    self._forward_rows = self._forward_bytes = 0
            elapsed = time.perf_counter() - started
            self._record(live, vectors, elapsed, sum(len(a) for a in arrays))

    def _record(self, rows: list[_Row], vectors: np.ndarray, elapsed: float, tokens: int) -> None:
        done: list[EmbeddingJob] = []
        with self._cond:
            self._counters["steps"] += 1
            self._counters["last_rows"] = len(rows)
            self._forward_s = elapsed if self._forward_s == 0.0 else 0.9 * self._forward_s + 0.1 * elapsed
            for row, vector in zip(rows, vectors, strict=True):
                job = row.job
                if job.finished:
                    continue
                job.vectors[row.index] = vector
                self._pending_bytes += vector.nbytes
                job.remaining -= 1
                if job.remaining == 0:
                    job.finished = True
                    self._pending_bytes -= sum(v.nbytes for v in job.vectors if v is not None)
                    self._counters["completed"] += 1
                    done.append(job)
        for job in done:
            self._deliver(job)
        if self._observer is not None:
            try:
                self._observer(StepReport(self.name, 0, 0, tokens, elapsed, 1))
            except Exception:  # metrics must never stop the queue
                logger.exception("embedding queue %s: step observer failed", self.name)

    def _deliver(self, job: EmbeddingJob) -> None:
        full = np.stack([v for v in job.vectors if v is not None])
        job.vectors = []
        vectors = full[:, :job.dimensions]
        if job.dimensions < full.shape[1] and self.encoder.pooling.normalize:
            vectors = normalized(vectors)  # Matryoshka: a shortened unit vector is made unit again
        job.deliver(EmbeddingResult(np.ascontiguousarray(vectors), sum(len(a) for a in job.inputs)))

    def _fail(self, job: EmbeddingJob, error: BaseException) -> None:
        """Answers `error` once, unless the job already ended (delivered, failed or cancelled)."""
        with self._cond:
            if job.finished:
                return
            job.finished = True
            self._pending_bytes -= sum(v.nbytes for v in job.vectors if v is not None)
            job.vectors = []
        job.deliver(error)

    # ---- stats -----------------------------------------------------------------------

    def held_bytes(self) -> int:
        with self._cond:
            return self._queued_bytes + self._pending_bytes + self._forward_bytes

    def budget_bytes(self) -> int:
        """The most this queue can hold: a full queue of maximal inputs, one forward, their vectors."""
        limit = self.encoder.config.context_length
        return (self.max_queued * limit * 8 + self.budget_tokens * (3 * 8 + 4 * self.encoder.dimensions)
                + self.max_queued * 4 * self.encoder.dimensions)

    def stats(self) -> EngineStats:
        with self._cond:
            c = self._counters
            held = self._queued_bytes + self._pending_bytes + self._forward_bytes
            return EngineStats(
                model=self.name, running=self._forward_rows, queued=len(self._queue), sessions=0, cached_tokens=0,
                kv_bytes=held, kv_budget_bytes=self.budget_bytes(), kv_reserved_bytes=held, prefix_cache_entries=0,
                total_requests=c["total_requests"], completed=c["completed"], cancelled=c["cancelled"],
                time_limited=c["time_limited"], rejected_overloaded=c["rejected_overloaded"],
                prefix_cache_evictions=0, prefix_cache_hit_tokens=0, prefix_cache_query_tokens=0, steps=c["steps"],
                decode_rows=c["last_rows"])
