"""Tool calling in OpenAI's shapes: the `tools`, `tool_choice` and message fields a
request carries, what they become for the gateway's Chat, and the `tool_calls` of a
response (whole in a `chat.completion`, indexed deltas in a stream).

The gateway does the work (templates, grammar-forced calls, parsing the model's own
call format; see llmsuite.gateway.tool_calls). A streamed call arrives whole, once,
in one delta, so the deltas of a stream join to exactly the unary answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmsuite.client import Tool, ToolCall, ToolChoice


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # Accepted either way: forced calls are always held to the schema, as strict mode asks.
    strict: bool | None = None


class ToolParam(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Strict):
    name: str
    arguments: str


class ToolCallParam(_Strict):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"]
    function: CalledFunction


ToolChoiceParam = Literal["none", "auto", "required"] | NamedToolChoice
_TOOL_CHOICE_MODES = ("none", "auto", "required")


def parse_tool_choice(value: Any) -> ToolChoiceParam | None:
    """`tool_choice` as sent: one of the modes, or {"type": "function", "function": {"name": ...}}.
    (A plain validator, so that an error names `tool_choice` rather than a union member.)"""
    if value is None or value in _TOOL_CHOICE_MODES:
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict):
        try:
            return NamedToolChoice.model_validate(value)
        except ValidationError:
            pass
    raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


def sdk_tools(tools: Sequence[ToolParam] | None) -> list[Tool]:
    return [Tool(t.function.name, t.function.description or "", t.function.parameters) for t in tools or ()]


def sdk_tool_choice(choice: ToolChoiceParam | None) -> ToolChoice | str | None:
    if choice is None or isinstance(choice, str):
        return choice
    return ToolChoice.named(choice.function.name)


def sdk_tool_calls(calls: Sequence[ToolCallParam] | None) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in calls or ())


def renames(tool_count: int) -> dict[str, str]:
    """The gateway's names for the tool fields (after `start.` is dropped) as this API's."""
    names = {"tool_choice.function_name": "tool_choice.function.name"}
    for index in range(tool_count):
        for name in ("name", "parameters", "description"):
            names[f"tools[{index}].{name}"] = f"tools[{index}].function.{name}"
    return names


def _call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def assistant_message(text: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """A chat.completion's message: content null when the reply only calls tools, as OpenAI's."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = [_call(call) for call in calls]
    return message


class StreamedToolCalls:
    """Numbers the calls of one streamed reply (`index`, as OpenAI's deltas carry it)."""

    def __init__(self) -> None:
        self._sent = 0

    def delta(self, text: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text} if text or not calls else {}
        if calls:
            delta["tool_calls"] = [{"index": self._sent + offset, **_call(call)} for offset, call in enumerate(calls)]
            self._sent += len(calls)
        return delta

