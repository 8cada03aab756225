"""Protobuf helpers and API defaults that more than one service needs.

The gateway and the inference service both fill `common.v1` messages; what
they share lives here so the gateway never imports the inference package.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from llmsuite.runtime.errors import InvalidArgument

RequestT = TypeVar("RequestT", bound=Message)

# `SamplingParams.max_new_tokens` when the caller leaves it 0 (documented in common.proto).
DEFAULT_MAX_NEW_TOKENS = 16


def duration(seconds: float) -> duration_pb2.Duration:
    """A non-negative protobuf Duration from seconds (negative clock skew becomes 0)."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return d


async def opening_message(requests: AsyncIterator[RequestT], stream: str) -> RequestT | None:
    """The first message of a bidirectional stream whose `kind` oneof must open with `start`.

    None when the client half-closed without sending anything (the call then simply ends);
    INVALID_ARGUMENT `STREAM_NOT_STARTED` when the first message is anything else.
    """
    first = await anext(requests, None)
    if first is not None and first.WhichOneof("kind") != "start":
        raise InvalidArgument.for_field("start", f"the first {stream} message must be `start`",
                                        reason="STREAM_NOT_STARTED")
    return first
