"""The one place where SDK values and gateway protos are converted, shared by
the sync and the asyncio clients."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from llmsuite.client.errors import FieldViolation, InvalidRequest
from llmsuite.client.results import (
    ChatMessage,
    Completion,
    Constraint,
    Embeddings,
    Encoding,
    GenerateOptions,
    ModelInfo,
    PositionLogprobs,
    SamplingOptions,
    TextChunk,
    Timings,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2

SAMPLING_OPTIONS = SamplingOptions.__optional_keys__
DEFAULT_MODEL = "tiny"
_REPEATED = {"stop_strings", "stop_token_ids"}


def sampling_params(options: Mapping[str, Any]) -> common_pb2.SamplingParams:
    """SamplingParams from keyword options; None values stay unset so the
    server's documented defaults apply. Values protobuf cannot hold (a
    negative count, a string for a float) raise InvalidRequest naming the
    field, exactly like the server's own validation would."""
    unknown = set(options) - SAMPLING_OPTIONS
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    params = common_pb2.SamplingParams()
    for name, value in options.items():
        if value is None:
            continue
        field = "stop_strings" if name == "stop" else name
        try:
            if field == "constraint":
                params.constraint.CopyFrom(constraint_proto(value))
            elif field == "logit_bias":
                params.logit_bias.update({int(token_id): float(bias) for token_id, bias in value.items()})
            elif field in _REPEATED:
                getattr(params, field).extend([value] if isinstance(value, str | int) else value)
            else:
                setattr(params, field, value)
        except (TypeError, ValueError) as exc:
            path = f"sampling.{field}"
            raise InvalidRequest(f"{path}: {exc}", reason="INVALID_FIELD",
                                 field_violations=[FieldViolation(path, str(exc))]) from None
    return params


def constraint_proto(constraint: Constraint) -> common_pb2.Constraint:
    if not isinstance(constraint, Constraint):
        raise TypeError(f"expected a llmsuite.client.Constraint, got {type(constraint).__name__}")
    msg = common_pb2.Constraint()
    if constraint.kind == "choice":
        msg.choice.options.extend(constraint.choices)
    elif constraint.kind == "json_object":
        msg.json_object.SetInParent()
    elif constraint.kind in ("json_schema", "regex", "grammar"):
        setattr(msg, constraint.kind, constraint.text)
    else:
        raise ValueError(f"unknown constraint kind {constraint.kind!r}")
    return msg


def chat_messages(messages: Iterable[ChatMessage | Mapping[str, str]]) -> list[ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m, ChatMessage):
            out.append(m)
        else:
            out.append(ChatMessage(role=m["role"], content=m.get("content", ""), name=m.get("name", ""),
                                   tool_call_id=m.get("tool_call_id", "")))
    return out


def message_protos(messages: Sequence[ChatMessage]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m.role, content=m.content, name=m.name, tool_call_id=m.tool_call_id,
                                   tool_calls=[tool_call_proto(c) for c in m.tool_calls]) for m in messages]


def tool_call_proto(call: ToolCall) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def tool_calls(calls: Iterable[common_pb2.ToolCall]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.name, c.arguments) for c in calls)


def tool_protos(tools: Iterable[Tool]) -> list[common_pb2.Tool]:
    out = []
    for tool in tools:
        parameters = tool.parameters
        text = "" if parameters is None else parameters if isinstance(parameters, str) else json.dumps(parameters)
        out.append(common_pb2.Tool(name=tool.name, description=tool.description, parameters=text))
    return out


@dataclass(frozen=True)
class ChatToolOptions:
    """A chat session's tools and default tool choice, as protos."""

    tools: tuple[common_pb2.Tool, ...] = ()
    tool_choice: common_pb2.ToolChoice | None = None

    def start(self, start: gateway_pb2.ChatStart, choice: ToolChoice | str | None) -> None:
        """Puts the tools, and this send's choice or the session's, on the opening message."""
        start.tools.extend(self.tools)
        chosen = tool_choice_proto(choice) if choice is not None else self.tool_choice
        if chosen is not None:
            start.tool_choice.CopyFrom(chosen)


