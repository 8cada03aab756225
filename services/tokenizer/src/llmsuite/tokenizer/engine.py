"""The tokenizer engine: loaded Hugging Face tokenizers, what can be done with them, and
the registry that serves them by name.

Everything runs through the `tokenizers` library (batch encode/decode run in parallel
in Rust, outside the GIL); this module adds validation with typed errors, truncation
that never mutates the shared tokenizer, HF config quirks, and chat templates.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from tokenizers import Encoding, Tokenizer

from llmsuite.runtime.detokenizer import IncrementalDetokenizer
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument, LlmsuiteError, NotFound
from llmsuite.tokenizer.chat_template import (
    ChatJob,
    ChatMessage,
    ChatTemplate,
    RenderedChat,
    check_template_variables,
    render_context,
)
from llmsuite.tokenizer.files import TokenizerFiles, read_tokenizer_files
from llmsuite.tokenizer.reload_roots import ReloadRoots

_log = logging.getLogger(__name__)

TruncationSide = Literal["left", "right"]
# transformers writes int(1e30) when a tokenizer has no length limit.
_NO_LIMIT_SENTINEL = 10**18


@dataclass(frozen=True)
class SpecialTokens:
    """Special token strings and ids; None where the tokenizer has no such token."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    additional: tuple[str, ...] = ()
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    additional_ids: tuple[int, ...] = ()

    def additional_with_ids(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(self.additional, self.additional_ids, strict=True))


@dataclass(frozen=True)
class EncodedText:
    ids: list[int]
    # (start, end) character offsets into the text, per token; (0, 0) for added specials.
    offsets: list[tuple[int, int]] | None
    truncated: bool


# Upper bounds of what one token costs in an EncodeResponse: a uint32 id is at most a
# 5-byte varint; an offset is a CharSpan sub-message (tag, length, two varints of at
# most 5 bytes each, with their tags).
_ID_BYTES = 5
_OFFSET_BYTES = 14


@dataclass(frozen=True)
class TokenizerLimits:
    """Per-request bounds; anything above is rejected as INVALID_ARGUMENT.

    Each text and each sequence is bounded, and so is each request as a whole: the
    characters it asks to process (what costs CPU), the token ids it asks to return or
    decode (what costs memory), and the size of the response it would produce.
    """

    max_batch_size: int = 256
    max_input_chars: int = 1_000_000
    max_tokens_per_sequence: int = 1_000_000
    max_request_chars: int = 1_000_000
    max_request_tokens: int = 1_000_000
    max_response_bytes: int = 64 * 1024 * 1024
    max_chat_messages: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_chars", "max_tokens_per_sequence", "max_request_chars",
                     "max_request_tokens", "max_response_bytes", "max_chat_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


def _token_content(value: Any, key: str, directory: pathlib.Path) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return cast(str, value["content"])
    raise FailedPrecondition(
        message=f"{key} in the tokenizer config of {str(directory)!r} must be a string or {{'content': ...}}",
        reason="TOKENIZER_INVALID",
        metadata={"directory": str(directory), "field": key},
    )


def _configured(files: TokenizerFiles, key: str) -> Any:
    # tokenizer_config.json wins, even with an explicit null; special_tokens_map.json fills gaps.
    if key in files.config:
        return files.config[key]
    return files.special_tokens_map.get(key)


def _special_tokens(files: TokenizerFiles, tokenizer: Tokenizer) -> SpecialTokens:
    named: dict[str, tuple[str | None, int | None]] = {}
    for role in ("bos", "eos", "pad", "unk"):
        key = f"{role}_token"
        token = _token_content(_configured(files, key), key, files.directory)
        token_id = None if token is None else tokenizer.token_to_id(token)
        if token is not None and token_id is None:
            _log.warning("%s %r of %s is not in the vocabulary; treating it as absent", key, token, files.directory)
            token = None
        named[role] = (token, token_id)

    named_tokens = {token for token, _ in named.values() if token is not None}
    additional: dict[str, int] = {}
    for value in _configured(files, "additional_special_tokens") or ():
        token = _token_content(value, "additional_special_tokens", files.directory)
        token_id = None if token is None else tokenizer.token_to_id(token)
        if token is not None and token_id is not None and token not in named_tokens:
            additional[token] = token_id
    # Chat markers such as <|eot_id|> are often only flagged special in tokenizer.json.
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if added.special and added.content not in named_tokens:
            additional.setdefault(added.content, token_id)
    ordered = sorted(additional.items(), key=lambda item: item[1])
    return SpecialTokens(
        bos=named["bos"][0],
        eos=named["eos"][0],
        pad=named["pad"][0],
        unk=named["unk"][0],
        additional=tuple(token for token, _ in ordered),
        bos_id=named["bos"][1],
        eos_id=named["eos"][1],
        pad_id=named["pad"][1],
        unk_id=named["unk"][1],
        additional_ids=tuple(token_id for _, token_id in ordered),
    )


