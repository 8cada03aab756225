"""Tool calling through gateway Chat on a real cluster (tokenizer, inference, gateway on
loopback, the random-weight tiny model whose template writes Hermes-style calls).

Random weights write nonsense, so only forced calls (tool_choice required or named,
constrained by grammar) are certain to be calls; the property checked is that they
always parse, name a declared function and carry arguments valid for it, streamed and
unary alike, and that a conversation continued after a call renders as a re-sent one."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from support import ServiceProcess, processes

from llmsuite.client import (
    ChatMessage,
    Constraint,
    InvalidRequest,
    LlmsuiteClient,
    Tool,
    ToolChoice,
)

WEATHER = Tool("get_weather", "The weather in a city", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False})
ADD = Tool("add", "Adds two numbers", {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False})
NOW = Tool("now", "The time")  # no parameters
TOOLS = [WEATHER, ADD, NOW]
PARAMETERS = {t.name: t.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
              for t in TOOLS}
SAMPLING = {"max_new_tokens": 160}


def upstream(kind: str, model_dir: object) -> ServiceProcess:
    argv = [f"llmsuite-{kind}", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}"]
    if kind == "inference":
        argv += ["--device", "cpu", "--intra-op-threads", "1"]
    return ServiceProcess(argv)


def gateway(tok: ServiceProcess, inf: ServiceProcess, *extra: str) -> ServiceProcess:
    return ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tok.address,
                           "--inference", inf.address, *extra])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny preset with room for the tool definitions the template lists (512 positions are too few)."""
    from llmsuite.builder.model import build_model

    out = tmp_path_factory.mktemp("tools-models") / "tiny"
    build_model(out, preset="tiny", max_position_embeddings=4096)
    return out


@pytest.fixture(scope="module")
def cluster(model_dir):
    tok, inf = upstream("tokenizer", model_dir), upstream("inference", model_dir)
    with processes(tok, inf):
        with processes(gateway(tok, inf)) as (gw,):
            yield tok, inf, gw


@pytest.fixture(scope="module")
def client(cluster):
    with LlmsuiteClient(cluster[2].address, timeout_s=120) as client:
        yield client


def check_forced_call(reply, allowed: set[str]) -> None:
    assert reply.finish_reason == "tool_calls", reply
    assert reply.text == ""
    (call,) = reply.tool_calls
    assert call.name in allowed and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_a_required_call_always_parses_and_fits_a_declared_function(client, seed) -> None:
    sampling = {**SAMPLING, "temperature": 0.0} if seed is None else {**SAMPLING, "seed": seed}
    with client.chat("tiny", tools=TOOLS, tool_choice="required", **sampling) as chat:
        chunks = list(chat.send("What is the weather in Paris?"))
        unary = chat.last
    assert unary is not None
    check_forced_call(unary, {t.name for t in TOOLS})
    # Streamed: the calls arrive whole, once, and are the unary answer's.
    assert [c for chunk in chunks for c in chunk.tool_calls] == list(unary.tool_calls)
    assert "".join(chunk.text for chunk in chunks) == ""


def test_a_named_function_is_the_one_called(client) -> None:
    for seed in range(3):
        with client.chat("tiny", tools=TOOLS, tool_choice=ToolChoice.named("add"), seed=seed, **SAMPLING) as chat:
            check_forced_call(chat.send("Add 2 and 3").wait(), {"add"})


def test_a_conversation_goes_on_after_a_call_as_a_resent_one_would(client) -> None:
    greedy = {**SAMPLING, "temperature": 0.0, "max_new_tokens": 12}
    with client.chat("tiny", tools=TOOLS, **greedy) as chat:
        call = chat.send("Weather in Rome?", tool_choice="required", max_new_tokens=160).wait()
        (made,) = call.tool_calls
        answer = chat.send('{"temperature": 21}', role="tool", tool_call_id=made.id, tool_choice="none",
                           max_new_tokens=12).wait()
        history = list(chat.messages)
    assert answer.finish_reason in ("stop", "length") and not answer.tool_calls
    assert history[1] == ChatMessage("assistant", "", tool_calls=(made,))
    # The same conversation re-sent in full (as a stateless HTTP client sends it) gets the same reply.
    with client.chat("tiny", history[:-2], tools=TOOLS, tool_choice="none", **greedy) as fresh:
        resent = fresh.send('{"temperature": 21}', role="tool", tool_call_id=made.id).wait()
    assert resent.text == answer.text


