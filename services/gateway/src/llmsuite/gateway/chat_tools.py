"""The tools of one Chat stream: what the chat template is given, and how each reply
is constrained (tool_choice `required` or a named function) and read for calls
(`auto`, and forced calls too, so both come out the same way).

The formats, grammars and the parser are in tool_calls.py; this module applies them
to a conversation and speaks protos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.local_tokenizers import LocalTokenizer
from llmsuite.gateway.tool_calls import (
    FORMATS,
    CallFormat,
    FunctionSpec,
    Parsed,
    ToolCallParser,
    detect_format,
    forced_call_grammar,
    function_specs,
)
from llmsuite.gateway.v1 import gateway_pb2
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument

_MODE = common_pb2.ToolChoice.Mode
_TOOL_FINISHES = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_GRAMMAR)


@dataclass
class ReplyTools:
    """Tool handling for one reply. `parser` is None under tool_choice none."""

    tokenizer: LocalTokenizer
    fmt: CallFormat | None
    parser: ToolCallParser | None
    grammar: str | None  # the constraint forcing a call, if any
    calls: list[common_pb2.ToolCall] = field(default_factory=list)

    def keep_ids(self) -> frozenset[int]:
        """Special tokens the reply's text must keep for the parser to see them."""
        return self.tokenizer.special_ids(self.fmt.markers) if self.fmt is not None else frozenset()

    def constrained(self, sampling: common_pb2.SamplingParams, field_path: str) -> common_pb2.SamplingParams:
        """The reply's sampling with the grammar that forces a call, if any."""
        if self.grammar is None:
            return sampling
        if sampling.HasField("constraint"):
            raise InvalidArgument.for_field(
                field_path, "a required or named tool_choice constrains the reply to a call; it cannot be combined "
                "with sampling.constraint", reason="TOOL_CHOICE_CONFLICT")
        forced = common_pb2.SamplingParams()
        forced.CopyFrom(sampling)
        forced.constraint.grammar = self.grammar
        return forced

    def feed(self, text: str) -> tuple[str, list[common_pb2.ToolCall]]:
        if self.parser is None:
            return text, []
        return self._released(self.parser.feed(text))

    def finish(self) -> tuple[str, list[common_pb2.ToolCall]]:
        if self.parser is None:
            return "", []
        return self._released(self.parser.finish())

    def finish_reason(self, reason: common_pb2.FinishReason) -> common_pb2.FinishReason:
        """A reply that made calls and ended normally ended to call them."""
        return common_pb2.FINISH_REASON_TOOL_CALLS if self.calls and reason in _TOOL_FINISHES else reason

    def _released(self, piece: Parsed) -> tuple[str, list[common_pb2.ToolCall]]:
        assert self.fmt is not None
        calls = [common_pb2.ToolCall(id=self.fmt.new_call_id(), name=c.name, arguments=c.arguments)
                 for c in piece.calls]
        self.calls.extend(calls)
        return piece.content, calls


class ChatTools:
    """Declared once, at the start of a Chat; each reply gets its own ReplyTools."""

    def __init__(self, tools: Sequence[common_pb2.Tool], specs: list[FunctionSpec], fmt: CallFormat | None,
                 tokenizer: LocalTokenizer, choice: common_pb2.ToolChoice | None, model_name: str) -> None:
        self.tools = list(tools)
        self._model_name = model_name
        self._specs = specs
        self._fmt = fmt
        self._tokenizer = tokenizer
        self._choice = choice

    @classmethod
    def from_start(cls, start: gateway_pb2.ChatStart, model_name: str, tokenizer: LocalTokenizer,
                   configured_formats: Mapping[str, str]) -> ChatTools | None:
        """None when the chat declared no tools (a tool_choice other than none is then refused)."""
        choice = start.tool_choice if start.HasField("tool_choice") else None
        if not start.tools:
            refuse_choice_without_tools(choice, "start.tool_choice")
            return None
        specs = function_specs([(t.name, t.parameters) for t in start.tools])
        configured = configured_formats.get(model_name)
        fmt = FORMATS[configured] if configured else detect_format(tokenizer.chat_template)
        tools = cls(start.tools, specs, fmt, tokenizer, choice, model_name)
        if choice is not None:
            tools._check_choice(choice, "start.tool_choice")
        return tools

    def reply(self, choice: common_pb2.ToolChoice | None, field_path: str) -> ReplyTools:
        """The tools of the next reply; `choice` overrides the start's for it."""
        if choice is not None:
            self._check_choice(choice, field_path)
        else:
            choice = self._choice
        mode = _mode(choice) if choice is not None else _MODE.MODE_AUTO
        if mode == _MODE.MODE_NONE:
            return ReplyTools(self._tokenizer, None, None, None)
        if self._fmt is None:  # tool_choice none alone needs no format: the template renders the tools
            raise FailedPrecondition(
                f"model {self._model_name!r}: its chat template shows no tool-call format the gateway knows; start "
                f"the gateway with --tool-call-parser {self._model_name}=FORMAT ({', '.join(sorted(FORMATS))}), or "
                "send tool_choice none", reason="TOOL_CALL_FORMAT_UNKNOWN", metadata={"model": self._model_name})
        forced: list[FunctionSpec] = []
        if choice is not None and choice.WhichOneof("kind") == "function_name":
            forced = [s for s in self._specs if s.name == choice.function_name]
        elif mode == _MODE.MODE_REQUIRED:
            forced = self._specs
        grammar = None
        if forced:
            marker_ids = self._tokenizer.special_ids([self._fmt.opening])
            grammar = forced_call_grammar(self._fmt, forced, marker_token_id=next(iter(marker_ids), None))
        return ReplyTools(self._tokenizer, self._fmt, ToolCallParser(self._fmt, [s.name for s in self._specs]),
                          grammar)

    def _check_choice(self, choice: common_pb2.ToolChoice, field_path: str) -> None:
        if choice.WhichOneof("kind") == "function_name" and choice.function_name not in {s.name for s in self._specs}:
            raise InvalidArgument.for_field(f"{field_path}.function_name",
                                            f"{choice.function_name!r} is not one of the declared tools",
                                            reason="INVALID_TOOL")


def refuse_choice_without_tools(choice: common_pb2.ToolChoice | None, field_path: str) -> None:
    """A chat without tools may say none or auto, but cannot ask for a call."""
    if choice is not None and _mode(choice) == _MODE.MODE_REQUIRED:
        raise InvalidArgument.for_field(field_path, "asks for a tool call, but start.tools declares no tools",
                                        reason="INVALID_TOOL")


def _mode(choice: common_pb2.ToolChoice) -> int:
    if choice.WhichOneof("kind") == "function_name":
        return _MODE.MODE_REQUIRED
    return choice.mode
