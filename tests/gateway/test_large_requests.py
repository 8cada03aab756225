"""The gateway holds its own memory: text over `--max-request-chars` is refused before
anything is forwarded (INVALID_ARGUMENT naming the field and the limit), and a message
too large for even that is refused by gRPC from its length prefix (RESOURCE_EXHAUSTED),
before the gateway buffers it. What this costs in memory under load is measured by
bench/gateway_large_prompts.py (docs/reliability.md), not here."""

from __future__ import annotations

import queue

import grpc
import pytest
from scripted_inference import running_gateway

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc

LIMIT = 1000  # characters; the tokenizer behind it allows 1,000,000, so a refusal here is the gateway's
LIMITS = GatewayLimits(max_request_chars=LIMIT)
SAMPLING = common_pb2.SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture
def gateway(tokenizer_server, scripted):
    app, inference = scripted
    with running_gateway(tokenizer_server.address, [inference.address], limits=LIMITS) as gw, gw.channel() as ch:
        yield app, gateway_pb2_grpc.GatewayServiceStub(ch)


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc_info:
        call()
    return exc_info.value


def assert_too_large(error: grpc.RpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    details = error_details(error)
    assert details["reason"] == "REQUEST_TOO_LARGE", details
    assert details["metadata"]["limit"] == str(LIMIT), details
    assert [f for f, _ in details["field_violations"]] == [field], details


def chat(stub, *turns: list[common_pb2.ChatMessage]) -> list[pb.ChatResponse]:
    """One Chat stream; each next turn is sent once the previous turn's final arrived."""
    requests: queue.Queue = queue.Queue()
    pending = list(turns[1:])
    requests.put(pb.ChatRequest(start=pb.ChatStart(model="tiny", sampling=SAMPLING, messages=turns[0])))
    responses = []
    for response in stub.Chat(iter(requests.get, None), timeout=60):
        responses.append(response)
        if response.WhichOneof("kind") == "final":
            requests.put(pb.ChatRequest(turn=pb.ChatTurn(messages=pending.pop(0))) if pending else None)
    return responses


def test_text_over_the_limit_is_refused_before_it_is_forwarded(gateway):
    app, stub = gateway
    over = "a" * (LIMIT + 1)
    assert_too_large(failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt=over), timeout=60)),
                     "prompt")
    assert_too_large(failure(lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt=over),
                                                              timeout=60))), "prompt")
    half = "b" * (LIMIT // 2 + 1)  # each text fits, together they do not
    assert_too_large(failure(lambda: stub.Tokenize(pb.TokenizeRequest(model="tiny", texts=[half, half]),
                                                   timeout=60)), "texts")
    assert_too_large(failure(lambda: stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=[half, half]),
                                                      timeout=60)), "texts")
    assert_too_large(failure(lambda: chat(stub, [common_pb2.ChatMessage(role="user", content=over)])),
                     "start.messages")
    assert app.starts == []  # no replica saw any of them

    # A conversation grows past the limit on a later turn: that turn is refused.
    user = common_pb2.ChatMessage(role="user", content=half)
    error = failure(lambda: chat(stub, [user], [user]))
    assert_too_large(error, "turn.messages")
    assert len(app.starts) == 1  # the first turn ran

    # At the limit, text is served.
    at_limit = "a " * (LIMIT // 2)
    assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=[at_limit]), timeout=60).total > 0


def test_a_message_larger_than_the_receive_cap_is_refused_by_grpc_before_it_is_buffered(gateway):
    _, stub = gateway
    cap = LIMITS.max_receive_bytes(64 * 1024 * 1024)
    assert cap == 4 * LIMIT + 1024 * 1024
    huge = "a" * (cap + 1)
    error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt=huge), timeout=60))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "larger than max" in error.details(), error.details()
    # The gateway goes on serving.
    reply = stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hello", sampling=SAMPLING), timeout=60)
    assert reply.summary.usage.completion_tokens > 0


def test_a_prompt_over_the_token_cap_is_refused_without_its_ids_coming_back(tokenizer_server, scripted):
    app, inference = scripted
    cap = 16
    limits = GatewayLimits(max_prompt_tokens=cap)
    with running_gateway(tokenizer_server.address, [inference.address], limits=limits) as gw, gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        # The tokenizer cuts the encoding one id past the cap, so the count is a bound, not exact.
        error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="one two " * 500), timeout=60))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error_details(error)
        assert details["reason"] == "PROMPT_TOO_LONG", details
        assert details["metadata"]["limit"] == str(cap) and details["metadata"]["prompt_tokens"] == f"more than {cap}"
        assert app.starts == []

        # The longest prompt within the cap is served, with every one of its ids.
        words = 1
        while stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["one " * (words + 1)])).total <= cap:
            words += 1
        prompt = "one " * words
        assert stub.Generate(pb.GenerateRequest(model="tiny", prompt=prompt, sampling=SAMPLING), timeout=60).summary
        counted = stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=[prompt])).total
        assert len(app.starts[-1].prompt_token_ids) == counted <= cap