def test_auto_and_none_replies(client) -> None:
    with client.chat("tiny", tools=TOOLS, seed=3, **SAMPLING) as chat:
        auto = chat.send("Anything?").wait()
        none = chat.send("Again", tool_choice="none").wait()
    # A random model rarely writes a call: whatever it wrote is text or declared calls.
    assert auto.finish_reason in ("stop", "length", "tool_calls")
    assert all(call.name in PARAMETERS for call in auto.tool_calls)
    assert (auto.finish_reason == "tool_calls") == bool(auto.tool_calls)
    assert none.finish_reason in ("stop", "length") and not none.tool_calls


def test_auto_reads_the_calls_a_reply_writes(client) -> None:
    """A random model does not write calls by itself, so a grammar makes it write text and two
    calls in the Hermes format: auto mode must find them, streamed as in the unary reply."""
    call = '"<tool_call>\\n" %json ' + json.dumps({
        "type": "object", "properties": {"name": {"const": "add"}, "arguments": ADD.parameters},
        "required": ["name", "arguments"], "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False}}) + ' "\\n</tool_call>"'
    grammar = f'start: "Let me add. " call "\\n" call\ncall: {call}\n'
    with client.chat("tiny", tools=TOOLS, seed=4, constraint=Constraint.grammar(grammar), **SAMPLING) as chat:
        chunks = list(chat.send("Add twice"))
        reply = chat.last
    assert reply is not None and reply.finish_reason == "tool_calls"
    assert reply.text == "Let me add."  # the blank before a call separates it from the text
    assert [c.name for c in reply.tool_calls] == ["add", "add"]
    for made in reply.tool_calls:
        jsonschema.validate(json.loads(made.arguments), PARAMETERS["add"])
    assert [c for chunk in chunks for c in chunk.tool_calls] == list(reply.tool_calls)
    assert "".join(chunk.text for chunk in chunks) == reply.text
    # Text that only looked like the start of a call is held back, then released whole.
    with client.chat("tiny", tools=TOOLS, constraint=Constraint.regex("Hello <tool_ca"), **SAMPLING) as chat:
        text_only = chat.send("Hi").wait()
    assert (text_only.text, text_only.tool_calls) == ("Hello <tool_ca", ())
    assert text_only.finish_reason in ("grammar", "stop")


def refusal(client, reason: str, **chat_options) -> list[str]:
    with pytest.raises(InvalidRequest) as refused:
        with client.chat("tiny", **{**SAMPLING, **chat_options}) as chat:
            chat.send("hi").wait()
    assert refused.value.reason == reason, refused.value
    return [v.field for v in refused.value.field_violations]


def test_bad_tool_requests_are_refused_naming_the_field(client) -> None:
    assert refusal(client, "INVALID_TOOL", tools=TOOLS, tool_choice=ToolChoice.named("nope")) == [
        "start.tool_choice.function_name"]
    assert refusal(client, "INVALID_TOOL", tool_choice="required") == ["start.tool_choice"]
    assert refusal(client, "INVALID_TOOL", tools=[Tool("f", parameters="{not json")]) == ["start.tools[0].parameters"]
    assert refusal(client, "INVALID_TOOL", tools=[Tool("f"), Tool("f")]) == ["start.tools[1].name"]
    assert refusal(client, "TOOL_CHOICE_CONFLICT", tools=TOOLS, tool_choice="required",
                   constraint=Constraint.json_object()) == ["start.tool_choice"]


def test_the_format_flag_overrides_the_template(cluster) -> None:
    tok, inf, _ = cluster
    with processes(gateway(tok, inf, "--tool-call-parser", "tiny=mistral")) as (gw,), \
            LlmsuiteClient(gw.address, timeout_s=120) as client:
        for seed in range(2):
            with client.chat("tiny", tools=TOOLS, tool_choice="required", seed=seed, **SAMPLING) as chat:
                reply = chat.send("Weather?").wait()
            assert reply.finish_reason == "tool_calls" and reply.text == ""
            (call,) = reply.tool_calls
            assert len(call.id) == 9 and call.id.isalnum()  # Mistral's templates insist on it
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])


def test_the_gateway_refuses_a_bad_format_flag() -> None:
    ran = subprocess.run([sys.executable, "-m", "llmsuite.gateway", "--tool-call-parser", "tiny=xml"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode != 0 and "NAME=FORMAT" in ran.stderr
