"""Per-model continuous batching: the worker thread that plans each step, has it executed and
applies the results.

The asyncio side only submits, cancels and reads results; every model forward runs on the
scheduler's own worker thread, so the event loop is never blocked by model work. Results
go back through a per-turn `deliver` callback (the engine posts to its event loop's mailbox,
delivery.py; a batch of sampled tokens wakes each loop once).

The work is split as vLLM's scheduler and onnxruntime-genai's Engine split it:
  * the planner (planner.py) decides what a step does: which rows end before any forward,
    which queued turns are admitted (the KV budget, kv_budget.py, evicting cached prefixes
    to make room), which prefill forwards fit `prefill_chunk_tokens` and which rows decode;
  * an executor (executor.py; today padded_executor.py) runs the plan's forwards on its
    KV layout and owns every running row's KV; the scheduler holds only opaque handles;
  * this module applies the results: sampling (with constraint masks), delivery, finishing
    rows (their KV to the prefix cache), and containing faults.

`Scheduler.step()` is one iteration:
  1. plan, under the lock: end cancelled turns and turns whose deadline is near (early
     enough that their final message still reaches the client), expire idle cache entries,
     admit queued turns FIFO while the KV budget and max_running allow, each starting from
     the longest cached prefix of its ids;
  2. retire the interrupted rows (their KV leaves the executor, or goes to the prefix cache);
  3. prefill: at most `prefill_chunk_tokens` prompt tokens, oldest admitted prompt first.
     Fresh prompts next in line that fit share one forward (left-padded, or of equal length
     only for exports that cannot be left-padded); a continuation from cached KV, or a prompt
     longer than the budget, gets a chunk of its own. A prompt whose last chunk is fed samples
     its first token and joins the decode set;
  4. decode: ONE forward over every decoding row (per length, for exports that cannot be
     left-padded), one token sampled per row, finished rows leave at once.
Prefill and decode share a step instead of alternating whole prompts: running streams
wait at most one chunk for a newcomer, and a newcomer's first token comes after at most
one decode forward.

Every turn that ends (finished, cancelled or timed out) leaves its KV in the prefix cache
(prefix_cache.py), and every admitted turn starts from the longest cached prefix of its token
ids: a session's next turn, a conversation re-sent in full, a retry. The cache changes what
is computed, never the tokens: a turn's output depends only on its ids and sampling.

Threading rule: the lock guards the queues, counters, sessions, the budget and the prefix
cache. The executor's tensors are touched only by the worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from typing import Any

from llmsuite.inference.engine.constraints import RowGrammar
from llmsuite.inference.engine.delivery import batched_wakeups
from llmsuite.inference.engine.executor import KvExecutor, KvReleaseFailed, PrefillWork, StoredKv
from llmsuite.inference.engine.faults import caller_error, engine_failed
from llmsuite.inference.engine.kv_budget import KvBudget, RowsKv
from llmsuite.inference.engine.memory import MemoryGuard
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.planner import StepPlanner
from llmsuite.inference.engine.prefill_estimate import PrefillEstimate
from llmsuite.inference.engine.sampling import NonFiniteLogits, TokenSampler, choose_batch
from llmsuite.inference.engine.turn import Delivery, Ending, SessionState, Turn, TurnFailed
from llmsuite.inference.engine.types import (
    EngineSettings,
    EngineStats,
    FinishReason,
    GeneratedToken,
    SamplingParams,
    StepReport,
    TurnResult,
)
from llmsuite.inference.engine.validation import tokens_to_drop, validate_prompt, validate_sampling
from llmsuite.runtime.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LlmsuiteError,
    ResourceExhausted,
    Unavailable,
)

logger = logging.getLogger(__name__)

_COUNTER_FOR_REASON = {FinishReason.CANCELLED: "cancelled", FinishReason.TIME_LIMIT: "time_limited"}

# After a step that failed, the engine checks that its model still runs with a one-token
# forward, up to max_step_failures times, waiting this long (doubling) between tries.
PROBE_BACKOFF_S = 0.05

StepObserver = Callable[[StepReport], None]
# Called once, on the worker thread, with a one-line cause, when the engine gives up.
FailureObserver = Callable[[str], None]


class Scheduler:
    """Owns one model's sessions, queue, planner, executor and worker thread; see the module docstring."""

    def __init__(self, name: str, decoder: OnnxDecoder, settings: EngineSettings, *,
                 executor: KvExecutor[Turn], kv_budget_bytes: int, prefill_estimate: PrefillEstimate | None = None,
                 step_observer: StepObserver | None = None, sampling_threads: int = 1,
                 on_failed: FailureObserver | None = None, memory_guard: MemoryGuard | None = None) -> None:
        self.name = name
        self.settings = settings
        self.prefill_estimate = prefill_estimate or PrefillEstimate()
        self.eos_token_ids = frozenset(decoder.config.eos_token_ids)
        self._executor = executor
        self._budget = KvBudget(kv_budget_bytes, settings.session_idle_timeout_s)
        self._planner = StepPlanner(settings, self._budget, executor, padded=executor.mixes_prompt_lengths)
        self._observer = step_observer
        self._on_failed = on_failed
        self._failure: str | None = None  # set once the engine gave up: every call is refused
        self._step_faulted = False  # a row failed for a fault of the model or the engine this step
        # Rows failed this step, out of the executor (KV dropped) but not told yet: whether their
        # error is their own (MODEL_ERROR, OUT_OF_MEMORY) or ENGINE_FAILED depends on whether the
        # model still runs, which `_work` checks after the step.
        self._failed_rows: list[tuple[Turn, LlmsuiteError]] = []
        self._sampling_pool = (ThreadPoolExecutor(sampling_threads, thread_name_prefix=f"sampling-{name}")
                               if sampling_threads > 1 else None)
        self._memory_guard = memory_guard
        self._kv_in_host_memory = decoder.placement.device_type == "cpu"
        self._vocab_size = decoder.signature.vocab_size
        self._context_length = decoder.context_length
        self._cond = threading.Condition(threading.RLock())
        self._waiting: deque[Turn] = deque()
        self._prefilling: deque[Turn] = deque()  # admitted, prompt not fed yet; oldest first
        self._decoding: list[Turn] = []
        self._sessions: dict[int, SessionState] = {}
        self._session_ids = count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_turn_s = 1.0
        self._step_s = 0.0  # moving average of a step's model work
        self._last_decode_rows = 0
        self._counters = dict(
            total_requests=0, completed=0, cancelled=0, time_limited=0, rejected_overloaded=0,
            prefix_cache_hit_tokens=0, prefix_cache_query_tokens=0, steps=0,
        )

    @property
    def kv_budget_bytes(self) -> int:
        return self._budget.budget_bytes

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
        self._executor.clear()
        with self._cond:
            for turn in [*self._decoding, *self._prefilling, *self._waiting]:
                self._finish(Ending(turn, FinishReason.CANCELLED), kv=None)
            self._budget.clear()
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
                delay = self._budget.next_expiry_delay()
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
                self._executor.probe()
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
        self._executor.clear()
        with self._cond:
            error = engine_failed(self.name)
            for turn in [*self._decoding, *self._prefilling, *self._waiting]:
                self._finish(Ending(turn, None, error=error), kv=None)
            self._budget.clear()

    def _tell_failed_rows(self, *, engine_failed: bool) -> None:
        with self._cond:
            failed, self._failed_rows = self._failed_rows, []
            for turn, error in failed:
                self._finish(Ending(turn, None, error=self._engine_failed() if engine_failed else error), kv=None)

    def _engine_failed(self) -> Unavailable:
        return engine_failed(self.name)

    # ---- sessions --------------------------------------------------------------------

    def open_session(self, *, multi_turn: bool) -> SessionState:
        with self._cond:
            if self._failure is not None:
                raise engine_failed(self.name)
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
            hit = self._budget.lookup(session.history, limit=len(session.history), touch=False)
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
                raise engine_failed(self.name)
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
            self._budget.refuse_if_never_fits(reserved, self._executor.reservation_bytes([reserved]))
            self._check_memory(reserved)
            if deadline is not None:
                hit = self._budget.lookup(context, limit=len(context) - 1, touch=False)
                to_prefill = len(context) - (hit.length if hit is not None else 0)
                self.prefill_estimate.refuse_hopeless_deadline(deadline, to_prefill)
            session.history = context
            stop_ids = frozenset(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids |= self.eos_token_ids
            turn = Turn(
                session=session,
                params=params,
                sampler=TokenSampler(params, self._vocab_size, context, grammar, stop_ids),
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

    def _check_memory(self, reserved_tokens: int) -> None:
        """--max-memory: refuses (RESOURCE_EXHAUSTED, MEMORY_PRESSURE) before the process outgrows it."""
        if self._memory_guard is not None:
            kv_here = self._kv_in_host_memory  # KV in device memory does not grow the process
            self._memory_guard.admit(self.name, self._executor.reservation_bytes([reserved_tokens]) if kv_here else 0,
                                     self._budget.growth_to_come(self._rows_kv()) if kv_here else 0)

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
        """Plans, runs one prefill budget and one decode forward, applies the results; False
        when there was nothing to do."""
        self._step_faulted = False
        with self._cond:
            now = time.monotonic()
            endings = self._planner.interrupted([*self._waiting, *self._prefilling, *self._decoding], now,
                                                self._step_s)
            for ending in endings:
                if not ending.turn.admitted:  # queued: ends at once, it holds no KV
                    self._finish(ending, kv=None)
            self._expire_cache(now)
            plan = self._planner.plan(self._waiting, self._prefilling, self._decoding,
                                      [e for e in endings if e.turn.admitted])
            for turn in plan.admitted:
                assert self._waiting[0] is turn
                self._waiting.popleft()
                self._prefilling.append(turn)
                self._counters["prefix_cache_query_tokens"] += len(turn.session.history)
                self._counters["prefix_cache_hit_tokens"] += turn.cached_tokens
            if plan.empty:
                return False
        started = time.perf_counter()
        self._retire(plan.interrupted)
        prefill_tokens, prefill_forwards = self._prefill(plan.prefill)
        decode_rows, decode_forwards = self._decode([turn for turn in plan.decode if turn.decoding])
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

    def _expire_cache(self, now: float) -> None:
        self._budget.expire(now)

    def _prefill(self, works: Sequence[PrefillWork[Turn]]) -> tuple[int, int]:
        """Runs the plan's prefill forwards in order; returns (tokens, forwards). A row whose
        prompt is fed samples its first token, then ends or joins the decode set."""
        fed = forwards = 0
        for work in works:
            started = time.monotonic()
            for turn in work.rows:
                if turn.first_forward_at is None:
                    turn.first_forward_at = started
            try:
                logits = self._executor.prefill(work)
            except Exception as exc:  # the model failed: end these turns, keep serving the others
                logger.exception("model %s: prefill of %d row(s) failed", self.name, len(work.rows))
                self._fail(work.rows, exc)
                continue
            elapsed = time.monotonic() - started
            tokens = sum(len(ids) for ids in work.tokens)
            self.prefill_estimate.observe(tokens, elapsed)
            for turn, ids in zip(work.rows, work.tokens, strict=True):
                turn.hit = None  # read: an evicted entry must not stay alive through this turn
                turn.prefill_s += elapsed
                del turn.pending[:len(ids)]
            fed += tokens
            forwards += 1
            if work.completes:
                self._first_tokens(work.rows, logits)
        return fed, forwards

    def _first_tokens(self, rows: Sequence[Turn], logits: Any) -> None:
        """Samples each fully prefilled row's first token; the rows that go on start decoding."""
        pool = self._sampling_pool if len(rows) > 1 else None
        sampled = choose_batch([turn.sampler for turn in rows], logits, pool)
        with batched_wakeups():  # the rows' tokens reach each event loop in one wake-up (delivery.py)
            self._retire([e for e in (self._emit(t, token) for t, token in zip(rows, sampled, strict=True))
                          if e is not None])
        going_on = [turn for turn in rows if turn in self._prefilling]  # not ended, not failed
        if not going_on:
            return
        try:
            self._executor.start_decoding(going_on)
        except Exception as exc:
            logger.exception("model %s: joining the batch failed", self.name)
            self._fail(going_on, exc)
            return
        with self._cond:
            for turn in going_on:
                self._prefilling.remove(turn)
                self._decoding.append(turn)
                turn.decoding = True

    def _decode(self, rows: Sequence[Turn]) -> tuple[int, int]:
        """The executor's decode forwards over `rows`; returns (rows, forwards)."""
        decoded = forwards = 0
        if not rows:
            return 0, 0
        for outcome in self._executor.decode(rows, [turn.session.history[-1] for turn in rows]):
            if outcome.logits is None:
                error = outcome.error if outcome.error is not None else RuntimeError("no logits")
                logger.error("model %s: decode forward failed", self.name, exc_info=error)
                self._fail(outcome.rows, error)
                continue
            decoded += len(outcome.rows)
            forwards += 1
            sampled = choose_batch([turn.sampler for turn in outcome.rows], outcome.logits, self._sampling_pool)
            with batched_wakeups():
                self._retire([e for e in (self._emit(t, token)
                                          for t, token in zip(outcome.rows, sampled, strict=True)) if e is not None])
        return decoded, forwards

    def _retire(self, endings: Sequence[Ending]) -> None:
        """Takes ending rows' KV out of the executor (a copy of their tokens kept for the prefix
        cache), then finishes them. When that KV work fails, they end without keeping it, and
        the rows that shared their storage fail."""
        if not endings:
            return
        keep = [e.turn for e in endings if e.error is None and self.settings.prefix_cache]
        try:
            kept = self._executor.release([e.turn for e in endings], keep)
        except KvReleaseFailed as failure:
            logger.exception("model %s: releasing the KV of ending rows failed; dropping their batches", self.name)
            with self._cond:
                for ending in endings:
                    self._finish(ending, kv=None)
            self._fail([t for t in failure.casualties if isinstance(t, Turn)], failure.cause)
            return
        with self._cond:
            for ending in endings:
                self._finish(ending, kv=kept.get(ending.turn))

    def _emit(self, turn: Turn, token: GeneratedToken | NonFiniteLogits) -> Ending | None:
        """Records and delivers one sampled token; returns an ending when it was the turn's last
        (or when its logits could not be sampled: NUMERIC_ERROR, only this row ends)."""
        if isinstance(token, NonFiniteLogits):
            logger.warning("model %s: non-finite logits at position %d; ending that request with NUMERIC_ERROR: %s",
                           self.name, len(turn.session.history), token)
            return Ending(turn, None, error=Internal(
                f"model {self.name!r} produced logits that cannot be sampled ({token}) for output token "
                f"{turn.generated + 1} of this request; it ends here, and other requests are not affected",
                reason="NUMERIC_ERROR",
                metadata={"model": self.name, "output_tokens": str(turn.generated)}))
        if turn.grammar is not None and turn.grammar.failure is not None:
            return Ending(turn, None, error=turn.grammar.failure)  # sampled without a mask: not delivered
        now = time.monotonic()
        turn.generated += 1
        if turn.first_token_at is None:
            turn.first_token_at = now
        turn.last_token_at = now
        turn.session.history.append(token.token_id)
        self._deliver(turn, token)
        if token.token_id in turn.stop_token_ids:
            return Ending(turn, FinishReason.STOP, token.token_id)
        if turn.grammar is not None and turn.grammar.advance(token.token_id):
            return Ending(turn, FinishReason.GRAMMAR)
        if turn.generated >= turn.params.max_new_tokens:
            return Ending(turn, FinishReason.LENGTH)
        if len(turn.session.history) >= self._context_length:
            # The last token sits at position context-1: there is no position left to feed it.
            return Ending(turn, FinishReason.CONTEXT_FULL)
        return None

    def _fail(self, turns: Iterable[Turn], error: BaseException) -> None:
        """Takes `turns` out of the executor (their KV is dropped; the caller has logged the
        traceback) and marks the step as faulted; `_work` tells them after the step."""
        self._step_faulted = True
        error_for_caller = caller_error(self.name, error)
        turns = list(turns)
        self._executor.discard(turns)
        with self._cond:
            for turn in turns:
                self._leave_rows(turn)
                if not turn.finished and all(turn is not t for t, _ in self._failed_rows):
                    self._failed_rows.append((turn, error_for_caller))

    def _fail_admitted(self, error: BaseException) -> None:
        """After a step failed outside any forward: the rows' state is unknown, so every admitted
        row ends (queued turns stay queued) and the executor drops all KV."""
        with self._cond:
            turns = [*self._decoding, *self._prefilling]
        self._executor.clear()
        self._fail(turns, error)

    def _leave_rows(self, turn: Turn) -> None:
        if turn in self._prefilling:
            self._prefilling.remove(turn)
        if turn.decoding:
            self._decoding.remove(turn)
            turn.decoding = False

    def _finish(self, ending: Ending, kv: StoredKv | None) -> None:
        """Ends a turn (caller holds the lock): its KV goes to the prefix cache (or nowhere), its last item out."""
        turn = ending.turn
        if turn.finished:
            return
        turn.finished = True
        turn.hit = None  # an evicted entry must not stay alive through a finished turn
        if turn in self._waiting:
            self._waiting.remove(turn)
        self._leave_rows(turn)
        session = turn.session
        now = time.monotonic()
        session.active = None
        session.last_used = now
        if kv is not None:
            # The KV covers the first kv.length tokens of the history (never the last sampled one).
            self._budget.store(session.history[:kv.length], kv, self._rows_kv())
        if session.closed:
            self._sessions.pop(session.id, None)
        self._mean_turn_s = 0.9 * self._mean_turn_s + 0.1 * (now - turn.submitted_at)
        self._cond.notify_all()
        if ending.error is not None:
            self._deliver(turn, TurnFailed(ending.error))
            return
        assert ending.reason is not None
        self._counters[_COUNTER_FOR_REASON.get(ending.reason, "completed")] += 1
        self._deliver(turn, TurnResult(ending.reason, ending.matched, turn.usage(), turn.timings(now)))

    def _deliver(self, turn: Turn, item: Any) -> None:
        try:
            turn.deliver(item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            turn.cancel_requested = True

    # ---- KV accounting -----------------------------------------------------------------

    def _admitted_count(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    def _rows_kv(self) -> RowsKv:
        return self._planner.rows_kv([*self._prefilling, *self._decoding])

    def held_kv_bytes(self) -> int:
        """Bytes of every KV tensor this model keeps alive right now."""
        with self._cond:
            return self._budget.held_bytes(self._rows_kv())

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._cond:
            rows = self._rows_kv()
            return EngineStats(
                model=self.name,
                running=self._admitted_count(),
                queued=len(self._waiting),
                sessions=self._multi_turn_sessions(),
                cached_tokens=self._executor.held_tokens() + self._budget.prefix.tokens,
                kv_bytes=self._budget.held_bytes(rows),
                kv_budget_bytes=self._budget.budget_bytes,
                kv_reserved_bytes=self._budget.needed_bytes(rows),
                prefix_cache_entries=len(self._budget.prefix),
                prefix_cache_evictions=self._budget.evictions,
                decode_rows=self._last_decode_rows,
                **self._counters,
            )
