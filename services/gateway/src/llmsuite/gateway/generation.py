"""Text generation over the upstreams: ids from an inference replica become
text through the gateway's local detokenizer (see local_tokenizers.py), and
text-level stop strings cut it.

`relay_turn` is shared by Generate, GenerateStream and every Chat turn, so
all three detokenize and stop identically: the concatenation of deltas
equals the unary text, never splits a character, and never contains text at
or past a stop string.

Two things keep it cheap and honest under load and at a deadline:

- Read-ahead: a task reads the replica's stream while the caller is being
  written to; every message that arrived meanwhile is relayed as ONE delta
  (tokens coalesce when the caller, or the gateway, is the slower side).
- Deadline: the replica gets the request's deadline minus twice a margin and
  is expected to end with a TIME_LIMIT final; if it has not by the deadline
  minus one margin, the gateway ends the turn itself with a TIME_LIMIT final
  and the text produced so far, early enough for it to reach the caller.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway import conversions as conv
from llmsuite.gateway.stop_strings import StopStringMatcher
from llmsuite.gateway.turns import Delta, TurnOutcome
from llmsuite.gateway.upstream_errors import ended_early
from llmsuite.gateway.upstreams import InferenceStream
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.detokenizer import IncrementalDetokenizer
from llmsuite.runtime.errors import DeadlineExceeded, LlmsuiteError

READ_AHEAD_MESSAGES = 64  # beyond this the replica's stream waits (HTTP/2 flow control)


@dataclass(frozen=True)
class Deadline:
    """A request's deadline, split so that its TIME_LIMIT final arrives in time."""

    final_at: float | None  # event-loop time by which the gateway sends its own final
    upstream_timeout_s: float | None  # the deadline the replica gets, from now

    @classmethod
    def split(cls, remaining_s: float | None, margin_s: float) -> Deadline:
        """`margin_s` is capped at a tenth of the time left, so short deadlines keep most of it."""
        if remaining_s is None:
            return cls(None, None)
        margin = min(margin_s, remaining_s / 10)
        return cls(asyncio.get_running_loop().time() + remaining_s - margin, max(0.0, remaining_s - 2 * margin))


class _Expired(Exception):
    """The gateway's own time for this turn is up."""


class _ReadAhead:
    """Reads one turn of a replica's stream ahead of the relay, up to its final."""

    def __init__(self, stream: InferenceStream, final_at: float | None) -> None:
        self._stream = stream
        self._items: collections.deque[inference_pb2.GenerateResponse | LlmsuiteError | None] = collections.deque()
        self._arrived = asyncio.Event()
        self._drained = asyncio.Event()
        self._expired = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(final_at, self._expire) if final_at is not None else None
        self._task = loop.create_task(self._pump())

    def _expire(self) -> None:
        self._expired = True
        self._arrived.set()

    async def _pump(self) -> None:
        while True:
            try:
                message = await self._stream.read()
            except LlmsuiteError as exc:
                self._push(exc)
                return
            self._push(message)
            if message is None or message.WhichOneof("kind") == "final":
                return
            while len(self._items) >= READ_AHEAD_MESSAGES:
                self._drained.clear()
                await self._drained.wait()

    def _push(self, item: inference_pb2.GenerateResponse | LlmsuiteError | None) -> None:
        self._items.append(item)
        self._arrived.set()

    async def take(self) -> list[inference_pb2.GenerateResponse | LlmsuiteError | None]:
        """Everything that has arrived (at least one item); _Expired once time is up."""
        while not self._items and not self._expired:
            self._arrived.clear()
            await self._arrived.wait()
        if self._expired:
            raise _Expired
        items = list(self._items)
        self._items.clear()
        self._drained.set()
        return items

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._task.cancel()


# A token id's text and bytes (LocalTokenizer.token_piece), written into relayed logprobs.
TokenPiece = Callable[[int], tuple[str, bytes]]


