"""Per-model continuous batching: request queue, KV admission, and the worker thread.

The asyncio side only submits, cancels and reads results; every model forward runs on the
scheduler's own worker thread, so the event loop is never blocked by model work. Results
go back through a per-turn `deliver` callback (the engine wraps `loop.call_soon_threadsafe`).

`Scheduler.step()` is one iteration of the batch:
  1. housekeeping under the lock: end cancelled turns and turns whose deadline is near
     (early enough that their final message still reaches the client), evict idle KV,
     admit queued turns FIFO while the KV budget and max_running allow;
  2. retire interrupted rows (their KV leaves the batch, or is kept for their session);
  3. prefill: feed at most `prefill_chunk_tokens` prompt tokens, oldest admitted prompt
     first. Fresh prompts next in line that fit that budget share one left-padded forward
     (of equal length only, for exports that cannot be left-padded); a continuation from
     cached KV, or a prompt longer than the budget, gets a chunk of its own (its unpadded
     KV, positions continuing from its cache). A prompt whose last chunk is fed samples its
     first token and joins the batch;
  4. decode: ONE forward over every decoding row (per length, for exports that cannot be
     left-padded), one token sampled per row, finished rows leave at once.
Prefill and decode share a step instead of alternating whole prompts: running streams
wait at most one chunk for a newcomer, and a newcomer's first token comes after at most
one decode forward.

Every turn that ends (finished, cancelled or timed out) leaves its KV in the prefix cache
(prefix_cache.py), and every admitted turn starts from the longest cached prefix of its token
ids: a session's next turn, a conversation re-sent in full, a retry. The cache changes what
is computed, never the tokens: a turn's output depends only on its ids and sampling.

Threading rule: the lock guards the queues, counters, sessions and the prefix cache. KV
tensors of a batch or of a prefilling turn are touched only by the worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from llmsuite.inference.engine.batch import DecodeBatch
from llmsuite.inference.engine.constraints import RowGrammar
from llmsuite.inference.engine.kv_ops import KvOps
from llmsuite.inference.engine.memory import MemoryGuard
from llmsuite.inference.engine.onnx_model import KvCache, OnnxDecoder
from llmsuite.inference.engine.prefix_cache import CacheEntry, PrefixCache, PrefixHit
from llmsuite.inference.engine.sampling import NonFiniteLogits, TokenSampler, choose_batch
from llmsuite.inference.engine.types import (
    EngineSettings,
    EngineStats,
    FinishReason,
    GeneratedToken,
    SamplingParams,
    StepReport,
    TurnResult,
    TurnTimings,
    TurnUsage,
)
from llmsuite.inference.engine.validation import tokens_to_drop, validate_prompt, validate_sampling
from llmsuite.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LlmsuiteError,
    ResourceExhausted,
    Unavailable,
)

logger = logging.getLogger(__name__)

_COUNTER_FOR_REASON = {FinishReason.CANCELLED: "cancelled", FinishReason.TIME_LIMIT: "time_limited"}

# A turn ends with TIME_LIMIT this long (plus two steps' worth) before its deadline, so its
# final message, carrying everything generated so far, reaches the client in time.
TIME_LIMIT_MARGIN_S = 0.05
# After a step that failed, the engine checks that its model still runs with a one-token
# forward, up to max_step_failures times, waiting this long (doubling) between tries.
PROBE_BACKOFF_S = 0.05
# How ONNX Runtime and CUDA word an allocation that failed (their errors are RuntimeErrors,
# not MemoryError): such a failure is capacity (OUT_OF_MEMORY), not a broken model.
_ALLOCATION_FAILURE_WORDS = ("failed to allocate", "bad_alloc", "out of memory")


@dataclass
class TurnFailed:
    """Delivered instead of a TurnResult when the model itself failed; the stream re-raises it."""

    error: BaseException


Delivery = Callable[[GeneratedToken | TurnResult | TurnFailed], None]
StepObserver = Callable[[StepReport], None]
# Called once, on the worker thread, with a one-line cause, when the engine gives up.
FailureObserver = Callable[[str], None]


class PrefillEstimate:
    """Predicts prefill seconds as fixed + per_token * tokens, for refusing hopeless deadlines.

    Measured at warm-up, then nudged towards each observed prefill so it tracks the real
    load. Without warm-up it predicts 0 (only already-passed deadlines are refused).
    """

    def __init__(self, fixed_s: float = 0.0, per_token_s: float = 0.0) -> None:
        self.fixed_s = fixed_s
        self.per_token_s = per_token_s

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            sample = max(0.0, seconds - self.fixed_s) / tokens
            self.per_token_s = 0.8 * self.per_token_s + 0.2 * sample

    @classmethod
    def measure(cls, decoder: OnnxDecoder) -> PrefillEstimate:
        """Warms the session up (first runs allocate and tune) and times a short and a long prefill."""
        vocab = decoder.signature.vocab_size
        long_tokens = max(2, min(64, decoder.context_length - 1))
        short_tokens = max(1, min(8, long_tokens // 2))

        def best_time(tokens: int) -> float:
            ids = [i % vocab for i in range(tokens)]
            times = []
            for _ in range(2):
                start = time.perf_counter()
                decoder.forward(ids, decoder.empty_cache())
                times.append(time.perf_counter() - start)
            return min(times)

        warm = decoder.forward([0] * short_tokens, decoder.empty_cache())
        decoder.forward([0], warm.cache)  # the decode shape gets its first run too
        short_s, long_s = best_time(short_tokens), best_time(long_tokens)
        per_token = max(0.0, (long_s - short_s) / (long_tokens - short_tokens))
        return cls(fixed_s=max(0.0, short_s - per_token * short_tokens), per_token_s=per_token)


@dataclass(eq=False)
class SessionState:
    """One conversation's token history (prompts and generated ids); turns run one at a time.

    Its KV lives in the prefix cache between turns, like every finished request's: the next
    turn finds it there by its ids.
    """

    id: int
    multi_turn: bool
    history: list[int] = field(default_factory=list)
    active: Turn | None = None
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False


@dataclass(eq=False)
class Turn:
    """One generate() call in flight, one row of the batch: queued, prefilling, decoding, finished."""

    session: SessionState
    params: SamplingParams
    sampler: TokenSampler
    stop_token_ids: frozenset[int]
    prompt_tokens: int
    reserved_tokens: int  # the longest this row can grow to: what admission reserves
    deadline: float | None
    deliver: Delivery
    submitted_at: float
    hit: PrefixHit | None = None  # the cached prefix found at admission
    grammar: RowGrammar | None = None  # the sampling constraint's matcher (its sampler masks with it)
    cache: KvCache | None = None  # own KV while prefilling (unpadded, one row)
    pending: list[int] = field(default_factory=list)  # prompt ids still to feed
    batch: DecodeBatch[Turn] | None = None  # set while decoding
    admitted: bool = False
    cached_tokens: int = 0
    generated: int = 0
    cancel_requested: bool = False
    finished: bool = False
    first_forward_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    prefill_s: float = 0.0


@dataclass
class _Ending:
    """A row that stops this step, and why."""

    turn: Turn
    reason: FinishReason | None
    matched: int | None = None
    error: BaseException | None = None


class Scheduler:
    """Owns one model's sessions, queue, batch and worker thread; see the module docstring."""

    def __init__(self, name: str, decoder: OnnxDecoder, settings: EngineSettings, *,
                 kv_ops: KvOps, kv_budget_bytes: int, prefill_estimate: PrefillEstimate | None = None,
                 step_observer: StepObserver | None = None, sampling_threads: int = 1,
                 on_failed: FailureObserver | None = None, memory_guard: MemoryGuard | None = None) -> None:
        self.name = name
        self.decoder = decoder
        self.settings = settings
        self.kv_budget_bytes = kv_budget_bytes
        self.prefill_estimate = prefill_estimate or PrefillEstimate()
        self.eos_token_ids = frozenset(decoder.config.eos_token_ids)
        self.prefill_chunk_tokens = settings.prefill_chunk_tokens
        self._ops = kv_ops
        self._observer = step_observer
        self._on_failed = on_failed
        self._failure: str | None = None  # set once the engine gave up: every call is refused
        self._step_faulted = False  # a row failed for a fault of the model or the engine this step
        # Rows failed this step, out of the batch (KV dropped) but not told yet: whether their
        # error is their own (MODEL_ERROR, OUT_OF_MEMORY) or ENGINE_FAILED depends on whether the
        # model still runs, which `_work` checks after the step.
        self._failed_rows: list[tuple[Turn, LlmsuiteError]] = []
        self._sampling_pool = (ThreadPoolExecutor(sampling_threads, thread_name_prefix=f"sampling-{name}")
                               if sampling_threads > 1 else None)
        self._bytes_per_token = decoder.kv_bytes_per_token
        self._memory_guard = memory_guard
        self._kv_in_host_memory = decoder.placement.device_type == "cpu"
        self._vocab_size = decoder.signature.vocab_size
        self._context_length = decoder.context_length
        self._padded = decoder.left_padding
        self._cond = threading.Condition(threading.RLock())
        self._waiting: deque[Turn] = deque()
        self._prefilling: deque[Turn] = deque()
        self._batches: list[DecodeBatch[Turn]] = []
        self._sessions: dict[int, SessionState] = {}
        self._prefix = PrefixCache()
        self._session_ids = count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_turn_s = 1.0
        self._step_s = 0.0  # moving average of a step's model work
        self._last_decode_rows = 0
        self._counters = dict(
            total_requests=0, completed=0, cancelled=0, time_limited=0, rejected_overloaded=0,
            prefix_cache_evictions=0, prefix_cache_hit_tokens=0, prefix_cache_query_tokens=0, steps=0,
        )

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking: lets the current step finish, ends every turn as CANCELLED, frees all KV."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._sampling_pool is not None:
            self._sampling_pool.shutdown()
        self._tell_failed_rows(engine_failed=False)  # stopped mid-check: they failed on their own account
        with self._cond:
            for turn in [*self._decoding(), *self._prefilling, *self._waiting]:
                turn.cache, turn.batch = None, None
                self._finish(_Ending(turn, FinishReason.CANCELLED), kv=None)
            self._batches.clear()
            self._prefix.clear()
            for session in self._sessions.values():
                session.closed = True
            self._sessions.clear()

    def _work(self) -> None:
        """Steps until stopped. A step that fails is contained: the rows it touched fail (their
        KV freed), one ERROR with the traceback is logged, and the engine checks its model
        still runs (`_model_still_runs`) before going on. When it does not, or when steps keep
        failing outside any forward, the engine gives up (`_give_up`): never a silent retry."""
        failed_in_a_row = 0  # steps that raised out of step(): bookkeeping, not one forward
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                progressed = self.step()
            except Exception as exc:
                failed_in_a_row += 1
                logger.exception("model %s: scheduler step failed (%d in a row, limit %d); ending every "
                                 "running row", self.name, failed_in_a_row, self.settings.max_step_failures)
                self._fail_admitted(exc)
                if failed_in_a_row >= self.settings.max_step_failures:
                    self._give_up(f"{failed_in_a_row} scheduler steps in a row failed, the last with "
                                  f"{type(exc).__name__}: {exc}")
                    return
                self._tell_failed_rows(engine_failed=False)
                continue
            failed_in_a_row = 0
            if self._step_faulted:
                if not self._model_still_runs():
                    return
                self._tell_failed_rows(engine_failed=False)
            if progressed:
                continue
            with self._cond:
                if self._stopping or self._admitted_count():
                    continue
                # Queued turns that could not be admitted wait for a submit, cancel or finish to
                # notify; the timeout only backs that up (and drives idle-session expiry).
                delay = self._next_wakeup_delay()
                if self._waiting:
                    delay = 0.05 if delay is None else min(delay, 0.05)
                self._cond.wait(timeout=delay)

    def _model_still_runs(self) -> bool:
        """After a failed step: a one-token forward from an empty cache, tried up to
        max_step_failures times with a doubling pause. True when one works (the failure
        belonged to the rows that failed); otherwise the engine gives up and this is False."""
        tries = self.settings.max_step_failures
        for attempt in range(1, tries + 1):
            try:
                self.decoder.forward([0], self.decoder.empty_cache())
                return True
            except Exception as exc:
                logger.error("model %s: check forward %d of %d failed: %s: %s", self.name, attempt, tries,
                             type(exc).__name__, exc)
                cause = f"{type(exc).__name__}: {exc}"
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, timeout=PROBE_BACKOFF_S * 2 ** (attempt - 1)):
                    return False
        self._give_up(f"the model failed {tries} check forwards in a row after a failed step, the last with {cause}")
        return False

    def _give_up(self, cause: str) -> None:
        """The engine cannot step: later calls are refused, the failure observer (the service:
        health NOT_SERVING, then exit) is told first, then every turn (running, failed this
        step or queued) fails with UNAVAILABLE ENGINE_FAILED and all KV is freed."""
        with self._cond:
            self._failure = cause
        logger.error("model %s: engine failed, no longer serving: %s", self.name, cause)
        if self._on_failed is not None:
            try:
                self._on_failed(cause)
            except Exception:  # e.g. the service's event loop already closed: nobody left to tell
                logger.exception("model %s: the failure observer failed", self.name)
        self._tell_failed_rows(engine_failed=True)
        with self._cond:
            error = self._engine_failed()
            for turn in [*self._decoding(), *self._prefilling, *self._waiting]:
                turn.cache, turn.batch = None, None
                self._finish(_Ending(turn, None, error=error), kv=None)
            self._batches.clear()
            self._prefix.clear()

    def _tell_failed_rows(self, *, engine_failed: bool) -> None:
        with self._cond:
            failed, self._failed_rows = self._failed_rows, []
            for turn, error in failed:
                self._finish(_Ending(turn, None, error=self._engine_failed() if engine_failed else error), kv=None)

    def _engine_failed(self) -> Unavailable:
        return Unavailable(f"model {self.name!r} on this replica cannot run its model any more and is restarting; "
                           "retry on another replica", reason="ENGINE_FAILED", retry_after_s=1.0,
                           metadata={"model": self.name})

    # ---- sessions --------------------------------------------------------------------

    def open_session(self, *, multi_turn: bool) -> SessionState:
        with self._cond:
            if self._failure is not None:
                raise self._engine_failed()
            if self._stopping:
                raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING")
            if multi_turn and self._multi_turn_sessions() >= self.settings.max_sessions:
                raise ResourceExhausted(
                    f"model {self.name!r} already holds {self.settings.max_sessions} sessions; "
                    "close one or retry later",
                    reason="TOO_MANY_SESSIONS",
                    metadata={"model": self.name, "max_sessions": str(self.settings.max_sessions)},
                    retry_after_s=1.0,
                )
            session = SessionState(id=next(self._session_ids), multi_turn=multi_turn)
            self._sessions[session.id] = session
            return session

    def close_session(self, session: SessionState) -> None:
        """Idempotent. A running turn is cancelled (its KV goes to the prefix cache as it stops)."""
        with self._cond:
            if session.closed:
                return
            session.closed = True
            if session.active is not None:
                session.active.cancel_requested = True
                self._cond.notify_all()
            else:
                self._sessions.pop(session.id, None)

    def cached_prefix(self, session: SessionState) -> int:
        """Tokens of the session's history whose KV the prefix cache holds now."""
        with self._cond:
            if not session.history:
                return 0
            hit = self._prefix.lookup(session.history, limit=len(session.history), touch=False)
            return hit.length if hit is not None else 0

    def _multi_turn_sessions(self) -> int:
        return sum(1 for s in self._sessions.values() if s.multi_turn)

    # ---- submitting and cancelling ----------------------------------------------------

    def submit(self, session: SessionState, new_token_ids: Sequence[int], params: SamplingParams, *,
               deadline: float | None, truncate_prompt: bool, deliver: Delivery,
               keep_history: int | None = None, grammar: RowGrammar | None = None) -> Turn:
        """Validates and queues a turn; raises the caller-facing error instead when it cannot run.

        keep_history rewinds the session first: only its first `keep_history` tokens stay.
        grammar: the compiled params.constraint (ConstraintCompiler.start_row), fresh for this turn.
        """
        validate_sampling(params, vocab_size=self._vocab_size, context_length=self._context_length)
        if keep_history is not None and not 0 <= keep_history <= len(session.history):
            raise InvalidArgument.for_field(
                "turn.keep_history_tokens",
                f"must be in [0, {len(session.history)}] (the session's history so far), got {keep_history}",
                reason="INVALID_FIELD")
        kept_history = session.history if keep_history is None else session.history[:keep_history]
        new_ids = validate_prompt(new_token_ids, self._vocab_size, allow_empty=bool(kept_history))
        with self._cond:
            if self._failure is not None:
                raise self._engine_failed()
            if self._stopping:
                raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING")
            if session.closed:
                raise FailedPrecondition("the session is closed", reason="SESSION_CLOSED")
            if session.active is not None:
                raise FailedPrecondition(
                    "a turn is still generating in this session; wait for it or cancel it", reason="TURN_IN_PROGRESS"
                )
            # Turns the worker has not admitted yet count against free rows first, then the queue.
            if len(self._waiting) + self._admitted_count() >= self.settings.max_running + self.settings.max_queued:
                self._counters["rejected_overloaded"] += 1
                raise ResourceExhausted(
                    f"model {self.name!r} is at capacity ({self._admitted_count()} running, "
                    f"{len(self._waiting)} queued)",
                    reason="ENGINE_OVERLOADED",
                    metadata={"model": self.name, "max_queued": str(self.settings.max_queued)},
                    retry_after_s=self._retry_after_s(),
                )
            drop = tokens_to_drop(
                len(kept_history), len(new_ids), params.max_new_tokens, self._context_length,
                retained_session=session.multi_turn, truncate_prompt=truncate_prompt,
            )
            context = kept_history + new_ids
            if drop:
                context = context[drop:]  # positions shift: the prefix cache finds what still matches
            reserved = min(self._context_length, len(context) + params.max_new_tokens)
            self._check_fits_budget(reserved)
            self._check_memory(reserved)
            if deadline is not None:
                hit = self._prefix.lookup(context, limit=len(context) - 1, touch=False)
                self._check_deadline(deadline, len(context) - (hit.length if hit is not None else 0))
            session.history = context
            stop_ids = frozenset(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids |= self.eos_token_ids
            turn = Turn(
                session=session,
                params=params,
                sampler=TokenSampler(params, self._vocab_size, context, grammar),
                stop_token_ids=stop_ids,
                prompt_tokens=len(context),  # until admission finds what is cached
                reserved_tokens=reserved,
                deadline=deadline,
                deliver=deliver,
                submitted_at=time.monotonic(),
                grammar=grammar,
            )
            session.active = turn
            session.last_used = turn.submitted_at
            self._waiting.append(turn)
            self._counters["total_requests"] += 1
            self._cond.notify_all()
            return turn

    def _check_fits_budget(self, reserved_tokens: int) -> None:
        """A request that could not fit even alone is the caller's to shrink: retrying cannot help."""
        needed = reserved_tokens * self._bytes_per_token
        if needed > self.kv_budget_bytes:
            raise InvalidArgument.for_field(
                "sampling.max_new_tokens",
                f"the prompt plus max_new_tokens can grow to {reserved_tokens} tokens, whose KV cache ({needed} "
                f"bytes) exceeds this server's KV budget for the model ({self.kv_budget_bytes} bytes); lower "
                "max_new_tokens or shorten the prompt",
                reason="KV_BUDGET_EXCEEDED",
                needed_bytes=str(needed), kv_budget_bytes=str(self.kv_budget_bytes),
            )

    def _check_memory(self, reserved_tokens: int) -> None:
        """--max-memory: refuses (RESOURCE_EXHAUSTED, MEMORY_PRESSURE) before the process outgrows it."""
        if self._memory_guard is not None:
            kv_here = self._kv_in_host_memory  # KV in device memory does not grow the process
            self._memory_guard.admit(self.name, reserved_tokens * self._bytes_per_token if kv_here else 0,
                                     self._growth_to_come() if kv_here else 0)

    def _check_deadline(self, deadline: float, tokens_to_prefill: int) -> None:
        remaining = deadline - time.monotonic()
        needed = self.prefill_estimate.seconds(tokens_to_prefill)
        if remaining <= 0 or remaining < needed:
            raise DeadlineExceeded(
                f"{max(remaining, 0.0):.3f}s left before the deadline cannot cover the estimated "
                f"{needed:.3f}s prefill of {tokens_to_prefill} tokens",
                reason="DEADLINE_TOO_SHORT",
                metadata={"remaining_s": f"{max(remaining, 0.0):.3f}", "estimated_prefill_s": f"{needed:.3f}"},
            )

    def _retry_after_s(self) -> float:
        backlog = len(self._waiting) + self._admitted_count()
        return min(60.0, max(0.1, self._mean_turn_s * backlog / max(1, self._admitted_count())))

    def cancel(self, turn: Turn) -> None:
        """Thread-safe; the turn ends as CANCELLED at the next step, before any further forward of it."""
        with self._cond:
            if not turn.finished:
                turn.cancel_requested = True
                self._cond.notify_all()

    # ---- the scheduling step -----------------------------------------------------------

    def step(self) -> bool:
        """Housekeeping, one prefill budget and one decode forward; False when there was nothing to do."""
        self._step_faulted = False
        with self._cond:
            now = time.monotonic()
            endings = self._collect_interrupted(now)
            self._expire_cache(now)
            self._admit()
            if not endings and not self._prefilling and not self._batches:
                return False
        started = time.perf_counter()
        self._retire(endings)
        prefill_tokens, prefill_forwards = self._prefill()
        decode_rows, decode_forwards = self._decode()
        elapsed = time.perf_counter() - started
        with self._cond:
            if prefill_forwards or decode_forwards:
                self._counters["steps"] += 1
                self._step_s = elapsed if self._step_s == 0.0 else 0.9 * self._step_s + 0.1 * elapsed
            if decode_forwards:
                self._last_decode_rows = decode_rows
        if self._observer is not None and (prefill_forwards or decode_forwards):
            try:
                self._observer(StepReport(self.name, decode_rows, decode_forwards, prefill_tokens, elapsed,
                                          prefill_forwards))
            except Exception:  # metrics must never stop generation
                logger.exception("scheduler %s: step observer failed", self.name)
        return True

    def _collect_interrupted(self, now: float) -> list[_Ending]:
        """Ends queued turns at once; returns admitted ones, whose KV the worker must release."""
        cutoff = now + TIME_LIMIT_MARGIN_S + 2 * self._step_s
        endings: list[_Ending] = []
        for turn in [*self._waiting, *self._prefilling, *self._decoding()]:
            if turn.cancel_requested:
                reason = FinishReason.CANCELLED
            elif turn.deadline is not None and cutoff >= turn.deadline:
                reason = FinishReason.TIME_LIMIT
            else:
                continue
            if turn.admitted:
                endings.append(_Ending(turn, reason))
            else:
                self._finish(_Ending(turn, reason), kv=None)
        return endings

    def _admit(self) -> None:
        """FIFO: the head of the queue waits for room rather than being overtaken."""
        while self._waiting and self._admitted_count() < self.settings.max_running:
            turn = self._waiting[0]
            context = turn.session.history
            # Look up first: the hit becomes the most recently used entry, the last to be evicted.
            hit = (self._prefix.lookup(context, limit=len(context) - 1)
                   if self.settings.prefix_cache else None)
            if not self._make_room_for(turn, keep=hit.entry if hit is not None else None):
                return
            self._waiting.popleft()
            turn.admitted = True
            turn.hit = hit
            turn.cached_tokens = hit.length if hit is not None else 0
            turn.pending = context[turn.cached_tokens:]
            turn.prompt_tokens = len(turn.pending)
            self._counters["prefix_cache_query_tokens"] += len(context)
            self._counters["prefix_cache_hit_tokens"] += turn.cached_tokens
            self._prefilling.append(turn)

    def _starting_cache(self, turn: Turn) -> KvCache:
        """The KV a turn's first prefill continues from: its cached prefix, or nothing."""
        hit = turn.hit
        turn.hit = None
        if hit is None:
            return self.decoder.empty_cache()
        cache = hit.entry.cache
        if hit.length == cache.length:
            return cache  # immutable: the forward writes new tensors and the entry stays valid
        return KvCache(self._ops.reshape(cache.tensors, [0], keep=hit.length), hit.length, 1)

    def _retire(self, endings: Sequence[_Ending]) -> None:
        """Releases the KV of ending rows (kept for retained sessions), then delivers their results.

        KV work happens first, outside the lock; the new batch layouts and the finished turns
        are then published together, so stats never see a row in no state or in two.
        """
        if not endings:
            return
        kept: dict[int, KvCache | None] = {}
        by_batch: dict[int, tuple[DecodeBatch[Turn], list[Turn]]] = {}
        try:
            for ending in endings:
                turn = ending.turn
                keep = ending.error is None and self.settings.prefix_cache
                if turn.batch is not None:
                    kept[id(turn)] = turn.batch.extract(turn) if keep else None
                    by_batch.setdefault(id(turn.batch), (turn.batch, []))[1].append(turn)
                else:
                    kept[id(turn)] = turn.cache if keep else None
            layouts = [(batch, batch.without_rows(leaving)) for batch, leaving in by_batch.values()]
        except Exception as exc:
            logger.exception("model %s: releasing the KV of ending rows failed; dropping their batches", self.name)
            self._retire_dropping_batches(endings, exc)
            return
        with self._cond:
            for batch, layout in layouts:
                batch.apply(layout)
            self._batches = [b for b in self._batches if len(b)]
            for ending in endings:
                ending.turn.cache, ending.turn.batch = None, None
                self._finish(ending, kv=kept[id(ending.turn)])

    def _retire_dropping_batches(self, endings: Sequence[_Ending], error: BaseException) -> None:
        """When the KV work of `_retire` failed: the ending turns still end as they would have
        (their KV is not kept), and every other row of their batches fails, since a batch
        whose rows cannot be removed cannot run again. Dropping a whole batch needs no KV work."""
        ending_turns = {id(e.turn) for e in endings}
        batches = {id(e.turn.batch): e.turn.batch for e in endings if e.turn.batch is not None}
        casualties: list[Turn] = []
        with self._cond:
            for batch in batches.values():
                casualties += [t for t in batch.keys if id(t) not in ending_turns]
                batch.apply(batch.without_rows(list(batch.keys)))
            self._batches = [b for b in self._batches if len(b)]
            for ending in endings:
                ending.turn.cache, ending.turn.batch = None, None
                self._finish(ending, kv=None)
        self._fail(casualties, error)

    def _prefill(self) -> tuple[int, int]:
        """Feeds up to prefill_chunk_tokens prompt tokens, oldest admitted prompt first;
        returns (tokens, forwards).

        Fresh prompts (nothing cached, short enough to finish within the budget) that are
        next in line are prefilled together in one left-padded forward; a continuation or a
        long prompt gets a chunk of its own, continuing from its cache.
        """
        budget = self.prefill_chunk_tokens
        fed = forwards = 0
        while budget > 0:
            with self._cond:
                waiting = [t for t in self._prefilling if not t.cancel_requested]
            if not waiting:
                break
            group = self._fresh_group(waiting, budget)
            if len(group) > 1:
                fed += sum(len(t.pending) for t in group)
                budget -= len(group) * max(len(t.pending) for t in group)
                forwards += 1
                self._prefill_together(group)
                continue
            turn = waiting[0]
            chunk = turn.pending[:budget]
            started = time.monotonic()
            if turn.first_forward_at is None:
                turn.first_forward_at = started
            try:
                if turn.cache is None:
                    turn.cache = self._starting_cache(turn)
                result = self.decoder.forward(chunk, turn.cache)
            except Exception as exc:  # the model failed: end this turn, keep serving the others
                logger.exception("model %s: prefill failed", self.name)
                self._fail([turn], exc)
                continue
            elapsed = time.monotonic() - started
            turn.prefill_s += elapsed
            self.prefill_estimate.observe(len(chunk), elapsed)
            turn.cache = result.cache
            del turn.pending[:len(chunk)]
            fed += len(chunk)
            forwards += 1
            budget -= len(chunk)
            if turn.pending:
                continue
            (token,) = choose_batch([turn.sampler], result.logits[-1:])
            ending = self._emit(turn, token)
            if ending is not None:
                self._retire([ending])
            else:
                self._join(turn)
        return fed, forwards

    def _fresh_group(self, waiting: Sequence[Turn], budget: int) -> list[Turn]:
        """The prompts next in line that can share one prefill forward within `budget` padded
        tokens: nothing cached, whole prompt fed at once (equal lengths without position_ids)."""
        group: list[Turn] = []
        width = 0
        for turn in waiting:
            fresh = turn.hit is None and turn.cache is None and turn.first_forward_at is None
            if not fresh or (not self._padded and group and len(turn.pending) != width):
                break
            wider = max(width, len(turn.pending))
            if (len(group) + 1) * wider > budget:
                break
            group.append(turn)
            width = wider
        return group

    def _prefill_together(self, group: list[Turn]) -> None:
        """One forward for every prompt of `group`; the rows that go on join a decode batch."""
        started = time.monotonic()
        for turn in group:
            turn.first_forward_at = started
        try:
            batch, logits = DecodeBatch.prefill(self.decoder, self._ops, group, [t.pending for t in group],
                                                padded=self._padded)
        except Exception as exc:
            logger.exception("model %s: batched prefill failed", self.name)
            self._fail(group, exc)
            return
        elapsed = time.monotonic() - started
        tokens = sum(len(t.pending) for t in group)
        self.prefill_estimate.observe(tokens, elapsed)
        for turn in group:
            turn.prefill_s += elapsed
            turn.pending = []
            turn.batch = batch
        endings = [e for e in (self._emit(t, token) for t, token in
                               zip(group, choose_batch([t.sampler for t in group], logits, self._sampling_pool),
                                   strict=True)) if e is not None]
        self._retire(endings)
        if not len(batch):
            return
        target = next((b for b in self._batches if b.accepts(batch.padded_length)), None)
        if target is None:
            target = DecodeBatch(self.decoder, self._ops, padded=self._padded)
        try:
            layout = target.with_batch(batch)
        except Exception as exc:
            logger.exception("model %s: joining the batch failed", self.name)
            self._fail(list(batch.keys), exc)
            return
        with self._cond:
            target.apply(layout)
            if target not in self._batches:
                self._batches.append(target)
            for turn in batch.keys:
                self._prefilling.remove(turn)
                turn.batch = target

    def _join(self, turn: Turn) -> None:
        """Moves a prefilled turn into a batch (KV work outside the lock, bookkeeping inside)."""
        cache = turn.cache
        assert cache is not None
        batch = next((b for b in self._batches if b.accepts(cache.length)), None)
        if batch is None:
            batch = DecodeBatch(self.decoder, self._ops, padded=self._padded)
        try:
            layout = batch.with_row(turn, cache)
        except Exception as exc:
            logger.exception("model %s: joining the batch failed", self.name)
            self._fail([turn], exc)
            return
        with self._cond:
            batch.apply(layout)
            if batch not in self._batches:
                self._batches.append(batch)
            self._prefilling.remove(turn)
            turn.cache, turn.batch = None, batch

    def _decode(self) -> tuple[int, int]:
        """One forward per batch over all its rows; returns (rows, forwards)."""
        rows = forwards = 0
        for batch in list(self._batches):
            turns = list(batch.keys)
            try:
                logits = batch.forward([t.session.history[-1] for t in turns])
            except Exception as exc:
                logger.exception("model %s: decode forward failed", self.name)
                with self._cond:
                    batch.apply(batch.without_rows(turns))  # every row leaves: no KV work
                self._fail(turns, exc)
                continue
            rows += len(turns)
            forwards += 1
            endings = [e for e in (self._emit(t, token) for t, token in
                                   zip(turns, choose_batch([t.sampler for t in turns], logits, self._sampling_pool),
                                       strict=True))
                       if e is not None]
            self._retire(endings)
        return rows, forwards

    def _emit(self, turn: Turn, token: GeneratedToken | NonFiniteLogits) -> _Ending | None:
        """Records and delivers one sampled token; returns an ending when it was the turn's last
        (or when its logits could not be sampled: NUMERIC_ERROR, only this row ends)."""
        if isinstance(token, NonFiniteLogits):
            logger.warning("model %s: non-finite logits at position %d; ending that request with NUMERIC_ERROR: %s",
                           self.name, len(turn.session.history), token)
            return _Ending(turn, None, error=Internal(
                f"model {self.name!r} produced logits that cannot be sampled ({token}) for output token "
                f"{turn.generated + 1} of this request; it ends here, and other requests are not affected",
                reason="NUMERIC_ERROR",
                metadata={"model": self.name, "output_tokens": str(turn.generated)}))
        if turn.grammar is not None and turn.grammar.failure is not None:
            return _Ending(turn, None, error=turn.grammar.failure)  # sampled without a mask: not delivered
        now = time.monotonic()
        turn.generated += 1
        if turn.first_token_at is None:
            turn.first_token_at = now
        turn.last_token_at = now
        turn.session.history.append(token.token_id)
        self._deliver(turn, token)
        if token.token_id in turn.stop_token_ids:
            return _Ending(turn, FinishReason.STOP, token.token_id)
        if turn.grammar is not None and turn.grammar.advance(token.token_id):
            return _Ending(turn, FinishReason.GRAMMAR)
        if turn.generated >= turn.params.max_new_tokens:
            return _Ending(turn, FinishReason.LENGTH)
        if len(turn.session.history) >= self._context_length:
            # The last token sits at position context-1: there is no position left to feed it.
            return _Ending(turn, FinishReason.CONTEXT_FULL)
        return None

    def _fail(self, turns: Iterable[Turn], error: BaseException) -> None:
        """Takes `turns` out of the batch (their KV is dropped; the caller has logged the
        traceback) and marks the step as faulted; `_work` tells them after the step."""
        self._step_faulted = True
        caller_error = self._caller_error(error)
        with self._cond:
            self._batches = [b for b in self._batches if len(b)]
            for turn in turns:
                if turn in self._prefilling:
                    self._prefilling.remove(turn)
                turn.cache, turn.batch = None, None
                if not turn.finished and all(turn is not t for t, _ in self._failed_rows):
                    self._failed_rows.append((turn, caller_error))

    def _fail_admitted(self, error: BaseException) -> None:
        """After a step failed outside any forward: the rows' state is unknown, so every admitted
        row ends (queued turns stay queued) and every batch is dropped with its KV."""
        with self._cond:
            turns = [*self._decoding(), *self._prefilling]
            self._batches.clear()
        self._fail(turns, error)

    def _caller_error(self, error: BaseException) -> LlmsuiteError:
        """What a caller sees for a fault of the model or the engine: OUT_OF_MEMORY when an
        allocation failed (capacity: a retry may fit), MODEL_ERROR for anything else."""
        if isinstance(error, LlmsuiteError):
            return error
        if isinstance(error, MemoryError) or any(w in str(error).lower() for w in _ALLOCATION_FAILURE_WORDS):
            return ResourceExhausted(
                f"model {self.name!r} ran out of memory computing this request; retry later or send less",
                reason="OUT_OF_MEMORY", retry_after_s=5.0, metadata={"model": self.name})
        return Internal(f"model {self.name!r} failed computing this request ({type(error).__name__}); the "
                        "server's log has the details; other requests are not affected",
                        reason="MODEL_ERROR", metadata={"model": self.name})

    def _finish(self, ending: _Ending, kv: KvCache | None) -> None:
        """Ends a turn (caller holds the lock): hands its KV to the session or frees it, delivers its last item."""
        turn = ending.turn
        if turn.finished:
            return
        turn.finished = True
        turn.hit = None  # an evicted entry must not stay alive through a finished turn
        if turn in self._waiting:
            self._waiting.remove(turn)
        if turn in self._prefilling:
            self._prefilling.remove(turn)
        session = turn.session
        now = time.monotonic()
        session.active = None
        session.last_used = now
        if kv is not None:
            # The KV covers the first kv.length tokens of the history (never the last sampled one).
            self._prefix.insert(session.history[:kv.length], kv)
            self._enforce_budget()
        if session.closed:
            self._sessions.pop(session.id, None)
        self._mean_turn_s = 0.9 * self._mean_turn_s + 0.1 * (now - turn.submitted_at)
        self._cond.notify_all()
        if ending.error is not None:
            self._deliver(turn, TurnFailed(ending.error))
            return
        assert ending.reason is not None
        self._counters[_COUNTER_FOR_REASON.get(ending.reason, "completed")] += 1
        self._deliver(turn, TurnResult(ending.reason, ending.matched, self._usage(turn), self._timings(turn, now)))

    def _deliver(self, turn: Turn, item: Any) -> None:
        try:
            turn.deliver(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            turn.cancel_requested = True

    @staticmethod
    def _usage(turn: Turn) -> TurnUsage:
        return TurnUsage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.generated,
                         cached_tokens=turn.cached_tokens)

    @staticmethod
    def _timings(turn: Turn, now: float) -> TurnTimings:
        submitted = turn.submitted_at
        first_token, last_token = turn.first_token_at, turn.last_token_at
        decode_s = last_token - first_token if first_token is not None and last_token is not None else 0.0
        first_forward = turn.first_forward_at if turn.first_forward_at is not None else now
        return TurnTimings(
            queue_s=first_forward - submitted,
            prefill_s=turn.prefill_s,
            time_to_first_token_s=first_token - submitted if first_token is not None else 0.0,
            decode_s=decode_s,
            mean_inter_token_s=decode_s / (turn.generated - 1) if turn.generated > 1 else 0.0,
            total_s=now - submitted,
        )

    # ---- KV memory ---------------------------------------------------------------------

    def _decoding(self) -> list[Turn]:
        return [turn for batch in self._batches for turn in batch.keys]

    def _admitted_count(self) -> int:
        return len(self._prefilling) + sum(len(b) for b in self._batches)

    def _reserved_bytes(self, extra: Turn | None = None) -> int:
        """What admitted rows (+ `extra`) may grow to, padded as their batches pad them (a forecast)."""
        rows = [*self._prefilling, *self._decoding(), *([extra] if extra is not None else [])]
        if not rows:
            return 0
        if self._padded:  # one batch: every row is as long as the longest
            return len(rows) * max(t.reserved_tokens for t in rows) * self._bytes_per_token
        return sum(t.reserved_tokens for t in rows) * self._bytes_per_token

    def _row_caches(self) -> list[KvCache]:
        """KV that admitted rows keep alive and the prefix cache does not account for: batches,
        prefilling rows' own caches, and cached prefixes they are about to read (an entry evicted
        since admission stays alive until its reader starts), each once."""
        caches: dict[int, KvCache] = {}
        for batch in self._batches:
            if batch.cache is not None:
                caches[id(batch.cache)] = batch.cache
        for turn in self._prefilling:
            for cache in (turn.cache, turn.hit.entry.cache if turn.hit is not None else None):
                if cache is not None and not self._prefix.holds(cache):
                    caches[id(cache)] = cache
        return list(caches.values())

    def held_kv_bytes(self) -> int:
        """Bytes of every KV tensor this model keeps alive right now (caller holds the lock)."""
        return sum(cache.nbytes for cache in self._row_caches()) + self._prefix.nbytes

    def _kv_needed(self, extra: Turn | None = None) -> int:
        """What the KV budget must cover: the rows' reservations (or what they really hold,
        when that is more) plus the prefix cache's held bytes."""
        rows_held = sum(cache.nbytes for cache in self._row_caches())
        return max(self._reserved_bytes(extra), rows_held) + self._prefix.nbytes

    def _growth_to_come(self) -> int:
        """Bytes admitted rows may still add to what they hold (for --max-memory)."""
        return max(0, self._reserved_bytes() - sum(cache.nbytes for cache in self._row_caches()))

    def _make_room_for(self, turn: Turn, keep: CacheEntry | None = None) -> bool:
        """True when `turn` fits the KV budget, evicting least recently used cache entries
        (never `keep`, the entry it is about to read) if needed."""
        if self._kv_needed(extra=turn) - self._prefix.nbytes > self.kv_budget_bytes:
            return False  # wait for running rows to finish; evicting the cache would not be enough
        for entry in self._prefix.least_recently_used():
            if self._kv_needed(extra=turn) <= self.kv_budget_bytes:
                return True
            if entry is not keep:
                self._evict(entry)
        return self._kv_needed(extra=turn) <= self.kv_budget_bytes

    def _enforce_budget(self) -> None:
        """After a store: evicts least recently used entries until the rows' KV and the cache fit."""
        for entry in self._prefix.least_recently_used():
            if self._kv_needed() <= self.kv_budget_bytes:
                return
            self._evict(entry)

    def _evict(self, entry: CacheEntry) -> None:
        self._prefix.remove(entry)
        self._counters["prefix_cache_evictions"] += 1

    def _expire_cache(self, now: float) -> None:
        timeout = self.settings.session_idle_timeout_s
        for entry in self._prefix.least_recently_used():
            if now - entry.last_used < timeout:
                return
            self._evict(entry)

    def _next_wakeup_delay(self) -> float | None:
        entries = self._prefix.least_recently_used()
        if not entries:
            return None
        return max(0.0, entries[0].last_used + self.settings.session_idle_timeout_s - time.monotonic())

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._cond:
            decoding = self._decoding()
            cached = (sum(t.cache.length for t in self._prefilling if t.cache is not None)
                      + sum(sum(b.lengths) for b in self._batches) + self._prefix.tokens)
            return EngineStats(
                model=self.name,
                running=len(self._prefilling) + len(decoding),
                queued=len(self._waiting),
                sessions=self._multi_turn_sessions(),
                cached_tokens=cached,
                kv_bytes=self.held_kv_bytes(),
                kv_budget_bytes=self.kv_budget_bytes,
                kv_reserved_bytes=self._kv_needed(),
                prefix_cache_entries=len(self._prefix),
                decode_rows=self._last_decode_rows,
                **self._counters,
            )
