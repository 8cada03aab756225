"""Runs a benchmark: the plan, warm-up, then each concurrency level in turn.

A level keeps `concurrency` jobs in flight (closed loop, as ghz and `vllm bench serve
--max-concurrency` do): a worker starts its next job the moment its previous one ends,
until the level's request count is used up or its duration has passed (jobs already
running then finish and count). Each level sends its own prompts, so a prefix cache
cannot carry one level's prompts into the next.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from llmsuite.client.bench_stats import LevelSummary, RequestRecord
from llmsuite.client.bench_targets import LiveCounters, ModelFacts, Target
from llmsuite.client.bench_workload import Conversation, LengthSpec, draw_lengths

WORKLOADS = ("generate", "chat")


@dataclass(frozen=True)
class BenchConfig:
    """One `llmsuite bench` run (see `llmsuite bench --help` for each field)."""

    target: str
    model: str
    tokenizer_model: str
    concurrency: tuple[int, ...]
    requests: tuple[int, ...] | None  # one per level; None with duration_s
    duration_s: float | None
    prompt_tokens: LengthSpec
    output_tokens: LengthSpec
    seed: int = 0
    warmup: int = 1
    workload: str = "generate"
    turns: int = 1
    chat_mode: str | None = None
    json_schema: str | None = None  # every request's sampling.constraint.json_schema

    def __post_init__(self) -> None:
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give a request count or a duration, not both")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.requests is not None and (len(self.requests) != len(self.concurrency) or min(self.requests) < 1):
            raise ValueError("requests: one count >= 1 per concurrency level")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")
        if self.warmup < 0 or self.turns < 1:
            raise ValueError("warmup must be >= 0 and turns >= 1")

    def jobs_per_level(self) -> list[int]:
        """How many jobs each level may need: its count, or for a duration a pool
        that later jobs cycle through."""
        if self.requests is not None:
            return list(self.requests)
        return [max(64, 8 * c) for c in self.concurrency]

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "target": self.target, "model": self.model, "tokenizer_model": self.tokenizer_model,
            "workload": self.workload, "concurrency": list(self.concurrency),
            "requests": list(self.requests) if self.requests is not None else None, "duration_s": self.duration_s,
            "prompt_tokens": str(self.prompt_tokens), "output_tokens": str(self.output_tokens), "seed": self.seed,
            "warmup": self.warmup, "sampling": "greedy, ignore_eos",
            "constraint": "json_schema" if self.json_schema is not None else None,
        }
        if self.workload == "chat":
            out |= {"turns": self.turns, "chat_mode": self.chat_mode}
        return out


@dataclass
class LevelResult:
    summary: LevelSummary
    records: list[RequestRecord]
    jobs: list[Conversation]


@dataclass
class BenchResult:
    config: BenchConfig
    model: dict[str, object]
    warmup_errors: dict[str, int] = field(default_factory=dict)
    levels: list[LevelResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


async def plan(config: BenchConfig, target: Target, facts: ModelFacts) -> tuple[list[list[Conversation]],
                                                                                 list[Conversation]]:
    """The jobs of every level, and the warm-up jobs (their own prompts)."""
    counts = config.jobs_per_level()
    total = sum(counts) + config.warmup
    lengths = draw_lengths(total, config.turns, config.prompt_tokens, config.output_tokens, config.seed)
    flat = [p for job in lengths for p, _ in job]
    prompts = await target.prompts(flat, facts, config.workload == "chat", config.seed)
    jobs = []
    for i, job in enumerate(lengths):
        turn_prompts = prompts[i * config.turns:(i + 1) * config.turns]
        jobs.append(Conversation(index=i, prompts=turn_prompts, output_tokens=[o for _, o in job]))
    levels, start = [], 0
    for count in counts:
        levels.append(jobs[start:start + count])
        start += count
    return levels, jobs[start:]


def context_overflows(jobs: Sequence[Conversation], context_length: int | None) -> int:
    """Jobs whose whole conversation cannot fit the context (the server will refuse them)."""
    if not context_length:
        return 0
    return sum(1 for j in jobs if sum(len(p.token_ids) for p in j.prompts) + sum(j.output_tokens) > context_length)


async def run_jobs(target: Target, jobs: Sequence[Conversation], concurrency: int, count: int | None,
                   duration_s: float | None, live: LiveCounters) -> tuple[list[RequestRecord], float]:
    """Keeps `concurrency` jobs running; returns every record and the level's wall time
    (from the first start to the last job's end)."""
    records: list[RequestRecord] = []
    numbers = itertools.count()
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s

    async def worker() -> None:
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            n = next(numbers)
            if count is not None and n >= count:
                return
            await target.run(jobs[n % len(jobs)], records.append, live)

    await asyncio.gather(*(worker() for _ in range(concurrency if count is None else min(concurrency, count))))
    return records, time.perf_counter() - started


class ProgressBar:
    """One self-rewriting line on a terminal; silent anywhere else."""

    WIDTH = 24

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self._stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled

    async def track(self, label: str, live: LiveCounters, total: int | None, duration_s: float | None) -> None:
        """Redraws until cancelled, then clears its line."""
        if not self.enabled:
            return
        started = time.perf_counter()
        try:
            while True:
                self._draw(label, live, total, duration_s, time.perf_counter() - started)
                await asyncio.sleep(0.25)
        finally:
            self._stream.write("\r\033[K")
            self._stream.flush()

    def _draw(self, label: str, live: LiveCounters, total: int | None, duration_s: float | None,
              elapsed: float) -> None:
        fraction = live.done / total if total else min(elapsed / duration_s, 1.0) if duration_s else 0.0
        filled = math.floor(fraction * self.WIDTH)
        count = f"{live.done}/{total}" if total else f"{live.done}"
        rate = live.tokens / elapsed if elapsed > 0 else 0.0
        self._stream.write(f"\r\033[K{label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {count} requests, "
                           f"{live.errors} errors, {rate:.1f} tok/s, {elapsed:.0f}s")
        self._stream.flush()


async def _with_progress(progress: ProgressBar, label: str, total: int | None, duration_s: float | None,
                         target: Target, jobs: Sequence[Conversation], concurrency: int, count: int | None
                         ) -> tuple[list[RequestRecord], float]:
    live = LiveCounters()
    ticker = asyncio.create_task(progress.track(label, live, total, duration_s))
    try:
        return await run_jobs(target, jobs, concurrency, count, duration_s, live)
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


async def run(config: BenchConfig, target: Target, facts: ModelFacts, progress: ProgressBar,
              log: TextIO = sys.stderr) -> BenchResult:
    """Runs the warm-up and every level; errors of single requests are results, not exceptions."""
    result = BenchResult(config=config, model={"name": config.model, **facts.details})
    levels, warmup = await plan(config, target, facts)
    overflow = context_overflows([j for level in levels for j in level], facts.context_length)
    if overflow:
        note = (f"{overflow} jobs need more than the model's {facts.context_length}-token context; the server "
                "will refuse them (INVALID_ARGUMENT)")
        result.notes.append(note)
        print(f"llmsuite bench: warning: {note}", file=log)
    turns = config.turns
    if warmup:
        concurrency = min(len(warmup), max(config.concurrency))
        records, _ = await _with_progress(progress, "warm-up", len(warmup) * turns, None, target, warmup,
                                          concurrency, len(warmup))
        failed = LevelSummary.of(concurrency, records, 1.0).errors
        result.warmup_errors = failed
        if failed:
            print(f"llmsuite bench: warm-up: {sum(failed.values())} of {len(records)} requests failed "
                  f"({', '.join(f'{k}={v}' for k, v in failed.items())})", file=log)
    for concurrency, jobs in zip(config.concurrency, levels, strict=True):
        count = len(jobs) if config.requests is not None else None
        records, wall = await _with_progress(progress, f"c={concurrency}", count * turns if count else None,
                                             config.duration_s, target, jobs, concurrency, count)
        summary = LevelSummary.of(concurrency, records, wall)
        result.levels.append(LevelResult(summary, records, jobs))
    return result
