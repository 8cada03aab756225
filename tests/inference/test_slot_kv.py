"""The fused layout's slot buffer on its own: rows of different lengths decode in place in one
forward, join and leave by taking and freeing slots, and cached sequences move into and out of
slots by their own tokens, giving exactly the tokens of a plain onnxruntime loop per row.

Checked on the builder's GroupQueryAttention model (fp32 and int4) and on onnxruntime-genai's
own builder outputs in ../shared/genai-exports (skipped where that folder is absent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from layout_support import SHARED_GENAI_EXPORTS, reference_greedy

from llmsuite.builder.variants import build_variant
from llmsuite.inference.engine import EngineSettings, ModelLoadError
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.prefill_estimate import PrefillEstimate
from llmsuite.inference.engine.slot_forwards import SlotForwards
from llmsuite.inference.engine.slot_kv import SlotKvBuffer, SlotPlan
from llmsuite.inference.engine.warmup import SlotWarmup

SETTINGS = EngineSettings(device="cpu", intra_op_threads=1, warmup=False)


@pytest.fixture(scope="module")
def fused_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slots")
    models = {"gqa": root / "gqa", "gqa-int4": root / "gqa-int4"}
    build_variant(models["gqa"], layout="gqa")
    build_variant(models["gqa-int4"], layout="gqa", precision="int4")
    return models


def _every_model(fused_models: dict[str, Path]) -> list[Path]:
    models = list(fused_models.values())
    for name in ("llama-fp32", "llama-int4"):
        if (SHARED_GENAI_EXPORTS / name).is_dir():
            models.append(SHARED_GENAI_EXPORTS / name)
    return models


@dataclass
class Row:
    prompt: list[int]
    new_tokens: int
    slot: int = -1
    tokens: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.new_tokens


def _prompts(vocab: int, lengths: Sequence[int], seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in lengths]


def _greedy(logits: np.ndarray) -> list[int]:
    return [int(i) for i in np.argmax(logits, axis=-1)]


def test_the_plan_fits_the_budget_and_the_buffer_is_counted_by_its_tensors(fused_models: dict[str, Path]) -> None:
    decoder = OnnxDecoder.load(fused_models["gqa"], SETTINGS)
    per_token = decoder.kv_bytes_per_token
    plan = SlotPlan.choose(budget_bytes=5 * 64 * per_token + 1, bytes_per_token=per_token, max_length=64,
                           max_running=32)
    assert (plan.slots, plan.max_length, plan.buffer_bytes) == (5, 64, 5 * 64 * per_token)
    assert SlotPlan.choose(budget_bytes=10**12, bytes_per_token=per_token, max_length=64, max_running=3).slots == 3
    assert SlotPlan.choose(budget_bytes=63 * per_token, bytes_per_token=per_token, max_length=64,
                           max_running=3).slots == 0

    buffer = SlotKvBuffer(decoder, plan.slots, plan.max_length)
    sig = decoder.signature
    assert buffer.nbytes == plan.buffer_bytes
    assert buffer.nbytes == sum(int(np.prod(t.shape())) * 4 for t in buffer.tensors)
    assert all(t.shape() == [5, sig.num_kv_heads, 64, sig.head_dim] for t in buffer.tensors)
    assert [buffer.take() for _ in range(3)] == [0, 1, 2]
    buffer.release(1)
    buffer.release(1)  # idempotent
    assert buffer.take() == 1  # the lowest free slot first
    assert [buffer.take(), buffer.take()] == [3, 4]
    with pytest.raises(LookupError, match="all 5 KV slots"):
        buffer.take()
    assert buffer.free_slots == 0
    for slot in (0, 2, 3, 4):
        buffer.release(slot)
    assert buffer.take_run(0) == []
    assert buffer.take_run(2) == [2, 3]  # the lowest run of consecutive free slots
    assert buffer.take_run(2) == [0, 4]  # none left: the lowest free ones
    with pytest.raises(LookupError, match="1 KV slots asked for, 0 of 5 free"):
        buffer.take_run(1)


def test_rows_of_different_lengths_decode_in_place_and_join_and_leave(fused_models: dict[str, Path]) -> None:
    """Eight rows through four slots: fresh prompts prefilled together, mixed lengths decoding in
    one forward, a freed slot in the middle of the span, newcomers taking freed slots mid-way."""
    for model in _every_model(fused_models):
        decoder = OnnxDecoder.load(model, SETTINGS)
        forwards = SlotForwards(decoder, SlotKvBuffer(decoder, 4, 64))
        buffer = forwards.buffer
        prompts = _prompts(decoder.signature.vocab_size, (5, 9, 3, 14, 7, 1, 11, 4))
        rows = [Row(p, n) for p, n in zip(prompts, (6, 12, 3, 9, 5, 7, 4, 8), strict=True)]
        waiting, running = list(rows), []
        forward_rows: list[int] = []
        while waiting or running:
            joining = []
            while waiting and buffer.free_slots:
                row = waiting.pop(0)
                row.slot = buffer.take()
                joining.append(row)
            if joining:
                for row, token in zip(joining, _greedy(forwards.prefill([(r.slot, r.prompt) for r in joining])),
                                      strict=True):
                    row.tokens.append(token)
                running += joining
            decoding = [r for r in running if not r.done]
            if decoding:
                logits = forwards.decode([(r.slot, r.tokens[-1]) for r in decoding])
                forward_rows.append(len(decoding))
                for row, token in zip(decoding, _greedy(logits), strict=True):
                    row.tokens.append(token)
            for row in [r for r in running if r.done]:
                buffer.release(row.slot)
                running.remove(row)
        for index, row in enumerate(rows):
            assert row.tokens == reference_greedy(decoder.layout.model_file, row.prompt, row.new_tokens), \
                f"{model.name} row {index}"
        assert max(forward_rows) == 4 and buffer.free_slots == 4


def test_a_slot_decodes_beside_a_prefilling_and_a_free_slot(fused_models: dict[str, Path]) -> None:
    """Slots between decoding ones ride along: a prompt fed in chunks keeps its prefix, a free
    slot stays free, and the decoding rows' tokens do not change."""
    decoder = OnnxDecoder.load(fused_models["gqa"], SETTINGS)
    forwards = SlotForwards(decoder, SlotKvBuffer(decoder, 4, 64))
    buffer = forwards.buffer
    short, chunked, other = _prompts(decoder.signature.vocab_size, (6, 20, 9), seed=3)
    slots = [buffer.take() for _ in range(4)]  # 0: short, 1: chunked, 2: freed, 3: other
    buffer.release(slots[2])
    tokens = {0: _greedy(forwards.prefill([(0, short)])), 3: _greedy(forwards.prefill([(3, other)]))}
    forwards.prefill([(1, chunked[:8])])
    for chunk in (chunked[8:15], chunked[15:]):
        logits = forwards.decode([(0, tokens[0][-1]), (3, tokens[3][-1])])
        for slot, token in zip((0, 3), _greedy(logits), strict=True):
            tokens[slot].append(token)
        last = forwards.prefill([(1, chunk)])
    tokens[1] = _greedy(last)
    for _ in range(5):
        logits = forwards.decode([(s, tokens[s][-1]) for s in (0, 1, 3)])
        for slot, token in zip((0, 1, 3), _greedy(logits), strict=True):
            tokens[slot].append(token)
    model = decoder.layout.model_file
    assert tokens[0] == reference_greedy(model, short, 8)
    assert tokens[3] == reference_greedy(model, other, 8)
    assert tokens[1] == reference_greedy(model, chunked, 6)


