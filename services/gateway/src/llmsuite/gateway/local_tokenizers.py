"""Detokenization in the gateway's own process, with the tokenizer service's files.

The tokenizer service stays the one owner of tokenizer semantics: the gateway
fetches a model's tokenizer files from it (GetTokenizerFiles), checks that
they hash to the content hash both the tokenizer and the inference service
report for the model, and runs the same `IncrementalDetokenizer` over the
same `tokenizers` library the service's DecodeStream runs. What this removes
is one network round trip per streamed token. Encoding and chat templates stay
in the tokenizer service.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders

from llmsuite.runtime.detokenizer import IncrementalDetokenizer
from llmsuite.runtime.tokenizer_hash import content_hash_of

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerFilesRejected(Exception):
    """The files the tokenizer service sent cannot be used (wrong hash, unloadable)."""


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte (GPT-2's scheme, which `tokenizers`'
    ByteLevel keeps): printable Latin-1 bytes stand for themselves, the other bytes for
    the characters from U+0100 up, in byte order. Returned inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in chars)
    chars.update((byte, chr(256 + n)) for n, byte in enumerate(others))
    return {char: byte for byte, char in chars.items()}


@dataclass(frozen=True)
class LocalTokenizer:
    """One tokenizer version, identified by its content hash."""

    content_hash: str
    tokenizer: Tokenizer
    # The chat template's source (every named template, when there are several): the
    # gateway reads which tool-call format the model writes from it. Rendering stays
    # the tokenizer service's.
    chat_template: str | None = None
    _pieces: dict[int, tuple[str, bytes]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_files(cls, files: dict[str, bytes], expected_hash: str) -> LocalTokenizer:
        """Builds from GetTokenizerFiles' answer, refusing files that do not
        hash to `expected_hash` (the hash the model was paired on)."""
        actual = content_hash_of(files)
        if actual != expected_hash:
            raise TokenizerFilesRejected(f"files hash to {actual}, expected {expected_hash}")
        if TOKENIZER_JSON not in files:
            raise TokenizerFilesRejected(f"no {TOKENIZER_JSON} among {sorted(files)}")
        try:
            tokenizer = Tokenizer.from_str(files[TOKENIZER_JSON].decode("utf-8"))
        except Exception as exc:  # the Rust parser reports every problem as a plain Exception
            raise TokenizerFilesRejected(f"{TOKENIZER_JSON} cannot be loaded: {exc}") from exc
        return cls(expected_hash, tokenizer, _chat_template(files))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token alone, as OpenAI's logprobs show it: its text (decoded alone,
        special tokens kept, U+FFFD for part of a character) and its exact bytes. The bytes
        come from the vocabulary entry where the tokenizer says how (byte-level BPE's byte
        alphabet, SentencePiece's `<0xNN>` byte fallback), else from the text."""
        piece = self._pieces.get(token_id)
        if piece is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            piece = (text, self._raw_bytes(token_id, text))
            self._pieces[token_id] = piece  # at most one entry per vocabulary id
        return piece

    def _raw_bytes(self, token_id: int, text: str) -> bytes:
        entry = self.tokenizer.id_to_token(token_id)
        if entry is None:
            return text.encode("utf-8")
        if isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            alphabet = _byte_level_alphabet()
            if all(char in alphabet for char in entry):
                return bytes(alphabet[char] for char in entry)
        fallback = _BYTE_FALLBACK.match(entry)
        if fallback is not None:
            return bytes([int(fallback.group(1), 16)])
        return text.encode("utf-8")

    def detokenizer(self, prefix_ids: Sequence[int], *, skip_special_tokens: bool,
                    keep_ids: Collection[int] = ()) -> IncrementalDetokenizer:
        """The same incremental detokenizer the tokenizer service's DecodeStream runs.
        `keep_ids`: special tokens whose text stays even when special tokens are
        skipped (a tool-call marker such as Mistral's `[TOOL_CALLS]`)."""
        if keep_ids and skip_special_tokens:
            return IncrementalDetokenizer(functools.partial(self._decode_keeping, frozenset(keep_ids)),
                                          prefix_ids=prefix_ids)
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=skip_special_tokens)
        return IncrementalDetokenizer(decode, prefix_ids=prefix_ids)

    def special_ids(self, texts: Collection[str]) -> frozenset[int]:
        """The ids of those texts that are special tokens (dropped by skip_special_tokens)."""
        special = {token.content: token_id for token_id, token in self.tokenizer.get_added_tokens_decoder().items()
                   if token.special}
        return frozenset(special[text] for text in texts if text in special)

    def _decode_keeping(self, keep: frozenset[int], ids: Sequence[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in keep:
                pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
                pieces.append(self.tokenizer.decode([token_id], skip_special_tokens=False))
                run = []
            else:
                run.append(token_id)
        pieces.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(pieces)


def _chat_template(files: dict[str, bytes]) -> str | None:
    if CHAT_TEMPLATE_FILE in files:
        return files[CHAT_TEMPLATE_FILE].decode("utf-8", errors="replace")
    try:
        config = json.loads(files.get(TOKENIZER_CONFIG, b"{}"))
    except ValueError:
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates ("default", "tool_use", ...)
        return "\n".join(str(item.get("template", "")) for item in template if isinstance(item, dict))
    return template if isinstance(template, str) else None


class LocalTokenizers:
    """Loaded tokenizers by content hash. Loading parses tokenizer.json (large
    for big vocabularies), so it runs in a thread."""

    def __init__(self) -> None:
        self._by_hash: dict[str, LocalTokenizer] = {}

    def get(self, content_hash: str) -> LocalTokenizer | None:
        return self._by_hash.get(content_hash)

    async def load(self, files: dict[str, bytes], expected_hash: str) -> LocalTokenizer:
        loaded = await asyncio.to_thread(LocalTokenizer.from_files, files, expected_hash)
        self._by_hash[expected_hash] = loaded
        return loaded

    def keep_only(self, content_hashes: set[str]) -> None:
        """Forgets versions no served model uses any more."""
        for stale in set(self._by_hash) - content_hashes:
            del self._by_hash[stale]
