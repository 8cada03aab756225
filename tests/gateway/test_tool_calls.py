"""Tool-call formats: detection from chat templates, the streaming parser, and the
grammar that forces one call (driven through llguidance over the default tokenizer,
the way the engine drives it, with random choices among the allowed tokens)."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import pytest
from tokenizers import Tokenizer

from llmsuite.builder.tokenizer import CHAT_TEMPLATE
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.chat_tools import ChatTools
from llmsuite.gateway.local_tokenizers import LocalTokenizer
from llmsuite.gateway.tool_calls import (
    FORMATS,
    FunctionSpec,
    ParsedCall,
    ToolCallParser,
    detect_format,
    forced_call_grammar,
    function_specs,
    parse_format_flags,
)
from llmsuite.gateway.v1 import gateway_pb2
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument
from llmsuite.runtime.tokenizer_hash import content_hash_of

DECLARED = ("get_weather", "add")
WEATHER = ParsedCall("get_weather", '{"city": "Paris"}')


def parse(fmt: str, text: str, step: int) -> tuple[str, list[ParsedCall]]:
    parser = ToolCallParser(FORMATS[fmt], DECLARED)
    content, calls = "", []
    for start in range(0, len(text), step):
        piece = parser.feed(text[start:start + step])
        content += piece.content
        calls += piece.calls
    piece = parser.finish()
    return content + piece.content, calls + piece.calls


CASES = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
     "Sure.", [WEATHER, ParsedCall("add", '{"a": 1}')]),
    ("hermes", "plain text with a < sign and trailing blanks  ", "plain text with a < sign and trailing blanks  ", []),
    ("hermes", 'a <tool b <tool_call>{not json}</tool_call> c', 'a <tool b <tool_call>{not json}</tool_call> c', []),
    # An undeclared function is not a call: the text stays content.
    ("hermes", '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "rm", "arguments": {}}</tool_call>', []),
    # The reply ended (end of sequence) before the closing marker: the call is whole.
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [WEATHER]),
    # Cut in the middle of a call (max tokens): what there is stays text.
    ("hermes", 'x <tool_call>\n{"name": "get_weather", "argu', 'x <tool_call>\n{"name": "get_weather", "argu', []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>', "",
     [WEATHER]),
    ("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {}}',
     "", [WEATHER, ParsedCall("add", "{}")]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ("llama3_json", 'Hi {"name": "add", "parameters": {}}', 'Hi {"name": "add", "parameters": {}}', []),
    ("llama3_json", '{"answer": 1} and more', '{"answer": 1} and more', []),
    ("mistral", 'Hi [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "add", "arguments": {"a": 2}}]', "Hi", [WEATHER, ParsedCall("add", '{"a": 2}')]),
    ("mistral", "[TOOL_CALLS] [oops", "[TOOL_CALLS] [oops", []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_the_parser_gives_the_same_answer_however_the_reply_is_split(fmt, text, content, calls) -> None:
    for step in range(1, len(text) + 1):
        assert parse(fmt, text, step) == (content, calls), f"split every {step} characters"


def test_text_that_may_open_a_call_is_held_back_until_it_cannot() -> None:
    parser = ToolCallParser(FORMATS["hermes"], DECLARED)
    assert parser.feed("Hello <tool").content == "Hello"
    assert parser.feed("box").content == " <toolbox"
    assert parser.feed(' <tool_call>{"name": "get_weather", ').content == ""
    assert not parser.made_calls
    piece = parser.feed('"arguments": {"city": "Paris"}}</tool_call>')
    assert (piece.content, piece.calls) == ("", [WEATHER]) and parser.made_calls


@pytest.mark.parametrize(("template", "expected"), [
    (CHAT_TEMPLATE, "hermes"),
    ("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>", "hermes"),
    ("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}", "mistral"),
    ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
    ("{%- if message.role == 'ipython' %}{{ '\"parameters\": ' }}{% endif %}", "llama3_json"),
    ("{{ messages[0].content }}", None),
    (None, None),
])
def test_the_format_is_read_from_the_chat_template(template, expected) -> None:
    found = detect_format(template)
    assert (found.name if found else None) == expected


def test_tools_on_a_model_of_unknown_format_need_the_flag(tiny_tokenizer_dir) -> None:
    start = gateway_pb2.ChatStart(model="m")
    start.tools.add(name="f")
    plain = LocalTokenizer("sha256:x", Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")),
                           "{{ messages[0].content }}")
    tools = ChatTools.from_start(start, "m", plain, {})
    none = common_pb2.ToolChoice(mode=common_pb2.ToolChoice.MODE_NONE)
    assert tools is not None and tools.reply(none, "start.tool_choice").parser is None  # none needs no format
    with pytest.raises(FailedPrecondition) as refused:
        tools.reply(None, "start.tool_choice")
    assert refused.value.reason == "TOOL_CALL_FORMAT_UNKNOWN" and "--tool-call-parser m=FORMAT" in refused.value.message
    configured = ChatTools.from_start(start, "m", plain, {"m": "hermes"})
    assert configured is not None and configured.reply(None, "start.tool_choice").parser is not None


def test_format_flags() -> None:
    assert parse_format_flags(["tiny=hermes", "llama=llama3_json"]) == {"tiny": "hermes", "llama": "llama3_json"}
    for bad in ("tiny", "tiny=xml", "=hermes"):
        with pytest.raises(ValueError, match="NAME=FORMAT"):
            parse_format_flags([bad])


def test_declared_functions_are_checked() -> None:
    specs = function_specs([("get_weather", '{"type": "object"}'), ("now", "")])
    assert specs[1] == FunctionSpec("now", {"type": "object", "properties": {}, "additionalProperties": False})
    for tools, path in ([("bad name", "")], "start.tools[0].name"), ([("f", ""), ("f", "")], "start.tools[1].name"), \
            ([("f", "[1]")], "start.tools[0].parameters"), ([("f", "{")], "start.tools[0].parameters"):
        with pytest.raises(InvalidArgument) as caught:
            function_specs(tools)
        assert caught.value.violations[0].field == path and caught.value.reason == "INVALID_TOOL"


# -- forced calls through llguidance -------------------------------------------------------------

ADDRESS = {"type": "object", "properties": {"street": {"type": "string", "maxLength": 8},
                                            "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
           "required": ["street", "zip"], "additionalProperties": False}
FUNCTIONS = [
    FunctionSpec("get_weather", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    # Pydantic's shape for a nested model: $defs at the root of the parameters.
    FunctionSpec("ship", {"type": "object", "$defs": {"Address": ADDRESS},
                          "properties": {"to": {"$ref": "#/$defs/Address"}, "express": {"type": "boolean"}},
                          "required": ["to", "express"], "additionalProperties": False}),
    FunctionSpec("now", {"type": "object", "properties": {}, "additionalProperties": False}),
]
PARAMETERS = {f.name: {**f.parameters} for f in FUNCTIONS}


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir) -> tuple[Tokenizer, llguidance.LLTokenizer]:
    source = (tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    return Tokenizer.from_str(source), llguidance.LLTokenizer(source)


def random_output(grammar: str, tokenizer, seed: int, max_tokens: int = 400) -> str:
    """What a model with random logits writes under the grammar: a random allowed token each step."""
    hf, llg = tokenizer
    matcher = llguidance.LLMatcher(llg, grammar)
    assert not matcher.is_error(), matcher.get_error()
    rng = random.Random(seed)
    ids: list[int] = []
    while not matcher.is_stopped() and len(ids) < max_tokens:
        mask = matcher.compute_bitmask()
        allowed = [i for i in range(hf.get_vocab_size()) if mask[i // 8] >> (i % 8) & 1]
        token = rng.choice(allowed)
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    assert matcher.is_stopped(), "the forced call did not end"
    return hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("only", [None, "ship"])
def test_a_forced_call_always_parses_to_a_declared_function_with_valid_arguments(tokenizer, fmt, only) -> None:
    functions = [f for f in FUNCTIONS if only in (None, f.name)]
    grammar = forced_call_grammar(FORMATS[fmt], functions)
    for seed in range(6):
        text = random_output(grammar, tokenizer, seed)
        parser = ToolCallParser(FORMATS[fmt], [f.name for f in functions])
        first, last = parser.feed(text), parser.finish()
        assert first.content + last.content == "", text
        (call,) = first.calls + last.calls
        assert call.name in {f.name for f in functions}
        jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])


def test_a_forced_hermes_call_is_written_as_the_template_writes_it(tokenizer) -> None:
    text = random_output(forced_call_grammar(FORMATS["hermes"], FUNCTIONS[2:]), tokenizer, 0)
    assert text == '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def test_marker_tokens_survive_detokenization_when_other_special_tokens_do_not(tiny_tokenizer_dir) -> None:
    """Mistral's [TOOL_CALLS] is a special token: the reply's text must keep it (and only it)
    for the parser to see the call. The tiny tokenizer's <|end|> stands in for it."""
    files = {name: (tiny_tokenizer_dir / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                         "special_tokens_map.json")}
    local = LocalTokenizer.from_files(files, content_hash_of(files))
    assert local.chat_template == CHAT_TEMPLATE
    (end_id,) = local.special_ids(["<|end|>", "not a token"])
    ids = local.tokenizer.encode("<s>hi<|end|> there</s>", add_special_tokens=False).ids
    detok = local.detokenizer([], skip_special_tokens=True, keep_ids={end_id})
    streamed = "".join(detok.push([token]) for token in ids) + detok.finish()
    assert streamed == "hi<|end|> there"
    plain = local.detokenizer([], skip_special_tokens=True)
    assert "".join(plain.push([token]) for token in ids) + plain.finish() == "hi there"
