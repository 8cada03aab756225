"""LoadedTokenizer and TokenizerRegistry, with no gRPC.

Runs against our built byte-level BPE, a BERT-style WordPiece built here, and (when
present) the real Optimum exports with ids produced by transformers.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import threading
import time

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmsuite.builder import tokenizer as builder
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash
from llmsuite.tokenizer.chat_template import ChatMessage
from llmsuite.tokenizer.engine import LoadedTokenizer, TokenizerLimits, TokenizerRegistry
from llmsuite.tokenizer.files import content_hash
from llmsuite.tokenizer.reload_roots import ReloadRoots

EXPORTS = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "optimum-exports"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces\tand tabs\n\nand blank lines   ",
    "naïve café 東京 — déjà vu? Ünïcödé ✓ 😀 Привет, мир!",
    "e\u0301 n\u0303 a\u0308\u0304 combining marks",
    "👩\u200d💻 👨\u200d👩\u200d👧 🇯🇵 👍🏽 ❤️ emoji sequences",
    "def f(x):\n    return x + 1\n",
    "",
    "a",
]

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _export(name: str) -> pathlib.Path:
    directory = EXPORTS / name
    if not (directory / "tokenizer.json").is_file():
        pytest.skip(f"Optimum export {directory} not present (it lives in the shared folder beside the repo)")
    return directory


def build_wordpiece(out_dir: pathlib.Path) -> pathlib.Path:
    """A BERT-style tokenizer: lowercasing normalizer, WordPiece, [CLS] ... [SEP]."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=WORDPIECE_SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(builder.generate_corpus(3, 2000), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special_map = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map))
    # transformers' "no limit" sentinel, exactly as it writes it.
    config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": int(1e30)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("built")
    builder.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def built(built_dir: pathlib.Path) -> LoadedTokenizer:
    return LoadedTokenizer.load("default", built_dir)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory: pytest.TempPathFactory) -> LoadedTokenizer:
    return LoadedTokenizer.load("bert", build_wordpiece(tmp_path_factory.mktemp("wordpiece")))


@pytest.fixture(params=["built", "gpt2", "llama"])
def byte_level(request: pytest.FixtureRequest, built: LoadedTokenizer) -> LoadedTokenizer:
    if request.param == "built":
        return built
    return LoadedTokenizer.load(request.param, _export(request.param))


@pytest.fixture(params=["built", "gpt2", "llama", "wordpiece"])
def any_tokenizer(
    request: pytest.FixtureRequest, built: LoadedTokenizer, wordpiece: LoadedTokenizer
) -> LoadedTokenizer:
    if request.param == "built":
        return built
    if request.param == "wordpiece":
        return wordpiece
    return LoadedTokenizer.load(request.param, _export(request.param))


