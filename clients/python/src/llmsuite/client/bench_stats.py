"""What `llmsuite bench` measures per request, and the statistics over a level.

Pure Python on purpose: the client distribution carries no numpy. Percentiles use
linear interpolation between the closest ranks (numpy's default "linear" method,
and `statistics.quantiles(..., method="inclusive")`), so they agree with what
vLLM's and most other benchmarks print for the same samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50.0, 95.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, interpolating linearly
    between the two closest ranks. NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency's samples, in seconds."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        p50, p95, p99 = (percentile(values, q) for q in PERCENTILES)
        return cls(len(values), math.fsum(values) / len(values), p50, p95, p99)

    def to_ms(self) -> dict[str, float | int | None]:
        def ms(v: float) -> float | None:  # JSON has no NaN
            return None if math.isnan(v) else round(v * 1e3, 3)

        return {"count": self.count, "mean": ms(self.mean), "p50": ms(self.p50), "p95": ms(self.p95),
                "p99": ms(self.p99)}


@dataclass
class RequestRecord:
    """One request (or one chat turn) as the client saw it. Times are
    `time.perf_counter()` seconds; `token_times` holds one (arrival, tokens)
    pair per response message that carried tokens."""

    index: int
    expected_output_tokens: int
    started: float
    prompt_tokens: int = 0  # as the server reported it in usage
    cached_tokens: int = 0
    turn: int = 0  # chat workload: 0 for a conversation's first turn
    finished: float | None = None
    code: str = "OK"  # gRPC status code name
    error: str = ""
    token_times: list[tuple[float, int]] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    reported_output_tokens: int | None = None  # usage.completion_tokens
    # The stream carried text but no ids (gateway Chat): each text delta counts as one
    # arrival for the latencies, and usage gives the number of tokens.
    counted_by_usage: bool = False

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def output_tokens(self) -> int:
        if self.counted_by_usage and self.reported_output_tokens is not None:
            return self.reported_output_tokens
        return sum(n for _, n in self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0][0] - self.started if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def inter_token_latencies(self) -> list[float]:
        """One sample per token after the first. A message that carries k tokens
        (the server coalesced them) gives k samples of (gap / k), so the mean
        stays (last arrival - first arrival) / (tokens - 1) as in vLLM's TPOT."""
        samples: list[float] = []
        previous, first_count = self.token_times[0] if self.token_times else (0.0, 0)
        samples += [0.0] * max(first_count - 1, 0)  # tokens that came with the first one
        for arrival, count in self.token_times[1:]:
            samples += [(arrival - previous) / count] * count
            previous = arrival
        return samples

    def to_dict(self) -> dict[str, object]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1e3, 3)

        return {"index": self.index, "turn": self.turn, "code": self.code, "error": self.error,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "expected_output_tokens": self.expected_output_tokens, "output_tokens": self.output_tokens,
                "reported_output_tokens": self.reported_output_tokens, "ttft_ms": ms(self.ttft),
                "e2e_ms": ms(self.e2e), "output_token_ids": self.output_token_ids}


@dataclass(frozen=True)
class LevelSummary:
    """Everything the table and the JSON report show for one concurrency level."""

    concurrency: int
    requests: int  # attempted (successes + errors)
    succeeded: int
    errors: dict[str, int]  # gRPC code name -> count
    error_examples: dict[str, str]  # gRPC code name -> the first such request's message
    duration_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    length_mismatches: int  # succeeded requests whose output differs from the requested length
    ttft: Distribution
    itl: Distribution
    e2e: Distribution
    turns: list[dict[str, object]]  # chat workload only: per turn index

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def requests_per_s(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s > 0 else math.nan

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompt tokens served from cache (usage.cached_tokens)."""
        total = self.prompt_tokens + self.cached_tokens
        return self.cached_tokens / total if total else 0.0

    @classmethod
    def of(cls, concurrency: int, records: Iterable[RequestRecord], duration_s: float) -> LevelSummary:
        records = list(records)
        ok = [r for r in records if r.ok]
        errors = Counter(r.code for r in records if not r.ok)
        examples: dict[str, str] = {}
        for r in records:
            if not r.ok:
                examples.setdefault(r.code, r.error)
        turns = sorted({r.turn for r in records})
        by_turn = []
        if turns != [0]:
            for turn in turns:
                done = [r for r in ok if r.turn == turn]
                prompt, cached = sum(r.prompt_tokens for r in done), sum(r.cached_tokens for r in done)
                by_turn.append({"turn": turn, "succeeded": len(done),
                                "prompt_tokens": prompt, "cached_tokens": cached,
                                "cache_hit_rate": round(cached / (prompt + cached), 4) if prompt + cached else 0.0,
                                "ttft_ms": Distribution.of([r.ttft for r in done if r.ttft is not None]).to_ms()})
        return cls(
            concurrency=concurrency, requests=len(records), succeeded=len(ok), errors=dict(sorted(errors.items())),
            error_examples=dict(sorted(examples.items())),
            duration_s=duration_s, prompt_tokens=sum(r.prompt_tokens for r in ok),
            cached_tokens=sum(r.cached_tokens for r in ok), output_tokens=sum(r.output_tokens for r in ok),
            length_mismatches=sum(1 for r in ok if r.output_tokens != r.expected_output_tokens),
            ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
            itl=Distribution.of([s for r in ok for s in r.inter_token_latencies()]),
            e2e=Distribution.of([r.e2e for r in ok if r.e2e is not None]),
            turns=by_turn,
        )

    def to_dict(self) -> dict[str, object]:
        def rate(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 3)

        return {
            "concurrency": self.concurrency, "requests": self.requests, "succeeded": self.succeeded,
            "errors": self.errors, "error_examples": self.error_examples,
            "duration_s": round(self.duration_s, 3), "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "cache_hit_rate": round(self.cache_hit_rate, 4),
            "output_tokens": self.output_tokens, "length_mismatches": self.length_mismatches,
            "output_tokens_per_s": rate(self.output_tokens_per_s), "requests_per_s": rate(self.requests_per_s),
            "ttft_ms": self.ttft.to_ms(), "itl_ms": self.itl.to_ms(), "e2e_ms": self.e2e.to_ms(),
            **({"turns": self.turns} if self.turns else {}),
        }
