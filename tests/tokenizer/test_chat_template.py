"""Chat template rendering: transformers' Jinja semantics, the sandbox, and typed errors."""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil

import pytest

from llmsuite.builder import tokenizer as builder
from llmsuite.common.v1 import common_pb2
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument
from llmsuite.tokenizer import convert
from llmsuite.tokenizer.chat_template import ChatMessage, ChatTemplate, render_context
from llmsuite.tokenizer.engine import LoadedTokenizer, TokenizerLimits
from llmsuite.tokenizer.v1 import tokenizer_pb2

MESSAGES = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi <b>&'\"</b>", name="ann"))


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("built")
    builder.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def loaded(built_dir: pathlib.Path) -> LoadedTokenizer:
    return LoadedTokenizer.load("default", built_dir)


def _render(loaded: LoadedTokenizer, template: str, messages=MESSAGES, **kwargs) -> str:
    kwargs.setdefault("add_generation_prompt", False)
    return loaded.apply_chat_template(messages, tokenize=False, template_override=template, **kwargs).text


def _with_config(built_dir: pathlib.Path, destination: pathlib.Path, **changes: object) -> LoadedTokenizer:
    shutil.copytree(built_dir, destination)
    path = destination / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return LoadedTokenizer.load("edited", destination)


def test_block_tags_leave_no_stray_whitespace(loaded: LoadedTokenizer) -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it.
    template = "{% for message in messages %}\n    {% if message.role == 'user' %}\n[{{ message.content }}]\n" \
               "    {% endif %}\n{% endfor %}\n"
    assert _render(loaded, template) == f"[{MESSAGES[1].content}]\n"


def test_tojson_does_not_escape_html(loaded: LoadedTokenizer) -> None:
    rendered = _render(loaded, "{{ messages[1].content | tojson }}|{{ {'b': 1, 'a': [2]} | tojson(sort_keys=True) }}")
    assert rendered == json.dumps(MESSAGES[1].content) + "|" + json.dumps({"a": [2], "b": 1})
    assert "\\u003c" not in rendered


def test_loop_controls_are_enabled(loaded: LoadedTokenizer) -> None:
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert _render(loaded, template) == MESSAGES[0].content


def test_generation_tag_is_transparent(loaded: LoadedTokenizer) -> None:
    template = "{% for m in messages %}{% generation %}<{{ m.role }}>{% endgeneration %}{% endfor %}"
    assert _render(loaded, template) == "<system><user>"


def test_context_has_special_tokens_generation_flag_and_defaults(loaded: LoadedTokenizer) -> None:
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|" \
               "{{ additional_special_tokens | join(',') }}|{{ add_generation_prompt }}|{{ tools is none }}"
    rendered = _render(loaded, template, add_generation_prompt=True)
    assert rendered == "|".join(
        ["<s>", "</s>", "<pad>", "False", ",".join(builder.SPECIAL_TOKENS[3:]), "True", "True"]
    )


def test_message_name_is_present_only_when_given(loaded: LoadedTokenizer) -> None:
    template = "{% for m in messages %}{{ 'name' in m }}:{{ m.name }};{% endfor %}"
    assert _render(loaded, template) == "False:;True:ann;"


def test_extra_context_reaches_the_template(loaded: LoadedTokenizer) -> None:
    rendered = _render(loaded, "{{ greeting }} {{ bos_token }}", extra_context={"greeting": "hey", "bos_token": "B"})
    assert rendered == "hey B"


def test_extra_context_may_not_replace_the_request(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _render(loaded, "{{ messages }}", extra_context={"messages": []})
    assert caught.value.violations[0].field == "template_variables"


def test_strftime_now(loaded: LoadedTokenizer) -> None:
    before = datetime.datetime.now().year
    rendered = _render(loaded, "{{ strftime_now('%Y') }}")
    assert rendered in {str(before), str(datetime.datetime.now().year)}


def test_raise_exception_is_a_caller_error_with_the_message(loaded: LoadedTokenizer) -> None:
    template = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('first message must be from the user') }}"
        "{% endif %}"
    )
    with pytest.raises(InvalidArgument) as caught:
        _render(loaded, template)
    assert caught.value.reason == "CHAT_TEMPLATE_ERROR"
    assert "first message must be from the user" in caught.value.message


