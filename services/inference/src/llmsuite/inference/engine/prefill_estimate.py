"""How long a prefill will take, for refusing deadlines that cannot be met."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from llmsuite.runtime.errors import DeadlineExceeded


class WarmupForwards(Protocol):
    """Forwards of one model as it is served (warmup.py), each starting from no KV and
    leaving none held."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def context_length(self) -> int:
        """The most tokens one sequence may hold."""
        ...

    def prefill(self, ids: Sequence[int]) -> None:
        """One fresh prompt."""
        ...

    def prefill_and_decode(self, ids: Sequence[int]) -> None:
        """One fresh prompt, then one decode step after it."""
        ...


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

    def refuse_hopeless_deadline(self, deadline: float, tokens_to_prefill: int) -> None:
        """DEADLINE_TOO_SHORT when the time left cannot cover the estimated prefill."""
        remaining = deadline - time.monotonic()
        needed = self.seconds(tokens_to_prefill)
        if remaining <= 0 or remaining < needed:
            raise DeadlineExceeded(
                f"{max(remaining, 0.0):.3f}s left before the deadline cannot cover the estimated "
                f"{needed:.3f}s prefill of {tokens_to_prefill} tokens",
                reason="DEADLINE_TOO_SHORT",
                metadata={"remaining_s": f"{max(remaining, 0.0):.3f}", "estimated_prefill_s": f"{needed:.3f}"},
            )

    @classmethod
    def measure(cls, forwards: WarmupForwards) -> PrefillEstimate:
        """Warms the session up through `forwards`, the path the model is served by (first runs
        allocate and tune), and times a short and a long prefill on it."""
        vocab = forwards.vocab_size
        long_tokens = max(2, min(64, forwards.context_length - 1))
        short_tokens = max(1, min(8, long_tokens // 2))

        def best_time(tokens: int) -> float:
            ids = [i % vocab for i in range(tokens)]
            times = []
            for _ in range(2):
                start = time.perf_counter()
                forwards.prefill(ids)
                times.append(time.perf_counter() - start)
            return min(times)

        forwards.prefill_and_decode([0] * short_tokens)  # the decode shape gets its first run too
        short_s, long_s = best_time(short_tokens), best_time(long_tokens)
        per_token = max(0.0, (long_s - short_s) / (long_tokens - short_tokens))
        return cls(fixed_s=max(0.0, short_s - per_token * short_tokens), per_token_s=per_token)
