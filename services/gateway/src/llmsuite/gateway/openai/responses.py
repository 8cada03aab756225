"""SDK results as OpenAI response objects (plain dicts, JSON-ready).

The one place where a `Completion` or a `TextChunk` becomes a `chat.completion`,
`chat.completion.chunk` or `text_completion` object.

Finish reasons: `stop` and `length` map to themselves. A generation cut by
the request deadline (`time_limit`) or by the model's context (`context_full`)
reports `length`: the text is valid but was cut by a limit. A generation the
server cancelled (`cancelled`; the caller's own disconnects never reach a
response) is not a normal ending in OpenAI's vocabulary, so it becomes an
error (see `ServerCancelled`).

Logprobs name each token by its text and bytes, as the gateway's tokenizer
decodes that token alone; a token that is part of a character reads U+FFFD
with its exact bytes, as OpenAI shows it. A token the gateway sent no text
for (an older gateway) is written `token_id:<id>` (vLLM's
`--return-tokens-as-token-ids` form) with `bytes: null`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmsuite.client import Completion, PositionLogprobs, TextChunk, TokenLogprob
from llmsuite.gateway.openai import tools
from llmsuite.gateway.openai.errors import ApiError

_FINISH_REASONS = {"stop": "stop", "grammar": "stop", "length": "length", "time_limit": "length",
                   "context_full": "length", "tool_calls": "tool_calls"}


class ServerCancelled(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "the server cancelled this generation (e.g. while shutting down); retry it",
                         "server_error", None, "cancelled")


def finish_reason(completion: Completion) -> str:
    if completion.finish_reason not in _FINISH_REASONS:
        raise ServerCancelled()
    return _FINISH_REASONS[completion.finish_reason]


def timings(c: Completion) -> dict[str, float]:
    """llmsuite's extension field (llama.cpp's server has one too): where the time went, in
    milliseconds, as the gateway measured it."""
    t = c.timings
    return {"queue_ms": round(t.queue_s * 1000, 3), "prefill_ms": round(t.prefill_s * 1000, 3),
            "time_to_first_token_ms": round(t.time_to_first_token_s * 1000, 3),
            "mean_inter_token_latency_ms": round(t.mean_inter_token_latency_s * 1000, 3),
            "total_ms": round(t.total_s * 1000, 3)}


def request_timings(completions: Sequence[Completion]) -> dict[str, float]:
    """A whole response's timings: with several choices, those of the one that took longest
    (the request was answered when it finished)."""
    return timings(max(completions, key=lambda c: c.timings.total_s))


def token_text(t: TokenLogprob) -> str:
    return t.token if t.token or t.token_bytes else f"token_id:{t.token_id}"


def _chat_token(t: TokenLogprob) -> dict[str, Any]:
    described = bool(t.token or t.token_bytes)
    return {"token": token_text(t), "logprob": t.logprob, "bytes": list(t.token_bytes) if described else None}


def chat_logprobs(positions: Sequence[PositionLogprobs]) -> dict[str, Any]:
    return {"content": [{**_chat_token(p.chosen), "top_logprobs": [_chat_token(t) for t in p.top]}
                        for p in positions],
            "refusal": None}


def _top_by_text(top: Sequence[TokenLogprob]) -> dict[str, float]:
    """The legacy format keys alternatives by text; two tokens can read the same (pieces of
    characters both read U+FFFD), so a later one is keyed `token_id:<id>` rather than lost."""
    by_text: dict[str, float] = {}
    for t in top:
        key = token_text(t)
        by_text[f"token_id:{t.token_id}" if key in by_text else key] = t.logprob
    return by_text


def completion_logprobs(positions: Sequence[PositionLogprobs], text_offset: int = 0) -> dict[str, Any]:
    """`text_offset` is where the first token's text starts in the choice's text (after an
    echoed prompt, or after the text of earlier stream chunks); offsets add up the tokens'
    decoded lengths, as vLLM's do."""
    offsets = []
    for p in positions:
        offsets.append(text_offset)
        text_offset += len(token_text(p.chosen))
    return {
        "tokens": [token_text(p.chosen) for p in positions],
        "token_logprobs": [p.chosen.logprob for p in positions],
        "top_logprobs": [_top_by_text(p.top) for p in positions],
        "text_offset": offsets,
    }


