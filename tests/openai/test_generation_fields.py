"""The generation fields clients send, through the official `openai` client and a real
cluster: n, batched prompts, echo, penalties, logit_bias, min_p, min_tokens,
stop_token_ids, skip_special_tokens, include_stop_str_in_output and top_k -1. Each is
checked for what it does, and streamed answers must equal unary ones."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import openai
import pytest

from llmsuite.builder.tokenizer import EOS_TOKEN, SPECIAL_TOKENS

MODEL = "tiny"
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
CONVERSATION = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster.base_url, api_key=cluster.api_key, max_retries=0, timeout=60) as c:
        yield c


def streamed_texts(stream: Any, chat: bool = False) -> dict[int, str]:
    texts: dict[int, str] = defaultdict(str)
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content or "") if chat else choice.text
    return dict(texts)


def with_extra(request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**request, "extra_body": {**request.get("extra_body", {}), **extra}}


def fresh_prompt() -> str:
    """A prompt no earlier test sent, so what the prefix cache holds is this test's doing."""
    return f"Story {uuid.uuid4().hex} begins here and goes on for a while"


def test_n_choices_are_seeded_per_choice_and_share_the_prompt(client):
    request = dict(model=MODEL, prompt=fresh_prompt(), max_tokens=12, temperature=1.0, seed=11, n=3,
                   extra_body={"ignore_eos": True})
    first = client.completions.create(**request)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1, "each choice samples with its own seed"
    # The prompt was prefilled once: the choices found its KV cached (it is a fresh prompt).
    assert first.usage.prompt_tokens_details.cached_tokens > 0
    assert first.usage.completion_tokens == 36
    # Streamed and unary agree choice by choice (greedy: the same tokens whatever the batch).
    greedy = dict(model=MODEL, prompt=fresh_prompt(), max_tokens=12, n=2, **GREEDY)
    whole = client.completions.create(**greedy)
    assert [c.index for c in whole.choices] == [0, 1] and whole.choices[0].text == whole.choices[1].text
    assert streamed_texts(client.completions.create(**greedy, stream=True)) == {c.index: c.text for c in whole.choices}


def test_chat_n_choices_stream_as_they_answer(client):
    request = dict(model=MODEL, messages=CONVERSATION, max_tokens=10, n=2, **GREEDY)
    whole = client.chat.completions.create(**request)
    assert [c.index for c in whole.choices] == [0, 1]
    streamed = streamed_texts(client.chat.completions.create(**request, stream=True), chat=True)
    assert streamed == {c.index: c.message.content for c in whole.choices}


def test_batched_prompts_give_each_prompt_its_choices(client):
    prompts = ["Once upon a time", "In a galaxy far away"]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, **GREEDY).choices[0].text
             for p in prompts]
    assert [c.text for c in batch.choices] == [alone[0], alone[0], alone[1], alone[1]]
    streamed = streamed_texts(client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, n=2,
                                                        stream=True, **GREEDY))
    assert streamed == {c.index: c.text for c in batch.choices}


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=6, **GREEDY).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=6, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Echo me" + plain
    streamed = streamed_texts(client.completions.create(model=MODEL, prompt="Echo me", max_tokens=6, echo=True,
                                                        stream=True, **GREEDY))
    assert streamed == {0: "Echo me" + plain}


def test_logit_bias_forces_a_token_and_penalties_change_the_text(client):
    forced = client.completions.create(model=MODEL, prompt="Bias", max_tokens=5, logprobs=0,
                                       logit_bias={"77": 100}, **GREEDY)
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 5 and len(set(tokens)) == 1
    request = dict(model=MODEL, prompt="Repeat after me", max_tokens=24, **GREEDY)
    plain = client.completions.create(**request).choices[0].text
    # Negative penalties reward what was said already: the random model starts repeating itself.
    looping = client.completions.create(**request, presence_penalty=-2.0, frequency_penalty=-2.0).choices[0].text
    assert looping != plain
    streamed = streamed_texts(client.completions.create(**request, presence_penalty=-2.0, frequency_penalty=-2.0,
                                                        stream=True))
    assert streamed == {0: looping}


def test_min_tokens_and_stop_token_ids(client, cluster):
    from llmsuite.client import LlmsuiteClient

    with LlmsuiteClient(cluster.gateway.address, api_key=cluster.api_key, timeout_s=60) as gateway:
        ids = gateway.generate("Count", model=MODEL, max_new_tokens=8, temperature=0.0, ignore_eos=True,
                               return_token_ids=True).token_ids
    request = with_extra(dict(model=MODEL, prompt="Count", max_tokens=8, temperature=0.0, logprobs=0),
                         ignore_eos=True, stop_token_ids=[ids[1]])
    stopped = client.completions.create(**request)
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].logprobs.tokens) == 2
    held = client.completions.create(**with_extra(request, min_tokens=5))
    assert len(held.choices[0].logprobs.tokens) >= 5


