"""The fused (ONNX Runtime GenAI) layout generates exactly what the Optimum layout of the same
weights generates, alone and batched, and quantized files generate exactly what a plain
onnxruntime loop on the same file generates.

GroupQueryAttention reads the KV cache right-padded (per-row lengths from attention_mask),
so the engine batches such exports only across rows of equal length; the mixed workload
below (16 rows of different lengths joining and leaving at different steps, two multi-turn
sessions, two cancellations, prefix-cache hits) still runs through it unchanged.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from layout_support import SHARED_GENAI_EXPORTS, reference_greedy

from llmsuite.builder.variants import build_variant
from llmsuite.inference.engine import FinishReason, GeneratedToken, ModelLoadError, SamplingParams, TurnResult


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fused")
    dirs = {"optimum": root / "optimum", "gqa": root / "gqa", "gqa-int4": root / "gqa-int4"}
    build_variant(dirs["optimum"])
    build_variant(dirs["gqa"], layout="gqa")
    build_variant(dirs["gqa-int4"], layout="gqa", precision="int4")
    return dirs


@dataclass(frozen=True)
class Row:
    turns: tuple[tuple[int, ...], ...]  # two turns: a multi-turn session
    max_new_tokens: int
    cancel_after: int | None = None


def workload(vocab: int) -> list[Row]:
    """16 rows: mixed prompt and output lengths, 2 sessions, 2 cancellations, and 3 rows that
    extend earlier rows' prompts (prefix-cache hits once those have ended)."""
    rng = np.random.default_rng(16)
    rows: list[Row] = []
    for i in range(13):
        prompt = tuple(int(t) for t in rng.integers(3, vocab, size=2 + (i * 5) % 19))
        turns: tuple[tuple[int, ...], ...] = (prompt,)
        if i in (2, 8):
            turns += (tuple(int(t) for t in rng.integers(3, vocab, size=3)),)
        cancel = 3 if i in (4, 10) else None
        rows.append(Row(turns, 40 if cancel else 4 + (i * 3) % 11, cancel))
    for base in (1, 6, 11):
        rows.append(Row((rows[base].turns[0] + (7, 8, 9),), 6))
    return rows


async def run_row(engine: Any, model: str, row: Row, after: asyncio.Event | None = None,
                  started: asyncio.Event | None = None) -> list[list[int]]:
    """Runs every turn of `row` (once `after` is set); sets `started` at its first token."""
    if after is not None:
        await after.wait()
    session = engine.open_session(model, multi_turn=len(row.turns) > 1)
    params = SamplingParams(temperature=0.0, max_new_tokens=row.max_new_tokens, ignore_eos=True)
    outputs: list[list[int]] = []
    try:
        for turn in row.turns:
            tokens: list[int] = []
            async for item in session.generate(list(turn), params):
                if isinstance(item, TurnResult):
                    assert item.finish_reason is FinishReason.LENGTH
                    break
                assert isinstance(item, GeneratedToken)
                tokens.append(item.token_id)
                if started is not None:
                    started.set()
                if row.cancel_after is not None and len(tokens) == row.cancel_after:
                    break  # leaving the stream cancels the turn
            outputs.append(tokens)
            if row.cancel_after is not None:
                break
    finally:
        session.close()
    return outputs


async def run_batched(engine: Any, model: str, rows: list[Row]) -> list[list[list[int]]]:
    """Every row at once; odd rows join only after the row before them has started decoding."""
    started = [asyncio.Event() for _ in rows]
    runs = [run_row(engine, model, row, started[i - 1] if i % 2 else None, started[i]) for i, row in enumerate(rows)]
    return list(await asyncio.gather(*runs))


async def run_alone(engine: Any, model: str, rows: list[Row]) -> list[list[list[int]]]:
    return [await run_row(engine, model, Row(r.turns, r.max_new_tokens)) for r in rows]


def same_tokens(got: list[list[list[int]]], expected: list[list[list[int]]], rows: list[Row]) -> None:
    for index, (row, mine, theirs) in enumerate(zip(rows, got, expected, strict=True)):
        if row.cancel_after is not None:
            assert mine[0] == theirs[0][: len(mine[0])], f"row {index}"
        else:
            assert mine == theirs, f"row {index}"


def test_fused_layout_matches_optimum_alone_and_batched(load_engine: Any, layouts: dict[str, Path]) -> None:
    engine = load_engine({"optimum": layouts["optimum"], "gqa": layouts["gqa"]}, max_running=16)
    rows = workload(engine.model_info("gqa").vocab_size)
    reference = asyncio.run(run_alone(engine, "optimum", rows))
    assert asyncio.run(run_alone(engine, "gqa", rows)) == reference
    before = engine.stats("gqa")
    same_tokens(asyncio.run(run_batched(engine, "gqa", rows)), reference, rows)
    stats = engine.stats("gqa")
    assert stats.prefix_cache_hit_tokens > before.prefix_cache_hit_tokens, "the workload should reuse cached KV"
    assert stats.running == 0 and stats.queued == 0
    info = engine.model_info("gqa")
    assert (info.layout, info.attention, info.uses_position_ids) == ("onnxruntime-genai", "GroupQueryAttention", False)


