"""Incremental detokenization: deltas never split a character and add up to a one-shot decode."""

from __future__ import annotations

import pathlib
import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmsuite.builder import tokenizer as builder
from llmsuite.runtime.detokenizer import CONTEXT_IDS, MAX_PENDING_IDS, IncrementalDetokenizer
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.tokenizer.engine import LoadedTokenizer

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # the seeded fuzz tests below still run
    hypothesis = None

EXPORTS = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "optimum-exports"
FFFD = "\ufffd"

SAMPLES = [
    "Plain English, with punctuation!",
    "東京は雨です。你好世界 서울의 밤",
    "👩\u200d💻 👨\u200d👩\u200d👧 🇯🇵 👍🏽 ❤️ 😀😀😀",
    "e\u0301te\u0301 n\u0303o a\u0308\u0304 — déjà vu, Ærøskøbing",
    "mixed: café 東 😀 x\u200dy  \n\t end",
]


def _gpt2_byte_chars() -> dict[int, str]:
    """The byte -> character table of byte-level BPE: printable Latin-1 bytes stand for
    themselves, the rest are moved past U+0100 in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


BYTE_CHARS = _gpt2_byte_chars()


def byte_ids(loaded: LoadedTokenizer, data: bytes) -> list[int]:
    """One token per byte: lets tests cut characters at any byte."""
    vocab = loaded._tokenizer.get_vocab()
    return [vocab[BYTE_CHARS[byte]] for byte in data]


def build_metaspace(out_dir: pathlib.Path) -> pathlib.Path:
    """A SentencePiece-style BPE: words carry a leading '▁' that decodes to a space,
    except at the very start of a decode, so streamed deltas need context."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(builder.generate_corpus(5, 2000), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> LoadedTokenizer:
    out = tmp_path_factory.mktemp("built")
    builder.build_tokenizer(out)
    return LoadedTokenizer.load("default", out)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory: pytest.TempPathFactory) -> LoadedTokenizer:
    return LoadedTokenizer.load("metaspace", build_metaspace(tmp_path_factory.mktemp("metaspace")))


def _export(name: str) -> LoadedTokenizer:
    directory = EXPORTS / name
    if not (directory / "tokenizer.json").is_file():
        pytest.skip(f"Optimum export {directory} not present (it lives in the shared folder beside the repo)")
    return LoadedTokenizer.load(name, directory)


@pytest.fixture(params=["built", "gpt2", "llama"])
def byte_level(request: pytest.FixtureRequest, built: LoadedTokenizer) -> LoadedTokenizer:
    return built if request.param == "built" else _export(request.param)


def stream(
    loaded: LoadedTokenizer,
    chunks: Sequence[Sequence[int]],
    *,
    skip_special_tokens: bool = False,
    prefix_ids: Sequence[int] = (),
) -> tuple[list[str], str]:
    detokenizer = loaded.new_decode_stream(skip_special_tokens=skip_special_tokens, prefix_ids=prefix_ids)
    return [detokenizer.push(chunk) for chunk in chunks], detokenizer.finish()


def check_stream_invariants(
    loaded: LoadedTokenizer, chunks: Sequence[Sequence[int]], *, skip_special_tokens: bool = False
) -> None:
    """The contract, checked after every push against one-shot decodes."""
    detokenizer = loaded.new_decode_stream(skip_special_tokens=skip_special_tokens)
    emitted = ""
    pushed: list[int] = []
    for chunk in chunks:
        pushed.extend(chunk)
        delta = detokenizer.push(chunk)
        so_far = loaded.decode([pushed], skip_special_tokens=skip_special_tokens)[0]
        # Never a replacement character that the decode of everything so far lacks there.
        for position, char in enumerate(delta, start=len(emitted)):
            if char == FFFD:
                assert so_far[position] == FFFD
        emitted += delta
        # Holds back only a trailing run of U+FFFD that later ids might still complete.
        assert emitted == so_far.rstrip(FFFD), (chunks, emitted, so_far)
    emitted += detokenizer.finish()
    assert emitted == loaded.decode([pushed], skip_special_tokens=skip_special_tokens)[0]


def test_valid_text_streams_without_replacement_characters(byte_level: LoadedTokenizer) -> None:
    for text in SAMPLES:
        ids = byte_level.encode([text], add_special_tokens=False)[0].ids
        deltas, tail = stream(byte_level, [[token_id] for token_id in ids])
        assert all(FFFD not in delta for delta in deltas)
        assert tail == ""
        assert "".join(deltas) == text


def test_every_byte_split_of_emoji_cjk_and_combining_text(built: LoadedTokenizer) -> None:
    for text in SAMPLES:
        ids = byte_ids(built, text.encode())
        deltas, tail = stream(built, [[token_id] for token_id in ids])
        assert "".join(deltas) == text and tail == ""
        # Each character comes out exactly when its last byte arrives, not later.
        expected = []
        for char in text:
            expected.extend([""] * (len(char.encode()) - 1) + [char])
        assert deltas == expected
        check_stream_invariants(built, [[token_id] for token_id in ids])


