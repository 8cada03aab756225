"""Generation through the engine interface: greedy, stop ids, eos, logprobs, seeds, sampling filters."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmsuite.inference.engine import FinishReason, SamplingParams
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.sampling import apply_repetition_penalty, log_softmax
from llmsuite.runtime.errors import NotFound
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

PROMPT = [1, 4, 310, 77, 512, 9, 5]


def decoder_greedy(decoder: OnnxDecoder, prompt: list[int], steps: int) -> list[int]:
    result = decoder.forward(prompt, decoder.empty_cache())
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(np.argmax(result.logits[-1])))
        result = decoder.forward(tokens[-1:], result.cache)
    return tokens


@pytest.fixture
def engine(load_engine: Any, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> Any:
    return load_engine({"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir})


def test_model_info_describes_the_export(engine: Any, tiny_llama_dir: Path) -> None:
    info = engine.model_info("llama")
    assert info.architecture == "llama"
    assert (info.num_layers, info.num_attention_heads, info.num_kv_heads, info.head_dim) == (2, 4, 2, 32)
    assert (info.context_length, info.vocab_size, info.kv_dtype) == (512, 1024, "float32")
    assert info.uses_position_ids and not engine.model_info("gpt2").uses_position_ids
    assert info.eos_token_ids == (2, 6) and info.bos_token_id == 1
    assert info.tokenizer_hash == tokenizer_content_hash(tiny_llama_dir)
    assert info.tokenizer_hash.startswith("sha256:")
    assert [m.name for m in engine.list_models()] == ["llama", "gpt2"]


def test_unknown_model_is_not_found(engine: Any) -> None:
    for call in (engine.model_info, engine.stats, lambda name: engine.open_session(name, multi_turn=False)):
        with pytest.raises(NotFound) as error:
            call("nope")
        assert error.value.reason == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(("model", "model_fixture"), [("llama", "tiny_llama_dir"), ("gpt2", "tiny_gpt2_dir")])
def test_greedy_matches_the_decoder(engine: Any, helpers: Any, model: str, model_fixture: str,
                                    cpu_settings: Any, request: pytest.FixtureRequest) -> None:
    decoder = OnnxDecoder.load(request.getfixturevalue(model_fixture), cpu_settings)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    tokens, result = asyncio.run(helpers.generate_once(engine, model, PROMPT, params))

    assert tokens == decoder_greedy(decoder, PROMPT, 12)
    assert result.finish_reason is FinishReason.LENGTH and result.matched_stop_token_id is None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.cached_tokens) == (7, 12, 0)
    timings = result.timings
    assert 0 <= timings.queue_s <= timings.time_to_first_token_s <= timings.total_s
    assert timings.prefill_s > 0 and timings.decode_s > 0
    assert timings.mean_inter_token_s == pytest.approx(timings.decode_s / 11)


def test_stop_token_ends_the_turn_and_is_the_last_token(engine: Any, helpers: Any) -> None:
    greedy, _ = asyncio.run(helpers.generate_once(engine, "llama", PROMPT))
    stop_at = next(i for i, token in enumerate(greedy) if i >= 2 and token not in greedy[:i])
    params = SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(greedy[stop_at], 1000))
    tokens, result = asyncio.run(helpers.generate_once(engine, "llama", PROMPT, params))

    assert tokens == greedy[: stop_at + 1]
    assert result.finish_reason is FinishReason.STOP
    assert result.matched_stop_token_id == greedy[stop_at]


def test_eos_ids_come_from_generation_config(tmp_path: Path, tiny_llama_dir: Path, load_engine: Any,
                                             helpers: Any) -> None:
    """Every id in generation_config.json's eos list stops generation, unless ignore_eos."""
    greedy_engine = load_engine({"m": tiny_llama_dir})
    greedy, _ = asyncio.run(helpers.generate_once(greedy_engine, "m", PROMPT))
    stop_at = next(i for i, token in enumerate(greedy) if i >= 2 and token not in greedy[:i])

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1000, greedy[stop_at]]}))
    engine = load_engine({"m": model_dir})
    assert greedy[stop_at] in engine.model_info("m").eos_token_ids

    tokens, result = asyncio.run(helpers.generate_once(engine, "m", PROMPT, SamplingParams(temperature=0.0,
                                                                                            max_new_tokens=8)))
    assert tokens == greedy[: stop_at + 1]
    assert (result.finish_reason, result.matched_stop_token_id) == (FinishReason.STOP, greedy[stop_at])

    ignoring = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    tokens, result = asyncio.run(helpers.generate_once(engine, "m", PROMPT, ignoring))
    assert tokens == greedy and result.finish_reason is FinishReason.LENGTH


