"""Per-model request queue, scheduler and worker thread.

The asyncio side only submits, cancels and reads results; every model forward runs on
the scheduler's own worker thread, so the event loop is never blocked by model work.
Results go back through a per-turn `deliver` callback (the engine wraps
`loop.call_soon_threadsafe`).

`Scheduler.step()` is the unit of work: housekeeping (finish cancelled or expired turns,
evict idle KV, admit queued turns FIFO up to max_running), then ONE forward for ONE
running turn, chosen round-robin so concurrent streams progress evenly. Batching several
turns into one forward later changes only `step()` and the decoder call, not the engine
interface or the servicer.

Threading rule: the lock guards the queues, counters and session bookkeeping; a session's
KV cache is written only by the worker thread, or under the lock while the session has no
turn (eviction, close).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from llmsuite.inference.engine.onnx_model import KvCache, OnnxDecoder
from llmsuite.inference.engine.sampling import TokenSampler
from llmsuite.inference.engine.types import (
    EngineSettings,
    EngineStats,
    FinishReason,
    GeneratedToken,
    SamplingParams,
    TurnResult,
    TurnTimings,
    TurnUsage,
)
from llmsuite.inference.engine.validation import tokens_to_drop, validate_prompt, validate_sampling
from llmsuite.runtime.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, Unavailable

logger = logging.getLogger(__name__)

# A long prompt is prefilled in chunks so it delays other streams by at most one chunk's
# forward instead of the whole prompt.
PREFILL_CHUNK_TOKENS = 256

_COUNTER_FOR_REASON = {FinishReason.CANCELLED: "cancelled", FinishReason.TIME_LIMIT: "time_limited"}


@dataclass
class TurnFailed:
    """Delivered instead of a TurnResult when the model itself failed; the stream re-raises it."""

    error: BaseException


Delivery = Callable[[GeneratedToken | TurnResult | TurnFailed], None]


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
    """One session's token history and, while held, the KV cache covering its prefix."""

    id: int
    retain_kv: bool
    history: list[int] = field(default_factory=list)
    cache: KvCache | None = None
    active: Turn | None = None
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False

    @property
    def cached_tokens(self) -> int:
        cache = self.cache
        return cache.length if cache is not None else 0


@dataclass(eq=False)
class Turn:
    """One generate() call in flight: queued, then running, then finished."""

    session: SessionState
    params: SamplingParams
    sampler: TokenSampler
    stop_token_ids: frozenset[int]
    prompt_tokens: int
    deadline: float | None
    deliver: Delivery
    submitted_at: float
    pending: list[int] = field(default_factory=list)  # ids to feed before the next sample
    cached_tokens: int = 0
    generated: int = 0
    cancel_requested: bool = False
    finished: bool = False
    first_forward_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    prefill_s: float = 0.0