def test_min_p_and_top_k_minus_one(client):
    request = dict(model=MODEL, prompt="Sample", max_tokens=10, temperature=1.5, seed=3)
    off = client.completions.create(**request).choices[0].text
    assert client.completions.create(**with_extra(request, top_k=-1)).choices[0].text == off
    greedy = client.completions.create(model=MODEL, prompt="Sample", max_tokens=10, temperature=0.0).choices[0].text
    assert client.completions.create(**with_extra(request, min_p=1.0)).choices[0].text == greedy


def test_skip_special_tokens_false_keeps_them_in_the_text(client):
    eos = SPECIAL_TOKENS.index(EOS_TOKEN)
    request = with_extra(dict(model=MODEL, prompt="Special", max_tokens=2, temperature=0.0,
                              logit_bias={str(eos): 100}), ignore_eos=True)
    assert client.completions.create(**request).choices[0].text == ""
    kept = client.completions.create(**with_extra(request, skip_special_tokens=False))
    assert kept.choices[0].text == EOS_TOKEN * 2
    assert streamed_texts(client.completions.create(**with_extra(request, skip_special_tokens=False),
                                                    stream=True)) == {0: kept.choices[0].text}


def test_include_stop_str_in_output(client):
    full = client.completions.create(model=MODEL, prompt="Stop", max_tokens=16, **GREEDY).choices[0].text
    stop = full[4:6]
    request = dict(model=MODEL, prompt="Stop", max_tokens=16, stop=[stop], **GREEDY)
    cut = client.completions.create(**request).choices[0].text
    assert cut == full[:full.index(stop)]
    kept = client.completions.create(**with_extra(request, include_stop_str_in_output=True))
    assert kept.choices[0].text == cut + stop and kept.choices[0].finish_reason == "stop"
    streamed = streamed_texts(client.completions.create(**with_extra(request, include_stop_str_in_output=True),
                                                        stream=True))
    assert streamed == {0: cut + stop}


def test_token_id_prompts_complete_like_their_text(client, cluster):
    from llmsuite.client import LlmsuiteClient

    with LlmsuiteClient(cluster.gateway.address, api_key=cluster.api_key, timeout_s=60) as gateway:
        ids = [list(e.token_ids) for e in gateway.tokenize(["Once upon a time", "Far away"], model=MODEL)]
    by_text = client.completions.create(model=MODEL, prompt=["Once upon a time", "Far away"], max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, **GREEDY)
    assert one.choices[0].text == by_text.choices[0].text
    assert streamed_texts(client.completions.create(model=MODEL, prompt=ids, max_tokens=6, stream=True,
                                                    **GREEDY)) == {0: by_text.choices[0].text,
                                                                   1: by_text.choices[1].text}


def test_continue_final_message_continues_the_assistants_text(client, cluster):
    """The reply continues the open message: it is what a completion of the template's
    rendering, cut right after that message, gives."""
    import grpc

    from llmsuite.common.v1 import common_pb2
    from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    messages = [{"role": "user", "content": "Start a story"}, {"role": "assistant", "content": "Once upon"}]
    with grpc.insecure_channel(cluster.tokenizer.address) as channel:
        rendered = tokenizer_pb2_grpc.TokenizerServiceStub(channel).ApplyChatTemplate(
            tokenizer_pb2.ApplyChatTemplateRequest(
                model=MODEL, messages=[common_pb2.ChatMessage(**m) for m in messages], tokenize=True,
                continue_final_message=True), timeout=30)
    assert rendered.text.endswith("Once upon")
    expected = client.completions.create(model=MODEL, prompt=list(rendered.token_ids), max_tokens=8,
                                         **GREEDY).choices[0].text
    request = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0.0,
                   extra_body={"ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False})
    assert client.chat.completions.create(**request).choices[0].message.content == expected
    assert streamed_texts(client.chat.completions.create(**request, stream=True), chat=True) == {0: expected}
    with pytest.raises(openai.BadRequestError) as both:
        client.chat.completions.create(**{**request, "extra_body": {"continue_final_message": True}})
    assert both.value.param == "continue_final_message"


def test_chat_template_kwargs_reach_the_template(client):
    request = dict(model=MODEL, messages=CONVERSATION, max_tokens=4, temperature=0.0)
    plain = client.chat.completions.create(**request).choices[0].message.content
    unused = client.chat.completions.create(**request, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert unused.choices[0].message.content == plain  # a variable the template does not read changes nothing
    # The template's own variables cannot be overridden: the refusal proves the kwargs got there.
    with pytest.raises(openai.BadRequestError) as reserved:
        client.chat.completions.create(**request, extra_body={"chat_template_kwargs": {"messages": []}})
    assert reserved.value.param == "chat_template_kwargs"


def test_chat_skip_special_tokens_false(client):
    eos = SPECIAL_TOKENS.index(EOS_TOKEN)
    request = dict(model=MODEL, messages=CONVERSATION, max_tokens=2, temperature=0.0, logit_bias={str(eos): 100},
                   extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert client.chat.completions.create(**request).choices[0].message.content == EOS_TOKEN * 2
