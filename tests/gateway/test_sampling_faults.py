"""Sampling values that cannot give a distribution stop at the gateway, and a replica's
faults reach the caller as the replica named them: ENGINE_FAILED (the replica is going away)
is spilled over to another replica, NUMERIC_ERROR and MODEL_ERROR (this request's own rows
failed, and the same model elsewhere would compute the same) are not."""

from __future__ import annotations

import math
import queue

import grpc
import pytest
from scripted_inference import ScriptedInference, running_gateway
from support import ServerThread

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.errors import Internal, Unavailable
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

SAMPLING = common_pb2.SamplingParams(max_new_tokens=8, temperature=0.0)

BAD_VALUES = [
    ({"temperature": 1e-38, "top_p": 0.9}, "sampling.temperature", "0.01"),
    ({"temperature": 0.005}, "sampling.temperature", "0.01"),
    ({"temperature": math.inf}, "sampling.temperature", "0.01"),
    ({"temperature": math.nan}, "sampling.temperature", "0.01"),
    ({"top_p": math.nan}, "sampling.top_p", "0 (exclusive)"),
    ({"repetition_penalty": 1e-45, "top_p": 0.5}, "sampling.repetition_penalty", "0.01"),
    ({"repetition_penalty": -math.inf}, "sampling.repetition_penalty", "0.01"),
]


def chat(stub: gateway_pb2_grpc.GatewayServiceStub, sampling: common_pb2.SamplingParams) -> list[pb.ChatResponse]:
    requests: queue.Queue[pb.ChatRequest | None] = queue.Queue()
    requests.put(pb.ChatRequest(start=pb.ChatStart(model="tiny", sampling=sampling, messages=[
        common_pb2.ChatMessage(role="user", content="Hello")])))
    responses = []
    for response in stub.Chat(iter(requests.get, None), timeout=30):
        responses.append(response)
        if response.WhichOneof("kind") == "final":
            requests.put(None)
    return responses


@pytest.fixture
def gateway(tokenizer_server, scripted):
    app, inference = scripted
    with running_gateway(tokenizer_server.address, [inference.address]) as gw, gw.channel() as ch:
        yield app, gateway_pb2_grpc.GatewayServiceStub(ch)


@pytest.mark.parametrize("values, field, minimum", BAD_VALUES, ids=[f"{f}-{i}" for i, (_, f, _) in
                                                                    enumerate(BAD_VALUES)])
def test_values_that_cannot_give_a_distribution_are_refused_before_any_upstream_call(gateway, values, field,
                                                                                     minimum):
    app, stub = gateway
    sampling = common_pb2.SamplingParams(max_new_tokens=8, **values)
    calls = {
        "Generate": lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=sampling)),
        "GenerateStream": lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(
            model="tiny", prompt="Hi", sampling=sampling))),
        "Chat": lambda: chat(stub, sampling),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as refused:
            call()
        error = refused.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        details = error_details(error)
        assert details["reason"] == "INVALID_FIELD"
        assert [f for f, _ in details["field_violations"]] == [field], name
        assert details["metadata"]["minimum"] == minimum and details["metadata"]["maximum"]
        assert (error.details() or "").startswith(field)
    assert app.starts == [], "refused by the gateway itself: no replica saw it"


def test_values_at_the_floors_pass(gateway):
    app, stub = gateway
    sampling = common_pb2.SamplingParams(max_new_tokens=8, temperature=0.01, top_p=1e-30, repetition_penalty=0.01)
    assert stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=sampling)).summary.usage
    assert len(app.starts) == 1


def test_a_replica_whose_engine_failed_is_spilled_over(tokenizer_server, scripted, tiny_tokenizer_dir):
    failing, failing_server = scripted
    failing.script.refuse_with = Unavailable("model 'tiny' on this replica cannot run its model any more",
                                             reason="ENGINE_FAILED", retry_after_s=1.0)
    healthy = ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir))
    with ServerThread(healthy) as healthy_server, \
            running_gateway(tokenizer_server.address, [failing_server.address, healthy_server.address]) as gw, \
            gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for _ in range(4):  # round-robin puts the failing replica first in half of them
            reply = stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING))
            assert reply.summary.usage.completion_tokens == 8
        assert failing.starts and len(healthy.starts) == 4


@pytest.mark.parametrize("reason", ["NUMERIC_ERROR", "MODEL_ERROR"])
def test_a_model_fault_keeps_its_reason_and_is_not_retried_elsewhere(tokenizer_server, scripted,
                                                                     tiny_tokenizer_dir, reason):
    failing, failing_server = scripted
    failing.script.refuse_with = Internal("model 'tiny' produced logits that cannot be sampled (NaN)",
                                          reason=reason, metadata={"model": "tiny"})
    healthy = ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir))
    with ServerThread(healthy) as healthy_server, \
            running_gateway(tokenizer_server.address, [failing_server.address, healthy_server.address]) as gw, \
            gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        failures = 0
        for _ in range(4):
            try:
                stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING))
            except grpc.RpcError as error:
                failures += 1
                assert error.code() == grpc.StatusCode.INTERNAL
                details = error_details(error)
                assert details["reason"] == reason and details["metadata"]["upstream"] == "inference"
                assert "cannot be sampled" in (error.details() or "")
        assert failures == len(failing.starts) >= 1
        assert len(healthy.starts) == 4 - failures