class ResponseBuilder:
    """Builds every object of one response; `id`, `created` and `model` are
    the same in each chunk of a stream, as OpenAI's are. A response holds one
    or more choices, numbered by `index` (n, batched prompts); `echo` is the
    text each completion choice starts with (its prompt, when `echo` was asked)."""

    def __init__(self, *, chat: bool, request_id: str, created: int, model: str, logprobs: bool,
                 include_usage: bool = False, continuous_usage: bool = False, choices_per_prompt: int = 1,
                 echo: Sequence[str] = ()) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created = created
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        # vLLM's continuous_usage_stats: every chunk carries the usage so far, not null.
        self.continuous_usage = include_usage and continuous_usage
        self.choices_per_prompt = max(1, choices_per_prompt)
        self._usage_so_far: dict[int, tuple[int, int]] = {}  # per choice: (prompt tokens, completion tokens)
        self.echo = tuple(echo)
        self._streamed_chars: dict[int, int] = {}  # per choice: text already sent (logprobs' text_offset)
        self._tool_calls: dict[int, tools.StreamedToolCalls] = {}  # per choice

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def _echo(self, index: int) -> str:
        return self.echo[index] if index < len(self.echo) else ""

    def _logprobs(self, positions: Sequence[PositionLogprobs], text_offset: int = 0) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(positions) if self.chat else completion_logprobs(positions, text_offset)

    # -- whole responses -----------------------------------------------------------------------

    def completion(self, c: Completion) -> dict[str, Any]:
        return self.completions([c])

    def completions(self, completions: Sequence[Completion], prompts: int = 1) -> dict[str, Any]:
        """The whole response; `completions[i]` is choice i, `prompts` how many prompts they share
        out evenly (usage counts each prompt once)."""
        choices = []
        for index, c in enumerate(completions):
            echo = self._echo(index)
            choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(c.logprobs, len(echo)),
                                      "finish_reason": finish_reason(c)}
            if self.chat:
                choice["message"] = tools.assistant_message(c.text, c.tool_calls)
            else:
                choice["text"] = echo + c.text
            choices.append(choice)
        return self._envelope("chat.completion" if self.chat else "text_completion", choices,
                              usage=total_usage(completions, prompts),
                              timings=request_timings(completions))

    # -- stream chunks ---------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        if self.include_usage:
            extra.setdefault("usage", self._running_usage() if self.continuous_usage else None)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choices, **extra)

    def first_chunks(self, choices: int = 1) -> list[dict[str, Any]]:
        """Chat streams open with the assistant role, as OpenAI's do; an echoed completion
        opens with its prompt."""
        if self.chat:
            return [self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for index in range(choices)]
        opening = []
        for index in range(choices):
            echo = self._echo(index)
            if echo:
                self._streamed_chars[index] = len(echo)
                opening.append(self._chunk([{"index": index, "text": echo, "logprobs": None,
                                             "finish_reason": None}]))
        return opening

    def first_chunk(self) -> dict[str, Any] | None:
        chunks = self.first_chunks()
        return chunks[0] if chunks else None

    def text_chunk(self, chunk: TextChunk, index: int = 0) -> dict[str, Any] | None:
        """A delta; None when there is nothing to show (held-back text, no logprobs asked)."""
        self.observe_usage(chunk, index)
        if not chunk.text and not chunk.tool_calls and not (self.logprobs and chunk.logprobs):
            return None
        sent = self._streamed_chars.get(index, 0)
        choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(chunk.logprobs, sent),
                                  "finish_reason": None}
        if self.chat:
            calls = self._tool_calls.setdefault(index, tools.StreamedToolCalls())
            choice["delta"] = calls.delta(chunk.text, chunk.tool_calls)
        else:
            choice["text"] = chunk.text
            self._streamed_chars[index] = sent + sum(len(token_text(p.chosen)) for p in chunk.logprobs)
        return self._chunk([choice])

    def observe_usage(self, chunk: TextChunk, index: int = 0) -> None:
        """Takes the usage so far a delta reports (for continuous usage); the stream calls it for
        its first delta before the opening chunks, so those carry the prompt's length too."""
        self._usage_so_far[index] = (chunk.prompt_tokens, chunk.completion_tokens)

    def _running_usage(self) -> dict[str, Any]:
        """Usage so far over every choice, each prompt counted once (as `total_usage` does)."""
        prompts: dict[int, int] = {}
        generated = 0
        for index, (prompt, completion) in self._usage_so_far.items():
            prompts.setdefault(index // self.choices_per_prompt, prompt)
            generated += completion
        prompt = sum(prompts.values())
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def final_chunks(self, c: Completion | Sequence[Completion], prompts: int = 1) -> list[dict[str, Any]]:
        """A chunk with finish_reason (and that choice's timings) per choice and, when asked
        for, the usage-only chunk."""
        completions = [c] if isinstance(c, Completion) else list(c)
        chunks = []
        for index, completion in enumerate(completions):
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason(completion)}
            if self.chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            u = completion.usage  # exact now: the finish chunk's running usage counts it
            self._usage_so_far[index] = (u.prompt_tokens + u.cached_tokens, u.completion_tokens)
            chunks.append(self._chunk([choice], timings=timings(completion)))
        if self.include_usage:
            chunks.append(self._chunk([], usage=total_usage(completions, prompts)))
        return chunks


def total_usage(completions: Sequence[Completion], prompts: int = 1) -> dict[str, Any]:
    """Usage of a response: each prompt counted once (from its first choice, as the other
    choices of a prompt read the same prompt), completion tokens of every choice."""
    per_prompt = max(1, len(completions) // max(1, prompts))
    firsts = completions[::per_prompt]
    prompt = sum(c.usage.prompt_tokens + c.usage.cached_tokens for c in firsts)
    cached = sum(c.usage.cached_tokens for c in firsts)
    generated = sum(c.usage.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
