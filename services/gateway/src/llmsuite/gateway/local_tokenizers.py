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
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from llmsuite.runtime.detokenizer import IncrementalDetokenizer
from llmsuite.runtime.tokenizer_hash import content_hash_of

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerFilesRejected(Exception):
    """The files the tokenizer service sent cannot be used (wrong hash, unloadable)."""


@dataclass(frozen=True)
class LocalTokenizer:
    """One tokenizer version, identified by its content hash."""

    content_hash: str
    tokenizer: Tokenizer
    # The chat template's source (every named template, when there are several): the
    # gateway reads which tool-call format the model writes from it. Rendering stays
    # the tokenizer service's.
    chat_template: str | None = None

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
