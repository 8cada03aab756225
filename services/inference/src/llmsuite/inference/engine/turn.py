"""One request's state as a row of the batch (`Turn`), and one conversation's (`SessionState`).

A turn is plain data: the scheduler moves it from the queue to prefilling to decoding and
finishes it; the planner reads it to decide what runs; the executor knows it only as the
key of a row whose KV it stores. Nothing here touches a tensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmsuite.inference.engine.constraints import RowGrammar
from llmsuite.inference.engine.prefix_cache import PrefixHit
from llmsuite.inference.engine.sampling import TokenSampler
from llmsuite.inference.engine.types import (
    FinishReason,
    GeneratedToken,
    SamplingParams,
    TurnResult,
    TurnTimings,
    TurnUsage,
)


@dataclass
class TurnFailed:
    """Delivered instead of a TurnResult when the model itself failed; the stream re-raises it."""

    error: BaseException


Delivery = Callable[[GeneratedToken | TurnResult | TurnFailed], None]


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
    hit: PrefixHit | None = None  # the cached prefix found at admission, until its first forward reads it
    grammar: RowGrammar | None = None  # the sampling constraint's matcher (its sampler masks with it)
    pending: list[int] = field(default_factory=list)  # prompt ids still to feed
    admitted: bool = False
    decoding: bool = False  # its prompt is fed and its KV is in the executor's decode set
    cached_tokens: int = 0
    generated: int = 0
    cancel_requested: bool = False
    finished: bool = False
    first_forward_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    prefill_s: float = 0.0

    def usage(self) -> TurnUsage:
        return TurnUsage(prompt_tokens=self.prompt_tokens, completion_tokens=self.generated,
                         cached_tokens=self.cached_tokens)

    def timings(self, now: float) -> TurnTimings:
        submitted = self.submitted_at
        first_token, last_token = self.first_token_at, self.last_token_at
        decode_s = last_token - first_token if first_token is not None and last_token is not None else 0.0
        first_forward = self.first_forward_at if self.first_forward_at is not None else now
        return TurnTimings(
            queue_s=first_forward - submitted,
            prefill_s=self.prefill_s,
            time_to_first_token_s=first_token - submitted if first_token is not None else 0.0,
            decode_s=decode_s,
            mean_inter_token_s=decode_s / (self.generated - 1) if self.generated > 1 else 0.0,
            total_s=now - submitted,
        )


@dataclass
class Ending:
    """A row that stops, and why: a finish reason, or the error it fails with."""

    turn: Turn
    reason: FinishReason | None
    matched: int | None = None
    error: BaseException | None = None