def chat_tool_options(tools: Sequence[Tool], tool_choice: ToolChoice | str | None) -> ChatToolOptions:
    return ChatToolOptions(tuple(tool_protos(tools)),
                           tool_choice_proto(tool_choice) if tool_choice is not None else None)


def chat_turn(message: ChatMessage, choice: ToolChoice | str | None) -> gateway_pb2.ChatTurn:
    turn = gateway_pb2.ChatTurn(messages=message_protos([message]))
    if choice is not None:
        turn.tool_choice.CopyFrom(tool_choice_proto(choice))
    return turn


_TOOL_MODES = {"auto": common_pb2.ToolChoice.MODE_AUTO, "none": common_pb2.ToolChoice.MODE_NONE,
               "required": common_pb2.ToolChoice.MODE_REQUIRED}


def tool_choice_proto(choice: ToolChoice | str) -> common_pb2.ToolChoice:
    """A ToolChoice, or one of its modes by name ("auto", "none", "required")."""
    if isinstance(choice, str):
        choice = ToolChoice(mode=choice)
    if choice.function:
        return common_pb2.ToolChoice(function_name=choice.function)
    if choice.mode not in _TOOL_MODES:
        raise ValueError(f"tool_choice mode must be one of {', '.join(_TOOL_MODES)}, not {choice.mode!r}")
    return common_pb2.ToolChoice(mode=_TOOL_MODES[choice.mode])


def finish_reason_name(value: int) -> str:
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def timings(t: common_pb2.Timings) -> Timings:
    return Timings(
        queue_s=_seconds(t.queue_time),
        prefill_s=_seconds(t.prefill_time),
        time_to_first_token_s=_seconds(t.time_to_first_token),
        mean_inter_token_latency_s=_seconds(t.mean_inter_token_latency),
        total_s=_seconds(t.total_time),
    )


def usage(u: common_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens)


def logprobs(positions: Iterable[common_pb2.PositionLogprobs]) -> tuple[PositionLogprobs, ...]:
    return tuple(
        PositionLogprobs(
            chosen=TokenLogprob(p.chosen.token_id, p.chosen.logprob, p.chosen.token, p.chosen.token_bytes),
            top=tuple(TokenLogprob(t.token_id, t.logprob, t.token, t.token_bytes) for t in p.top),
        )
        for p in positions
    )


def matched_stop(summary: gateway_pb2.GenerationSummary) -> str | int | None:
    if summary.matched_stop_string:
        return summary.matched_stop_string
    if summary.HasField("matched_stop_token_id"):
        return summary.matched_stop_token_id
    return None


def completion(response: gateway_pb2.GenerateResponse, request_id: str | None) -> Completion:
    return Completion(
        text=response.text,
        finish_reason=finish_reason_name(response.summary.finish_reason),
        usage=usage(response.summary.usage),
        timings=timings(response.summary.timings),
        request_id=response.request_id or request_id or "",
        token_ids=tuple(response.token_ids),
        logprobs=logprobs(response.logprobs),
        matched_stop=matched_stop(response.summary),
        raw=response,
    )


class StreamAccumulator:
    """Collects the deltas of one streamed generation (or chat reply) and
    turns its final summary into a Completion whose text is their concatenation."""

    def __init__(self, turn: int = 0) -> None:
        self.turn = turn
        self.request_id: str | None = None
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[PositionLogprobs] = []
        self._tool_calls: list[ToolCall] = []

    def delta(self, delta: gateway_pb2.TextDelta, request_id: str) -> TextChunk:
        self.request_id = request_id or self.request_id
        chunk = TextChunk(text=delta.text, token_ids=tuple(delta.token_ids), logprobs=logprobs(delta.logprobs),
                          tool_calls=tool_calls(delta.tool_calls), prompt_tokens=delta.prompt_tokens,
                          completion_tokens=delta.completion_tokens)
        self._text.append(chunk.text)
        self._token_ids.extend(chunk.token_ids)
        self._logprobs.extend(chunk.logprobs)
        self._tool_calls.extend(chunk.tool_calls)
        return chunk

    def finish(self, summary: gateway_pb2.GenerationSummary, request_id: str, raw: Any) -> Completion:
        self.request_id = request_id or self.request_id
        return Completion(
            text="".join(self._text),
            finish_reason=finish_reason_name(summary.finish_reason),
            usage=usage(summary.usage),
            timings=timings(summary.timings),
            request_id=self.request_id or "",
            token_ids=tuple(self._token_ids),
            logprobs=tuple(self._logprobs),
            matched_stop=matched_stop(summary),
            turn=self.turn,
            raw=raw,
            tool_calls=tuple(self._tool_calls),
        )