def test_zwj_sequence_fed_in_uneven_chunks(built: LoadedTokenizer) -> None:
    text = "👨\u200d👩\u200d👧 family"
    ids = byte_ids(built, text.encode())
    chunks = [ids[:3], ids[3:5], ids[5:12], ids[12:13], ids[13:]]
    check_stream_invariants(built, chunks)
    deltas, _ = stream(built, chunks)
    assert deltas[0] == "" and deltas[1] == "👨"


def test_skip_special_tokens(built: LoadedTokenizer) -> None:
    ids = built.encode(["<|user|>東京 hi<|end|><|assistant|>😀"])[0].ids
    chunks = [[token_id] for token_id in ids]
    check_stream_invariants(built, chunks, skip_special_tokens=True)
    check_stream_invariants(built, chunks, skip_special_tokens=False)
    skipped, _ = stream(built, chunks, skip_special_tokens=True)
    assert "".join(skipped) == "東京 hi😀"
    assert skipped[0] == ""  # <s> alone produces nothing


def test_finish_flushes_an_incomplete_character(built: LoadedTokenizer) -> None:
    ids = byte_ids(built, "a東".encode()[:-1])
    detokenizer = built.new_decode_stream()
    assert detokenizer.push(ids) == "a"
    assert detokenizer.finish() == FFFD == built.decode([ids])[0][1:]
    assert detokenizer.finish() == ""
    with pytest.raises(RuntimeError):
        detokenizer.push([10])


def test_prefix_gives_context_without_being_emitted_again(metaspace: LoadedTokenizer) -> None:
    text = "the cat sees the river"
    ids = metaspace.encode([text], add_special_tokens=False)[0].ids
    split = len(metaspace.encode(["the cat"], add_special_tokens=False)[0].ids)
    assert metaspace.decode([ids[:split]])[0] == "the cat"
    deltas, tail = stream(metaspace, [[token_id] for token_id in ids[split:]], prefix_ids=ids[:split])
    assert "".join(deltas) + tail == " sees the river"
    # Without the prefix, the first word would lose its leading space.
    no_context, _ = stream(metaspace, [[token_id] for token_id in ids[split:]])
    assert "".join(no_context) == "sees the river"


def test_long_prefix_only_needs_its_tail(built: LoadedTokenizer) -> None:
    prompt = built.encode([" ".join(SAMPLES) * 20])[0].ids
    continuation = built.encode([" and 東京 👩\u200d💻"], add_special_tokens=False)[0].ids
    deltas, tail = stream(built, [[token_id] for token_id in continuation], prefix_ids=prompt)
    assert "".join(deltas) + tail == " and 東京 👩\u200d💻"


def test_prefix_ending_mid_character_is_completed_by_the_stream(built: LoadedTokenizer) -> None:
    data = "a東".encode()
    deltas, tail = stream(built, [byte_ids(built, data[-1:]), byte_ids(built, b"b")],
                          prefix_ids=byte_ids(built, data[:-1]))
    assert deltas == ["東", "b"] and tail == ""


@pytest.mark.parametrize("prefix_bytes", [b"a\x80", "a東".encode()[:2]])
def test_replacement_at_end_of_prefix_is_not_emitted_again(built: LoadedTokenizer, prefix_bytes: bytes) -> None:
    # A lone continuation byte, or a started character that the stream abandons.
    deltas, tail = stream(built, [byte_ids(built, b"x"), byte_ids(built, b"y")],
                          prefix_ids=byte_ids(built, prefix_bytes))
    assert deltas == ["x", "y"] and tail == ""


def test_prefix_with_nothing_after_it(built: LoadedTokenizer) -> None:
    deltas, tail = stream(built, [], prefix_ids=byte_ids(built, "a東".encode()[:2]))
    assert deltas == [] and tail == ""


def test_window_stays_short_on_long_streams(built: LoadedTokenizer) -> None:
    ids = built.encode(["The cat sees a map. 東京 😀 " * 50], add_special_tokens=False)[0].ids
    window_sizes: list[int] = []

    def spy(window: Sequence[int]) -> str:
        window_sizes.append(len(window))
        return built.decode([list(window)])[0]

    detokenizer = IncrementalDetokenizer(spy)
    text = "".join(detokenizer.push([token_id]) for token_id in ids) + detokenizer.finish()
    assert text == built.decode([ids])[0]
    assert len(ids) > 300
    assert max(window_sizes) <= CONTEXT_IDS + 4