def _model_max_length(files: TokenizerFiles) -> int | None:
    value = files.config.get("model_max_length")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value <= 0 or value >= _NO_LIMIT_SENTINEL:
        return None
    return int(value)


def _chat_template_source(files: TokenizerFiles) -> str | None:
    if files.chat_template_file is not None:
        return files.chat_template_file
    value = files.config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # Several named templates: the unnamed use is the one called "default".
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default" and isinstance(entry.get("template"), str):
                return cast(str, entry["template"])
    return None


def _template_tokens(special: SpecialTokens) -> dict[str, Any]:
    # Like transformers' special_tokens_map: unset tokens are left undefined.
    context: dict[str, Any] = {
        f"{role}_token": token
        for role, token in (("bos", special.bos), ("eos", special.eos), ("pad", special.pad), ("unk", special.unk))
        if token is not None
    }
    context["additional_special_tokens"] = list(special.additional)
    return context


class LoadedTokenizer:
    """An immutable snapshot of one tokenizer directory; safe to share between threads.

    Build with `LoadedTokenizer.load`. A reload creates a new instance, so holders of
    this one keep a consistent tokenizer for as long as they use it.
    """

    def __init__(
        self,
        *,
        name: str,
        files: TokenizerFiles,
        tokenizer: Tokenizer,
        limits: TokenizerLimits,
    ) -> None:
        self.name = name
        self.directory = files.directory
        self.content_hash = files.content_hash
        self.hashed_files = files.hashed_files
        self.limits = limits
        self.loaded_at: float = time.time()  # wall clock, seconds since the epoch
        self._tokenizer = tokenizer

        known_ids = set(tokenizer.get_vocab(with_added_tokens=True).values())
        if not known_ids:
            raise FailedPrecondition(
                message=f"tokenizer in {str(files.directory)!r} has an empty vocabulary",
                reason="TOKENIZER_INVALID",
            )
        # Ids index the model's embedding rows, so the size is the highest id + 1.
        self.vocab_size: int = max(known_ids) + 1
        self._missing_ids = frozenset(range(self.vocab_size)) - known_ids
        self.special_tokens = _special_tokens(files, tokenizer)
        self.model_max_length = _model_max_length(files)
        self.chat_template = _chat_template_source(files)
        self._template_tokens = _template_tokens(self.special_tokens)
        self._template_problem: FailedPrecondition | None = None
        if self.chat_template is not None:
            try:
                ChatTemplate.compile(self.chat_template, from_request=False)
            except FailedPrecondition as problem:
                # Encoding still works without a usable template; chat requests get this error.
                _log.warning("chat template of %s is unusable: %s", name, problem)
                self._template_problem = problem

    @classmethod
    def load(cls, name: str, directory: pathlib.Path, limits: TokenizerLimits | None = None) -> LoadedTokenizer:
        """Reads `directory`; FailedPrecondition naming the file when anything is missing or broken."""
        files = read_tokenizer_files(pathlib.Path(directory))
        try:
            tokenizer = Tokenizer.from_str(files.tokenizer_json)
        except Exception as exc:
            # The Rust parser reports every problem as a generic Exception.
            raise FailedPrecondition(
                message=f"tokenizer.json in {str(files.directory)!r} cannot be loaded: {exc}",
                reason="TOKENIZER_INVALID",
                metadata={"directory": str(files.directory), "file": "tokenizer.json"},
            ) from exc
        # tokenizer.json may carry truncation/padding settings meant for training;
        # truncation here is per request and counts must be exact.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(name=name, files=files, tokenizer=tokenizer, limits=limits or TokenizerLimits())

    # -- encoding -----------------------------------------------------------------

    def encode(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        return_offsets: bool = False,
        max_length: int | None = None,
        truncation_side: TruncationSide = "right",
    ) -> list[EncodedText]:
        self._check_texts(texts)
        if truncation_side not in ("left", "right"):
            raise InvalidArgument.for_field("truncation.side", f"must be 'left' or 'right', got {truncation_side!r}")
        if max_length is None:
            encodings = self._encode_batch(texts, add_special_tokens, return_offsets)
            self._check_output(encodings, return_offsets)
            return [EncodedText(encoding.ids, encoding.offsets if return_offsets else None, truncated=False)
                    for encoding in encodings]
        content_budget = self._content_budget(max_length, add_special_tokens)
        finished: list[tuple[Encoding, bool]] = []
        # Truncate before post-processing, as transformers does: the special tokens
        # always survive and the result is at most max_length long.
        for encoding in self._encode_batch(texts, False, return_offsets):
            truncated = len(encoding) > content_budget
            if truncated:
                encoding.truncate(content_budget, direction=truncation_side)
            if add_special_tokens:
                encoding = self._tokenizer.post_process(encoding, None, True)
            finished.append((encoding, truncated))
        self._check_output([encoding for encoding, _ in finished], return_offsets)
        return [EncodedText(encoding.ids, encoding.offsets if return_offsets else None, truncated)
                for encoding, truncated in finished]

    def _check_output(self, encodings: Sequence[Encoding], with_offsets: bool) -> None:
        """Bounds what the response would hold, before any of it is built in Python."""
        total = sum(len(encoding) for encoding in encodings)
        limit = self.limits.max_request_tokens
        if total > limit:
            raise InvalidArgument.for_field(
                "texts", f"{total} tokens in all exceeds limit {limit} per request; send fewer or shorter texts",
                reason="TOO_MANY_TOKENS", limit=str(limit))
        estimate = total * (_ID_BYTES + (_OFFSET_BYTES if with_offsets else 0))
        if estimate > self.limits.max_response_bytes:
            field_path = "return_offsets" if with_offsets else "texts"
            raise InvalidArgument.for_field(
                field_path, f"the response would take up to {estimate} bytes, over the limit of "
                f"{self.limits.max_response_bytes}; send fewer texts" + (" or no offsets" if with_offsets else ""),
                reason="RESPONSE_TOO_LARGE", limit=str(self.limits.max_response_bytes))

    def count(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[int]:
        self._check_texts(texts)
        return [len(encoding.ids) for encoding in self._encode_batch(texts, add_special_tokens, False)]

    def _encode_batch(self, texts: Sequence[str], add_special_tokens: bool, with_offsets: bool) -> list[Encoding]:
        if with_offsets:
            return self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)

    def _content_budget(self, max_length: int, add_special_tokens: bool) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InvalidArgument.for_field("truncation.max_length", f"must be a positive integer, got {max_length!r}")
        special_count = self._tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0
        if max_length < special_count:
            raise InvalidArgument.for_field(
                "truncation.max_length",
                f"{max_length} cannot hold the {special_count} special tokens this tokenizer adds",
            )
        return max_length - special_count

    def _check_texts(self, texts: Sequence[str]) -> None:
        self._check_batch_size("texts", len(texts))
        limit = self.limits.max_input_chars
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidArgument.for_field(f"texts[{index}]", f"must be a string, got {type(text).__name__}")
            if len(text) > limit:
                raise InvalidArgument.for_field(
                    f"texts[{index}]",
                    f"{len(text)} characters exceeds limit {limit}",
                    reason="INPUT_TOO_LONG",
                    limit=str(limit),
                )
        self._check_request_chars("texts", sum(len(text) for text in texts))

    def _check_request_chars(self, field_path: str, total: int) -> None:
        limit = self.limits.max_request_chars
        if total > limit:
            raise InvalidArgument.for_field(
                field_path, f"{total} characters in all exceeds limit {limit} per request",
                reason="REQUEST_TOO_LARGE", limit=str(limit))

    def _check_batch_size(self, field_path: str, size: int, *, limit: int | None = None) -> None:
        if size == 0:
            raise InvalidArgument.for_field(field_path, "must not be empty", reason="EMPTY_BATCH")
        limit = self.limits.max_batch_size if limit is None else limit
        if size > limit:
            raise InvalidArgument.for_field(
                field_path,
                f"batch of {size} exceeds limit {limit}",
                reason="BATCH_TOO_LARGE",
                limit=str(limit),
            )

    # -- decoding -----------------------------------------------------------------

    def decode(self, sequences: Sequence[Sequence[int]], *, skip_special_tokens: bool = False) -> list[str]:
        self._check_batch_size("sequences", len(sequences))
        total = 0
        for index, ids in enumerate(sequences):
            self._check_ids(ids, f"sequences[{index}].token_ids")
            total += len(ids)
        limit = self.limits.max_request_tokens
        if total > limit:
            raise InvalidArgument.for_field(
                "sequences", f"{total} token ids in all exceeds limit {limit} per request",
                reason="TOO_MANY_TOKENS", limit=str(limit))
        texts = self._tokenizer.decode_batch([list(ids) for ids in sequences], skip_special_tokens=skip_special_tokens)
        # UTF-8 is at most 4 bytes a character; the bound only costs a scan when it is near.
        if 4 * sum(len(text) for text in texts) > self.limits.max_response_bytes:
            size = sum(len(text.encode("utf-8")) for text in texts)
            if size > self.limits.max_response_bytes:
                raise InvalidArgument.for_field(
                    "sequences", f"the decoded texts take {size} bytes, over the limit of "
                    f"{self.limits.max_response_bytes}; decode fewer ids per request",
                    reason="RESPONSE_TOO_LARGE", limit=str(self.limits.max_response_bytes))
        return texts

    def new_decode_stream(
        self, *, skip_special_tokens: bool = False, prefix_ids: Sequence[int] = ()
    ) -> IncrementalDetokenizer:
        """A detokenizer for one generation stream. `prefix_ids` (the prompt, or what was
        already streamed) is not emitted again but gives the first ids their context."""
        self._check_ids(prefix_ids, "prefix_token_ids")
        decode = functools.partial(self._tokenizer.decode, skip_special_tokens=skip_special_tokens)
        return IncrementalDetokenizer(
            decode,
            prefix_ids=prefix_ids,
            check_ids=functools.partial(self._check_ids, field_path="token_ids"),
        )

    def _check_ids(self, ids: Sequence[int], field_path: str) -> None:
        limit = self.limits.max_tokens_per_sequence
        if len(ids) > limit:
            raise InvalidArgument.for_field(
                field_path, f"{len(ids)} tokens exceeds limit {limit}", reason="INPUT_TOO_LONG", limit=str(limit)
            )
        if not ids:
            return
        # min/max run in C; the per-id scan only happens when something is wrong.
        if min(ids) >= 0 and max(ids) < self.vocab_size and not self._missing_ids:
            return
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                problem = f"token id {token_id} is outside vocabulary [0, {self.vocab_size})"
            elif token_id in self._missing_ids:
                problem = f"token id {token_id} is not assigned in the vocabulary"
            else:
                continue
            raise InvalidArgument.for_field(
                f"{field_path}[{position}]", problem, reason="TOKEN_ID_OUT_OF_RANGE", vocab_size=str(self.vocab_size)
            )

    # -- chat -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        tokenize: bool,
        template_override: str | None = None,
        extra_context: Mapping[str, Any] | None = None,
        continue_final: str | None = None,
    ) -> RenderedChat:
        """Renders `messages` in this process; with `tokenize`, also encodes the text
        without adding special tokens, since the template places them itself (as
        transformers does). Only the output is bounded here: the service renders
        untrusted work in template workers instead (`prepare_chat`, a
        TemplateRenderer, `finish_chat`)."""
        job = self.prepare_chat(messages, add_generation_prompt=add_generation_prompt,
                                template_override=template_override, extra_context=extra_context)
        template = ChatTemplate.compile(job.source, from_request=job.from_request)
        text = template.render_context(job.context, max_output_chars=job.max_output_chars,
                                       from_request=job.from_request)
        return self.finish_chat(text, tokenize=tokenize, continue_final=continue_final)

    def prepare_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        template_override: str | None = None,
        extra_context: Mapping[str, Any] | None = None,
    ) -> ChatJob:
        """Validates a chat request and returns what a renderer needs: the template and
        its variables, with the rendered text capped at --max-input-chars."""
        if not messages:
            raise InvalidArgument.for_field("messages", "must contain at least one message", reason="EMPTY_BATCH")
        self._check_batch_size("messages", len(messages), limit=self.limits.max_chat_messages)
        limit = self.limits.max_input_chars
        total_chars = sum(len(message.content) for message in messages)
        if total_chars > limit:
            raise InvalidArgument.for_field(
                "messages", f"{total_chars} characters of content exceeds limit {limit}",
                reason="INPUT_TOO_LONG", limit=str(limit),
            )
        if template_override is not None and len(template_override) > limit:
            raise InvalidArgument.for_field(
                "chat_template", f"{len(template_override)} characters exceeds limit {limit}",
                reason="INPUT_TOO_LONG", limit=str(limit),
            )
        variables_chars = check_template_variables(extra_context or {})
        self._check_request_chars("messages", sum(message.chars for message in messages)
                                  + len(template_override or "") + variables_chars)
        source, from_request = self._template_source(template_override)
        context = render_context(messages, add_generation_prompt, self._template_tokens, extra_context or {})
        return ChatJob(source=source, context=context, from_request=from_request, max_output_chars=limit)

    def finish_chat(self, text: str, *, tokenize: bool, continue_final: str | None = None) -> RenderedChat:
        """With `continue_final` (the last message's content), the text is cut right after
        its last occurrence, leaving that message open for the model to continue."""
        if continue_final is not None:
            text = open_final_message(text, continue_final)
        limit = self.limits.max_input_chars
        if len(text) > limit:
            raise InvalidArgument.for_field(
                "messages", f"rendered conversation of {len(text)} characters exceeds limit {limit}",
                reason="INPUT_TOO_LONG", limit=str(limit),
            )
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids if tokenize else None
        return RenderedChat(text=text, ids=ids)

    def _template_source(self, template_override: str | None) -> tuple[str, bool]:
        """(source, whether the caller sent it)."""
        if template_override is not None:
            return template_override, True
        if self._template_problem is not None:
            # A fresh error per request: exceptions carry tracebacks, so share none.
            problem: LlmsuiteError = self._template_problem
            raise FailedPrecondition(message=problem.message, reason=problem.reason, metadata={"model": self.name})
        if self.chat_template is None:
            raise FailedPrecondition(
                message=f"model {self.name!r} has no chat template",
                reason="NO_CHAT_TEMPLATE",
                metadata={"model": self.name},
            )
        return self.chat_template, False