def test_fused_layout_equals_a_plain_onnxruntime_loop(load_engine: Any, helpers: Any,
                                                      layouts: dict[str, Path]) -> None:
    engine = load_engine({"gqa": layouts["gqa"], "gqa-int4": layouts["gqa-int4"]})
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    for prompt in ([1, 17, 300, 41], list(range(5, 45))):
        for name in ("gqa", "gqa-int4"):
            tokens, _ = asyncio.run(helpers.generate_once(engine, name, prompt, params))
            assert tokens == reference_greedy(layouts[name] / "model.onnx", prompt, 20), name
    assert engine.model_info("gqa-int4").precision == "int4"


def test_chunked_prefill_of_the_fused_layout_changes_nothing(load_engine: Any, helpers: Any,
                                                             layouts: dict[str, Path]) -> None:
    """A prompt fed in chunks continues from its own cache: GroupQueryAttention's subsequent-prompt path."""
    engine = load_engine({"gqa": layouts["gqa"]}, prefill_chunk_tokens=8)
    prompt = list(range(20, 57))
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    tokens, _ = asyncio.run(helpers.generate_once(engine, "gqa", prompt, params))
    assert tokens == reference_greedy(layouts["gqa"] / "model.onnx", prompt, 12)


def _genai_exports() -> Path:
    if not SHARED_GENAI_EXPORTS.is_dir():
        pytest.skip(f"{SHARED_GENAI_EXPORTS} is absent: onnxruntime-genai's builder outputs ship only beside the "
                    "team's checkout")
    return SHARED_GENAI_EXPORTS


def test_genai_builder_export_reproduces_transformers(load_engine: Any, helpers: Any) -> None:
    exports = _genai_exports()
    cases = json.loads((exports / "llama-fp32" / "reference.json").read_text())["cases"]
    engine = load_engine({"fp32": exports / "llama-fp32", "int4": exports / "llama-int4"}, max_running=16)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    for case in cases:
        tokens, result = asyncio.run(helpers.generate_once(engine, "fp32", case["prompt_ids"], params))
        assert tokens == case["greedy_ids"], case["name"]
        assert result.finish_reason is FinishReason.LENGTH

    async def all_at_once(model: str) -> list[list[int]]:
        runs = [helpers.generate_once(engine, model, c["prompt_ids"], params) for c in cases]
        return [tokens for tokens, _ in await asyncio.gather(*runs)]

    assert asyncio.run(all_at_once("fp32")) == [c["greedy_ids"] for c in cases]
    int4_reference = [reference_greedy(exports / "llama-int4" / "model.onnx", c["prompt_ids"], 24) for c in cases]
    assert asyncio.run(all_at_once("int4")) == int4_reference


def test_genai_builder_export_stops_at_its_eos(load_engine: Any, helpers: Any) -> None:
    """eos ids come from genai_config.json: the `fox` case reaches an eos id at its third token."""
    exports = _genai_exports()
    case = next(c for c in json.loads((exports / "llama-fp32" / "reference.json").read_text())["cases"]
                if c["name"] == "fox")
    engine = load_engine({"fp32": exports / "llama-fp32"})
    tokens, result = asyncio.run(helpers.generate_once(engine, "fp32", case["prompt_ids"],
                                                       SamplingParams(temperature=0.0, max_new_tokens=24)))
    assert tokens == case["greedy_ids_stop_at_eos"] and len(tokens) == case["first_eos_index"] + 1
    assert (result.finish_reason, result.matched_stop_token_id) == (FinishReason.STOP, tokens[-1])
    assert tokens[-1] in (1532, 1535)


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_fused_layout_and_int4_on_cuda(load_engine: Any, helpers: Any, layouts: dict[str, Path]) -> None:
    """On CUDA the fused fp32 layout gives the CPU tokens; int4 (whose CUDA kernel computes
    differently from the CPU's int8-activation one) gives a plain CUDA loop's tokens."""
    try:
        engine = load_engine({"gqa": layouts["gqa"], "gqa-int4": layouts["gqa-int4"]}, device="cuda")
    except ModelLoadError as exc:
        pytest.skip(f"CUDA provider listed but not usable: {exc}")
    assert engine.model_info("gqa").execution_provider == "CUDAExecutionProvider"
    params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    prompt = [1, 17, 300, 41, 9, 88]
    tokens, _ = asyncio.run(helpers.generate_once(engine, "gqa", prompt, params))
    assert tokens == reference_greedy(layouts["gqa"] / "model.onnx", prompt, 16)
    tokens, _ = asyncio.run(helpers.generate_once(engine, "gqa-int4", prompt, params))
    assert tokens == reference_greedy(layouts["gqa-int4"] / "model.onnx", prompt, 16, "CUDAExecutionProvider")
