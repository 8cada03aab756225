"""What one generation turn yields, as domain values: text deltas, then one outcome.

`relay_turn` (generation.py) produces them for Generate, GenerateStream and every
Chat turn; conversions.py makes the gateway's protos of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmsuite.common.v1 import common_pb2
from llmsuite.inference.v1 import inference_pb2


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.PositionLogprobs]
    prompt_tokens: int = 0  # the whole prompt's length (cached tokens included)
    completion_tokens: int = 0  # generated until this delta


@dataclass
class TurnOutcome:
    """How a turn ended. `final` is the replica's final message, or the gateway's own when the
    replica sent none (the turn was cancelled after a stop string, or ran out of time)."""

    final: inference_pb2.GenerateFinal
    total_s: float  # from the request's arrival to the end of the turn
    first_text_s: float | None  # from the request's arrival to its first text (None: no text)
    generated_ids: list[int] = field(default_factory=list)
    matched_stop_string: str | None = None
    time_limited: bool = False

    @property
    def stopped_by_string(self) -> bool:
        return self.matched_stop_string is not None

    @property
    def finish_reason(self) -> common_pb2.FinishReason:
        return common_pb2.FINISH_REASON_STOP if self.stopped_by_string else self.final.finish_reason