def test_logprobs_are_log_softmax_of_raw_logits(engine: Any, helpers: Any, llama_decoder: OnnxDecoder) -> None:
    # Temperature and penalty change the choice, not the reported logprobs.
    params = SamplingParams(temperature=0.7, seed=3, max_new_tokens=1, logprobs=True, top_logprobs=5,
                            repetition_penalty=1.3)
    session = engine.open_session("llama", multi_turn=False)
    tokens, _ = asyncio.run(helpers.run_turn(session, PROMPT, params))
    expected = log_softmax(llama_decoder.forward(PROMPT, llama_decoder.empty_cache()).logits[-1])

    token = tokens[0]
    assert token.logprob == pytest.approx(expected[token.token_id], abs=1e-4)
    assert [t.token_id for t in token.top_logprobs] == list(np.argsort(-expected)[:5])
    assert [t.logprob for t in token.top_logprobs] == pytest.approx(list(np.sort(expected)[::-1][:5]), abs=1e-4)


def test_logprobs_are_absent_unless_asked(engine: Any, helpers: Any) -> None:
    session = engine.open_session("llama", multi_turn=False)
    tokens, _ = asyncio.run(helpers.run_turn(session, PROMPT, helpers.GREEDY))
    assert all(t.logprob is None and t.top_logprobs == () for t in tokens)


def test_same_seed_same_tokens_even_beside_other_requests(engine: Any, helpers: Any) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_new_tokens=16, ignore_eos=True)

    async def alone() -> list[int]:
        return (await helpers.generate_once(engine, "llama", PROMPT, seeded))[0]

    async def with_neighbours() -> list[int]:
        noise = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
        results = await asyncio.gather(
            helpers.generate_once(engine, "llama", PROMPT, noise),
            helpers.generate_once(engine, "llama", PROMPT, seeded),
            helpers.generate_once(engine, "llama", PROMPT, noise),
        )
        return results[1][0]

    first = asyncio.run(alone())
    assert asyncio.run(alone()) == first
    assert asyncio.run(with_neighbours()) == first
    other_seed = SamplingParams(temperature=1.0, seed=99, max_new_tokens=16, ignore_eos=True)
    assert asyncio.run(helpers.generate_once(engine, "llama", PROMPT, other_seed))[0] != first


def test_top_k_one_is_greedy_at_any_temperature(engine: Any, helpers: Any) -> None:
    greedy, _ = asyncio.run(helpers.generate_once(engine, "llama", PROMPT))
    for seed in range(3):
        params = SamplingParams(temperature=2.0, top_k=1, seed=seed, max_new_tokens=8, ignore_eos=True)
        assert asyncio.run(helpers.generate_once(engine, "llama", PROMPT, params))[0] == greedy


def test_tiny_top_p_is_greedy(engine: Any, helpers: Any) -> None:
    greedy, _ = asyncio.run(helpers.generate_once(engine, "llama", PROMPT))
    params = SamplingParams(temperature=1.0, top_p=1e-6, seed=5, max_new_tokens=8, ignore_eos=True)
    assert asyncio.run(helpers.generate_once(engine, "llama", PROMPT, params))[0] == greedy


def test_repetition_penalty_follows_hf_semantics(engine: Any, helpers: Any, llama_decoder: OnnxDecoder) -> None:
    """The first greedy token under a penalty is the argmax of the penalized logits (prompt ids seen)."""
    logits = llama_decoder.forward(PROMPT, llama_decoder.empty_cache()).logits[-1]
    seen = np.zeros_like(logits, dtype=bool)
    seen[PROMPT] = True
    for penalty in (0.5, 1.0, 3.0):
        params = SamplingParams(temperature=0.0, repetition_penalty=penalty, max_new_tokens=1, ignore_eos=True)
        tokens, _ = asyncio.run(helpers.generate_once(engine, "llama", PROMPT, params))
        assert tokens == [int(np.argmax(apply_repetition_penalty(logits, seen, penalty)))]


def test_repetition_penalty_reduces_repeats(engine: Any, helpers: Any) -> None:
    prompt = [1, 40, 41, 42, 40, 41, 42, 40, 41, 42]

    def repeats(penalty: float) -> int:
        params = SamplingParams(temperature=0.0, repetition_penalty=penalty, max_new_tokens=48, ignore_eos=True)
        tokens, _ = asyncio.run(helpers.generate_once(engine, "gpt2", prompt, params))
        return sum(1 for i, token in enumerate(tokens) if token in prompt or token in tokens[:i])

    assert repeats(10.0) < repeats(1.0)
    assert repeats(0.2) > repeats(1.0)
