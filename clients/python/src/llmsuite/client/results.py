"""What the SDK returns: small frozen dataclasses instead of raw protos.

Where a result comes from one proto message, that message is kept on `.raw`
(excluded from equality and repr) for fields the dataclass does not surface.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict

from google.protobuf.message import Message


@dataclass(frozen=True)
class Usage:
    """Token accounting; `cached_tokens` counts prompt tokens whose KV cache a
    chat turn reused instead of recomputing."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Latencies in seconds as the gateway saw them."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    time_to_first_token_s: float = 0.0
    mean_inter_token_latency_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability; `token` (its text alone) and `token_bytes` (its exact
    bytes) come from the gateway's tokenizer."""

    token_id: int
    logprob: float
    token: str = ""
    token_bytes: bytes = b""


@dataclass(frozen=True)
class PositionLogprobs:
    """The chosen token of one generated position and, when `top_logprobs` was
    asked for, the most likely alternatives (most likely first)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made; `arguments` is a JSON object as JSON text."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `parameters` is the JSON Schema of its
    arguments (a dict, or its JSON text; None: no arguments)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | str | None = None


@dataclass(frozen=True)
class ToolChoice:
    """Whether a chat reply may call tools: `mode` "auto" (the model decides),
    "none" or "required" (exactly one call); or `function`, exactly one call to
    that function. Calls forced by "required" or `function` are constrained by
    grammar, so they always parse and fit the function's parameters."""

    mode: str = "auto"
    function: str = ""

    @classmethod
    def named(cls, function: str) -> ToolChoice:
        return cls(mode="required", function=function)


@dataclass(frozen=True)
class TextChunk:
    """One streamed piece of text (whole characters only). `token_ids` and
    `logprobs` are filled when requested and may run ahead of the text.
    `tool_calls`: calls recognised in a chat reply with tools, each whole and
    sent once (text that may be part of a call is held back until it is known).
    `prompt_tokens` and `completion_tokens` are the usage so far: the prompt's
    length (for a chat reply, the whole rendered conversation; cached tokens
    included) and the tokens generated until this chunk."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[PositionLogprobs, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """A finished generation or chat reply.

    `finish_reason` is lowercase: "length", "stop", "cancelled", "time_limit",
    "context_full", "grammar" (a `constraint` was complete) or "tool_calls" (a chat
    reply that called tools, in `tool_calls`). `matched_stop` is the stop string (str) or the stop /
    end-of-sequence token id (int) that ended the text, else None. `turn` is
    the reply's index in a chat session (0 for the first and for generate).
    """

    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[PositionLogprobs, ...] = ()
    matched_stop: str | int | None = None
    turn: int = 0
    raw: Message | None = field(default=None, repr=False, compare=False)
    tool_calls: tuple[ToolCall, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (without `.raw`)."""
        out = asdict(replace(self, raw=None))
        del out["raw"]
        return out


@dataclass(frozen=True)
class ChatMessage:
    """One conversation message; the model's chat template decides which roles
    it accepts (usually "system", "user", "assistant")."""

    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str = ""  # a "tool" message: the call it answers


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    context_length: int
    has_chat_template: bool
    execution_provider: str
    layout: str = ""  # "optimum" or "onnxruntime-genai" (empty from gateways that predate it)
    precision: str = ""  # of the weights: fp32, fp16, bf16, int8, int4
    quantization: str = ""  # "none" for float weights
    kind: str = "generation"  # or "embedding": which of generate/chat or embed it serves
    embedding_dimensions: int = 0  # embedding models: the vector length
    kv_cache_slots: int = 0  # KV slots of the replica's slot buffer; 0 when it has none (padded KV path)
    kv_cache_slot_tokens: int = 0  # tokens each slot holds; 0 without slots
    raw: Message | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Encoding:
    """Token ids of one text; `offsets` holds (start, end) code-point spans
    when they were requested (special tokens have empty spans)."""

    token_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...] = ()
    truncated: bool = False


@dataclass(frozen=True)
class Embeddings:
    """One vector per input, in order; `usage.prompt_tokens` counts the tokens embedded."""

    vectors: tuple[tuple[float, ...], ...]
    model: str
    usage: Usage
    request_id: str | None = None
    raw: Message | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TokenCounts:
    counts: tuple[int, ...]
    total: int
    request_id: str | None = None


@dataclass(frozen=True)
class Constraint:
    """What the output must match (constrained decoding, enforced by the engine).

    Build one with a class method: `Constraint.json_schema({...})`, `.json_object()`,
    `.regex(...)`, `.grammar(...)` (Lark or GBNF) or `.choice([...])`, and pass it as the
    `constraint` sampling option. A reply that completes its grammar ends with
    finish_reason "grammar" (or "stop" when the model ended it where the grammar allowed).
    """

    kind: str
    text: str = ""
    choices: tuple[str, ...] = ()

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """One JSON value valid against `schema` (a dict, or its JSON text)."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text that the regular expression matches as a whole (Rust regex syntax)."""
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, grammar: str) -> Constraint:
        """Text of a context-free grammar: llguidance's Lark dialect, or GBNF."""
        return cls("grammar", grammar)

    @classmethod
    def choice(cls, options: Iterable[str]) -> Constraint:
        """Exactly one of `options`."""
        return cls("choice", choices=tuple(options))


class SamplingOptions(TypedDict, total=False):
    """Keyword arguments accepted wherever sampling can be set (see
    `llmsuite.common.v1.SamplingParams` for ranges and defaults; unset or None
    fields use the server's defaults). A sampling option is added here once:
    chat, send, generate and generate_stream all take what this lists."""

    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int | None
    constraint: Constraint | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: Mapping[int, float] | None
    min_p: float | None
    min_tokens: int | None
    include_stop_str_in_output: bool


class GenerateOptions(SamplingOptions, total=False):
    """Keyword arguments of generate and generate_stream (sync and asyncio): the
    sampling options, then what the request carries besides (`model` defaults
    to "tiny"; the flags to False; `add_special_tokens` None means the server's
    default, true), then the call's own `request_id` and `timeout_s` (None: the
    client's default deadline)."""

    model: str
    add_special_tokens: bool | None
    truncate_prompt: bool
    keep_special_tokens: bool
    return_token_ids: bool
    request_id: str | None
    timeout_s: float | None
