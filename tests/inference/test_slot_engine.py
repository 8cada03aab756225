"""The engine serving the fused layout from its slot buffer: rows of different lengths decode in
one forward, admission is by free slots within the KV budget, and the buffer is what kv_bytes
counts. Tokens are checked against a plain onnxruntime loop; nothing here is timed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from layout_support import reference_greedy

from llmsuite.builder.variants import build_variant
from llmsuite.inference.engine import ModelLoadError, SamplingParams
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted

# The builder's tiny preset: 2 layers x (key, value) x 2 KV heads x 32 dims x 4 bytes.
BYTES_PER_TOKEN = 1024


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slot-engine") / "gqa"
    build_variant(out, layout="gqa")
    return out


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in lengths]


@pytest.mark.parametrize("slot_kv", [True, False], ids=["slots", "padded"])
def test_rows_of_different_lengths_decode_in_one_forward(load_engine: Any, helpers: Any, gqa_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch, slot_kv: bool) -> None:
    steps = helpers.StepLog()
    engine = load_engine({"gqa": gqa_dir}, step_observer=steps, slot_kv=slot_kv, max_running=8)
    prompts = _prompts(engine.model_info("gqa").vocab_size, [3, 8, 13, 21, 5, 34])
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    # The first forward waits until every request is queued, so all six decode together after it.
    everyone_queued = helpers.gate_forwards(monkeypatch)

    async def all_at_once() -> list[list[int]]:
        runs = [asyncio.ensure_future(helpers.generate_once(engine, "gqa", prompt, params)) for prompt in prompts]
        await helpers.wait_until(lambda: engine.stats("gqa").total_requests == len(prompts), within_s=60)
        everyone_queued.set()
        return [tokens for tokens, _ in await asyncio.gather(*runs)]

    assert asyncio.run(all_at_once()) == [reference_greedy(gqa_dir / "model.onnx", p, 10) for p in prompts]
    decodes = steps.decodes()
    if slot_kv:  # every step decodes every row in one forward, whatever their lengths
        assert all(forwards == 1 for _, forwards in decodes)
        assert max(rows for rows, _ in decodes) == len(prompts)
    else:  # equal lengths only: one forward per length
        assert max(forwards for _, forwards in decodes) > 1


def test_the_slot_buffer_is_the_kv_held_and_sized_from_the_budget(load_engine: Any, helpers: Any,
                                                                  gqa_dir: Path) -> None:
    slot_bytes = 64 * BYTES_PER_TOKEN
    engine = load_engine({"gqa": gqa_dir}, kv_cache_bytes=3 * slot_bytes + slot_bytes // 2, max_model_len=64,
                         max_running=8)
    assert engine.model_info("gqa").context_length == 64
    idle = engine.stats("gqa")
    assert idle.kv_bytes == 3 * slot_bytes  # three slots, preallocated: held before any request
    assert idle.kv_budget_bytes == 3 * slot_bytes + slot_bytes // 2
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    prompt = list(range(10, 30))
    tokens, _ = asyncio.run(helpers.generate_once(engine, "gqa", prompt, params))
    assert tokens == reference_greedy(gqa_dir / "model.onnx", prompt, 4)
    after = engine.stats("gqa")
    assert after.prefix_cache_entries == 1  # the finished turn's 23 tokens, copied out of its slot
    assert after.kv_bytes == 3 * slot_bytes + 23 * BYTES_PER_TOKEN
    assert after.kv_bytes <= after.kv_budget_bytes


def test_a_request_waits_for_a_free_slot(load_engine: Any, helpers: Any, gqa_dir: Path) -> None:
    """Two slots, four requests: two run, two wait in the queue and run as slots free up."""
    engine = load_engine({"gqa": gqa_dir}, kv_cache_bytes=2 * 64 * BYTES_PER_TOKEN, max_model_len=64,
                         max_running=8)
    prompts = _prompts(engine.model_info("gqa").vocab_size, [4, 9, 6, 12])
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    most_running = 0

    async def scenario() -> list[list[int]]:
        nonlocal most_running
        runs = [asyncio.ensure_future(helpers.generate_once(engine, "gqa", p, params)) for p in prompts]
        while not all(run.done() for run in runs):
            most_running = max(most_running, engine.stats("gqa").running)
            await asyncio.sleep(0.005)
        return [run.result()[0] for run in runs]

    assert asyncio.run(scenario()) == [reference_greedy(gqa_dir / "model.onnx", p, 12) for p in prompts]
    assert most_running <= 2


def test_admission_refuses_what_never_fits_and_what_finds_no_room(load_engine: Any, helpers: Any,
                                                                  gqa_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    engine = load_engine({"gqa": gqa_dir}, kv_cache_bytes=64 * BYTES_PER_TOKEN, max_model_len=64,
                         max_running=4, max_queued=1)
    too_long = SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True)
    with pytest.raises(InvalidArgument) as never:
        asyncio.run(helpers.generate_once(engine, "gqa", list(range(3, 23)), too_long))
    assert "64" in str(never.value)

    # One slot and a queue of one: the first request decodes, the second waits, the third is refused.
    helpers.slow_forward(monkeypatch, 0.01)
    long = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)

    async def scenario() -> None:
        sessions = [engine.open_session("gqa", multi_turn=False) for _ in range(3)]
        streams = [s.generate([5 + i, 6, 7], long) for i, s in enumerate(sessions)]
        first = asyncio.ensure_future(streams[0].__anext__())
        await helpers.wait_until(lambda: engine.stats("gqa").running == 1)
        second = asyncio.ensure_future(streams[1].__anext__())
        await helpers.wait_until(lambda: engine.stats("gqa").queued == 1)
        with pytest.raises(ResourceExhausted) as busy:
            await streams[2].__anext__()
        assert busy.value.reason == "ENGINE_OVERLOADED" and busy.value.retry_after_s > 0
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        for stream in streams[:2]:  # closing a stream cancels its turn
            await stream.aclose()
        await helpers.wait_until(lambda: engine.stats("gqa").running + engine.stats("gqa").queued == 0)

    asyncio.run(scenario())


def test_a_budget_without_room_for_one_slot_fails_at_load(load_engine: Any, gqa_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"cannot hold one slot of 512 tokens.*--max-model-len"):
        load_engine({"gqa": gqa_dir}, kv_cache_bytes=100 * BYTES_PER_TOKEN)
    engine = load_engine({"gqa": gqa_dir}, kv_cache_bytes=100 * BYTES_PER_TOKEN, max_model_len=100)
    assert engine.stats("gqa").kv_bytes == 100 * BYTES_PER_TOKEN


class ForwardCounts:
    """Counts the decoder's padded forwards and its in-place (slot buffer) forwards."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.padded = self.in_place = 0
        counts = self
        forward, run_in_place = OnnxDecoder.forward, OnnxDecoder.run_in_place

        def counted_forward(self: OnnxDecoder, *args: Any) -> Any:
            counts.padded += 1
            return forward(self, *args)

        def counted_in_place(self: OnnxDecoder, *args: Any) -> Any:
            counts.in_place += 1
            return run_in_place(self, *args)

        monkeypatch.setattr(OnnxDecoder, "forward", counted_forward)
        monkeypatch.setattr(OnnxDecoder, "run_in_place", counted_in_place)


