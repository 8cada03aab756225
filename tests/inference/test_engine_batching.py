"""Continuous batching changes throughput, never tokens.

A mixed workload (16 requests of different prompt and output lengths joining and leaving
at different steps, two multi-turn sessions, two cancellations) must give every request
exactly the greedy tokens it gets alone, on the builder's models (Llama-style with
position_ids: one left-padded batch; GPT-2-style without: one batch per length) and on
the real Optimum exports. Admission is by KV bytes: the batch never reserves more than
the budget, and a request that could never fit is refused up front.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import SHARED_EXPORTS

from llmsuite.inference.engine import FinishReason, GeneratedToken, SamplingParams, TurnResult
from llmsuite.inference.engine.batch import DecodeBatch
from llmsuite.inference.engine.kv_ops import KvOps
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.types import StepReport
from llmsuite.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Request:
    index: int
    turns: tuple[tuple[int, ...], ...]  # prompt ids per turn (two turns = a retained session)
    max_new_tokens: int
    cancel_after: int | None = None  # leave the stream after this many tokens of the first turn
    wait_for_previous: bool = False  # start once the previous request has streamed a token


def mixed_workload(vocab: int) -> list[Request]:
    rng = np.random.default_rng(7)
    requests = []
    for i in range(16):
        prompt = tuple(int(t) for t in rng.integers(3, vocab, size=2 + (i * 7) % 23))
        turns: tuple[tuple[int, ...], ...] = (prompt,)
        if i in (3, 9):
            turns += (tuple(int(t) for t in rng.integers(3, vocab, size=4)),)
        cancelled = i in (5, 12)  # long, so the cancel normally lands before the end (either way is checked)
        requests.append(Request(i, turns, max_new_tokens=60 if cancelled else 5 + (i * 5) % 14,
                                cancel_after=3 if cancelled else None, wait_for_previous=i % 2 == 1))
    return requests


async def run_request(engine: Any, model: str, request: Request, started: asyncio.Event | None = None,
                      previous: asyncio.Event | None = None) -> list[list[int]]:
    """Runs every turn of `request`; returns the tokens of each turn."""
    if previous is not None:
        await previous.wait()
    session = engine.open_session(model, multi_turn=len(request.turns) > 1)
    params = SamplingParams(temperature=0.0, max_new_tokens=request.max_new_tokens, ignore_eos=True)
    outputs: list[list[int]] = []
    try:
        for turn in request.turns:
            tokens: list[int] = []
            result: TurnResult | None = None
            async for item in session.generate(list(turn), params):
                if isinstance(item, TurnResult):
                    result = item
                    break
                assert isinstance(item, GeneratedToken)
                tokens.append(item.token_id)
                if started is not None:
                    started.set()
                if request.cancel_after is not None and len(tokens) == request.cancel_after:
                    break  # leaving the loop cancels the turn
            outputs.append(tokens)
            if request.cancel_after is None:
                assert result is not None and result.finish_reason is FinishReason.LENGTH
                assert len(tokens) == request.max_new_tokens
            else:
                break
    finally:
        session.close()
    return outputs


async def run_mixed(engine: Any, model: str, requests: Sequence[Request]) -> list[list[list[int]]]:
    started = [asyncio.Event() for _ in requests]
    tasks = [
        asyncio.create_task(run_request(engine, model, r, started[i],
                                        started[i - 1] if r.wait_for_previous and i else None))
        for i, r in enumerate(requests)
    ]
    return list(await asyncio.gather(*tasks))


async def run_alone(engine: Any, model: str, requests: Sequence[Request]) -> list[list[list[int]]]:
    return [await run_request(engine, model, Request(r.index, r.turns, r.max_new_tokens)) for r in requests]


def assert_same_tokens(batched: list[list[list[int]]], alone: list[list[list[int]]],
                       requests: Sequence[Request]) -> None:
    for request, got, expected in zip(requests, batched, alone, strict=True):
        if request.cancel_after is not None:
            assert got[0] == expected[0][: request.cancel_after], f"request {request.index}"
        else:
            assert got == expected, f"request {request.index}"


def _models(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_batching_never_changes_greedy_tokens(load_engine: Any, tiny_llama_dir: Path, tiny_gpt2_dir: Path,
                                              model: str, helpers: Any) -> None:
    log = helpers.StepLog()
    # Without the prefix cache: the batched run must compute everything itself, not reuse the alone run's KV.
    engine = load_engine(_models(tiny_llama_dir, tiny_gpt2_dir), step_observer=log, max_running=16,
                         prefix_cache=False)
    requests = mixed_workload(engine.model_info(model).vocab_size)
    alone = asyncio.run(run_alone(engine, model, requests))
    assert log.most_rows == 1
    before = engine.stats(model)
    batched = asyncio.run(run_mixed(engine, model, requests))
    assert_same_tokens(batched, alone, requests)
    if engine.model_info(model).uses_position_ids:
        assert log.most_rows >= 8, "the mixed workload should have decoded many rows in one forward"
    stats = engine.stats(model)
    assert stats.running == 0 and stats.cached_tokens == 0 and stats.kv_bytes == 0
    # Every turn ended exactly once; a cancel can lose the race with the turn's last token on a busy machine.
    turns = sum(len(r.turns) if r.cancel_after is None else 1 for r in requests)
    ended = (stats.completed - before.completed) + (stats.cancelled - before.cancelled)
    assert ended == turns and stats.cancelled - before.cancelled <= 2


@pytest.mark.optimum
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batching_never_changes_greedy_tokens_on_real_exports(load_engine: Any, arch: str, helpers: Any) -> None:
    if not (SHARED_EXPORTS / arch).is_dir():
        pytest.skip(f"{SHARED_EXPORTS} is absent: the real Optimum exports ship only beside the team's checkout")
    log = helpers.StepLog()
    engine = load_engine({arch: SHARED_EXPORTS / arch}, step_observer=log, max_running=16, prefix_cache=False)
    requests = mixed_workload(engine.model_info(arch).vocab_size)
    alone = asyncio.run(run_alone(engine, arch, requests))
    batched = asyncio.run(run_mixed(engine, arch, requests))
    assert_same_tokens(batched, alone, requests)
    assert log.most_rows >= 8


def test_admission_keeps_reserved_kv_within_the_budget(load_engine: Any, tiny_llama_dir: Path, helpers: Any) -> None:
    # Tiny Llama KV is 1 KiB per token; each request can grow to 10 + 20 = 30 tokens, and a row
    # reserves its KV twice (what it holds, and the copy a step writes): 60 KiB.
    budget = 140 * 1024
    engine = load_engine({"tiny": tiny_llama_dir}, kv_cache_bytes=budget, max_running=16, prefix_cache=False)
    reserved: list[int] = []
    log = helpers.StepLog()

    def observe(report: StepReport) -> None:
        log(report)
        reserved.append(engine.stats("tiny").kv_reserved_bytes)

    engine._models["tiny"].scheduler._observer = observe
    requests = [Request(i, (tuple(range(20 + i, 30 + i)),), max_new_tokens=20) for i in range(6)]
    alone = asyncio.run(run_alone(engine, "tiny", requests))
    batched = asyncio.run(run_mixed(engine, "tiny", requests))
    assert batched == alone
    assert log.most_rows == 2, "two 30-token rows fit 140 KiB with a step's copy of their KV, three do not"
    assert max(reserved) <= budget
    assert engine.stats("tiny").kv_budget_bytes == budget


def test_a_request_larger_than_the_whole_budget_is_refused(load_engine: Any, tiny_llama_dir: Path) -> None:
    engine = load_engine({"tiny": tiny_llama_dir}, kv_cache_bytes=16 * 1024)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=False)
        with pytest.raises(InvalidArgument) as caught:  # retrying cannot help: not RESOURCE_EXHAUSTED
            async for _ in session.generate(list(range(10, 20)), SamplingParams(max_new_tokens=20)):
                pass
        assert caught.value.reason == "KV_BUDGET_EXCEEDED"
        assert caught.value.violations[0].field == "sampling.max_new_tokens"
        session.close()

    asyncio.run(scenario())


# ---- the batch's KV bookkeeping, without the scheduler --------------------------------


def _greedy_alone(decoder: OnnxDecoder, prompt: list[int], steps: int) -> list[int]:
    result = decoder.forward(prompt, decoder.empty_cache())
    out = []
    for _ in range(steps):
        token = int(np.argmax(result.logits[-1]))
        out.append(token)
        result = decoder.forward([token], result.cache)
    return out


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_rows_join_leave_and_are_extracted_without_changing_logits(tiny_llama_dir: Path, tiny_gpt2_dir: Path,
                                                                   cpu_settings: Any, model: str) -> None:
    decoder = OnnxDecoder.load(_models(tiny_llama_dir, tiny_gpt2_dir)[model], cpu_settings)
    ops = KvOps(decoder.placement, decoder.placement.providers(), decoder.signature.num_layers,
                decoder.signature.kv_dtype)
    prompts = {name: list(range(5 + 3 * name, 5 + 3 * name + length))
               for name, length in enumerate((3, 17, 9, 30, 3))}
    steps = 12
    expected = {name: _greedy_alone(decoder, prompt, steps) for name, prompt in prompts.items()}
    join_at = {0: 0, 1: 0, 2: 3, 3: 5, 4: 0}
    batches: list[DecodeBatch[int]] = []
    tokens: dict[int, list[int]] = {name: [] for name in prompts}
    for step in range(60):
        for name, prompt in prompts.items():
            if join_at[name] == step:
                result = decoder.forward(prompt, decoder.empty_cache())
                tokens[name].append(int(np.argmax(result.logits[-1])))
                batch = next((b for b in batches if b.accepts(result.cache.length)), None)
                if batch is None:
                    batch = DecodeBatch(decoder, ops, padded=decoder.uses_position_ids)
                    batches.append(batch)
                batch.add(name, result.cache)
        for batch in batches:
            if not batch.padded:
                assert len(set(batch.lengths)) <= 1, "an export without position_ids must never be padded"
            if not len(batch):
                continue
            logits = batch.forward([tokens[name][-1] for name in batch.keys])
            done = []
            for row, name in enumerate(batch.keys):
                tokens[name].append(int(np.argmax(logits[row])))
                if len(tokens[name]) == steps:
                    done.append(name)
            for name in done:
                row = batch.keys.index(name)
                alone = batch.extract(name)
                assert (alone.rows, alone.length) == (1, batch.lengths[row])
                # The extracted, unpadded cache holds what the row alone would have computed.
                own = decoder.forward(prompts[name] + tokens[name][:-1], decoder.empty_cache()).cache
                for got, want in zip(decoder.present_to_numpy(alone), decoder.present_to_numpy(own), strict=True):
                    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
                    np.testing.assert_allclose(got[1], want[1], atol=1e-4)
            batch.remove(done)
            if len(batch):
                assert batch.padded_length == max(batch.lengths), "all-padding columns are dropped"
        batches = [b for b in batches if len(b)]
        if all(len(t) == steps for t in tokens.values()):
            break
    assert tokens == expected
    if decoder.uses_position_ids:
        assert len({join_at[n] for n in prompts}) > 1


def test_fresh_prompts_arriving_together_share_one_prefill_forward(load_engine: Any, tiny_llama_dir: Path,
                                                                   helpers: Any) -> None:
    log = helpers.StepLog()
    engine = load_engine({"tiny": tiny_llama_dir}, step_observer=log, max_running=16, prefix_cache=False,
                         prefill_chunk_tokens=256)
    requests = [Request(i, (tuple(range(30 + 7 * i, 30 + 7 * i + 10 + 3 * i)),), max_new_tokens=6)
                for i in range(6)]
    alone = asyncio.run(run_alone(engine, "tiny", requests))
    log.reports.clear()
    batched = asyncio.run(run_mixed(engine, "tiny", requests))  # all six start at once
    assert batched == alone
    prompt_tokens = sum(len(r.turns[0]) for r in requests)
    assert sum(r.prefill_tokens for r in log.reports) == prompt_tokens
    # Fewer prefill forwards than prompts: fresh prompts in line were prefilled together.
    assert sum(r.prefill_forwards for r in log.reports) < len(requests)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_prompts_prefilled_together_decode_like_prompts_prefilled_alone(tiny_llama_dir: Path, tiny_gpt2_dir: Path,
                                                                        cpu_settings: Any, model: str) -> None:
    decoder = OnnxDecoder.load(_models(tiny_llama_dir, tiny_gpt2_dir)[model], cpu_settings)
    ops = KvOps(decoder.placement, decoder.placement.providers(), decoder.signature.num_layers,
                decoder.signature.kv_dtype)
    lengths = (7, 19, 12) if decoder.uses_position_ids else (12, 12, 12)
    prompts = [list(range(5 + 9 * i, 5 + 9 * i + n)) for i, n in enumerate(lengths)]
    steps = 8
    batch, logits = DecodeBatch.prefill(decoder, ops, [0, 1, 2], prompts, padded=decoder.uses_position_ids)
    assert batch.lengths == list(lengths) and batch.padded_length == max(lengths)
    tokens = [[int(t)] for t in np.argmax(logits, axis=1)]
    for _ in range(steps - 1):
        logits = batch.forward([t[-1] for t in tokens])
        for row, row_tokens in enumerate(tokens):
            row_tokens.append(int(np.argmax(logits[row])))
    assert tokens == [_greedy_alone(decoder, prompt, steps) for prompt in prompts]
    if not decoder.uses_position_ids:
        with pytest.raises(ValueError):
            DecodeBatch.prefill(decoder, ops, [0, 1], [[5, 6, 7], [5, 6]], padded=False)