def describe_logprobs(positions: list[common_pb2.PositionLogprobs], token_piece: TokenPiece) -> None:
    """Fills each entry's `token` and `token_bytes`: the replica sends ids only."""
    for position in positions:
        for entry in (position.chosen, *position.top):
            entry.token, entry.token_bytes = token_piece(entry.token_id)


async def relay_turn(stream: InferenceStream, detok: IncrementalDetokenizer, stop_strings: tuple[str, ...], *,
                     started_at: float, prompt_tokens: int, deadline: Deadline, token_piece: TokenPiece | None = None,
                     include_stop_string: bool = False, prompt_length: int | None = None
                     ) -> AsyncIterator[Delta | TurnOutcome]:
    """Relays one upstream turn (until its final message) as text deltas, then
    one TurnOutcome. On a stop string it sends Cancel upstream and waits for
    the turn's final message so usage and timings stay exact; the text ends
    before it, or with it when `include_stop_string`. With `token_piece`,
    logprobs carry each token's text and bytes. `prompt_tokens` are the ids sent to
    the replica; `prompt_length` the whole prompt's (more when a chat session kept
    the rest), which every delta reports with the tokens generated so far."""
    length = prompt_tokens if prompt_length is None else prompt_length
    matcher = StopStringMatcher(stop_strings, include_matched=include_stop_string) if stop_strings else None
    generated: list[int] = []
    first_text_at: float | None = None
    matched: str | None = None
    feed = _ReadAhead(stream, deadline.final_at)
    final: inference_pb2.GenerateFinal | None = None
    time_limited = False
    try:
        while final is None and not time_limited:
            try:
                batch = await feed.take()
            except _Expired:
                time_limited = True
                break
            ids: list[int] = []
            logprobs: list[common_pb2.PositionLogprobs] = []
            for item in batch:
                if isinstance(item, DeadlineExceeded):  # the replica's deadline ran out before its final
                    time_limited = True
                    break
                if isinstance(item, LlmsuiteError):
                    if matched is None:
                        raise item
                    item = None  # the text is complete; the upstream ended as we cancelled it
                if item is None:
                    if matched is None:
                        raise ended_early("inference")
                    # The cancelled turn ended without its final message: summarize what we counted.
                    final = conv.gateway_final(common_pb2.FINISH_REASON_CANCELLED, prompt_tokens=prompt_tokens,
                                               completion_tokens=len(generated))
                    break
                if item.WhichOneof("kind") == "final":
                    final = item.final
                    break
                if matched is None:
                    ids.extend(item.tokens.token_ids)
                    logprobs.extend(item.tokens.logprobs)
            if not ids:
                continue
            if token_piece is not None and logprobs:
                describe_logprobs(logprobs, token_piece)
            generated.extend(ids)
            text = detok.push(ids)
            if matcher is not None:
                scan = matcher.feed(text)
                text = scan.emit
                if scan.stopped:
                    matched = scan.matched
                    # The turn may already have ended upstream (stop in its last tokens).
                    await stream.stop_generating("stop string")
            if text and first_text_at is None:
                first_text_at = time.monotonic()
            yield Delta(text, ids, logprobs, length, len(generated))
    finally:
        feed.close()
    if time_limited:
        stream.cancel()  # the replica may still be generating: free its slot now
        final = conv.gateway_final(common_pb2.FINISH_REASON_TIME_LIMIT, prompt_tokens=prompt_tokens,
                                   completion_tokens=len(generated))
    assert final is not None
    if matched is None:
        tail = detok.finish()
        if matcher is not None:
            scan = matcher.feed(tail)
            tail = scan.emit if scan.stopped else scan.emit + matcher.flush()
            matched = scan.matched if scan.stopped else None
        if tail:
            first_text_at = first_text_at or time.monotonic()
            yield Delta(tail, [], [], length, len(generated))
    yield TurnOutcome(final, time.monotonic() - started_at,
                      None if first_text_at is None else first_text_at - started_at, generated, matched,
                      time_limited)