def open_final_message(text: str, final_content: str) -> str:
    """`text` cut right after the last occurrence of the final message's content (stripped,
    as Hugging Face's continue_final_message does), so the model continues that message."""
    content = final_content.strip()
    end = text.rfind(content) if content else -1
    if end < 0:
        raise InvalidArgument.for_field(
            "continue_final_message", "the chat template's rendering does not contain the last message's content, "
            "so it cannot be left open", reason="INVALID_FIELD")
    return text[:end + len(content)]


class TokenizerRegistry:
    """Thread-safe name -> LoadedTokenizer map.

    Loading happens outside the lock, so a slow reload never blocks lookups; the swap
    itself is a single assignment, and callers holding the old snapshot keep using it.
    """

    def __init__(self, limits: TokenizerLimits | None = None, *, reload_roots: ReloadRoots | None = None) -> None:
        """`reload_roots` bounds the directories `reload` may read; by default they are the
        directories given to `load`."""
        self.limits = limits or TokenizerLimits()
        self._lock = threading.Lock()
        self._tokenizers: dict[str, LoadedTokenizer] = {}
        self._roots_follow_loads = reload_roots is None
        self.reload_roots = ReloadRoots() if reload_roots is None else reload_roots

    def load(self, name: str, directory: pathlib.Path) -> LoadedTokenizer:
        """Loads a tokenizer under a new name; FailedPrecondition if the name is taken."""
        if not name:
            raise InvalidArgument.for_field("name", "must not be empty")
        loaded = LoadedTokenizer.load(name, directory, self.limits)
        if self._roots_follow_loads:
            self.reload_roots.add(directory)
        with self._lock:
            if name in self._tokenizers:
                raise FailedPrecondition(
                    message=f"model {name!r} is already loaded; reload it instead",
                    reason="MODEL_ALREADY_LOADED",
                    metadata={"model": name},
                )
            self._tokenizers[name] = loaded
        return loaded

    def get(self, name: str) -> LoadedTokenizer:
        with self._lock:
            loaded = self._tokenizers.get(name)
            known = sorted(self._tokenizers)
        if loaded is None:
            raise NotFound(
                message=f"unknown model {name!r}; loaded models: {', '.join(known) or 'none'}",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name, "known_models": ",".join(known)},
            )
        return loaded

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tokenizers)

    def all(self) -> list[LoadedTokenizer]:
        with self._lock:
            return [self._tokenizers[name] for name in sorted(self._tokenizers)]

    def reload(self, name: str, directory: str | pathlib.Path | None = None) -> LoadedTokenizer:
        """Loads `name` again (from `directory`, or where it came from) and swaps it in.

        A `directory` outside the reload roots is PermissionDenied, the same for every
        such path. If loading fails the current tokenizer stays and FailedPrecondition
        with reason RELOAD_FAILED carries the cause.
        """
        current = self.get(name)
        source = current.directory if directory is None else self.reload_roots.check(str(directory))
        try:
            replacement = LoadedTokenizer.load(name, source, self.limits)
        except LlmsuiteError as cause:
            raise FailedPrecondition(
                message=f"reloading model {name!r} from {str(source)!r} failed, still serving "
                f"{current.content_hash}: {cause.message}",
                reason="RELOAD_FAILED",
                metadata={"model": name, "directory": str(source), "cause_reason": cause.reason},
            ) from cause
        with self._lock:
            self._tokenizers[name] = replacement
        return replacement
