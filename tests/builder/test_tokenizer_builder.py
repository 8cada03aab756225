"""The default tokenizer builder: determinism, layout, and the chat template contract."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from tokenizers import Tokenizer

from llmsuite.builder import tokenizer as builder
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.tokenizer.chat_template import ChatMessage, ToolCall, tool_definitions
from llmsuite.tokenizer.engine import LoadedTokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

CONVERSATION = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Hi there"),
    ChatMessage("assistant", "Hello! How can I help?"),
    ChatMessage("user", "  leading spaces and\nnewlines"),
    # Leading whitespace and newlines would merge with a header newline if there were one.
    ChatMessage("assistant", "\n\n  東京 👩\u200d💻 café"),
    ChatMessage("user", "Thanks <|end|> oops"),
    ChatMessage("assistant", " ok"),
    ChatMessage("user", "code?"),
    ChatMessage("assistant", "    return x + 1"),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("built")
    builder.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def loaded(built: pathlib.Path) -> LoadedTokenizer:
    return LoadedTokenizer.load("default", built)


def _contents(directory: pathlib.Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


def test_same_arguments_give_byte_identical_files(built: pathlib.Path, tmp_path: pathlib.Path) -> None:
    builder.build_tokenizer(tmp_path)
    assert _contents(tmp_path) == _contents(built)


def test_build_is_identical_in_another_process_with_another_hash_seed(
    built: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # Python's string hashing is randomized per process; a dict/set ordering leak
    # into the corpus or the files would show up here.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    script = "import pathlib, sys; from llmsuite.builder.tokenizer import build_tokenizer; " \
             "build_tokenizer(pathlib.Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=60)
    assert _contents(tmp_path) == _contents(built)


def test_seed_changes_the_trained_vocabulary(built: pathlib.Path, tmp_path: pathlib.Path) -> None:
    builder.build_tokenizer(tmp_path, seed=1)
    assert (tmp_path / "tokenizer.json").read_bytes() != (built / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("vocab_size", [builder.MIN_VOCAB_SIZE, 300, 1024, 2048])
def test_vocabulary_has_exactly_the_requested_size(tmp_path: pathlib.Path, vocab_size: int) -> None:
    builder.build_tokenizer(tmp_path, vocab_size=vocab_size)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    assert sorted(tokenizer.get_vocab(with_added_tokens=True).values()) == list(range(vocab_size))


def test_too_small_vocabulary_is_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        builder.build_tokenizer(tmp_path, vocab_size=builder.MIN_VOCAB_SIZE - 1)


def test_special_tokens_have_fixed_ids(built: pathlib.Path) -> None:
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    assert [tokenizer.token_to_id(token) for token in builder.SPECIAL_TOKENS] == list(range(7))
    constants = [builder.PAD_ID, builder.BOS_ID, builder.EOS_ID, builder.SYSTEM_ID, builder.USER_ID,
                 builder.ASSISTANT_ID, builder.END_OF_TURN_ID]
    names = [builder.PAD_TOKEN, builder.BOS_TOKEN, builder.EOS_TOKEN, builder.SYSTEM_TOKEN, builder.USER_TOKEN,
             builder.ASSISTANT_TOKEN, builder.END_OF_TURN_TOKEN]
    assert [tokenizer.token_to_id(name) for name in names] == constants
    added = tokenizer.get_added_tokens_decoder()
    assert all(added[token_id].special for token_id in constants)


def test_special_tokens_in_text_become_single_ids(built: pathlib.Path) -> None:
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    ids = tokenizer.encode("hi<|user|>there<|end|>", add_special_tokens=False).ids
    assert builder.USER_ID in ids and builder.END_OF_TURN_ID in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hithere"


def test_bos_is_prepended_only_with_special_tokens(built: pathlib.Path) -> None:
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    plain = tokenizer.encode("The cat sees a map.", add_special_tokens=False).ids
    assert tokenizer.encode("The cat sees a map.").ids == [builder.BOS_ID, *plain]
    assert builder.BOS_ID not in plain


def test_every_byte_is_representable(built: pathlib.Path) -> None:
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    text = "".join(chr(code) for code in range(1, 0x250)) + "\U0001f600\U0001fae0\U00010348 \x00"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_training_learned_merges_inside_multibyte_characters(built: pathlib.Path) -> None:
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    # Without merges a 3-byte CJK character is 3 tokens and a 4-byte emoji 4.
    assert len(tokenizer.encode("東京", add_special_tokens=False).ids) < 6
    assert len(tokenizer.encode("😀", add_special_tokens=False).ids) < 4


def test_config_files_describe_the_tokenizer(built: pathlib.Path) -> None:
    config = json.loads((built / "tokenizer_config.json").read_text())
    assert config["bos_token"] == builder.BOS_TOKEN
    assert config["eos_token"] == builder.EOS_TOKEN
    assert config["pad_token"] == builder.PAD_TOKEN
    assert config["model_max_length"] == 512
    assert config["add_bos_token"] is True
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == builder.CHAT_TEMPLATE
    assert {int(key): value["content"] for key, value in config["added_tokens_decoder"].items()} == dict(
        enumerate(builder.SPECIAL_TOKENS)
    )
    special_map = json.loads((built / "special_tokens_map.json").read_text())
    assert special_map["bos_token"] == builder.BOS_TOKEN
    assert special_map["additional_special_tokens"] == list(builder.SPECIAL_TOKENS[3:])


def test_model_max_length_is_written(tmp_path: pathlib.Path) -> None:
    builder.build_tokenizer(tmp_path, model_max_length=77)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_chat_template_renders_headers_content_and_end_markers(loaded: LoadedTokenizer) -> None:
    messages = [ChatMessage("system", "S"), ChatMessage("user", "U")]
    closed = loaded.apply_chat_template(messages, add_generation_prompt=False, tokenize=False).text
    assert closed == "<s><|system|>S<|end|>\n<|user|>U<|end|>\n"
    opened = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).text
    assert opened == closed + "<|assistant|>"


def test_chat_template_rejects_unknown_roles(loaded: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        loaded.apply_chat_template([ChatMessage("ipython", "x")], add_generation_prompt=True, tokenize=False)
    assert caught.value.reason == "CHAT_TEMPLATE_ERROR"
    assert "ipython" in caught.value.message


def test_prompt_for_each_assistant_turn_is_a_prefix_of_the_whole_conversation(loaded: LoadedTokenizer) -> None:
    full = loaded.apply_chat_template(CONVERSATION, add_generation_prompt=False, tokenize=True)
    assert full.ids is not None
    assistant_turns = [k for k, message in enumerate(CONVERSATION) if message.role == "assistant"]
    assert len(assistant_turns) == 4
    for k in assistant_turns:
        prompt = loaded.apply_chat_template(CONVERSATION[:k], add_generation_prompt=True, tokenize=True)
        assert full.text.startswith(prompt.text)
        # Token-level prefix is what lets the gateway reuse the KV cache.
        assert prompt.ids is not None
        assert full.ids[: len(prompt.ids)] == prompt.ids


TOOLS = tool_definitions([("get_weather", "The weather in a city",
                           '{"type": "object", "properties": {"city": {"type": "string"}}}')])
TOOL_CONVERSATION = (
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ChatMessage("assistant", "It is sunny."),
)


def test_chat_template_renders_tools_calls_and_results_in_the_hermes_format(loaded: LoadedTokenizer) -> None:
    full = loaded.apply_chat_template(TOOL_CONVERSATION, add_generation_prompt=False, tokenize=True,
                                      extra_context={"tools": TOOLS})
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in full.text
    assert ('<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|end|>'
            in full.text)
    assert "<|user|><tool_response>\nsunny\n</tool_response><|end|>" in full.text
    without_tools = loaded.apply_chat_template(TOOL_CONVERSATION[:1], add_generation_prompt=True, tokenize=False)
    assert "<tools>" not in without_tools.text
    # The prefix property holds with tools too: every reply's prompt is an id prefix of the whole.
    assert full.ids is not None
    for k in (1, 3):
        prompt = loaded.apply_chat_template(TOOL_CONVERSATION[:k], add_generation_prompt=True, tokenize=True,
                                            extra_context={"tools": TOOLS})
        assert prompt.ids is not None and full.ids[: len(prompt.ids)] == prompt.ids


def test_chat_ids_start_with_a_single_bos(loaded: LoadedTokenizer) -> None:
    rendered = loaded.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    assert rendered.ids is not None
    assert rendered.ids[0] == builder.BOS_ID
    assert rendered.ids.count(builder.BOS_ID) == 1
    assert rendered.ids[-1] == builder.ASSISTANT_ID
