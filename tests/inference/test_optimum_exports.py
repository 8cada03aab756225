"""Real Optimum exports (GPT-2 and Llama with GQA) reproduce transformers' greedy tokens exactly.

The exports live in ../shared/optimum-exports beside the repository (see its README);
a clone without that folder skips these tests.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from support import SHARED_EXPORTS as EXPORTS

from llmsuite.inference.engine import FinishReason, SamplingParams

pytestmark = pytest.mark.optimum

ARCHES = ("gpt2", "llama")


def _exports_dir() -> Path:
    if not EXPORTS.is_dir():
        pytest.skip(f"{EXPORTS} is absent: the real Optimum exports ship only beside the team's checkout")
    return EXPORTS


def _cases(arch: str) -> list[dict[str, Any]]:
    if not EXPORTS.is_dir():
        return []
    return json.loads((EXPORTS / arch / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module")
def engine() -> Any:
    from llmsuite.inference.engine import EngineSettings, InferenceEngine

    exports = _exports_dir()
    engine = InferenceEngine.load({arch: exports / arch for arch in ARCHES}, EngineSettings(device="cpu"))
    yield engine
    asyncio.run(engine.close())


def _all_cases() -> list[Any]:
    cases = [pytest.param(arch, case, id=f"{arch}-{case['name']}") for arch in ARCHES for case in _cases(arch)]
    return cases or [pytest.param(None, None, id="exports-absent")]


@pytest.mark.parametrize(("arch", "case"), _all_cases())
def test_reference_greedy_tokens_exactly(engine: Any, helpers: Any, arch: str, case: dict[str, Any]) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    tokens, result = asyncio.run(helpers.generate_once(engine, arch, case["prompt_ids"], params))
    assert tokens == case["greedy_ids"]
    assert result.finish_reason is FinishReason.LENGTH


def test_model_info_is_read_from_the_exports(engine: Any) -> None:
    gpt2, llama = engine.model_info("gpt2"), engine.model_info("llama")
    assert (gpt2.architecture, gpt2.num_kv_heads, gpt2.num_attention_heads, gpt2.context_length) == ("gpt2", 4, 4, 256)
    assert (llama.architecture, llama.num_kv_heads, llama.num_attention_heads) == ("llama", 2, 4)
    assert (llama.num_layers, llama.head_dim, llama.vocab_size) == (3, 32, 1536)
    # generation_config.json lists both; config.json and the tokenizer name only one each.
    assert llama.eos_token_ids == (1532, 1535)
    assert gpt2.eos_token_ids == (1023,)


def test_generation_stops_at_end_of_text(engine: Any, helpers: Any) -> None:
    """The `long` case reaches eos id 1532 at step 23; with eos honoured it stops there."""
    case = next(c for c in _cases("llama") if c["name"] == "long")
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    tokens, result = asyncio.run(helpers.generate_once(engine, "llama", case["prompt_ids"], params))
    assert tokens == case["greedy_ids_stop_at_eos"]
    assert (result.finish_reason, result.matched_stop_token_id) == (FinishReason.STOP, 1532)


def test_generation_stops_at_end_of_turn(engine: Any, helpers: Any) -> None:
    """1535 (<|eot_id|>) is the tokenizer's eos; this prompt makes greedy decoding emit it second."""
    prompt = [1531, 1274, 327, 998, 255, 380, 653, 1430, 1027, 673, 314]
    tokens, result = asyncio.run(
        helpers.generate_once(engine, "llama", prompt, SamplingParams(temperature=0.0, max_new_tokens=24))
    )
    assert tokens == [1211, 1535]
    assert (result.finish_reason, result.matched_stop_token_id) == (FinishReason.STOP, 1535)

    ignoring = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    tokens, result = asyncio.run(helpers.generate_once(engine, "llama", prompt, ignoring))
    assert tokens[:2] == [1211, 1535] and len(tokens) == 24 and result.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("arch", ARCHES)
def test_session_turns_continue_the_reference(engine: Any, helpers: Any, arch: str) -> None:
    """Splitting generation over two session turns (the second reusing the KV cache) changes nothing."""
    case = _cases(arch)[1]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)

    async def two_turns() -> tuple[list[int], int]:
        session = engine.open_session(arch, multi_turn=True)
        first, _ = await helpers.run_turn(session, case["prompt_ids"], params)
        second, result = await helpers.run_turn(session, [], params)
        await session.aclose()
        return [t.token_id for t in first + second], result.usage.cached_tokens

    tokens, cached = asyncio.run(two_turns())
    assert tokens == case["greedy_ids"]
    assert cached == len(case["prompt_ids"]) + 12 - 1