def test_cached_sequences_move_into_and_out_of_slots_by_their_own_tokens(fused_models: dict[str, Path]) -> None:
    """read() copies a slot's tokens out (the same KV a plain forward computes); write() copies a
    cached prefix, whole or cut, into another slot, and decoding continues from it exactly."""
    decoder = OnnxDecoder.load(fused_models["gqa"], SETTINGS)
    forwards = SlotForwards(decoder, SlotKvBuffer(decoder, 3, 64))
    buffer = forwards.buffer
    vocab = decoder.signature.vocab_size
    (prompt,) = _prompts(vocab, (21,), seed=11)
    source = buffer.take()
    first = _greedy(forwards.prefill([(source, prompt)]))[0]

    cached = buffer.read(source)
    assert (cached.length, cached.rows) == (21, 1)
    plain = decoder.forward(prompt, decoder.empty_cache()).cache
    for (key, value), (plain_key, plain_value) in zip(decoder.present_to_numpy(cached),
                                                      decoder.present_to_numpy(plain), strict=True):
        np.testing.assert_allclose(key, plain_key, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(value, plain_value, rtol=1e-5, atol=1e-6)
    assert buffer.read(source, 5).length == 5

    # The whole sequence into a fresh slot between two busy ones: decode continues as if never moved.
    neighbour = buffer.take()
    (other,) = _prompts(vocab, (9,), seed=12)
    neighbour_tokens = _greedy(forwards.prefill([(neighbour, other)]))
    buffer.release(source)
    target = buffer.take()
    assert target == source  # the freed slot: a reused slot starts from what is written into it
    buffer.write(target, cached, cached.length)
    assert buffer.lengths[target] == 21
    tokens = [first]
    for _ in range(6):
        out = _greedy(forwards.decode([(target, tokens[-1]), (neighbour, neighbour_tokens[-1])]))
        tokens.append(out[0])
        neighbour_tokens.append(out[1])
    assert tokens == reference_greedy(decoder.layout.model_file, prompt, 7)
    assert neighbour_tokens == reference_greedy(decoder.layout.model_file, other, 7)

    # A cut prefix (a partial prefix-cache hit): 16 cached tokens, the rest of a new prompt fed after.
    third = buffer.take()
    extended = [*prompt[:16], 5, 6, 7]
    buffer.write(third, cached, 16)
    tokens = _greedy(forwards.prefill([(third, extended[16:])]))
    for _ in range(4):
        tokens += _greedy(forwards.decode([(third, tokens[-1])]))
    assert tokens == reference_greedy(decoder.layout.model_file, extended, 5)


def test_copies_refuse_what_a_slot_cannot_hold(fused_models: dict[str, Path]) -> None:
    decoder = OnnxDecoder.load(fused_models["gqa"], SETTINGS)
    forwards = SlotForwards(decoder, SlotKvBuffer(decoder, 2, 16))
    buffer = forwards.buffer
    slot = buffer.take()
    long_cache = decoder.forward(list(range(3, 23)), decoder.empty_cache()).cache
    with pytest.raises(ValueError, match="into a slot of 16"):
        buffer.write(slot, long_cache, 20)
    with pytest.raises(ValueError, match="not taken"):
        buffer.write(1, long_cache, 4)
    with pytest.raises(ValueError, match="would pass its 16"):
        forwards.prefill([(slot, list(range(3, 20)))])
    with pytest.raises(ValueError, match="holds 0 tokens"):
        buffer.read(slot)


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_slots_on_cuda_give_a_plain_cuda_loops_tokens(fused_models: dict[str, Path]) -> None:
    """The buffer lives in device memory; mixed lengths decode in place there too (fp32 and int4)."""
    for name in ("gqa", "gqa-int4"):
        try:
            decoder = OnnxDecoder.load(fused_models[name], EngineSettings(device="cuda", warmup=False))
        except ModelLoadError as exc:
            pytest.skip(f"CUDA provider listed but not usable: {exc}")
        forwards = SlotForwards(decoder, SlotKvBuffer(decoder, 3, 64))
        assert forwards.buffer.tensors[0].device_name().lower() == "cuda"
        prompts = _prompts(decoder.signature.vocab_size, (5, 12, 8))
        slots = [forwards.buffer.take() for _ in prompts]
        tokens = [[t] for t in _greedy(forwards.prefill(list(zip(slots, prompts, strict=True))))]
        for _ in range(7):
            for row, token in zip(tokens, _greedy(forwards.decode([(s, t[-1]) for s, t in zip(slots, tokens,
                                                                                              strict=True)])),
                                  strict=True):
                row.append(token)
        for prompt, row in zip(prompts, tokens, strict=True):
            assert row == reference_greedy(decoder.layout.model_file, prompt, 8, "CUDAExecutionProvider"), name


def test_warm_up_and_the_prefill_estimate_leave_the_buffer_as_they_found_it(fused_models: dict[str, Path]) -> None:
    """A slot model warms up through SlotForwards in its own buffer: afterwards every slot is
    free with length 0, and rows served from the buffer give a plain loop's tokens."""
    decoder = OnnxDecoder.load(fused_models["gqa"], SETTINGS)
    buffer = SlotKvBuffer(decoder, slots=3, max_length=48)
    estimate = PrefillEstimate.measure(SlotWarmup(decoder, buffer))
    assert estimate.per_token_s >= 0 and estimate.fixed_s >= 0
    assert buffer.free_slots == 3 and buffer.lengths == [0, 0, 0] and not buffer.owned

    forwards = SlotForwards(decoder, buffer)
    prompts = _prompts(decoder.signature.vocab_size, [9, 4])
    slots = buffer.take_run(2)
    assert slots == [0, 1]  # the lowest free run, as before any warm-up
    tokens = [[t] for t in _greedy(forwards.prefill(list(zip(slots, prompts, strict=True))))]
    for _ in range(5):
        step = _greedy(forwards.decode([(slot, row[-1]) for slot, row in zip(slots, tokens, strict=True)]))
        for row, token in zip(tokens, step, strict=True):
            row.append(token)
    assert tokens == [reference_greedy(fused_models["gqa"] / "model.onnx", p, 6) for p in prompts]
