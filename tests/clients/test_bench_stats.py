"""`llmsuite bench`'s arithmetic and workload planning, without a server."""

from __future__ import annotations

import asyncio
import io
import math
import random
import statistics

import numpy as np
import pytest

from llmsuite.client.bench_runner import ProgressBar
from llmsuite.client.bench_stats import Distribution, LevelSummary, RequestRecord, percentile
from llmsuite.client.bench_targets import LiveCounters
from llmsuite.client.bench_workload import LengthSpec, draw_lengths, exact_texts, random_ids


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.parametrize("size", [2, 3, 10, 101, 1000])
def test_percentile_agrees_with_numpy_and_statistics(size):
    rng = random.Random(size)
    values = [rng.expovariate(1.0) for _ in range(size)]
    for q in (1, 25, 50, 90, 95, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    assert percentile(values, 50) == pytest.approx(cuts[49])
    assert percentile(values, 99) == pytest.approx(cuts[98])


def test_distribution_summary_and_json_without_nan():
    d = Distribution.of([0.010, 0.020, 0.030])
    assert (d.count, d.mean, d.p50) == (3, pytest.approx(0.02), pytest.approx(0.02))
    assert d.to_ms()["p50"] == 20.0
    empty = Distribution.of([]).to_ms()
    assert empty == {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}


def _record(index: int, arrivals: list[tuple[float, int]], *, code: str = "OK", expected: int | None = None,
            turn: int = 0, prompt: int = 10, cached: int = 0) -> RequestRecord:
    total = sum(n for _, n in arrivals)
    return RequestRecord(index=index, turn=turn, expected_output_tokens=total if expected is None else expected,
                         started=0.0, finished=(arrivals[-1][0] + 0.5) if arrivals else 0.1, code=code,
                         prompt_tokens=prompt, cached_tokens=cached, token_times=list(arrivals),
                         error="" if code == "OK" else f"{code.lower()} happened")


def test_inter_token_latency_spreads_coalesced_tokens_and_keeps_the_mean():
    # First message at 1.0 with 1 token, then 3 tokens together at 1.6, then 1 at 1.8.
    r = _record(0, [(1.0, 1), (1.6, 3), (1.8, 1)])
    samples = r.inter_token_latencies()
    assert samples == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert sum(samples) / len(samples) == pytest.approx((1.8 - 1.0) / (r.output_tokens - 1))
    assert r.ttft == 1.0 and r.output_tokens == 5
    # Tokens that arrive with the first one are samples of 0 (the client saw no gap).
    assert _record(1, [(1.0, 2), (2.0, 1)]).inter_token_latencies() == pytest.approx([0.0, 1.0])
    assert _record(2, [(1.0, 1)]).inter_token_latencies() == []


def test_text_only_streams_count_tokens_from_usage():
    r = _record(0, [(1.0, 1), (2.0, 1)])
    r.counted_by_usage, r.reported_output_tokens = True, 6
    assert r.output_tokens == 6


def test_level_summary_counts_errors_by_code_and_skips_them_in_latencies():
    records = [
        _record(0, [(0.1, 1), (0.2, 4)]),
        _record(1, [(0.3, 5)], expected=6),  # one token short
        _record(2, [], code="RESOURCE_EXHAUSTED", expected=5),
        _record(3, [], code="RESOURCE_EXHAUSTED", expected=5),
        _record(4, [(0.05, 2)], code="DEADLINE_EXCEEDED", expected=5),
    ]
    s = LevelSummary.of(4, records, duration_s=2.0)
    assert (s.requests, s.succeeded) == (5, 2)
    assert s.errors == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert s.error_examples["RESOURCE_EXHAUSTED"] == "resource_exhausted happened"
    assert s.output_tokens == 10 and s.length_mismatches == 1
    assert s.output_tokens_per_s == 5.0 and s.requests_per_s == 1.0
    assert s.ttft.count == 2 and s.ttft.p50 == pytest.approx(0.2)  # failed requests' tokens are not counted
    assert s.turns == []
    out = s.to_dict()
    assert out["errors"] == s.errors and out["ttft_ms"]["count"] == 2 and "turns" not in out


def test_level_summary_reports_cache_hits_per_turn():
    records = [_record(0, [(0.1, 2)], turn=0, prompt=30), _record(0, [(0.2, 2)], turn=1, prompt=10, cached=30),
               _record(1, [(0.3, 2)], turn=0, prompt=30), _record(1, [], turn=1, code="UNAVAILABLE")]
    s = LevelSummary.of(2, records, duration_s=1.0)
    assert s.cache_hit_rate == pytest.approx(30 / 100)
    assert [(t["turn"], t["succeeded"], t["cache_hit_rate"]) for t in s.turns] == [(0, 2, 0.0), (1, 1, 0.75)]


def test_length_specs_parse_and_draw_within_bounds():
    assert str(LengthSpec.parse("128")) == "128"
    uniform = LengthSpec.parse("uniform:5:9")
    normal = LengthSpec.parse("normal:20:50")
    rng = random.Random(0)
    assert {uniform.sample(rng) for _ in range(400)} == set(range(5, 10))
    assert min(normal.sample(rng) for _ in range(400)) >= 1
    for bad in ("0", "uniform:9:5", "normal:1", "12x", "uniform:0:3"):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)
    plan = draw_lengths(5, 3, uniform, LengthSpec.parse("normal:10:2"), seed=7)
    assert plan == draw_lengths(5, 3, uniform, LengthSpec.parse("normal:10:2"), seed=7)
    assert len(plan) == 5 and all(len(job) == 3 for job in plan)


def test_random_ids_stay_in_the_vocabulary_and_avoid_excluded_ids():
    prompts = random_ids([200, 50], vocab_size=8, excluded=(0, 2, 7), seed=1)
    assert [len(p.token_ids) for p in prompts] == [200, 50]
    assert {i for p in prompts for i in p.token_ids} == {1, 3, 4, 5, 6}
    assert random_ids([5], 8, (), seed=3)[0].token_ids == random_ids([5], 8, (), seed=3)[0].token_ids


def test_exact_texts_hit_every_length_with_a_real_bpe_tokenizer(tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))

    async def tokenize(texts, offsets):
        out = []
        for e in tokenizer.encode_batch(list(texts), add_special_tokens=True):
            spans = [(a, b) for a, b in e.offsets] if offsets else []
            out.append((list(e.ids), spans))
        return out

    lengths = list(range(2, 90, 3))
    prompts = asyncio.run(exact_texts(lengths, tokenize, seed=5))
    for n, prompt in zip(lengths, prompts, strict=True):
        encoded = tokenizer.encode(prompt.text, add_special_tokens=True).ids
        assert len(encoded) == n and encoded == prompt.token_ids
    with pytest.raises(ValueError, match="too short"):
        asyncio.run(exact_texts([1], tokenize, seed=0))


def test_progress_bar_draws_only_where_asked():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not ProgressBar(io.StringIO()).enabled
    tty = Terminal()
    bar = ProgressBar(tty)
    assert bar.enabled
    bar._draw("c=4", LiveCounters(done=3, errors=1, tokens=50), total=12, duration_s=None, elapsed=5.0)
    line = tty.getvalue()
    assert line.startswith("\r") and "c=4" in line and "3/12 requests" in line and "1 errors" in line
    assert "10.0 tok/s" in line and "[######" in line
