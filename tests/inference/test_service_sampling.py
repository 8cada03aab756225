"""The OpenAI-style sampling fields of SamplingParams through a real InferenceService on
loopback: they reach the engine, they do what common.proto says, and bad values are refused
with the field named."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import ServerThread

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import InferenceApp
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc

PROMPT = [1, 40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def stub(tiny_model_dir: Path) -> Any:
    settings = EngineSettings(device="cpu", intra_op_threads=1, max_running=4, max_queued=8)
    with ServerThread(InferenceApp({"tiny": tiny_model_dir}, settings)) as server, server.channel() as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def generate(stub: Any, **sampling: Any) -> tuple[list[int], list[Any], Any]:
    """(token ids, logprob entries, final) of one greedy request."""
    sampling = {"temperature": 0.0, "max_new_tokens": 16, **sampling}
    request = pb.GenerateRequest(start=pb.GenerateStart(model="tiny", prompt_token_ids=PROMPT,
                                                        sampling=common_pb2.SamplingParams(**sampling)))
    tokens: list[int] = []
    logprobs: list[Any] = []
    final = None
    for response in stub.Generate(iter([request])):
        if response.WhichOneof("kind") == "tokens":
            tokens.extend(response.tokens.token_ids)
            logprobs.extend(response.tokens.logprobs)
        else:
            final = response.final
    return tokens, logprobs, final


def test_min_tokens_holds_back_a_stop_id_the_model_would_pick(stub: Any) -> None:
    plain, _, _ = generate(stub, ignore_eos=True)
    stop_id = plain[1]
    stopped, _, final = generate(stub, ignore_eos=True, stop_token_ids=[stop_id])
    assert stopped == plain[:2] and final.finish_reason == common_pb2.FINISH_REASON_STOP
    held, _, final = generate(stub, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=6)
    assert len(held) >= 6 and stop_id not in held[:6]
    assert held[:1] == plain[:1]  # before the stop id came up, nothing changed
    if final.finish_reason == common_pb2.FINISH_REASON_STOP:
        assert held[-1] == stop_id == final.matched_stop_token_id


def test_logit_bias_forces_and_bans_tokens(stub: Any) -> None:
    forced, _, _ = generate(stub, ignore_eos=True, max_new_tokens=6, logit_bias={77: 100.0})
    assert forced == [77] * 6
    plain, _, _ = generate(stub, ignore_eos=True)
    banned = {token: -100.0 for token in set(plain)}
    avoided, _, _ = generate(stub, ignore_eos=True, logit_bias=banned)
    assert not set(avoided) & set(plain)


def test_penalties_pick_the_best_penalized_token_at_every_step(stub: Any) -> None:
    """Logprobs are the raw model's: subtracting OpenAI's penalties from the top 20 of each
    position, nothing may beat the token the engine chose (it was the argmax of all of them)."""
    presence, frequency = -1.5, -2.0  # encouraging repeats: the random model rarely repeats by itself
    tokens, entries, _ = generate(stub, ignore_eos=True, max_new_tokens=24, logprobs=True, top_logprobs=20,
                                  presence_penalty=presence, frequency_penalty=frequency)
    plain, _, _ = generate(stub, ignore_eos=True, max_new_tokens=24)
    counts: Counter[int] = Counter()
    for token, entry in zip(tokens, entries, strict=True):
        def penalized(token_id: int, logprob: float) -> float:
            return logprob - frequency * counts[token_id] - (presence if counts[token_id] else 0.0)

        chosen = penalized(entry.chosen.token_id, entry.chosen.logprob)
        assert all(chosen >= penalized(alt.token_id, alt.logprob) - 1e-4 for alt in entry.top)
        counts[token] += 1
    assert len(set(tokens)) < len(set(plain))  # negative penalties made it repeat itself


def test_min_p_one_is_greedy_at_any_temperature(stub: Any) -> None:
    plain, _, _ = generate(stub, ignore_eos=True)
    hot, _, _ = generate(stub, ignore_eos=True, temperature=5.0, seed=3, min_p=1.0)
    assert hot == plain


@pytest.mark.parametrize(("sampling", "field", "reason"), [
    ({"presence_penalty": 2.5}, "sampling.presence_penalty", "INVALID_FIELD"),
    ({"frequency_penalty": -3.0}, "sampling.frequency_penalty", "INVALID_FIELD"),
    ({"min_p": 1.5}, "sampling.min_p", "INVALID_FIELD"),
    ({"min_tokens": 17}, "sampling.min_tokens", "INVALID_FIELD"),
    ({"logit_bias": {5: 101.0}}, "sampling.logit_bias[5]", "INVALID_FIELD"),
    ({"logit_bias": {50_000: 1.0}}, "sampling.logit_bias[50000]", "TOKEN_ID_OUT_OF_RANGE"),
])
def test_bad_values_are_refused_with_the_field(stub: Any, sampling: dict[str, Any], field: str,
                                               reason: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, **sampling)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(error.value)
    assert details["reason"] == reason and details["field_violations"][0][0] == field
