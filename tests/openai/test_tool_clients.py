"""Tool calling and structured output through the clients people point at an
OpenAI-compatible server: the official `openai` package, LangChain's ChatOpenAI and
LiteLLM, against `llmsuite-openai` in front of a real cluster.

The model has random weights: what it says is nonsense, but what is constrained
(a required or named call, a JSON schema) must parse and validate every time."""

from __future__ import annotations

import json
import os
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

MODEL = "tiny"
QUESTION = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris, in celsius?"}]
WEATHER_PARAMETERS = {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD_PARAMETERS = {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": ADD_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}


class Weather(pydantic.BaseModel):
    """The weather in a city."""

    city: str = pydantic.Field(max_length=12)
    unit: Literal["c", "f"]


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster.base_url, api_key=cluster.api_key, max_retries=0, timeout=120) as c:
        yield c


def check_call(call, allowed) -> dict:
    assert call.type == "function" and call.id and call.function.name in allowed
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments


def streamed_calls(chunks) -> tuple[str, list[dict], str | None]:
    """Content, calls (joined from their deltas as the openai SDK's users join them) and finish reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


# -- openai ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_calls_are_declared_and_valid_and_stream_as_they_answer(client, seed):
    request = dict(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=160, seed=seed)
    whole = client.chat.completions.create(**request)
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    check_call(call, PARAMETERS)
    content, calls, finish = streamed_calls(client.chat.completions.create(**request, stream=True))
    assert (content, finish) == ("", "tool_calls")
    # Ids are fresh per request; the calls themselves are the unary ones.
    assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]
    assert calls[0]["id"].startswith("call_")


def test_a_named_tool_is_called(client):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=160,
                                              tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = response.choices[0].message.tool_calls
    check_call(call, {"add"})


def test_auto_and_none(client):
    auto = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=30, seed=5)
    (choice,) = auto.choices
    # A random model rarely writes a call: it answered in text, or with declared calls.
    for call in choice.message.tool_calls or ():
        check_call(call, PARAMETERS)
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    content, calls, finish = streamed_calls(client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=30, seed=5, stream=True))
    assert (content or None, finish) == (choice.message.content, choice.finish_reason)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
    none = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                          max_tokens=30, temperature=0.0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    streamed, calls, finish = streamed_calls(client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=30, temperature=0.0, stream=True))
    assert (streamed, calls, finish) == (none.choices[0].message.content, [], none.choices[0].finish_reason)


def test_a_call_and_its_result_go_back_into_the_conversation(client):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           max_tokens=160, temperature=0.0)
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [*QUESTION, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    # The history's call is in the prompt the model saw: the prompt grew by its rendering.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_beta_parse_with_a_pydantic_function_tool(client):
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=QUESTION, max_tokens=160, temperature=0.0,
        tools=[openai.pydantic_function_tool(Weather)], tool_choice="required")
    (call,) = completion.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Weather)


def test_tool_errors_name_the_http_field(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert (refused.value.param, refused.value.code) == ("tool_choice.function.name", "invalid_tool")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[
            {"type": "function", "function": {"name": "bad name"}}])
    assert refused.value.param == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert (refused.value.param, refused.value.code) == ("tool_choice", "tool_choice_conflict")


# -- LangChain ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(cluster):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=cluster.base_url, api_key=cluster.api_key, temperature=0.0,
                      max_tokens=200, max_retries=0, timeout=120)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_validates(chat_model, method):
    structured = chat_model.with_structured_output(Weather, method=method)
    result = structured.invoke("Weather in Paris?")
    assert isinstance(result, Weather)


def test_langchain_json_mode_constrains_to_an_object(chat_model):
    """json_mode asks for any JSON object, which a random model never closes: it writes string
    characters until max_tokens (json_schema and function_calling above are bounded and do end).
    So what is checked is what json_object promises: the reply is an object from its first byte,
    whole when it ends; openai's parser refuses a reply cut by the length limit."""
    short = chat_model.model_copy(update={"max_tokens": 24})
    structured = short.with_structured_output(WEATHER_PARAMETERS | {"title": "weather"}, method="json_mode")
    try:
        assert isinstance(structured.invoke("Weather in Paris, as JSON?"), dict)
    except openai.LengthFinishReasonError as cut:
        content = cut.completion.choices[0].message.content
        assert content.startswith("{") and cut.completion.usage.completion_tokens == 24
        assert cut.completion.choices[0].finish_reason == "length"


def test_langchain_bind_tools_round_trip(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    class AddArguments(pydantic.BaseModel):
        # Bounded: a random model writes an unbounded integer's digits until max_tokens.
        a: int = pydantic.Field(ge=0, le=99)
        b: int = pydantic.Field(ge=0, le=99)

    @tool(args_schema=AddArguments)
    def add(a: int, b: int) -> int:
        """Adds two numbers."""
        return a + b

    with_tools = chat_model.bind_tools([add], tool_choice="any")
    question = HumanMessage("What is 2 + 3?")
    reply = with_tools.invoke([question])
    (call,) = reply.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(value, int) for value in call["args"].values())
    result = ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"])
    answer = chat_model.bind_tools([add], tool_choice="none").invoke([question, reply, result])
    assert not answer.tool_calls and isinstance(answer.content, str)


# -- LiteLLM -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm():
    # Read when litellm is imported: its price list comes from the package, not the network.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def test_litellm_completion_with_and_without_tools(cluster, litellm):
    options = dict(model=f"openai/{MODEL}", api_base=cluster.base_url, api_key=cluster.api_key, messages=QUESTION,
                   temperature=0.0, timeout=120, num_retries=0)
    plain = litellm.completion(**options, max_tokens=8, extra_body={"ignore_eos": True})
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].message.content
    assert plain.usage.completion_tokens == 8
    called = litellm.completion(**options, max_tokens=160, tools=TOOLS, tool_choice="required")
    assert called.choices[0].finish_reason == "tool_calls"
    (call,) = called.choices[0].message.tool_calls
    check_call(call, PARAMETERS)