def _copy(directory: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    shutil.copytree(directory, destination)
    return destination


def _edit_config(directory: pathlib.Path, **changes: object) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# -- real exports --------------------------------------------------------------------


@pytest.mark.optimum
@pytest.mark.parametrize("export", ["gpt2", "llama"])
def test_exports_encode_exactly_like_transformers(export: str) -> None:
    directory = _export(export)
    loaded = LoadedTokenizer.load(export, directory)
    reference = json.loads((directory / "reference.json").read_text())
    checked = 0
    for case in reference["cases"]:
        if case["kind"] == "chat":
            messages = [ChatMessage(**message) for message in case["messages"]]
            rendered = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            assert rendered.text == case["prompt"], case["name"]
            assert rendered.ids == case["prompt_ids"], case["name"]
        else:
            encoded = loaded.encode([case["prompt"]], add_special_tokens=case["add_special_tokens"])[0]
            assert encoded.ids == case["prompt_ids"], case["name"]
        checked += 1
    assert checked == len(reference["cases"]) > 0


@pytest.mark.optimum
@pytest.mark.parametrize("export", ["gpt2", "llama"])
def test_exports_report_the_special_tokens_transformers_sees(export: str) -> None:
    directory = _export(export)
    loaded = LoadedTokenizer.load(export, directory)
    expected = json.loads((directory / "reference.json").read_text())["special_tokens"]
    special = loaded.special_tokens
    assert (special.bos, special.bos_id) == (expected["bos_token"], expected["bos_token_id"])
    assert (special.eos, special.eos_id) == (expected["eos_token"], expected["eos_token_id"])
    assert (special.pad, special.pad_id) == (expected["pad_token"], expected["pad_token_id"])
    assert (special.unk, special.unk_id) == (expected["unk_token"], expected["unk_token_id"])
    assert loaded.vocab_size == json.loads((directory / "config.json").read_text())["vocab_size"]


# -- loading -------------------------------------------------------------------------


def test_built_tokenizer_metadata(built: LoadedTokenizer, built_dir: pathlib.Path) -> None:
    assert built.vocab_size == 1024
    assert built.model_max_length == 512
    assert built.chat_template == builder.CHAT_TEMPLATE
    special = built.special_tokens
    assert (special.pad, special.bos, special.eos, special.unk) == ("<pad>", "<s>", "</s>", None)
    assert (special.pad_id, special.bos_id, special.eos_id, special.unk_id) == (
        builder.PAD_ID, builder.BOS_ID, builder.EOS_ID, None
    )
    assert special.additional == builder.SPECIAL_TOKENS[3:]
    assert special.additional_ids == (builder.SYSTEM_ID, builder.USER_ID, builder.ASSISTANT_ID,
                                      builder.END_OF_TURN_ID)
    assert built.directory == built_dir
    assert abs(time.time() - built.loaded_at) < 3600
    assert special.additional_with_ids() == tuple(zip(special.additional, special.additional_ids, strict=True))


def test_wordpiece_special_tokens_come_from_the_special_tokens_map(wordpiece: LoadedTokenizer) -> None:
    special = wordpiece.special_tokens
    assert special.unk == "[UNK]" and special.pad == "[PAD]"
    assert special.unk_id == WORDPIECE_SPECIALS.index("[UNK]")
    assert special.pad_id == WORDPIECE_SPECIALS.index("[PAD]")
    assert special.bos is None and special.bos_id is None
    assert set(special.additional) == {"[CLS]", "[SEP]", "[MASK]"}
    # 1e30 is transformers' "unlimited".
    assert wordpiece.model_max_length is None
    assert wordpiece.chat_template is None


def test_content_hash_is_stable_and_tracks_every_tokenizer_file(
    built_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    first = LoadedTokenizer.load("a", built_dir).content_hash
    assert first == LoadedTokenizer.load("b", built_dir).content_hash == content_hash(built_dir)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    seen = {first}
    copy = _copy(built_dir, tmp_path / "copy")
    assert content_hash(copy) == first
    for name in ("special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
        path = copy / name
        path.write_text(path.read_text() + " ")
        seen.add(LoadedTokenizer.load("c", copy).content_hash)
    # The chat template decides what the model sees, wherever it is kept.
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0].content }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    seen.add(LoadedTokenizer.load("c", copy).content_hash)
    (copy / "chat_template.jinja").write_text("{{ bos_token }}")
    seen.add(LoadedTokenizer.load("c", copy).content_hash)
    assert len(seen) == 6


def test_directories_without_chat_template_jinja_keep_their_published_hash(built_dir: pathlib.Path) -> None:
    # The definition before chat_template.jinja counted: hashes already published stay valid.
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        digest.update(name.encode() + b"\0" + (built_dir / name).read_bytes())
    assert LoadedTokenizer.load("a", built_dir).content_hash == f"sha256:{digest.hexdigest()}"


def test_loaded_hash_matches_the_inference_services_definition(
    built_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # The gateway compares our hash with the one the inference service publishes.
    copy = _copy(built_dir, tmp_path / "copy")
    (copy / "chat_template.jinja").write_text("{{ bos_token }}")
    directories = [built_dir, copy, build_wordpiece(tmp_path / "wp")]
    (directories[2] / "special_tokens_map.json").unlink()
    for directory in directories:
        assert LoadedTokenizer.load("x", directory).content_hash == tokenizer_content_hash(directory)
    assert len({tokenizer_content_hash(directory) for directory in directories}) == 3


def test_missing_directory_is_a_failed_precondition(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        LoadedTokenizer.load("x", tmp_path / "nowhere")
    assert caught.value.reason == "TOKENIZER_FILES_MISSING"
    assert "nowhere" in caught.value.message


def test_missing_tokenizer_json_names_the_file(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    copy = _copy(built_dir, tmp_path / "copy")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FailedPrecondition) as caught:
        LoadedTokenizer.load("x", copy)
    assert caught.value.reason == "TOKENIZER_FILES_MISSING"
    assert caught.value.metadata["file"] == "tokenizer.json"


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("tokenizer.json", "{not json"),
        ("tokenizer.json", '{"model": {"type": "Nonsense"}}'),
        ("tokenizer_config.json", "[1, 2"),
        ("tokenizer_config.json", "[1, 2]"),
        ("special_tokens_map.json", "\xff"),
    ],
)
def test_broken_files_are_reported_as_invalid(
    built_dir: pathlib.Path, tmp_path: pathlib.Path, file_name: str, content: str
) -> None:
    copy = _copy(built_dir, tmp_path / "copy")
    (copy / file_name).write_text(content, encoding="latin-1")
    with pytest.raises(FailedPrecondition) as caught:
        LoadedTokenizer.load("x", copy)
    assert caught.value.reason == "TOKENIZER_INVALID"
    assert file_name in caught.value.message


def test_config_quirks_dict_tokens_named_templates_and_no_limit(
    built_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    copy = _copy(built_dir, tmp_path / "copy")
    _edit_config(
        copy,
        bos_token={"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        eos_token={"__type": "AddedToken", "content": "<|end|>"},
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"},
        ],
        model_max_length=1000000000000000019884624838656,
    )
    loaded = LoadedTokenizer.load("x", copy)
    assert (loaded.special_tokens.bos, loaded.special_tokens.bos_id) == ("<s>", builder.BOS_ID)
    assert (loaded.special_tokens.eos, loaded.special_tokens.eos_id) == ("<|end|>", builder.END_OF_TURN_ID)
    assert loaded.model_max_length is None
    rendered = loaded.apply_chat_template([ChatMessage("user", "hi")], add_generation_prompt=False, tokenize=False)
    assert rendered.text == "DEFAULT hi"


def test_chat_template_file_takes_precedence_over_the_config(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    copy = _copy(built_dir, tmp_path / "copy")
    (copy / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    loaded = LoadedTokenizer.load("x", copy)
    rendered = loaded.apply_chat_template([ChatMessage("user", "hi")], add_generation_prompt=False, tokenize=False)
    assert rendered.text == "FILE 1"


def test_special_token_missing_from_vocabulary_is_treated_as_absent(
    built_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    copy = _copy(built_dir, tmp_path / "copy")
    _edit_config(copy, unk_token="<unk>")
    assert LoadedTokenizer.load("x", copy).special_tokens.unk is None


def test_truncation_and_padding_in_tokenizer_json_are_ignored(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    copy = _copy(built_dir, tmp_path / "copy")
    raw = Tokenizer.from_file(str(copy / "tokenizer.json"))
    raw.enable_truncation(4)
    raw.enable_padding(length=64, pad_id=builder.PAD_ID, pad_token=builder.PAD_TOKEN)
    raw.save(str(copy / "tokenizer.json"))
    loaded = LoadedTokenizer.load("x", copy)
    reference = LoadedTokenizer.load("y", built_dir)
    assert loaded.encode([TEXTS[0]]) == reference.encode([TEXTS[0]])
    assert loaded.count([TEXTS[0]])[0] > 4


# -- encode / decode -------------------------------------------------------------------


def test_byte_level_round_trip(byte_level: LoadedTokenizer) -> None:
    encoded = byte_level.encode(TEXTS, add_special_tokens=False)
    decoded = byte_level.decode([item.ids for item in encoded], skip_special_tokens=False)
    assert decoded == TEXTS


def test_wordpiece_round_trip_up_to_normalization(wordpiece: LoadedTokenizer) -> None:
    text = "The old fisherman remembers the blue door, quite slowly."
    encoded = wordpiece.encode([text])[0]
    cls_id, sep_id = WORDPIECE_SPECIALS.index("[CLS]"), WORDPIECE_SPECIALS.index("[SEP]")
    assert encoded.ids[0] == cls_id and encoded.ids[-1] == sep_id
    assert wordpiece.decode([encoded.ids], skip_special_tokens=True) == [text.lower()]
    assert wordpiece.decode([encoded.ids])[0].startswith("[CLS]")


def test_batch_results_equal_single_results(any_tokenizer: LoadedTokenizer) -> None:
    batch = any_tokenizer.encode(TEXTS, return_offsets=True)
    singles = [any_tokenizer.encode([text], return_offsets=True)[0] for text in TEXTS]
    assert batch == singles
    assert any_tokenizer.count(TEXTS) == [len(item.ids) for item in batch]
    ids = [item.ids for item in batch]
    assert any_tokenizer.decode(ids) == [any_tokenizer.decode([one])[0] for one in ids]


def test_offsets_are_only_returned_on_request(built: LoadedTokenizer) -> None:
    without = built.encode([TEXTS[0]])[0]
    with_offsets = built.encode([TEXTS[0]], return_offsets=True)[0]
    assert without.offsets is None
    assert with_offsets.ids == without.ids
    assert with_offsets.offsets is not None and len(with_offsets.offsets) == len(with_offsets.ids)


def test_offsets_point_at_the_text_each_token_came_from(byte_level: LoadedTokenizer) -> None:
    special_ids = set(byte_level.special_tokens.additional_ids) | {
        token_id for token_id in (byte_level.special_tokens.bos_id, byte_level.special_tokens.eos_id) if token_id
    }
    for text in TEXTS:
        encoded = byte_level.encode([text], return_offsets=True)[0]
        assert encoded.offsets is not None
        previous_start = 0
        for token_id, (start, end) in zip(encoded.ids, encoded.offsets, strict=True):
            assert 0 <= start <= end <= len(text)
            if token_id in special_ids:
                assert (start, end) == (0, 0)
                continue
            assert start >= previous_start
            previous_start = start
            piece = byte_level.decode([[token_id]])[0]
            if "\ufffd" not in piece:
                # A whole-character token: its span is exactly its text.
                assert text[start:end] == piece
            else:
                # Bytes of a character split across tokens: the span covers that character.
                assert end > start


def test_wordpiece_offsets_map_to_the_original_casing(wordpiece: LoadedTokenizer) -> None:
    text = "Quiet Students FIND Maps"
    encoded = wordpiece.encode([text], add_special_tokens=False, return_offsets=True)[0]
    assert encoded.offsets is not None
    for token_id, (start, end) in zip(encoded.ids, encoded.offsets, strict=True):
        token = wordpiece.decode([[token_id]])[0].removeprefix("##")
        assert text[start:end].lower() == token


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_special_tokens_and_the_requested_side(any_tokenizer: LoadedTokenizer, side: str) -> None:
    text = TEXTS[0] + " " + TEXTS[2]
    full = any_tokenizer.encode([text], return_offsets=True)[0]
    plain = any_tokenizer.encode([text], add_special_tokens=False)[0].ids
    specials = len(full.ids) - len(plain)
    max_length = specials + 5
    cut = any_tokenizer.encode([text], max_length=max_length, truncation_side=side, return_offsets=True)[0]
    assert cut.truncated
    assert len(cut.ids) == max_length
    kept = plain[:5] if side == "right" else plain[-5:]
    # The content kept sits where the untruncated encoding had it, specials around it.
    start = full.ids.index(plain[0]) if specials else 0
    assert cut.ids[start : start + 5] == kept
    assert cut.ids[:start] == full.ids[:start]
    assert cut.offsets is not None and full.offsets is not None
    offset_index = start if side == "right" else start + len(plain) - 5
    assert cut.offsets[start : start + 5] == full.offsets[offset_index : offset_index + 5]


def test_truncation_without_special_tokens(built: LoadedTokenizer) -> None:
    plain = built.encode([TEXTS[0]], add_special_tokens=False)[0].ids
    cut = built.encode([TEXTS[0]], add_special_tokens=False, max_length=3, truncation_side="left")[0]
    assert cut.ids == plain[-3:] and cut.truncated


def test_long_enough_max_length_changes_nothing(any_tokenizer: LoadedTokenizer) -> None:
    for add_special_tokens in (True, False):
        untruncated = any_tokenizer.encode(TEXTS, add_special_tokens=add_special_tokens, return_offsets=True)
        longest = max(len(item.ids) for item in untruncated)
        bounded = any_tokenizer.encode(
            TEXTS, add_special_tokens=add_special_tokens, return_offsets=True, max_length=longest
        )
        assert bounded == untruncated
        assert not any(item.truncated for item in bounded)


@pytest.mark.parametrize("max_length", [0, -3, True])
def test_invalid_max_length(built: LoadedTokenizer, max_length: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        built.encode(["x"], max_length=max_length)
    assert caught.value.violations[0].field == "truncation.max_length"


def test_max_length_must_hold_the_special_tokens(wordpiece: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        wordpiece.encode(["x"], max_length=1)
    assert caught.value.violations[0].field == "truncation.max_length"
    assert "2 special tokens" in caught.value.message
    assert wordpiece.encode(["x"], max_length=1, add_special_tokens=False)[0].ids


def test_invalid_truncation_side(built: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        built.encode(["x"], max_length=4, truncation_side="middle")  # type: ignore[arg-type]
    assert caught.value.violations[0].field == "truncation.side"


def test_skip_special_tokens_on_decode(built: LoadedTokenizer) -> None:
    ids = built.encode(["<|user|>hello<|end|>"])[0].ids
    assert ids[0] == builder.BOS_ID
    assert built.decode([ids], skip_special_tokens=True) == ["hello"]
    assert built.decode([ids], skip_special_tokens=False) == ["<s><|user|>hello<|end|>"]


# -- limits and field paths ------------------------------------------------------------


def test_empty_batches_are_rejected(built: LoadedTokenizer) -> None:
    for call, field in ((lambda: built.encode([]), "texts"), (lambda: built.count([]), "texts"),
                        (lambda: built.decode([]), "sequences")):
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.reason == "EMPTY_BATCH"
        assert caught.value.violations[0].field == field


def test_batch_over_the_limit(built_dir: pathlib.Path) -> None:
    loaded = LoadedTokenizer.load("x", built_dir, TokenizerLimits(max_batch_size=3))
    assert len(loaded.encode(["a"] * 3)) == 3
    with pytest.raises(InvalidArgument) as caught:
        loaded.encode(["a"] * 4)
    error = caught.value
    assert (error.reason, error.violations[0].field, error.metadata["limit"]) == ("BATCH_TOO_LARGE", "texts", "3")
    assert "exceeds limit 3" in error.message
    with pytest.raises(InvalidArgument) as caught:
        loaded.decode([[1]] * 4)
    assert caught.value.violations[0].field == "sequences"


def test_text_over_the_limit_names_its_index(built_dir: pathlib.Path) -> None:
    loaded = LoadedTokenizer.load("x", built_dir, TokenizerLimits(max_input_chars=10))
    assert loaded.count(["0123456789"]) == loaded.count(["0123456789"])
    with pytest.raises(InvalidArgument) as caught:
        loaded.count(["ok", "01234567890"])
    error = caught.value
    assert (error.reason, error.violations[0].field, error.metadata["limit"]) == ("INPUT_TOO_LONG", "texts[1]", "10")


def test_sequence_over_the_token_limit(built_dir: pathlib.Path) -> None:
    loaded = LoadedTokenizer.load("x", built_dir, TokenizerLimits(max_tokens_per_sequence=4))
    loaded.decode([[10] * 4])
    with pytest.raises(InvalidArgument) as caught:
        loaded.decode([[10], [10] * 5])
    assert caught.value.reason == "INPUT_TOO_LONG"
    assert caught.value.violations[0].field == "sequences[1].token_ids"


def test_requests_are_bounded_as_a_whole(built_dir: pathlib.Path) -> None:
    # Every text and every sequence within its own limit; the request as a whole is not.
    loaded = LoadedTokenizer.load("x", built_dir, TokenizerLimits(
        max_input_chars=100, max_request_chars=250, max_request_tokens=100, max_response_bytes=600))
    text = "the cat sat on a mat " * 4  # 84 characters
    assert len(loaded.encode([text] * 2)) == 2
    cases = [
        (lambda: loaded.count([text] * 3), "REQUEST_TOO_LARGE", "texts", "250"),
        (lambda: loaded.encode(["東京" * 50, "🙂" * 50]), "TOO_MANY_TOKENS", "texts", "100"),
        (lambda: loaded.encode([text, "abc"], return_offsets=True), "RESPONSE_TOO_LARGE", "return_offsets", "600"),
        (lambda: loaded.decode([[10] * 60, [10] * 60]), "TOO_MANY_TOKENS", "sequences", "100"),
    ]
    for call, reason, field, limit in cases:
        with pytest.raises(InvalidArgument) as caught:
            call()
        error = caught.value
        assert (error.reason, error.violations[0].field, error.metadata["limit"]) == (reason, field, limit)
        assert limit in error.message


def test_decoded_text_is_kept_under_the_response_limit(built: LoadedTokenizer, built_dir: pathlib.Path) -> None:
    ids = built.encode(["東京タワー"], add_special_tokens=False)[0].ids
    small = LoadedTokenizer.load("x", built_dir, TokenizerLimits(max_response_bytes=20))
    assert small.decode([ids]) == ["東京タワー"]  # 15 bytes
    with pytest.raises(InvalidArgument) as caught:
        small.decode([ids, ids])
    assert caught.value.reason == "RESPONSE_TOO_LARGE"


@pytest.mark.parametrize("bad_id", [1024, 99999, -1])
def test_out_of_range_ids_name_sequence_and_position(built: LoadedTokenizer, bad_id: int) -> None:
    assert built.decode([[1023, 0]])  # the edges of the vocabulary are fine
    with pytest.raises(InvalidArgument) as caught:
        built.decode([[5, 6], [7, 8, bad_id, 9]])
    error = caught.value
    assert error.reason == "TOKEN_ID_OUT_OF_RANGE"
    assert error.violations[0].field == "sequences[1].token_ids[2]"
    assert "[0, 1024)" in error.message and str(bad_id) in error.message


def test_non_string_text_is_rejected(built: LoadedTokenizer) -> None:
    with pytest.raises(InvalidArgument) as caught:
        built.encode(["ok", b"bytes"])  # type: ignore[list-item]
    assert caught.value.violations[0].field == "texts[1]"


# -- registry --------------------------------------------------------------------------


def test_registry_load_get_and_list(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    registry = TokenizerRegistry(TokenizerLimits(max_batch_size=2))
    first = registry.load("b-model", built_dir)
    second = registry.load("a-model", build_wordpiece(tmp_path / "wp"))
    assert registry.get("b-model") is first and registry.get("a-model") is second
    assert registry.names() == ["a-model", "b-model"]
    assert registry.all() == [second, first]
    assert first.limits.max_batch_size == 2


def test_registry_unknown_name_lists_known_models(built_dir: pathlib.Path) -> None:
    registry = TokenizerRegistry()
    registry.load("alpha", built_dir)
    registry.load("beta", built_dir)
    with pytest.raises(NotFound) as caught:
        registry.get("gamma")
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert "alpha" in caught.value.message and "beta" in caught.value.message


def test_registry_refuses_to_load_a_name_twice(built_dir: pathlib.Path) -> None:
    registry = TokenizerRegistry()
    original = registry.load("m", built_dir)
    with pytest.raises(FailedPrecondition):
        registry.load("m", built_dir)
    assert registry.get("m") is original


def test_reload_swaps_in_the_new_files_and_old_references_keep_working(
    built_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    directory = _copy(built_dir, tmp_path / "model")
    registry = TokenizerRegistry()
    old = registry.load("m", directory)
    _edit_config(directory, model_max_length=64)
    new = registry.reload("m")
    assert registry.get("m") is new is not old
    assert (old.model_max_length, new.model_max_length) == (512, 64)
    assert old.content_hash != new.content_hash
    assert old.encode([TEXTS[0]]) == new.encode([TEXTS[0]])


def test_reload_from_another_directory(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    registry = TokenizerRegistry(reload_roots=ReloadRoots([tmp_path]))
    registry.load("m", built_dir)
    other = build_wordpiece(tmp_path / "wp")
    assert registry.reload("m", other).directory == other.resolve()
    assert registry.get("m").special_tokens.unk == "[UNK]"


def test_reload_reads_only_inside_the_roots_and_never_says_what_exists_outside(
    built_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    model = _copy(built_dir, tmp_path / "models" / "m")
    registry = TokenizerRegistry()  # roots default to the loaded directories
    registry.load("m", model)
    (model / "v2").mkdir()
    _copy(built_dir, model / "v2" / "tok")
    assert registry.reload("m", model / "v2" / "tok").directory == (model / "v2" / "tok").resolve()
    elsewhere = _copy(built_dir, tmp_path / "elsewhere")
    (model / "escape").symlink_to(elsewhere)
    outside = [elsewhere, tmp_path / "missing", model / ".." / "..", model / "escape", "/proc/1/root",
               "/" + "x" * 300, "relative/path", tmp_path / ("y" * 300)]
    answers = set()
    for directory in outside:
        with pytest.raises(PermissionDenied) as caught:
            registry.reload("m", directory)
        answers.add((caught.value.message, caught.value.reason, tuple(caught.value.metadata.items())))
    assert len(answers) == 1 and next(iter(answers))[1] == "DIRECTORY_NOT_ALLOWED"
    with pytest.raises(InvalidArgument):
        registry.reload("m", "/" + "z" * 5000)
    assert registry.get("m").directory == (model / "v2" / "tok").resolve()


def test_reload_inside_a_root_reports_unreadable_paths_as_failed_precondition(tmp_path: pathlib.Path,
                                                                               built_dir: pathlib.Path) -> None:
    registry = TokenizerRegistry(reload_roots=ReloadRoots([tmp_path]))
    registry.load("m", built_dir)
    for directory in (tmp_path / ("n" * 300), tmp_path / "absent"):
        with pytest.raises(FailedPrecondition) as caught:
            registry.reload("m", directory)
        assert caught.value.reason == "RELOAD_FAILED"


def test_failed_reload_keeps_the_old_tokenizer(built_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    directory = _copy(built_dir, tmp_path / "model")
    registry = TokenizerRegistry()
    old = registry.load("m", directory)
    (directory / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(FailedPrecondition) as caught:
        registry.reload("m")
    error = caught.value
    assert error.reason == "RELOAD_FAILED"
    assert "tokenizer.json" in error.message and error.metadata["cause_reason"] == "TOKENIZER_INVALID"
    assert registry.get("m") is old
    encoded = old.encode([TEXTS[2]], add_special_tokens=False)[0]
    assert old.decode([encoded.ids]) == [TEXTS[2]]


def test_reload_of_an_unknown_name_is_not_found(built_dir: pathlib.Path) -> None:
    with pytest.raises(NotFound):
        TokenizerRegistry().reload("nope", built_dir)


def test_concurrent_use_during_reloads(built_dir: pathlib.Path) -> None:
    registry = TokenizerRegistry()
    registry.load("m", built_dir)
    expected = registry.get("m").encode(TEXTS)
    failures: list[BaseException] = []
    stop = threading.Event()

    def use() -> None:
        try:
            while not stop.is_set():
                loaded = registry.get("m")
                assert loaded.encode(TEXTS) == expected
                assert loaded.decode([item.ids for item in expected], skip_special_tokens=True)[0] == TEXTS[0]
        except BaseException as exc:  # reported to the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(5):
            registry.reload("m")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures
