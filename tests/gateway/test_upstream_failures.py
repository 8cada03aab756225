"""What the gateway's caller sees when an upstream refuses, breaks or runs out
of time: one translation for every call site, retry hints and reasons kept,
no internal addresses, TIME_LIMIT with the text so far instead of a lost
DEADLINE_EXCEEDED, and rate-limit charges refunded on every failure."""

from __future__ import annotations

import asyncio
import queue

import grpc
import pytest
from scripted_inference import GENERATED, Script, ScriptedInference, running_gateway
from support import ServerThread
from tokenizers import Tokenizer

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.catalogue import Catalogue
from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.errors import DeadlineExceeded, ResourceExhausted, Unauthenticated, Unavailable
from llmsuite.runtime.settings import ServerSettings
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp

SAMPLING = common_pb2.SamplingParams(max_new_tokens=8, temperature=0.0)
LONG = common_pb2.SamplingParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc_info:
        call()
    return exc_info.value


def assert_no_internals(error: grpc.RpcError) -> None:
    shown = f"{error.details()} {error_details(error)}"
    for leak in ("ipv4:", "127.0.0.1", "AioRpcError", "Traceback"):
        assert leak not in shown, shown


def chat_turn(stub, sampling=SAMPLING, timeout=None) -> list[pb.ChatResponse]:
    requests: queue.Queue = queue.Queue()
    requests.put(pb.ChatRequest(start=pb.ChatStart(model="tiny", sampling=sampling, messages=[
        common_pb2.ChatMessage(role="user", content="Hello")])))
    responses = []
    for response in stub.Chat(iter(requests.get, None), timeout=timeout):
        responses.append(response)
        if response.WhichOneof("kind") == "final":
            requests.put(None)
    return responses


@pytest.fixture
def gateway(tokenizer_server, scripted):
    app, inference = scripted
    with running_gateway(tokenizer_server.address, [inference.address]) as gw, gw.channel() as ch:
        yield app, gateway_pb2_grpc.GatewayServiceStub(ch)


def test_upstream_refusal_keeps_its_code_reason_and_retry_delay(gateway):
    app, stub = gateway
    app.script = Script(refuse_with=ResourceExhausted("queue full", reason="ENGINE_OVERLOADED", retry_after_s=2.5))
    error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(error)
    assert details["reason"] == "ENGINE_OVERLOADED" and details["retry_after_s"] == 2.5

    app.script = Script(refuse_with=Unavailable("still loading", reason="LOADING", retry_after_s=3.0))
    error = failure(lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="Hi"))))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error)["reason"] == "LOADING" and error_details(error)["retry_after_s"] == 3.0


def test_upstream_refusing_the_gateways_credentials_is_not_the_callers_bad_key(gateway):
    app, stub = gateway
    app.script = Script(refuse_with=Unauthenticated("wrong key", reason="INVALID_API_KEY"))
    error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(error)["reason"] == "UPSTREAM_AUTH_FAILED"
    assert "not the problem" in error.details()
    assert_no_internals(error)


def test_a_transport_internal_before_the_first_token_is_spilled_over(tokenizer_server, scripted,
                                                                        tiny_tokenizer_dir):
    """grpc-core answers a call racing a replica's shutdown with a bare INTERNAL (no
    llmsuite ErrorInfo): that says nothing about the request, so another replica gets it."""
    failing, failing_server = scripted
    failing.script = Script(bare_abort=grpc.StatusCode.INTERNAL)
    healthy = ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir))
    with ServerThread(healthy) as healthy_server, \
            running_gateway(tokenizer_server.address, [failing_server.address, healthy_server.address]) as gw, \
            gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for _ in range(4):  # round-robin puts the failing replica first in half of them
            reply = stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING))
            assert reply.summary.usage.completion_tokens == 8  # the scripted default
        assert failing.starts and len(healthy.starts) == 4
        failing.script = Script(bare_abort=grpc.StatusCode.INTERNAL)
    # Alone, it is UNAVAILABLE with a retry hint, not an INTERNAL blamed on the caller's request.
    with running_gateway(tokenizer_server.address, [failing_server.address]) as gw, gw.channel() as ch:
        error = failure(lambda: gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
            pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and error_details(error)["retry_after_s"] > 0
        assert_no_internals(error)


def test_a_stream_that_ends_early_is_the_same_error_on_every_path(gateway):
    app, stub = gateway
    app.script = Script(tokens=3, end_early=True)
    calls = {
        "Generate": lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=SAMPLING)),
        "GenerateStream": lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="Hi",
                                                                                    sampling=SAMPLING))),
        "Chat": lambda: chat_turn(stub),
    }
    for name, call in calls.items():
        error = failure(call)
        assert (error.code(), error_details(error).get("reason")) == \
            (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_PROTOCOL_ERROR"), name


def test_a_dead_tokenizer_is_unavailable_on_every_rpc_without_leaking_addresses(tiny_tokenizer_dir, scripted):
    _, inference = scripted
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())) as tokenizer, \
            running_gateway(tokenizer.address, [inference.address]) as gw, gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["a b"])).total > 0
        tokenizer.stop()
        calls = {
            "Tokenize": lambda: stub.Tokenize(pb.TokenizeRequest(model="tiny", texts=["a"])),
            "CountTokens": lambda: stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["a"])),
            "Generate": lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi")),
            "GenerateStream": lambda: list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="Hi"))),
            "Chat": lambda: chat_turn(stub),
        }
        for name, call in calls.items():
            error = failure(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error)
            assert error_details(error).get("retry_after_s", 0) > 0, name
            assert_no_internals(error)


