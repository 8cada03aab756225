"""Text generation over the upstreams: ids from inference become text through
the tokenizer's DecodeStream, and text-level stop strings cut it.

`relay_turn` is shared by Generate, GenerateStream and every Chat turn, so
all three detokenize and stop identically: the concatenation of deltas
equals the unary text, never splits a character, and never contains text at
or past a stop string.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.stop_strings import StopStringMatcher
from llmsuite.gateway.upstreams import DecodeStreamClient
from llmsuite.gateway.v1 import gateway_pb2
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.errors import Unavailable
from llmsuite.runtime.messages import duration


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.PositionLogprobs]


@dataclass
class TurnOutcome:
    summary: gateway_pb2.GenerationSummary
    generated_ids: list[int] = field(default_factory=list)
    stopped_by_string: bool = False
    upstream_final: inference_pb2.GenerateFinal | None = None


async def relay_turn(call: grpc.aio.StreamStreamCall, first: inference_pb2.GenerateResponse | None,
                     detok: DecodeStreamClient, stop_strings: tuple[str, ...], *, started_at: float,
                     prompt_tokens: int) -> AsyncIterator[Delta | TurnOutcome]:
    """Relays one upstream turn (until its final message) as text deltas, then
    one TurnOutcome. On a stop string it sends Cancel upstream and waits for
    the turn's final message so usage and timings stay exact."""
    matcher = StopStringMatcher(stop_strings) if stop_strings else None
    generated: list[int] = []
    first_text_at: float | None = None
    matched: str | None = None
    message = first
    while True:
        if message is None:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError:
                if matched is None:
                    raise
                message = grpc.aio.EOF  # text is complete; the upstream ended as we cancelled it
        if message is grpc.aio.EOF and matched is not None:
            # The cancelled upstream turn ended without its final message: summarize what we counted.
            message = inference_pb2.GenerateResponse(final=inference_pb2.GenerateFinal(
                finish_reason=common_pb2.FINISH_REASON_CANCELLED,
                usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=len(generated))))
        if message is grpc.aio.EOF:
            raise Unavailable("the inference replica ended the stream without a final message",
                              reason="UPSTREAM_PROTOCOL_ERROR")
        if message.WhichOneof("kind") == "tokens":
            ids = list(message.tokens.token_ids)
            if matched is None:
                generated.extend(ids)
                text = await detok.push(ids)
                if matcher is not None:
                    scan = matcher.feed(text)
                    text = scan.emit
                    if scan.stopped:
                        matched = scan.matched
                        # The turn may already have ended upstream (stop in its last tokens).
                        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                            await call.write(inference_pb2.GenerateRequest(
                                cancel=inference_pb2.GenerateCancel(reason="stop string")))
                if text and first_text_at is None:
                    first_text_at = time.monotonic()
                yield Delta(text, ids, list(message.tokens.logprobs))
            message = None
            continue
        final = message.final
        if matched is None:
            tail = await detok.finish()
            if matcher is not None:
                scan = matcher.feed(tail)
                tail = scan.emit if scan.stopped else scan.emit + matcher.flush()
                matched = scan.matched if scan.stopped else None
            if tail:
                first_text_at = first_text_at or time.monotonic()
                yield Delta(tail, [], [])
        else:
            detok.cancel()
        yield TurnOutcome(_summary(final, matched, started_at, first_text_at), generated, matched is not None, final)
        return


def _summary(final: inference_pb2.GenerateFinal, matched: str | None, started_at: float,
             first_text_at: float | None) -> gateway_pb2.GenerationSummary:
    now = time.monotonic()
    timings = common_pb2.Timings()
    timings.CopyFrom(final.timings)
    timings.total_time.CopyFrom(duration(now - started_at))
    if first_text_at is not None:
        timings.time_to_first_token.CopyFrom(duration(first_text_at - started_at))
    summary = gateway_pb2.GenerationSummary(
        finish_reason=common_pb2.FINISH_REASON_STOP if matched is not None else final.finish_reason,
        usage=final.usage, timings=timings, matched_stop_string=matched or "")
    if matched is None and final.HasField("matched_stop_token_id"):
        summary.matched_stop_token_id = final.matched_stop_token_id
    return summary