def test_a_stream_of_stray_bytes_costs_bounded_work_per_id(built: LoadedTokenizer) -> None:
    # Lone continuation bytes never complete a character: without a bound, every push
    # would decode the whole stream so far.
    stray = byte_ids(built, b"\x80" * (4 * MAX_PENDING_IDS)) + built.encode(["done"], add_special_tokens=False)[0].ids
    window_sizes: list[int] = []

    def spy(window: Sequence[int]) -> str:
        window_sizes.append(len(window))
        return built.decode([list(window)])[0]

    detokenizer = IncrementalDetokenizer(spy)
    text = "".join(detokenizer.push([token_id]) for token_id in stray) + detokenizer.finish()
    assert max(window_sizes) <= CONTEXT_IDS + MAX_PENDING_IDS + 1
    assert text == built.decode([stray])[0]  # stray bytes decode locally, so nothing is lost here


def test_pushed_and_prefix_ids_are_validated(built: LoadedTokenizer) -> None:
    detokenizer = built.new_decode_stream()
    with pytest.raises(InvalidArgument) as caught:
        detokenizer.push([5, built.vocab_size])
    assert caught.value.reason == "TOKEN_ID_OUT_OF_RANGE"
    assert caught.value.violations[0].field == "token_ids[1]"
    with pytest.raises(InvalidArgument) as caught:
        built.new_decode_stream(prefix_ids=[-1])
    assert caught.value.violations[0].field == "prefix_token_ids[0]"


def _random_ids(rng: random.Random, loaded: LoadedTokenizer) -> list[int]:
    # Mostly byte tokens of multi-byte characters, cut anywhere, plus arbitrary vocabulary.
    ids: list[int] = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.5:
            data = rng.choice(SAMPLES).encode()
            start = rng.randrange(len(data))
            ids.extend(byte_ids(loaded, data[start : start + rng.randint(1, 6)]))
        else:
            ids.extend(rng.randrange(loaded.vocab_size) for _ in range(rng.randint(1, 4)))
    return ids


def _random_chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    chunks, position = [], 0
    while position < len(ids):
        size = rng.choice([1, 1, 1, 2, 3, 5])
        chunks.append(ids[position : position + size])
        position += size
    return chunks


def test_random_id_sequences_seeded(byte_level: LoadedTokenizer) -> None:
    rng = random.Random(20240607)
    for _ in range(150):
        ids = _random_ids(rng, byte_level)
        check_stream_invariants(byte_level, _random_chunks(rng, ids), skip_special_tokens=rng.random() < 0.3)


def test_random_prefixes_seeded(byte_level: LoadedTokenizer) -> None:
    rng = random.Random(7)
    for _ in range(150):
        prefix, pushed = _random_ids(rng, byte_level), _random_ids(rng, byte_level)
        deltas, tail = stream(byte_level, _random_chunks(rng, pushed), prefix_ids=prefix)
        streamed = "".join(deltas) + tail
        prefix_text = byte_level.decode([prefix])[0]
        whole = byte_level.decode([prefix + pushed])[0]
        # The prefix's text is never repeated: the stream starts where the one-shot
        # decode stops agreeing with the prefix's own decode, which is only ever inside
        # the prefix's trailing U+FFFD run (a character it left open, now completed).
        agreed = next(
            (i for i, (a, b) in enumerate(zip(whole, prefix_text, strict=False)) if a != b),
            min(len(whole), len(prefix_text)),
        )
        assert agreed >= len(prefix_text.rstrip(FFFD)), (prefix, pushed)
        assert whole == prefix_text[:agreed] + streamed, (prefix, pushed)


if hypothesis is not None:

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(data=st.data())
    def test_random_id_sequences_property(built: LoadedTokenizer, data: st.DataObject) -> None:
        byte_token = st.sampled_from(byte_ids(built, bytes(range(256))))
        any_token = st.integers(min_value=0, max_value=built.vocab_size - 1)
        ids = data.draw(st.lists(st.one_of(byte_token, byte_token, any_token), min_size=1, max_size=40))
        sizes = data.draw(st.lists(st.integers(min_value=1, max_value=4), min_size=len(ids), max_size=len(ids)))
        chunks, position = [], 0
        for size in sizes:
            if position >= len(ids):
                break
            chunks.append(ids[position : position + size])
            position += size
        check_stream_invariants(built, chunks, skip_special_tokens=data.draw(st.booleans()))

else:

    def test_random_id_sequences_property() -> None:
        pytest.skip("hypothesis is not installed; the seeded fuzz tests cover the same invariants")


def test_random_sequences_with_a_context_sensitive_decoder(metaspace: LoadedTokenizer) -> None:
    # Metaspace drops the space of only the first word of a decode; sliding the window
    # must not drop or add spaces in the middle of a stream.
    rng = random.Random(11)
    for _ in range(100):
        ids = [rng.randrange(metaspace.vocab_size) for _ in range(rng.randint(1, 30))]
        check_stream_invariants(metaspace, _random_chunks(rng, ids))