@pytest.mark.parametrize(("slot_kv", "warmup"), [(True, True), (False, True), (True, False)],
                         ids=["slots", "padded", "no-warmup"])
def test_warm_up_runs_the_path_the_model_is_served_by(load_engine: Any, helpers: Any, gqa_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch, slot_kv: bool,
                                                      warmup: bool) -> None:
    counts = ForwardCounts(monkeypatch)
    engine = load_engine({"gqa": gqa_dir}, slot_kv=slot_kv, warmup=warmup, kv_cache_bytes=3 * 64 * BYTES_PER_TOKEN,
                         max_model_len=64, max_running=8)
    info, idle = engine.model_info("gqa"), engine.stats("gqa")
    if not warmup:  # no warm-up forwards at all
        assert (counts.padded, counts.in_place) == (0, 0)
    elif slot_kv:  # a prefill into a slot and a decode step, all through the buffer
        assert counts.padded == 0 and counts.in_place >= 6
    else:
        assert counts.padded >= 6 and counts.in_place == 0
    if slot_kv:  # warm-up leaves every slot free and empty
        assert (info.kv_slots, info.kv_slot_tokens, idle.free_kv_slots) == (3, 64, 3)
    else:
        assert (info.kv_slots, info.kv_slot_tokens, idle.free_kv_slots) == (0, 0, 0)
    assert (idle.cached_tokens, idle.running, idle.prefix_cache_entries) == (0, 0, 0)

    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    prompt = _prompts(info.vocab_size, [11])[0]
    tokens, _ = asyncio.run(helpers.generate_once(engine, "gqa", prompt, params))
    assert tokens == reference_greedy(gqa_dir / "model.onnx", prompt, 6)