def test_undefined_attribute_access_is_a_caller_error(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _render(loaded, "{{ no_such_thing.field }}")
    assert caught.value.reason == "CHAT_TEMPLATE_ERROR"


def test_undefined_plain_variable_renders_empty_like_transformers(loaded: LoadedTokenizer) -> None:
    assert _render(loaded, "[{{ no_such_thing }}]") == "[]"


def test_sandbox_hides_dunder_attributes(loaded: LoadedTokenizer) -> None:
    assert _render(loaded, "[{{ ''.__class__ }}]") == "[]"
    with pytest.raises(InvalidArgument) as caught:
        _render(loaded, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert caught.value.reason == "CHAT_TEMPLATE_ERROR"


def test_sandbox_forbids_mutating_the_messages(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _render(loaded, "{{ messages.append({'role': 'x'}) }}")
    assert caught.value.reason == "CHAT_TEMPLATE_ERROR"


def test_type_errors_in_template_code_are_caller_errors(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument):
        _render(loaded, "{{ messages[0].content + 1 }}")


def test_request_template_syntax_error_is_invalid_argument(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _render(loaded, "{% for m in messages %}{{ m.content }")
    assert caught.value.reason == "CHAT_TEMPLATE_INVALID"
    assert caught.value.violations[0].field == "chat_template"


def test_model_template_syntax_error_is_failed_precondition(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    broken = _with_config(built_dir, tmp_path / "broken", chat_template="{% if %}")
    assert broken.encode(["still encodes"])[0].ids  # only chat is affected
    for _ in range(2):  # the stored problem is raised afresh each time
        with pytest.raises(FailedPrecondition) as caught:
            broken.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        assert caught.value.reason == "CHAT_TEMPLATE_INVALID"
    # A valid override still works for that model.
    assert _render(broken, "ok") == "ok"


def test_missing_template_is_failed_precondition(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    without = _with_config(built_dir, tmp_path / "none", chat_template=None)
    assert without.chat_template is None
    with pytest.raises(FailedPrecondition) as caught:
        without.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert caught.value.reason == "NO_CHAT_TEMPLATE"


def test_empty_role_and_empty_conversation_name_their_fields(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        loaded.apply_chat_template([MESSAGES[0], ChatMessage("", "x")], add_generation_prompt=True, tokenize=False)
    assert caught.value.violations[0].field == "messages[1].role"
    with pytest.raises(InvalidArgument) as caught:
        loaded.apply_chat_template([], add_generation_prompt=True, tokenize=False)
    assert caught.value.violations[0].field == "messages"


def test_conversation_over_the_input_limit(built_dir: pathlib.Path) -> None:
    small = LoadedTokenizer.load("small", built_dir, TokenizerLimits(max_input_chars=40))
    with pytest.raises(InvalidArgument) as caught:
        small.apply_chat_template([ChatMessage("user", "x" * 41)], add_generation_prompt=True, tokenize=False)
    assert caught.value.reason == "INPUT_TOO_LONG"
    # Content fits, but the template inflates it past the limit.
    with pytest.raises(InvalidArgument) as caught:
        small.apply_chat_template(
            [ChatMessage("user", "x" * 10)], add_generation_prompt=True, tokenize=False,
            template_override="{% for i in range(10) %}{{ messages[0].content }}{% endfor %}",
        )
    assert caught.value.reason == "INPUT_TOO_LONG"


def test_tokenize_encodes_without_adding_special_tokens(loaded: LoadedTokenizer) -> None:
    rendered = loaded.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert rendered.ids == loaded.encode([rendered.text], add_special_tokens=False)[0].ids
    assert rendered.ids is not None and rendered.ids.count(builder.BOS_ID) == 1
    assert loaded.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False).ids is None


def test_templates_are_compiled_once() -> None:
    source = "{{ messages | length }} compiled-once-probe"
    first = ChatTemplate.compile(source, from_request=True)
    second = ChatTemplate.compile(source, from_request=False)
    assert first._template is second._template


def test_tools_and_calls_reach_the_template_as_transformers_passes_them() -> None:
    request = tokenizer_pb2.ApplyChatTemplateRequest(model="m", messages=[
        common_pb2.ChatMessage(role="assistant", tool_calls=[
            common_pb2.ToolCall(id="c1", name="f", arguments='{"x": 1}'),
            common_pb2.ToolCall(id="c2", name="f", arguments="not json")]),
        common_pb2.ChatMessage(role="tool", content="2", tool_call_id="c1")],
        tools=[common_pb2.Tool(name="f", description="F", parameters='{"type": "object"}'), common_pb2.Tool(name="g")])
    variables = convert.template_variables(request)
    assert variables == {"tools": [
        {"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}]}
    context = render_context(convert.chat_messages(request.messages), True, {}, variables)
    assert context["messages"] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
        {"role": "tool", "content": "2", "tool_call_id": "c1"}]
    request.template_variables.update({"tools": []})
    with pytest.raises(InvalidArgument) as caught:
        convert.template_variables(request)
    assert caught.value.violations[0].field == "template_variables.tools"
    bad = tokenizer_pb2.ApplyChatTemplateRequest(tools=[common_pb2.Tool(name="f", parameters="[")])
    with pytest.raises(InvalidArgument) as caught:
        convert.template_variables(bad)
    assert caught.value.violations[0].field == "tools[0].parameters"
