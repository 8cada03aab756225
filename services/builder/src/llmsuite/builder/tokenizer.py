"""Builds the project's default tokenizer: a small byte-level BPE trained on generated text.

The tokenizer is written as a Hugging Face tokenizer directory (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), so it loads exactly like an
exported model's tokenizer and every service treats it as just another model.
Nothing is downloaded: the training text comes from a seeded grammar below.
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_OF_TURN_TOKEN = "<|end|>"

# Order fixes the ids: the trainer places special tokens first, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_OF_TURN_TOKEN,
)
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SYSTEM_ID = 3
USER_ID = 4
ASSISTANT_ID = 5
END_OF_TURN_ID = 6

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# Every byte needs a token before any merge can be learned.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())

# Role headers sit directly against the content, with no newline after them: added
# tokens are hard segment boundaries for the BPE, so rendering messages[:k] with the
# generation prompt tokenizes to an exact id prefix of the full conversation. A
# newline there would merge with leading whitespace of the content and break that
# prefix, which the gateway relies on to reuse the KV cache across turns.
# Tools follow the Hermes / Qwen convention (a system message listing the functions as
# JSON inside <tools>, calls written as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
# results as a user turn inside <tool_response>), so the gateway recognises the format
# from these markers as it does for real models' templates, and a forced call is
# written exactly as the template writes it back into the conversation.
CHAT_TEMPLATE = "".join(
    [
        "{{ bos_token }}",
        "{% if tools %}",
        "{{ '<|system|>You may call functions. To call one, reply with <tool_call>\\n"
        "{\"name\": <function name>, \"arguments\": <arguments object>}\\n</tool_call>. "
        "The functions:\\n<tools>\\n' }}",
        "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}",
        "{{ '</tools><|end|>\\n' }}",
        "{% endif %}",
        "{% for message in messages %}",
        "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}",
        "{{ raise_exception('Unsupported chat role ' ~ message['role'] ~ "
        "'; expected system, user, assistant or tool') }}",
        "{% endif %}",
        "{% if message['role'] == 'tool' %}",
        "{{ '<|user|><tool_response>\\n' ~ (message['content'] or '') ~ '\\n</tool_response><|end|>\\n' }}",
        "{% else %}",
        "{{ '<|' ~ message['role'] ~ '|>' ~ (message['content'] or '') }}",
        "{% for call in message['tool_calls'] or [] %}",
        "{{ '<tool_call>\\n' ~ ({'name': call['function']['name'], "
        "'arguments': call['function']['arguments']} | tojson) ~ '\\n</tool_call>' }}",
        "{% endfor %}",
        "{{ '<|end|>\\n' }}",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
    ]
)

_SUBJECTS = (
    "the cat", "a small dog", "my friend", "the old fisherman", "our teacher", "the river",
    "a bright star", "the machine", "every child", "the city", "her brother", "the garden",
    "a quiet student", "the market", "this model", "the tokenizer", "the server", "a red bird",
)
_VERBS = (
    "sees", "likes", "builds", "finds", "remembers", "carries", "writes", "opens", "follows",
    "answers", "counts", "paints", "watches", "repairs", "sends", "reads", "moves", "explains",
)
_OBJECTS = (
    "a long letter", "the blue door", "three apples", "the morning train", "an old map",
    "the last question", "a warm coat", "the winter sea", "some bread", "the small window",
    "forty numbers", "the green hill", "a new request", "the hidden key", "every word",
)
_ADVERBIALS = (
    "today", "in the evening", "before dinner", "quite slowly", "with great care", "again",
    "near the station", "after the rain", "without a sound", "every Sunday", "at noon",
)
_QUESTIONS = ("Why", "How", "When", "Where")
# Multi-byte text: CJK (3 bytes), accented Latin, combining marks, emoji (4 bytes),
# including ZWJ and skin-tone sequences, so merges learn byte runs inside characters.
_MULTIBYTE_PHRASES = (
    "東京は雨です", "你好世界", "中文字符", "서울의 밤", "こんにちは", "ありがとう",
    "café crème", "naïve façade", "Málaga", "München", "Ærøskøbing", "déjà vu",
    "e\u0301te\u0301", "n\u0303o", "a\u0308\u0304", "Привет, мир", "Καλημέρα", "العربية",
    "😀", "👍🏽", "👩\u200d💻", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "✓", "—", "…", "€42",
)
_SYLLABLES = (
    "ka", "lo", "mi", "ren", "tor", "va", "shi", "el", "an", "dor", "qu", "is", "pen", "zu",
    "bri", "gal", "ost", "ne", "ry", "cha",
)


def _invented_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(_ADVERBIALS))
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice(".!")
    if kind < 0.6:
        return f"{rng.choice(_QUESTIONS)} does {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)[:-1]}?"
    if kind < 0.75:
        return f"In {rng.randint(1800, 2099)}, {rng.randint(0, 999)}.{rng.randint(0, 99)}% of {_invented_word(rng)}."
    if kind < 0.9:
        return " ".join(rng.choice(_MULTIBYTE_PHRASES) for _ in range(rng.randint(1, 3)))
    name = _invented_word(rng).capitalize()
    return f"{name} said: 'def {_invented_word(rng)}(x):\n    return x + {rng.randint(0, 9)}'"


def generate_corpus(seed: int, n_lines: int) -> Iterator[str]:
    """Yields `n_lines` English-like lines with some multi-byte text, fixed by `seed`."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        yield " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))


def _train(vocab_size: int, seed: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Invented words keep supplying new pairs, so larger vocabularies can still be filled.
    n_lines = max(4000, vocab_size * 4)
    tokenizer.train_from_iterator(generate_corpus(seed, n_lines), trainer=trainer, length=n_lines)
    # Same shape as Llama 3: byte-level offsets untouched, then bos prepended.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, BOS_ID)],
            ),
        ]
    )
    return tokenizer


def _check_layout(tokenizer: Tokenizer, vocab_size: int) -> None:
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = tokenizer.token_to_id(token)
        if actual_id != expected_id:
            raise RuntimeError(f"special token {token!r} got id {actual_id}, expected {expected_id}")
    actual_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual_size != vocab_size:
        raise ValueError(
            f"the generated corpus only supports a vocabulary of {actual_size} tokens, "
            f"{vocab_size} were requested"
        )


def _tokenizer_config(model_max_length: int) -> dict[str, object]:
    return {
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token_id, token in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
    }


def _write_json(path: pathlib.Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def build_tokenizer(
    out_dir: pathlib.Path, *, vocab_size: int = 1024, seed: int = 0, model_max_length: int = 512
) -> None:
    """Writes the default tokenizer into `out_dir`; the same arguments give byte-identical files.

    Ids 0-6 are always `SPECIAL_TOKENS`; the vocabulary has exactly `vocab_size` entries.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (special tokens + 256 bytes)")
    if model_max_length < 1:
        raise ValueError("model_max_length must be positive")
    tokenizer = _train(vocab_size, seed)
    _check_layout(tokenizer, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(model_max_length))
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
