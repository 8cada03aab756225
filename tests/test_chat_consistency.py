"""One conversation, one answer: a Chat reply depends on the conversation alone, never on
what a KV cache happens to hold.

The same three-turn conversation goes through the gateway four ways: one Chat stream on a
replica with the prefix cache, one Chat stream on a replica without it, one Chat stream per
turn re-sending the whole conversation (as stateless OpenAI-style clients do), and unary
Generate calls on the rendered conversation (what apply_chat_template + generate means).
Every reply must be identical, and the cached paths must actually reuse KV.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence

import grpc
import pytest
from support import ServiceProcess, processes

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

SAMPLING = common_pb2.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
SYSTEM = common_pb2.ChatMessage(role="system", content="You answer in short sentences about the sea.")
USER_TURNS = ["Hello there, how are the waves today?", "And the wind?", "Thanks. One more: the tide?"]


def _inference(model_dir, *extra: str) -> ServiceProcess:
    return ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}",
                           "--device", "cpu", "--intra-op-threads", "1", *extra])


@pytest.fixture(scope="module")
def clusters(tiny_model_dir):
    tokenizer = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}"])
    cached, cold = _inference(tiny_model_dir), _inference(tiny_model_dir, "--no-prefix-cache")
    with processes(tokenizer, cached, cold):
        gateways = [ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tokenizer.address,
                                    "--inference", replica.address]) for replica in (cached, cold)]
        with processes(*gateways):
            yield {"tokenizer": tokenizer, "cached": gateways[0], "cold": gateways[1]}


def _stub(process: ServiceProcess) -> gateway_pb2_grpc.GatewayServiceStub:
    return gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(process.address))


def chat_stream(stub, turns: Sequence[str]) -> tuple[list[str], list[common_pb2.Usage]]:
    """One Chat stream for the whole conversation: replies and usage per turn."""
    outbox: queue.Queue = queue.Queue()
    outbox.put(pb.ChatRequest(start=pb.ChatStart(model="tiny", sampling=SAMPLING, messages=[
        SYSTEM, common_pb2.ChatMessage(role="user", content=turns[0])])))
    replies, usages, text = [], [], []
    for response in stub.Chat(iter(outbox.get, None)):
        if response.WhichOneof("kind") == "delta":
            text.append(response.delta.text)
            continue
        replies.append("".join(text))
        usages.append(response.final.usage)
        text = []
        if len(replies) < len(turns):
            outbox.put(pb.ChatRequest(turn=pb.ChatTurn(messages=[
                common_pb2.ChatMessage(role="user", content=turns[len(replies)])])))
        else:
            outbox.put(None)
    return replies, usages


def conversation(turns: Sequence[str], replies: Sequence[str]) -> list[common_pb2.ChatMessage]:
    messages = [SYSTEM]
    for index, user in enumerate(turns):
        messages.append(common_pb2.ChatMessage(role="user", content=user))
        if index < len(replies):
            messages.append(common_pb2.ChatMessage(role="assistant", content=replies[index]))
    return messages


def test_a_conversation_gets_the_same_replies_whatever_the_cache_holds(clusters) -> None:
    cached, cold = _stub(clusters["cached"]), _stub(clusters["cold"])

    reference, cold_usage = chat_stream(cold, USER_TURNS)
    assert all(usage.cached_tokens == 0 for usage in cold_usage)
    assert all(reference), "every turn should produce some text"

    replies, usages = chat_stream(cached, USER_TURNS)
    assert replies == reference
    assert usages[0].cached_tokens == 0 and all(u.cached_tokens > 0 for u in usages[1:])

    # Stateless clients: a new Chat stream per turn, re-sending the conversation so far.
    resent = []
    for index in range(len(USER_TURNS)):
        history = conversation(USER_TURNS[:index + 1], resent)
        outbox: queue.Queue = queue.Queue()
        outbox.put(pb.ChatRequest(start=pb.ChatStart(model="tiny", sampling=SAMPLING, messages=history)))
        outbox.put(None)
        responses = list(cached.Chat(iter(outbox.get, None)))
        resent.append("".join(r.delta.text for r in responses if r.WhichOneof("kind") == "delta"))
        final = responses[-1].final
        if index:  # the replica's prefix cache holds the earlier turns
            assert final.usage.cached_tokens > 0
    assert resent == reference

    # apply_chat_template + generate: unary Generate on the rendered conversation.
    with grpc.insecure_channel(clusters["tokenizer"].address) as channel:
        templates = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        for index in range(len(USER_TURNS)):
            rendered = templates.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(
                model="tiny", messages=conversation(USER_TURNS[:index + 1], reference[:index]),
                add_generation_prompt=True))
            unary = cached.Generate(pb.GenerateRequest(model="tiny", prompt=rendered.text, sampling=SAMPLING,
                                                       add_special_tokens=False))
            assert unary.text == reference[index]
