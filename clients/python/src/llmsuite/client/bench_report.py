"""How `llmsuite bench` shows its results: a table for people (metrics as rows,
one column per concurrency level), one JSON document for machines, and JSON
lines per request / per prompt for whoever wants to dig further."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import IO

from llmsuite.client.bench_runner import BenchResult
from llmsuite.client.bench_stats import Distribution, LevelSummary

JSON_VERSION = 1


def to_json(result: BenchResult) -> dict[str, object]:
    return {
        "version": JSON_VERSION,
        "config": result.config.to_dict(),
        "model": result.model,
        "warmup_errors": result.warmup_errors,
        "notes": result.notes,
        "levels": [level.summary.to_dict() for level in result.levels],
    }


def write_requests(result: BenchResult, out: IO[str]) -> None:
    """One JSON line per request (chat: per turn), with the level's concurrency."""
    for level in result.levels:
        for record in sorted(level.records, key=lambda r: (r.index, r.turn)):
            out.write(json.dumps({"concurrency": level.summary.concurrency, **record.to_dict()}) + "\n")


def write_prompts(result: BenchResult, out: IO[str]) -> None:
    """One JSON line per job and turn: the prompt's token ids (and text) exactly as sent."""
    for level in result.levels:
        for job in level.jobs:
            for turn, (prompt, output) in enumerate(zip(job.prompts, job.output_tokens, strict=True)):
                line: dict[str, object] = {"concurrency": level.summary.concurrency, "index": job.index,
                                           "turn": turn, "output_tokens": output, "token_ids": prompt.token_ids}
                if prompt.text is not None:
                    line["text"] = prompt.text
                out.write(json.dumps(line) + "\n")


def _number(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _latency(pick: Callable[[LevelSummary], Distribution], which: str) -> Callable[[LevelSummary], str]:
    return lambda s: _number(getattr(pick(s), which) * 1e3)


def format_table(result: BenchResult) -> str:
    config = result.config
    summaries = [level.summary for level in result.levels]
    codes = sorted({code for s in summaries for code in s.errors})
    rows: list[tuple[str, Callable[[LevelSummary], str]]] = [
        ("requests" if config.workload == "generate" else "requests (turns)", lambda s: str(s.requests)),
        ("succeeded", lambda s: str(s.succeeded)),
        ("errors", lambda s: str(s.requests - s.succeeded)),
        *((f"  {code}", lambda s, c=code: str(s.errors.get(c, 0))) for code in codes),
        ("wrong output length", lambda s: str(s.length_mismatches)),
        ("duration (s)", lambda s: _number(s.duration_s, 2)),
        ("output tokens", lambda s: str(s.output_tokens)),
        ("output tokens/s", lambda s: _number(s.output_tokens_per_s)),
        ("requests/s", lambda s: _number(s.requests_per_s, 3)),
    ]
    for label, pick in (("TTFT", lambda s: s.ttft), ("ITL", lambda s: s.itl), ("E2E", lambda s: s.e2e)):
        rows += [(f"{label} {p} (ms)", _latency(pick, p)) for p in ("p50", "p95", "p99")]
    if config.workload == "chat":
        rows.append(("cached prompt tokens", lambda s: f"{s.cache_hit_rate:.1%}"))
        for turn in range(config.turns):
            rows.append((f"TTFT p50 turn {turn + 1} (ms)", lambda s, t=turn: _turn_ttft(s, t)))  # type: ignore[misc]

    header = ["", *(f"c={s.concurrency}" for s in summaries)]
    cells = [header, *([label, *(fmt(s) for s in summaries)] for label, fmt in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"{config.target} {config.model}: {config.workload}, prompt {config.prompt_tokens} tokens, "
             f"output {config.output_tokens} tokens, greedy, EOS ignored"
             + (f", {config.turns} turns ({config.chat_mode})" if config.workload == "chat" else "")]
    for row in cells:
        lines.append("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                                        strict=True))]).rstrip())
    lines += [f"c={s.concurrency} {code}: {message}" for s in summaries for code, message in s.error_examples.items()]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _turn_ttft(summary: LevelSummary, turn: int) -> str:
    entry = next((t for t in summary.turns if t["turn"] == turn), None)
    value = entry["ttft_ms"]["p50"] if entry else None  # type: ignore[index]
    return "-" if value is None else f"{value:,.1f}"
