"""The HTTP hop (issue 17): the same prompts as a gRPC level, streamed through `llmsuite-openai`.

    python bench/http_bench.py --url http://127.0.0.1:8000 --model bench --prompts prompts.jsonl -c 16

A closed loop of --concurrency clients, each sending the next prompt when its previous
request has finished, as `llmsuite bench` does over gRPC: streamed `POST /v1/completions`
with the prompt's text, `max_tokens` the prompt's output length, greedy, `ignore_eos`, and
`stream_options.include_usage` so the last event counts the tokens. The prompts come from
`llmsuite bench --save-prompts` (the text each gRPC request sent), so both sides tokenize
the same strings in the same gateway. Prints one JSON level summary, with the same field
names as `llmsuite bench --json` where they mean the same thing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class Prompt:
    text: str
    output_tokens: int


@dataclass
class Record:
    status: str = "OK"
    output_tokens: int = 0
    expected_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    chunks: int = 0


@dataclass
class Level:
    concurrency: int
    records: list[Record] = field(default_factory=list)
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.status == "OK"]
        tokens = sum(r.output_tokens for r in ok)
        itls = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                if r.ttft_s is not None and r.output_tokens > 1]
        return {
            "concurrency": self.concurrency, "requests": len(self.records), "succeeded": len(ok),
            "errors": dict(Counter(r.status for r in self.records if r.status != "OK")),
            "length_mismatches": sum(r.output_tokens != r.expected_tokens for r in ok),
            "duration_s": round(self.duration_s, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / self.duration_s, 2) if self.duration_s else None,
            "ttft_ms": {"p50": _p50_ms([r.ttft_s for r in ok if r.ttft_s is not None])},
            "itl_ms": {"p50": _p50_ms(itls)},
            "e2e_ms": {"p50": _p50_ms([r.e2e_s for r in ok])},
        }


def _p50_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1e3, 2) if values else None


def read_prompts(path: Path, concurrency: int | None = None) -> list[Prompt]:
    """`llmsuite bench --save-prompts` lines (of one level when `concurrency` is given), in order."""
    prompts = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if concurrency is None or entry["concurrency"] == concurrency:
            prompts.append(Prompt(text=entry["text"], output_tokens=entry["output_tokens"]))
    return prompts


def request_body(model: str, prompt: Prompt) -> dict[str, Any]:
    return {"model": model, "prompt": prompt.text, "max_tokens": prompt.output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _one(client: httpx.AsyncClient, model: str, prompt: Prompt) -> Record:
    record = Record(expected_tokens=prompt.output_tokens)
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=request_body(model, prompt)) as response:
            if response.status_code != 200:
                await response.aread()
                record.status = f"HTTP {response.status_code}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.status = f"stream error {event['error'].get('code') or event['error'].get('type')}"
                    return record
                if any(choice.get("text") for choice in event.get("choices", [])):
                    record.chunks += 1
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - started
                if event.get("usage"):
                    record.output_tokens = int(event["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        record.status = type(exc).__name__
    record.e2e_s = time.perf_counter() - started
    return record


async def run_level(url: str, model: str, prompts: list[Prompt], concurrency: int, timeout_s: float = 600.0
                    ) -> Level:
    """Every prompt once, `concurrency` in flight, in order."""
    level = Level(concurrency=concurrency)
    queue = list(reversed(prompts))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while queue:
                level.records.append(await _one(client, model, queue.pop()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.duration_s = time.perf_counter() - started
    return level


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the adapter's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="llmsuite bench --save-prompts output")
    parser.add_argument("--level", type=int, default=None, help="take the prompts of this gRPC level only")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="requests sent first, not measured")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts, args.level)
    if not prompts:
        parser.error(f"no prompts in {args.prompts}" + (f" at level {args.level}" if args.level else ""))
    if args.warmup:
        asyncio.run(run_level(args.url, args.model, prompts[:args.warmup], 1))
    print(json.dumps(asyncio.run(run_level(args.url, args.model, prompts, args.concurrency)).summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
