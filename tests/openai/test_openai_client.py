"""The official `openai` package (sync and async, streaming and not) against
`llmsuite-openai` in front of a real cluster: what it returns is what the
gateway returns for the same request."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from llmsuite.client import LlmsuiteClient

MODEL = "tiny"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Tell me more"}]


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster.base_url, api_key=cluster.api_key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def gateway_client(cluster):
    with LlmsuiteClient(cluster.gateway.address, api_key=cluster.api_key, timeout_s=60) as c:
        yield c


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "llmsuite")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.code == "model_not_found"


def test_completion_equals_the_gateway_generation(client, gateway_client):
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, **GREEDY)
    direct = gateway_client.generate("Once upon a time", model=MODEL, max_new_tokens=12, temperature=0.0,
                                     ignore_eos=True)
    (choice,) = response.choices
    assert choice.text == direct.text and choice.finish_reason == "length" and choice.logprobs is None
    assert response.object == "text_completion" and response.model == MODEL and response.id.startswith("cmpl-")
    assert response.usage.completion_tokens == 12
    # OpenAI counts cached tokens inside prompt_tokens; the gateway's usage counts them apart.
    assert response.usage.prompt_tokens == direct.usage.prompt_tokens + direct.usage.cached_tokens
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert response.usage.prompt_tokens_details.cached_tokens == 0


def test_streamed_completion_joins_to_the_unary_text_and_reports_usage(client):
    whole = client.completions.create(model=MODEL, prompt="A stream", max_tokens=20, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="A stream", max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, chat):
    # guidellm's stream_options (vLLM's continuous_usage_stats).
    options = dict(model=MODEL, max_tokens=12, **GREEDY)
    streamed = dict(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    if chat:
        messages = [{"role": "user", "content": "Count the usage as you go."}]
        whole = client.chat.completions.create(messages=messages, **options)
        chunks = list(client.chat.completions.create(messages=messages, **options, **streamed))
    else:
        whole = client.completions.create(prompt="A stream", **options)
        chunks = list(client.completions.create(prompt="A stream", **options, **streamed))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12 == counts[-2]  # the finish chunk has them all
    assert {c.usage.prompt_tokens for c in chunks} == {whole.usage.prompt_tokens}
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and (final.prompt_tokens, final.completion_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_continuous_usage_counts_a_shared_prompt_once_over_n_choices(client):
    chunks = list(client.completions.create(
        model=MODEL, prompt="Two at once", max_tokens=6, n=2, seed=3, temperature=1.0, stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    whole = chunks[-1].usage
    assert whole.completion_tokens == 12 and chunks[-1].choices == []
    assert {c.usage.prompt_tokens for c in chunks} == {whole.prompt_tokens}
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-2] == 12


def test_chat_equals_a_one_turn_gateway_chat(client, gateway_client):
    response = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_completion_tokens=10,
                                              **GREEDY)
    with gateway_client.chat(MODEL, CONVERSATION[:-1], max_new_tokens=10, temperature=0.0, ignore_eos=True) as chat:
        direct = chat.send(CONVERSATION[-1]["content"]).wait()
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == direct.text
    assert choice.finish_reason == "length" and response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.usage.completion_tokens == 10
    assert response.usage.prompt_tokens == direct.usage.prompt_tokens + direct.usage.cached_tokens
    assert response.usage.prompt_tokens_details.cached_tokens == 0  # a stateless request starts a fresh session
    # llmsuite's timings extension, from the gateway's summary.
    timings = response.model_extra["timings"]
    assert set(timings) == {"queue_ms", "prefill_ms", "time_to_first_token_ms", "mean_inter_token_latency_ms",
                            "total_ms"}
    assert 0 < timings["time_to_first_token_ms"] <= timings["total_ms"] and timings["prefill_ms"] > 0


def test_chat_stream_async_matches_the_unary_reply(cluster):
    async def scenario():
        async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key=cluster.api_key, max_retries=0) as client:
            whole = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=16, **GREEDY)
            stream = await client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=16,
                                                          stream=True, stream_options={"include_usage": True},
                                                          **GREEDY)
            chunks = [chunk async for chunk in stream]
            return whole, chunks

    whole, chunks = run(scenario())
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].object == "chat.completion.chunk" and chunks[-1].usage.completion_tokens == 16
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish.model_extra["timings"]["total_ms"] > 0


def test_async_completion_and_model_list(cluster):
    async def scenario():
        async with openai.AsyncOpenAI(base_url=cluster.base_url, api_key=cluster.api_key, max_retries=0) as client:
            models = [m.id async for m in client.models.list()]
            completion = await client.completions.create(model=MODEL, prompt="async", max_tokens=3, **GREEDY)
            stream = await client.completions.create(model=MODEL, prompt="async", max_tokens=3, stream=True, **GREEDY)
            texts = [c.choices[0].text async for c in stream]
            return models, completion, texts

    models, completion, texts = run(scenario())
    assert models == [MODEL]
    assert completion.usage.completion_tokens == 3 and "".join(texts) == completion.choices[0].text


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt="A stop test", max_tokens=24, **GREEDY).choices[0].text
    stop = full[6:9]
    assert len(full) >= 12 and stop
    for stops in (stop, [stop, "never appears"]):
        choice = client.completions.create(model=MODEL, prompt="A stop test", max_tokens=24, stop=stops,
                                           **GREEDY).choices[0]
        assert choice.text == full[:full.index(stop)] and choice.finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=24, stream=True,
                                              **GREEDY)
    assert all(stop not in (c.choices[0].delta.content or "") for c in streamed if c.choices)


def test_seed_and_top_p_make_sampling_repeatable(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Dice", max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_logprobs(client):
    completion = client.completions.create(model=MODEL, prompt="Odds", max_tokens=5, logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    # Each token by its text, as the gateway's tokenizer decodes it alone.
    assert all(t and not t.startswith("token_id:") for t in logprobs.tokens)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 and lp <= 0 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs,
                                                              strict=True))
    # Greedy: the chosen token is the most likely one.
    assert all(max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs,
                                                                         logprobs.token_logprobs, strict=True))

    chat = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=6, logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(p.top_logprobs) == 3 and p.logprob <= 0 for p in content)
    streamed = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=6, logprobs=True,
                                              stream=True, **GREEDY)
    positions = [p for c in streamed if c.choices and c.choices[0].logprobs for p in c.choices[0].logprobs.content]
    assert [p.token for p in positions] == [p.token for p in content]
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].token == content[0].token
    assert b"".join(bytes(p.bytes) for p in content).decode("utf-8", "replace") == chat.choices[0].message.content


def test_errors_arrive_as_the_clients_exceptions(cluster, client):
    with pytest.raises(openai.AuthenticationError) as auth:
        with openai.OpenAI(base_url=cluster.base_url, api_key="wrong", max_retries=0) as stranger:
            stranger.models.list()
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CONVERSATION)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=MODEL, messages=CONVERSATION, n=65)
    assert too_many.value.param == "n" and too_many.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as too_hot:
        client.completions.create(model=MODEL, prompt="x", temperature=1000, stream=True)
    assert too_hot.value.param == "temperature"


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = pydantic.Field(ge=0, le=9)
    note: str = pydantic.Field(max_length=6)


VERDICT_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {
    "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer", "confidence"],
    "additionalProperties": False}


def test_response_format_json_schema_is_enforced_streamed_and_not(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA}}
    request = dict(model=MODEL, messages=CONVERSATION, max_tokens=40, temperature=0.0,
                   response_format=response_format)
    whole = client.chat.completions.create(**request)
    (choice,) = whole.choices
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), VERDICT_SCHEMA)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       client.chat.completions.create(**request, stream=True) if chunk.choices)
    assert streamed == choice.message.content


def test_beta_parse_returns_the_pydantic_model(client):
    completion = client.beta.chat.completions.parse(model=MODEL, messages=CONVERSATION, max_tokens=60,
                                                    temperature=0.0, response_format=Verdict)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Verdict)
    assert message.parsed == Verdict.model_validate_json(message.content)


def test_response_format_json_object_writes_an_object(client):
    response = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=24, temperature=0.0,
                                              response_format={"type": "json_object"})
    (choice,) = response.choices
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"


def test_an_invalid_schema_is_a_400_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=CONVERSATION, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}})
    assert refused.value.code == "constraint_invalid"
    assert refused.value.param == "response_format.json_schema.schema"
