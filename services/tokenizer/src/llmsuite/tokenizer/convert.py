"""Protobuf <-> domain values for the tokenizer service, in one place.

Building a response is per-token Python work (a million offsets are a million
CharSpan messages), so the servicer runs these on the work queue's threads, never
on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from llmsuite.common.v1 import common_pb2
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.tokenizer.chat_template import ChatMessage, ToolCall, tool_definitions
from llmsuite.tokenizer.engine import EncodedText, LoadedTokenizer, TruncationSide
from llmsuite.tokenizer.v1 import tokenizer_pb2


def truncation(request: tokenizer_pb2.EncodeRequest) -> tuple[int | None, TruncationSide]:
    if not request.HasField("truncation") or request.truncation.max_length == 0:
        return None, "right"
    side: TruncationSide = "left" if request.truncation.side == common_pb2.TRUNCATION_SIDE_LEFT else "right"
    return request.truncation.max_length, side


def add_special_tokens(request: tokenizer_pb2.EncodeRequest | tokenizer_pb2.CountTokensRequest) -> bool:
    return request.add_special_tokens if request.HasField("add_special_tokens") else True


def chat_messages(messages: Sequence[common_pb2.ChatMessage]) -> list[ChatMessage]:
    return [ChatMessage(role=m.role, content=m.content, name=m.name or None,
                        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                        tool_call_id=m.tool_call_id or None) for m in messages]


def template_variables(request: tokenizer_pb2.ApplyChatTemplateRequest) -> dict[str, Any] | None:
    """The Struct as plain Python, plus `tools` from the request's tools. Unlike
    json_format this never raises (a NaN stays a float): judging the values is the
    engine's job, with the field path in the error."""
    variables = _struct(request.template_variables) if request.HasField("template_variables") else None
    if request.tools:
        if variables is not None and "tools" in variables:
            raise InvalidArgument.for_field("template_variables.tools", "tools are sent once: as `tools` or as "
                                            "this variable, not both")
        variables = {**(variables or {}),
                     "tools": tool_definitions([(t.name, t.description, t.parameters) for t in request.tools])}
    return variables


def _struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        # JSON has one number type; templates that print an integer expect no ".0".
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def encode_response(encoded: Sequence[EncodedText]) -> tokenizer_pb2.EncodeResponse:
    response = tokenizer_pb2.EncodeResponse()
    for item in encoded:
        encoding = response.encodings.add(token_ids=item.ids, truncated=item.truncated)
        for start, end in item.offsets or ():
            encoding.offsets.add(start=start, end=end)
    return response


def info_proto(tok: LoadedTokenizer) -> tokenizer_pb2.TokenizerInfo:
    sp = tok.special_tokens

    def special(content: str | None, token_id: int | None) -> tokenizer_pb2.SpecialToken | None:
        if content is None or token_id is None:
            return None
        return tokenizer_pb2.SpecialToken(content=content, id=token_id)

    loaded_at = timestamp_pb2.Timestamp()
    loaded_at.FromSeconds(int(tok.loaded_at))
    return tokenizer_pb2.TokenizerInfo(
        name=tok.name,
        vocab_size=tok.vocab_size,
        special_tokens=tokenizer_pb2.SpecialTokens(
            bos=special(sp.bos, sp.bos_id),
            eos=special(sp.eos, sp.eos_id),
            pad=special(sp.pad, sp.pad_id),
            unk=special(sp.unk, sp.unk_id),
            additional=[tokenizer_pb2.SpecialToken(content=c, id=i) for c, i in sp.additional_with_ids()],
        ),
        model_max_length=tok.model_max_length or 0,
        has_chat_template=tok.chat_template is not None,
        content_hash=tok.content_hash,
        directory=str(tok.directory),
        loaded_at=loaded_at,
    )