def model_info(m: gateway_pb2.ModelSummary) -> ModelInfo:
    return ModelInfo(name=m.name, architecture=m.architecture, context_length=m.context_length,
                     has_chat_template=m.has_chat_template, execution_provider=m.execution_provider,
                     layout=m.layout, precision=m.precision, quantization=m.quantization,
                     kind="embedding" if m.kind == common_pb2.MODEL_KIND_EMBEDDING else "generation",
                     embedding_dimensions=m.embedding_dimensions, kv_cache_slots=m.kv_cache_slots,
                     kv_cache_slot_tokens=m.kv_cache_slot_tokens, raw=m)


EmbedInputs = str | Iterable[str] | Iterable[Sequence[int]] | Sequence[int]


def embed_request(inputs: EmbedInputs, *, model: str, dimensions: int | None, truncate: bool,
                  add_special_tokens: bool | None) -> gateway_pb2.EmbedRequest:
    """Texts (a string is one text) or token ids (a list of ints is one input, a list of lists many)."""
    request = gateway_pb2.EmbedRequest(model=model, dimensions=dimensions or 0, truncate=truncate)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    if isinstance(inputs, str):
        request.texts.append(inputs)
        return request
    items: list[Any] = list(inputs)
    if items and all(isinstance(i, int) for i in items):
        request.token_ids.append(common_pb2.TokenIds(token_ids=items))
    elif all(isinstance(i, str) for i in items):
        request.texts.extend(items)
    else:
        request.token_ids.extend(common_pb2.TokenIds(token_ids=list(i)) for i in items)
    return request


def embeddings(response: gateway_pb2.EmbedResponse) -> Embeddings:
    return Embeddings(vectors=tuple(tuple(e.values) for e in response.embeddings), model=response.model,
                      usage=usage(response.usage), request_id=response.request_id or None, raw=response)


def encoding(e: common_pb2.Encoding) -> Encoding:
    return Encoding(token_ids=tuple(e.token_ids), offsets=tuple((o.start, o.end) for o in e.offsets),
                    truncated=e.truncated)


def text_list(texts: str | Iterable[str]) -> list[str]:
    """A lone string means one text, not a sequence of characters."""
    return [texts] if isinstance(texts, str) else list(texts)


def generation_request(cls: type[Any], prompt: str | Sequence[int], options: GenerateOptions) -> Any:
    """A GenerateRequest or GenerateStreamRequest (they share their fields) from
    generate's keyword options; `request_id` and `timeout_s` belong to the call. A prompt
    that is not a string is token ids."""
    unknown = set(options) - GenerateOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    sampling = {name: value for name, value in options.items() if name in SAMPLING_OPTIONS}
    text, ids = (prompt, ()) if isinstance(prompt, str) else ("", prompt)
    request = cls(model=options.get("model", DEFAULT_MODEL), prompt=text, prompt_token_ids=ids,
                  sampling=sampling_params(sampling),
                  truncate_prompt=options.get("truncate_prompt", False),
                  keep_special_tokens=options.get("keep_special_tokens", False),
                  return_token_ids=options.get("return_token_ids", False))
    add_special_tokens = options.get("add_special_tokens")
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def chat_rendering(template_kwargs: Mapping[str, Any] | None, add_generation_prompt: bool | None,
                   continue_final_message: bool, keep_special_tokens: bool) -> dict[str, Any]:
    """ChatStart's fields for how the conversation is rendered and the replies decoded; unset
    ones are left out so the gateway's defaults apply."""
    fields: dict[str, Any] = {"continue_final_message": continue_final_message,
                              "keep_special_tokens": keep_special_tokens}
    if add_generation_prompt is not None:
        fields["add_generation_prompt"] = add_generation_prompt
    if template_kwargs is not None:
        kwargs = struct_pb2.Struct()
        kwargs.update(dict(template_kwargs))
        fields["chat_template_kwargs"] = kwargs
    return fields
