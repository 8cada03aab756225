"""What one scheduler step does, decided before any forward runs: the step's plan.

The planner ends interrupted rows, admits queued turns FIFO while the KV budget and
`max_running` allow (evicting cached prefixes to make room), picks the prefill forwards
that fit `prefill_chunk_tokens`, and lists the rows to decode. It reads the executor only
through the `KvExecutor` protocol (what rows reserve in its layout, what they hold), so it
plans the same way whichever layout runs the plan. It runs under the scheduler's lock and
touches no tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llmsuite.inference.engine.executor import CachedPrefix, KvExecutor, PrefillWork
from llmsuite.inference.engine.kv_budget import KvBudget, RowsKv
from llmsuite.inference.engine.turn import Ending, Turn
from llmsuite.inference.engine.types import EngineSettings, FinishReason

# A turn ends with TIME_LIMIT this long (plus two steps' worth) before its deadline, so its
# final message, carrying everything generated so far, reaches the client in time.
TIME_LIMIT_MARGIN_S = 0.05


@dataclass
class StepPlan:
    """One step: rows admitted, rows that end before any forward, the prefill forwards in
    order, and the rows that decode after them (those whose prompt completes included)."""

    admitted: list[Turn] = field(default_factory=list)
    interrupted: list[Ending] = field(default_factory=list)
    prefill: list[PrefillWork[Turn]] = field(default_factory=list)
    decode: list[Turn] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.interrupted or self.prefill or self.decode)


class StepPlanner:
    """Plans the steps of one model; see the module docstring."""

    def __init__(self, settings: EngineSettings, budget: KvBudget, executor: KvExecutor[Turn], *,
                 padded: bool) -> None:
        self._settings = settings
        self._budget = budget
        self._executor = executor
        self._padded = padded  # fresh prompts of different lengths may share a left-padded prefill

    def interrupted(self, rows: Iterable[Turn], now: float, step_s: float) -> list[Ending]:
        """Rows cancelled, or whose deadline is within the margin (plus two steps)."""
        cutoff = now + TIME_LIMIT_MARGIN_S + 2 * step_s
        endings: list[Ending] = []
        for turn in rows:
            if turn.cancel_requested:
                endings.append(Ending(turn, FinishReason.CANCELLED))
            elif turn.deadline is not None and cutoff >= turn.deadline:
                endings.append(Ending(turn, FinishReason.TIME_LIMIT))
        return endings

    def rows_kv(self, running: Sequence[Turn]) -> RowsKv:
        """The running rows as the budget counts them: their reservations in the executor's
        layout, and what they keep alive (the executor's KV, and cached prefixes not read yet:
        an entry evicted since admission stays alive until its reader starts)."""
        hits = [turn.hit.entry.cache for turn in running if turn.hit is not None]
        return RowsKv(self._executor.reservation_bytes([turn.reserved_tokens for turn in running]),
                      [*self._executor.held(), *hits])

    def plan(self, waiting: Sequence[Turn], prefilling: Sequence[Turn], decoding: Sequence[Turn],
             interrupted: Sequence[Ending]) -> StepPlan:
        """Admits from the head of `waiting` (the caller dequeues `plan.admitted`), then plans
        the forwards over the rows that go on."""
        ending = {id(e.turn) for e in interrupted}
        admitted = self._admit(waiting, [*prefilling, *decoding])
        feeding = [t for t in [*prefilling, *admitted] if id(t) not in ending and not t.cancel_requested]
        prefill = self._prefill_work(feeding)
        completing = [work.rows for work in prefill if work.completes]
        decode = [t for t in decoding if id(t) not in ending] + [t for rows in completing for t in rows]
        return StepPlan(admitted, list(interrupted), prefill, decode)

    def _admit(self, waiting: Sequence[Turn], running: list[Turn]) -> list[Turn]:
        """FIFO: the head of the queue waits for room rather than being overtaken."""
        admitted: list[Turn] = []
        for turn in waiting:
            if len(running) + len(admitted) >= self._settings.max_running:
                break
            context = turn.session.history
            # Look up first: the hit becomes the most recently used entry, the last to be evicted.
            hit = self._budget.lookup(context, limit=len(context) - 1) if self._settings.prefix_cache else None
            if not self._budget.make_room(self.rows_kv([*running, *admitted, turn]),
                                          keep=hit.entry if hit is not None else None):
                break
            turn.admitted = True
            turn.hit = hit
            turn.cached_tokens = hit.length if hit is not None else 0
            turn.pending = context[turn.cached_tokens:]
            turn.prompt_tokens = len(turn.pending)
            admitted.append(turn)
        return admitted

    def _prefill_work(self, waiting: Sequence[Turn]) -> list[PrefillWork[Turn]]:
        """Up to prefill_chunk_tokens prompt tokens, oldest admitted prompt first. Fresh prompts
        (nothing cached, short enough to finish within the budget) next in line share one
        left-padded forward; a continuation or a long prompt gets a chunk of its own,
        continuing from its KV (on its first chunk, from its cached prefix)."""
        budget = self._settings.prefill_chunk_tokens
        work: list[PrefillWork[Turn]] = []
        position = 0
        while budget > 0 and position < len(waiting):
            group = self._fresh_group(waiting[position:], budget)
            if len(group) > 1:
                work.append(PrefillWork(tuple(group), tuple(tuple(t.pending) for t in group)))
                budget -= len(group) * max(len(t.pending) for t in group)
                position += len(group)
                continue
            turn = waiting[position]
            chunk = tuple(turn.pending[:budget])
            hit = turn.hit
            start = None if hit is None else CachedPrefix(hit.entry.cache, hit.length)
            work.append(PrefillWork((turn,), (chunk,), start=start, completes=len(chunk) == len(turn.pending)))
            budget -= len(chunk)
            position += 1
        return work

    def _fresh_group(self, waiting: Sequence[Turn], budget: int) -> list[Turn]:
        """The prompts next in line that can share one prefill forward within `budget` padded
        tokens: nothing cached, whole prompt fed at once (equal lengths where rows cannot be padded)."""
        group: list[Turn] = []
        width = 0
        for turn in waiting:
            fresh = turn.hit is None and turn.first_forward_at is None
            if not fresh or (not self._padded and group and len(turn.pending) != width):
                break
            wider = max(width, len(turn.pending))
            if (len(group) + 1) * wider > budget:
                break
            group.append(turn)
            width = wider
        return group
