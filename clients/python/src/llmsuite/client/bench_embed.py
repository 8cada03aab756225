"""`llmsuite bench --workload embed`: embedding throughput through the gateway.

Each request carries `--texts-per-request` texts of varied length (English-like sentences
drawn from a seeded generator, so two runs with one seed send the same texts); a closed loop
keeps `concurrency` requests in flight per level, as the generation levels do. Reported per
level: texts and tokens embedded per second, request latency quantiles, failures by gRPC
status code. `--save-texts` writes each request's texts, so a reference can embed exactly
the same inputs (bench/run.py does, straight on onnxruntime).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmsuite.client.async_client import AsyncLlmsuiteClient
from llmsuite.client.bench_stats import PERCENTILES, percentile
from llmsuite.client.errors import LlmsuiteError

_WORDS = (
    "the", "a", "model", "server", "request", "vector", "search", "document", "query", "answer", "river", "city",
    "quiet", "bright", "engine", "token", "batch", "memory", "network", "garden", "market", "letter", "window",
    "question", "retrieval", "embedding", "index", "forest", "winter", "signal", "careful", "slowly", "again",
    "東京", "café", "naïve", "über", "数据", "résumé", "jalapeño", "🙂",
)


def bench_texts(requests: int, per_request: int, seed: int, *, min_words: int = 4, max_words: int = 48
                ) -> list[list[str]]:
    """`requests` lists of `per_request` texts, lengths uniform in words; fixed by `seed`."""
    rng = random.Random(seed)
    return [[" ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
             for _ in range(per_request)] for _ in range(requests)]


@dataclass
class EmbedLevel:
    concurrency: int
    requests: int
    texts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        ms = {f"p{q:g}": percentile([s * 1e3 for s in self.latencies_s], q)
              for q in PERCENTILES} if self.latencies_s else {}
        return {"concurrency": self.concurrency, "requests": self.requests, "succeeded": len(self.latencies_s),
                "errors": dict(self.errors), "texts": self.texts, "tokens": self.tokens,
                "duration_s": round(self.seconds, 3),
                "texts_per_s": round(self.texts / self.seconds, 2) if self.seconds else None,
                "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
                "latency_ms": {k: round(v, 2) for k, v in ms.items()}}


async def _level(client: AsyncLlmsuiteClient, model: str, batches: Sequence[list[str]], concurrency: int
                 ) -> EmbedLevel:
    level = EmbedLevel(concurrency, len(batches))
    numbers = itertools.count()

    async def worker() -> None:
        while (n := next(numbers)) < len(batches):
            started = time.perf_counter()
            try:
                result = await client.embed(batches[n], model=model)
            except LlmsuiteError as exc:
                level.errors[exc.code.name] += 1
                continue
            level.latencies_s.append(time.perf_counter() - started)
            level.texts += len(result.vectors)
            level.tokens += result.usage.prompt_tokens

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(batches)))))
    level.seconds = time.perf_counter() - started
    return level


async def run_embed_bench(client: AsyncLlmsuiteClient, *, model: str, concurrency: Sequence[int],
                          requests: Sequence[int], per_request: int, seed: int, warmup: int
                          ) -> tuple[dict[str, Any], list[list[str]]]:
    """Every level in turn (each its own texts); returns the JSON-ready result and the texts sent."""
    counts = list(requests)
    all_texts = bench_texts(sum(counts) + warmup, per_request, seed)
    if warmup:
        await _level(client, model, all_texts[-warmup:], min(warmup, max(concurrency)))
    levels, start = [], 0
    for c, count in zip(concurrency, counts, strict=True):
        levels.append((await _level(client, model, all_texts[start:start + count], c)).to_dict())
        start += count
    result = {"workload": "embed", "model": model, "texts_per_request": per_request, "seed": seed,
              "levels": levels}
    return result, all_texts[:start]


def format_embed_table(result: dict[str, Any]) -> str:
    rows = [["c", "requests", "ok", "texts/s", "tokens/s", "p50 ms", "p99 ms", "errors"]]
    for level in result["levels"]:
        rows.append([str(level["concurrency"]), str(level["requests"]), str(level["succeeded"]),
                     str(level["texts_per_s"]), str(level["tokens_per_s"]), str(level["latency_ms"].get("p50")),
                     str(level["latency_ms"].get("p99")),
                     ",".join(f"{k}={v}" for k, v in level["errors"].items()) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    title = f"embeddings: model {result['model']}, {result['texts_per_request']} texts per request"
    return "\n".join([title, *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)])


def write_texts(texts: Sequence[list[str]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for batch in texts:
            f.write(json.dumps(batch, ensure_ascii=False) + "\n")
