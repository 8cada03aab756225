"""Bad requests are refused before any work, with the offending field named."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llmsuite.inference.engine import SamplingParams
from llmsuite.runtime.errors import InvalidArgument

OK_PROMPT = [1, 20, 30]
OK = SamplingParams(temperature=0.0, max_new_tokens=4)

CASES = [
    # (prompt, sampling changes, field, reason)
    ([], {}, "prompt_token_ids", "EMPTY_PROMPT"),
    ([1, 1024], {}, "prompt_token_ids[1]", "TOKEN_ID_OUT_OF_RANGE"),
    ([-1, 5], {}, "prompt_token_ids[0]", "TOKEN_ID_OUT_OF_RANGE"),
    (OK_PROMPT, {"temperature": -0.1}, "sampling.temperature", "INVALID_FIELD"),
    (OK_PROMPT, {"temperature": 100.5}, "sampling.temperature", "INVALID_FIELD"),
    (OK_PROMPT, {"temperature": float("nan")}, "sampling.temperature", "INVALID_FIELD"),
    (OK_PROMPT, {"top_p": 0.0}, "sampling.top_p", "INVALID_FIELD"),
    (OK_PROMPT, {"top_p": 1.01}, "sampling.top_p", "INVALID_FIELD"),
    (OK_PROMPT, {"top_k": -1}, "sampling.top_k", "INVALID_FIELD"),
    (OK_PROMPT, {"repetition_penalty": 0.0}, "sampling.repetition_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"repetition_penalty": 10.5}, "sampling.repetition_penalty", "INVALID_FIELD"),
    # Values that cannot give a distribution (llmsuite.runtime.sampling_limits): float32 overflow
    # made them NaN logits mid-step before they were refused here.
    (OK_PROMPT, {"temperature": 1e-38, "top_p": 0.9}, "sampling.temperature", "INVALID_FIELD"),
    (OK_PROMPT, {"temperature": 0.0099}, "sampling.temperature", "INVALID_FIELD"),
    (OK_PROMPT, {"temperature": float("inf")}, "sampling.temperature", "INVALID_FIELD"),
    (OK_PROMPT, {"top_p": float("nan")}, "sampling.top_p", "INVALID_FIELD"),
    (OK_PROMPT, {"top_p": float("inf")}, "sampling.top_p", "INVALID_FIELD"),
    (OK_PROMPT, {"repetition_penalty": 1.4e-45, "top_p": 0.5}, "sampling.repetition_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"repetition_penalty": 0.0099}, "sampling.repetition_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"repetition_penalty": float("nan")}, "sampling.repetition_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"repetition_penalty": float("-inf")}, "sampling.repetition_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"max_new_tokens": 0}, "sampling.max_new_tokens", "INVALID_FIELD"),
    (OK_PROMPT, {"max_new_tokens": 513}, "sampling.max_new_tokens", "INVALID_FIELD"),
    (OK_PROMPT, {"top_logprobs": 21}, "sampling.top_logprobs", "INVALID_FIELD"),
    (OK_PROMPT, {"top_logprobs": -1}, "sampling.top_logprobs", "INVALID_FIELD"),
    (OK_PROMPT, {"seed": -5}, "sampling.seed", "INVALID_FIELD"),
    (OK_PROMPT, {"stop_token_ids": (2, 4096)}, "sampling.stop_token_ids[1]", "TOKEN_ID_OUT_OF_RANGE"),
    (OK_PROMPT, {"max_new_tokens": 511}, "prompt_token_ids", "PROMPT_TOO_LONG"),
    (OK_PROMPT, {"presence_penalty": 2.01}, "sampling.presence_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"frequency_penalty": -2.5}, "sampling.frequency_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"frequency_penalty": float("nan")}, "sampling.frequency_penalty", "INVALID_FIELD"),
    (OK_PROMPT, {"min_p": 1.5}, "sampling.min_p", "INVALID_FIELD"),
    (OK_PROMPT, {"min_p": -0.1}, "sampling.min_p", "INVALID_FIELD"),
    (OK_PROMPT, {"min_tokens": 5}, "sampling.min_tokens", "INVALID_FIELD"),
    (OK_PROMPT, {"logit_bias": ((3, 100.5),)}, "sampling.logit_bias[3]", "INVALID_FIELD"),
    (OK_PROMPT, {"logit_bias": ((4096, 1.0),)}, "sampling.logit_bias[4096]", "TOKEN_ID_OUT_OF_RANGE"),
    (OK_PROMPT, {"logit_bias": tuple((i, 1.0) for i in range(1025))}, "sampling.logit_bias", "INVALID_FIELD"),
]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Any:
    from llmsuite.inference.engine import EngineSettings, InferenceEngine

    engine = InferenceEngine.load({"tiny": tiny_llama_dir}, EngineSettings(device="cpu", intra_op_threads=1))
    yield engine
    asyncio.run(engine.close())


@pytest.mark.parametrize(("prompt", "changes", "field", "reason"), CASES,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(CASES)])
def test_bad_input_names_the_field(engine: Any, helpers: Any, prompt: list[int], changes: dict[str, Any],
                                   field: str, reason: str) -> None:
    before = engine.stats("tiny").total_requests
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(helpers.generate_once(engine, "tiny", prompt, replace(OK, **changes)))
    assert error.value.violations[0].field == field
    assert error.value.reason == reason
    assert error.value.message.startswith(field)
    assert engine.stats("tiny").total_requests == before, "refused before it was queued"


def test_the_same_values_pass_when_in_range(engine: Any, helpers: Any) -> None:
    edge = replace(OK, temperature=100.0, top_p=1.0, top_k=0, repetition_penalty=10.0, max_new_tokens=4,
                   top_logprobs=20, seed=2**64 - 1, stop_token_ids=(1023,), presence_penalty=-2.0,
                   frequency_penalty=2.0, min_p=1.0, min_tokens=4, logit_bias=tuple((i, 100.0) for i in range(1024)))
    tokens, _ = asyncio.run(helpers.generate_once(engine, "tiny", OK_PROMPT, edge))
    assert len(tokens) <= 4


def test_the_floors_pass_as_float32_carries_them(engine: Any, helpers: Any) -> None:
    """A gRPC caller who sends 0.01 sends float32(0.01), a hair below the float64 0.01."""
    floor = struct.unpack("f", struct.pack("f", 0.01))[0]
    assert floor < 0.01
    edge = replace(OK, temperature=floor, top_p=struct.unpack("f", struct.pack("f", 1e-30))[0],
                   repetition_penalty=floor, seed=1)
    tokens, _ = asyncio.run(helpers.generate_once(engine, "tiny", OK_PROMPT, edge))
    assert len(tokens) <= 4


def test_max_model_len_caps_the_served_context(load_engine: Any, helpers: Any, tiny_llama_dir: Path) -> None:
    """--max-model-len: the model serves 48 of its 512 positions; what passes them is refused."""
    engine = load_engine({"tiny": tiny_llama_dir}, max_model_len=48)
    assert engine.model_info("tiny").context_length == 48
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    with pytest.raises(InvalidArgument) as error:
        asyncio.run(helpers.generate_once(engine, "tiny", list(range(3, 43)), params))
    assert error.value.reason == "PROMPT_TOO_LONG" and "48" in str(error.value)
    tokens, _ = asyncio.run(helpers.generate_once(engine, "tiny", list(range(3, 41)), params))
    assert len(tokens) == 10
    with pytest.raises(ValueError, match="max_model_len"):
        load_engine({"tiny": tiny_llama_dir}, max_model_len=1)