class Scheduler:
    """Owns one model's sessions, queue and worker thread; see the module docstring."""

    def __init__(self, name: str, decoder: OnnxDecoder, settings: EngineSettings,
                 prefill_estimate: PrefillEstimate | None = None) -> None:
        self.name = name
        self.decoder = decoder
        self.settings = settings
        self.prefill_estimate = prefill_estimate or PrefillEstimate()
        self.eos_token_ids = frozenset(decoder.config.eos_token_ids)
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        self._vocab_size = decoder.signature.vocab_size
        self._context_length = decoder.context_length
        self._cond = threading.Condition(threading.RLock())
        self._waiting: deque[Turn] = deque()
        self._running: deque[Turn] = deque()
        self._sessions: dict[int, SessionState] = {}
        self._session_ids = count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_turn_s = 1.0
        self._counters = dict(
            total_requests=0, completed=0, cancelled=0, time_limited=0, rejected_overloaded=0, evicted_sessions=0
        )

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking: lets the current forward finish, ends every turn as CANCELLED, frees all KV."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            for turn in list(self._running) + list(self._waiting):
                self._finish(turn, FinishReason.CANCELLED)
            for session in self._sessions.values():
                session.cache = None
                session.closed = True
            self._sessions.clear()

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                progressed = self.step()
            except Exception:  # a bug in housekeeping must not kill the worker silently
                logger.exception("scheduler %s: step failed", self.name)
                time.sleep(0.1)  # and must not spin at full speed if it repeats
                continue
            if progressed:
                continue
            with self._cond:
                if not self._stopping and not self._waiting and not self._running:
                    self._cond.wait(timeout=self._next_idle_expiry_delay())

    # ---- sessions --------------------------------------------------------------------

    def open_session(self, *, retain_kv: bool) -> SessionState:
        with self._cond:
            if self._stopping:
                raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING")
            if retain_kv and self._retained_sessions() >= self.settings.max_sessions:
                raise ResourceExhausted(
                    f"model {self.name!r} already holds {self.settings.max_sessions} sessions; "
                    "close one or retry later",
                    reason="TOO_MANY_SESSIONS",
                    metadata={"model": self.name, "max_sessions": str(self.settings.max_sessions)},
                    retry_after_s=1.0,
                )
            session = SessionState(id=next(self._session_ids), retain_kv=retain_kv)
            self._sessions[session.id] = session
            return session

    def close_session(self, session: SessionState) -> None:
        """Idempotent. A running turn is cancelled and its KV freed when it stops."""
        with self._cond:
            if session.closed:
                return
            session.closed = True
            if session.active is not None:
                session.active.cancel_requested = True
                self._cond.notify_all()
            else:
                session.cache = None
                self._sessions.pop(session.id, None)

    def _retained_sessions(self) -> int:
        return sum(1 for s in self._sessions.values() if s.retain_kv)

    # ---- submitting and cancelling ----------------------------------------------------

    def submit(self, session: SessionState, new_token_ids: Sequence[int], params: SamplingParams, *,
               deadline: float | None, truncate_prompt: bool, deliver: Delivery) -> Turn:
        """Validates and queues a turn; raises the caller-facing error instead when it cannot run."""
        validate_sampling(params, vocab_size=self._vocab_size, context_length=self._context_length)
        new_ids = validate_prompt(new_token_ids, self._vocab_size, allow_empty=bool(session.history))
        with self._cond:
            if self._stopping:
                raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING")
            if session.closed:
                raise FailedPrecondition("the session is closed", reason="SESSION_CLOSED")
            if session.active is not None:
                raise FailedPrecondition(
                    "a turn is still generating in this session; wait for it or cancel it", reason="TURN_IN_PROGRESS"
                )
            if len(self._waiting) + len(self._running) >= self.settings.max_running + self.settings.max_queued:
                self._counters["rejected_overloaded"] += 1
                raise ResourceExhausted(
                    f"model {self.name!r} is at capacity ({len(self._running)} running, {len(self._waiting)} queued)",
                    reason="ENGINE_OVERLOADED",
                    metadata={"model": self.name},
                    retry_after_s=self._retry_after_s(),
                )
            drop = tokens_to_drop(
                len(session.history), len(new_ids), params.max_new_tokens, self._context_length,
                retained_session=session.retain_kv, truncate_prompt=truncate_prompt,
            )
            context = session.history + new_ids
            kept_new = len(new_ids)
            cached = session.cached_tokens
            if drop:
                context = context[drop:]
                kept_new = min(len(new_ids), len(context))
                cached = 0  # positions shift, so no cached KV stays valid
            if deadline is not None:
                self._check_deadline(deadline, len(context) - cached)
            if drop:
                session.cache = None
            session.history = context
            stop_ids = frozenset(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids |= self.eos_token_ids
            turn = Turn(
                session=session,
                params=params,
                sampler=TokenSampler(params, self._vocab_size, context),
                stop_token_ids=stop_ids,
                prompt_tokens=kept_new,
                deadline=deadline,
                deliver=deliver,
                submitted_at=time.monotonic(),
            )
            session.active = turn
            session.last_used = turn.submitted_at
            self._waiting.append(turn)
            self._counters["total_requests"] += 1
            self._cond.notify_all()
            return turn

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
        backlog = len(self._waiting) + len(self._running)
        return min(60.0, max(0.1, self._mean_turn_s * backlog / self.settings.max_running))

    def cancel(self, turn: Turn) -> None:
        """Thread-safe; the turn ends as CANCELLED before its next forward."""
        with self._cond:
            if not turn.finished:
                turn.cancel_requested = True
                self._cond.notify_all()

    # ---- the scheduling step -----------------------------------------------------------

    def step(self) -> bool:
        """Housekeeping, then one forward for the next running turn; False when idle."""
        with self._cond:
            now = time.monotonic()
            self._finish_interrupted(now)
            self._evict_idle_sessions(now)
            self._admit()
            if not self._running:
                return False
            turn = self._running[0]
            self._running.rotate(-1)  # round-robin: the next step serves the next turn
        try:
            self._advance(turn)
        except Exception as exc:  # the model failed: end this turn, keep serving the others
            logger.exception("model %s: forward failed", self.name)
            with self._cond:
                turn.session.cache = None  # may be half-updated; the history is still right
                self._finish(turn, None, error=exc)
        return True

    def _finish_interrupted(self, now: float) -> None:
        for queue in (self._waiting, self._running):
            for turn in list(queue):
                if turn.cancel_requested:
                    self._finish(turn, FinishReason.CANCELLED)
                elif turn.deadline is not None and now >= turn.deadline:
                    self._finish(turn, FinishReason.TIME_LIMIT)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.settings.max_running:
            turn = self._waiting.popleft()
            session = turn.session
            turn.cached_tokens = session.cached_tokens
            turn.pending = session.history[turn.cached_tokens:]
            if session.cache is None:
                session.cache = self.decoder.empty_cache()
            self._running.append(turn)
            self._enforce_token_budget(reserve=len(turn.pending))

    def _advance(self, turn: Turn) -> None:
        """One forward for `turn` (a prefill chunk or one decode step), then sample when due."""
        session = turn.session
        assert session.cache is not None
        start = time.monotonic()
        if turn.first_forward_at is None:
            turn.first_forward_at = start
        if turn.pending:
            chunk = turn.pending[: self.prefill_chunk_tokens]
            result = self.decoder.forward(chunk, session.cache)
            elapsed = time.monotonic() - start
            turn.prefill_s += elapsed
            self.prefill_estimate.observe(len(chunk), elapsed)
            del turn.pending[: len(chunk)]
            sample_due = not turn.pending
        else:
            result = self.decoder.forward(session.history[-1:], session.cache)
            sample_due = True
        if turn.cancel_requested and sample_due:
            # Drop this forward's cache: an idle session's cache must end before its last
            # history token, so the next turn has a token to feed. Housekeeping ends the turn.
            return
        session.cache = result.cache
        if not sample_due:
            return

        token = turn.sampler.choose(result.logits[-1])
        now = time.monotonic()
        turn.generated += 1
        if turn.first_token_at is None:
            turn.first_token_at = now
        turn.last_token_at = now
        session.history.append(token.token_id)
        self._deliver(turn, token)

        if token.token_id in turn.stop_token_ids:
            reason, matched = FinishReason.STOP, token.token_id
        elif turn.generated >= turn.params.max_new_tokens:
            reason, matched = FinishReason.LENGTH, None
        elif len(session.history) >= self._context_length:
            # The last token sits at position context-1: there is no position left to feed it.
            reason, matched = FinishReason.CONTEXT_FULL, None
        else:
            return
        with self._cond:
            self._finish(turn, reason, matched)

    def _finish(self, turn: Turn, reason: FinishReason | None, matched: int | None = None, *,
                error: BaseException | None = None) -> None:
        """Ends a turn (caller holds the lock): frees what it held and delivers its last item."""
        if turn.finished:
            return
        turn.finished = True
        for queue in (self._waiting, self._running):
            if turn in queue:
                queue.remove(turn)
        session = turn.session
        now = time.monotonic()
        session.active = None
        session.last_used = now
        if not session.retain_kv or session.closed:
            session.cache = None
        if session.closed:
            self._sessions.pop(session.id, None)
        self._mean_turn_s = 0.9 * self._mean_turn_s + 0.1 * (now - turn.submitted_at)
        if error is not None:
            self._deliver(turn, TurnFailed(error))
            return
        assert reason is not None
        self._counters[_COUNTER_FOR_REASON.get(reason, "completed")] += 1
        self._deliver(turn, TurnResult(reason, matched, self._usage(turn), self._timings(turn, now)))
        self._enforce_token_budget()

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

    # ---- memory bounds -------------------------------------------------------------------

    def _idle_with_cache(self) -> list[SessionState]:
        return [s for s in self._sessions.values() if s.active is None and s.cache is not None]

    def _evict(self, session: SessionState) -> None:
        session.cache = None
        self._counters["evicted_sessions"] += 1

    def _evict_idle_sessions(self, now: float) -> None:
        timeout = self.settings.session_idle_timeout_s
        for session in self._idle_with_cache():
            if now - session.last_used >= timeout:
                self._evict(session)

    def _next_idle_expiry_delay(self) -> float | None:
        idle = self._idle_with_cache()
        if not idle:
            return None
        oldest = min(s.last_used for s in idle)
        return max(0.0, oldest + self.settings.session_idle_timeout_s - time.monotonic())

    def _enforce_token_budget(self, reserve: int = 0) -> None:
        """Evicts least recently used idle sessions until held (+ reserved) KV tokens fit the cap.

        Running turns are never evicted, so they alone may exceed the cap (bounded by
        max_running x context).
        """
        held = sum(s.cached_tokens for s in self._sessions.values()) + reserve
        if held <= self.settings.max_cached_tokens:
            return
        for session in sorted(self._idle_with_cache(), key=lambda s: s.last_used):
            held -= session.cached_tokens
            self._evict(session)
            if held <= self.settings.max_cached_tokens:
                return

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._cond:
            cached = sum(s.cached_tokens for s in self._sessions.values())
            return EngineStats(
                model=self.name,
                running=len(self._running),
                queued=len(self._waiting),
                sessions=self._retained_sessions(),
                cached_tokens=cached,
                kv_bytes=cached * self.decoder.kv_bytes_per_token,
                **self._counters,
            )