def test_deadline_ends_with_time_limit_and_the_text_so_far(gateway, tiny_tokenizer_dir):
    app, stub = gateway
    decode = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")).decode
    # A replica that keeps generating past its deadline: the gateway ends the turn itself.
    app.script = Script(forever=True, token_interval_s=0.005)
    responses = list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="Hi", sampling=LONG,
                                                                  return_token_ids=True), timeout=1.5))
    final = responses[-1].final
    assert final.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    ids = [i for r in responses[:-1] for i in r.delta.token_ids]
    assert ids == GENERATED[:len(ids)] and final.usage.completion_tokens == len(ids) > 0
    assert "".join(r.delta.text for r in responses[:-1]) == decode(ids, skip_special_tokens=True)
    # The replica was told a deadline earlier than the caller's, so its own final can still travel back.
    assert app.deadlines[-1] is not None and app.deadlines[-1] < 1.5 - 0.1

    # A replica that honours its deadline with its own TIME_LIMIT final: relayed as is.
    app.script = Script(forever=True, honour_deadline=True, token_interval_s=0.005)
    unary = stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=LONG, return_token_ids=True),
                          timeout=1.5)
    assert unary.summary.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    assert unary.summary.usage.completion_tokens == len(unary.token_ids) > 0
    assert unary.text == decode(list(unary.token_ids), skip_special_tokens=True)

    # Chat too: the final says TIME_LIMIT and the session ends with the turn.
    app.script = Script(forever=True, token_interval_s=0.005)
    responses = chat_turn(stub, LONG, timeout=1.5)
    assert responses[-1].final.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT


def test_a_replica_that_sends_nothing_by_the_deadline_still_ends_with_time_limit(gateway):
    """Queued behind others past its deadline, the replica never answers: the caller
    still gets the TIME_LIMIT final (no text), never DEADLINE_EXCEEDED."""
    app, stub = gateway
    app.script = Script(silent=True)
    responses = list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="Hi", sampling=LONG),
                                         timeout=3))
    assert [r.WhichOneof("kind") for r in responses] == ["final"]
    assert responses[0].final.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    assert responses[0].final.usage.completion_tokens == 0

    unary = stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=LONG), timeout=3)
    assert unary.summary.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT and unary.text == ""

    responses = chat_turn(stub, LONG, timeout=3)
    assert [r.WhichOneof("kind") for r in responses] == ["final"]
    assert responses[0].final.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT

    # A replica that refuses the deadline up front (it cannot cover prefill) is still an error.
    app.script = Script(refuse_with=DeadlineExceeded("too short", reason="DEADLINE_TOO_SHORT"))
    error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi"), timeout=30))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_details(error)["reason"] == "DEADLINE_TOO_SHORT"


def test_rate_limit_charges_are_refunded_when_the_upstream_refuses(tokenizer_server, scripted):
    app, inference = scripted
    # Room for one request's charge (prompt + max_new_tokens) at a time, refilled too slowly to matter.
    limiter = KeyedRateLimiter(0, 1, 0.001, 100)
    sampling = common_pb2.SamplingParams(max_new_tokens=60, temperature=0.0)
    with running_gateway(tokenizer_server.address, [inference.address], rate_limiter=limiter,
                         limits=GatewayLimits()) as gw, gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        app.script = Script(refuse_with=ResourceExhausted("queue full", reason="ENGINE_OVERLOADED"))
        for _ in range(3):  # without refunds the second would already be RATE_LIMITED
            error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=sampling)))
            assert error_details(error)["reason"] == "ENGINE_OVERLOADED"
        app.script = Script(tokens=3, end_early=True)  # fails after streaming: unused tokens come back too
        for _ in range(3):
            error = failure(lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=sampling)))
            assert error_details(error)["reason"] == "UPSTREAM_PROTOCOL_ERROR"
        app.script = Script(tokens=3)
        assert stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi", sampling=sampling)).summary.usage \
            .completion_tokens == 3


def test_a_gateway_holding_the_wrong_upstream_key_says_so_before_serving_anything(tiny_tokenizer_dir):
    """Its probes are refused: the reason it gives while it waits is the operator's
    problem (UPSTREAM_AUTH_FAILED), not a LOADING that never ends."""
    keyed = ServerSettings(listen="127.0.0.1:0", grace_period_s=0.5, log_format="text", api_keys=("right-key",))
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits()), keyed) as tokenizer, \
            ServerThread(ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir)), keyed) as inference:

        async def scenario() -> Unavailable:
            upstreams = Upstreams.connect(tokenizer.address, [inference.address], ChannelSettings(api_key="wrong"),
                                          tracer_provider=None, breaker_threshold=5, breaker_reset_s=30.0)
            try:
                catalogue = Catalogue(upstreams, refresh_interval_s=30.0)
                await catalogue.refresh()
                assert not catalogue.served and catalogue.health()[""] is False
                with pytest.raises(Unavailable) as exc_info:
                    catalogue.lookup("tiny")
                return exc_info.value
            finally:
                await upstreams.close()

        refusal = asyncio.run(scenario())
        assert refusal.reason == "UPSTREAM_AUTH_FAILED"
        assert "your API key is not the problem" in refusal.message
