"""SDK results as OpenAI response objects (plain dicts, JSON-ready).

The one place where a `Completion` or a `TextChunk` becomes a `chat.completion`,
`chat.completion.chunk` or `text_completion` object.

Finish reasons: `stop` and `length` map to themselves. A generation cut by
the request deadline (`time_limit`) or by the model's context (`context_full`)
reports `length`: the text is valid but was cut by a limit. A generation the
server cancelled (`cancelled`; the caller's own disconnects never reach a
response) is not a normal ending in OpenAI's vocabulary, so it becomes an
error (see `ServerCancelled`).

Token strings in logprobs are `token_id:<id>` (vLLM's
`--return-tokens-as-token-ids` form), because the gateway returns ids, not
token texts; `bytes` is null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmsuite.client import Completion, PositionLogprobs, TextChunk, TokenLogprob, Usage
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


def usage(u: Usage) -> dict[str, Any]:
    # OpenAI counts cached tokens inside prompt_tokens; the gateway counts them apart.
    prompt = u.prompt_tokens + u.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.completion_tokens,
        "total_tokens": prompt + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def token_text(token_id: int) -> str:
    return f"token_id:{token_id}"


def _chat_token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": token_text(t.token_id), "logprob": t.logprob, "bytes": None}


def chat_logprobs(positions: Sequence[PositionLogprobs]) -> dict[str, Any]:
    return {"content": [{**_chat_token(p.chosen), "top_logprobs": [_chat_token(t) for t in p.top]}
                        for p in positions],
            "refusal": None}


def completion_logprobs(positions: Sequence[PositionLogprobs]) -> dict[str, Any]:
    return {
        "tokens": [token_text(p.chosen.token_id) for p in positions],
        "token_logprobs": [p.chosen.logprob for p in positions],
        "top_logprobs": [{token_text(t.token_id): t.logprob for t in p.top} for p in positions],
        "text_offset": None,  # offsets need token texts, which the gateway does not return
    }


class ResponseBuilder:
    """Builds every object of one response; `id`, `created` and `model` are
    the same in each chunk of a stream, as OpenAI's are."""

    def __init__(self, *, chat: bool, request_id: str, created: int, model: str, logprobs: bool,
                 include_usage: bool = False) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created = created
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._tool_calls = tools.StreamedToolCalls()

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def _logprobs(self, positions: Sequence[PositionLogprobs]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(positions) if self.chat else completion_logprobs(positions)

    # -- whole responses -----------------------------------------------------------------------

    def completion(self, c: Completion) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(c.logprobs), "finish_reason": finish_reason(c)}
        if self.chat:
            choice["message"] = tools.assistant_message(c.text, c.tool_calls)
            return self._envelope("chat.completion", [choice], usage=usage(c.usage))
        choice["text"] = c.text
        return self._envelope("text_completion", [choice], usage=usage(c.usage))

    # -- stream chunks ---------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        if self.include_usage:
            extra.setdefault("usage", None)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choices, **extra)

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if not self.chat:
            return None
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def text_chunk(self, chunk: TextChunk) -> dict[str, Any] | None:
        """A delta; None when there is nothing to show (held-back text, no logprobs asked)."""
        if not chunk.text and not chunk.tool_calls and not (self.logprobs and chunk.logprobs):
            return None
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(chunk.logprobs), "finish_reason": None}
        if self.chat:
            choice["delta"] = self._tool_calls.delta(chunk.text, chunk.tool_calls)
        else:
            choice["text"] = chunk.text
        return self._chunk([choice])

    def final_chunks(self, c: Completion) -> list[dict[str, Any]]:
        """The chunk with finish_reason and, when asked for, the usage-only chunk."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(c)}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        chunks = [self._chunk([choice])]
        if self.include_usage:
            chunks.append(self._chunk([], usage=usage(c.usage)))
        return chunks
