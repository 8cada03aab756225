"""relay_turn without gRPC: an in-memory replica stream feeds the real local
detokenizer, so coalescing and the gateway's own deadline are exact facts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.conversions import generation_summary
from llmsuite.gateway.generation import Deadline, relay_turn
from llmsuite.gateway.local_tokenizers import LocalTokenizer, TokenizerFilesRejected
from llmsuite.gateway.turns import Delta, TurnOutcome
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.runtime.tokenizer_hash import TOKENIZER_FILES, content_hash_of


class MemoryStream:
    """What relay_turn needs of an InferenceStream, fed from a queue."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[pb.GenerateResponse | None] = asyncio.Queue()
        self.cancelled = False
        self.stop_requests: list[str] = []

    def tokens(self, *ids: int) -> None:
        self.messages.put_nowait(pb.GenerateResponse(tokens=pb.GeneratedTokens(token_ids=ids)))

    def final(self, reason: int, completion: int) -> None:
        self.messages.put_nowait(pb.GenerateResponse(final=pb.GenerateFinal(
            finish_reason=reason, usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=completion))))

    async def read(self) -> pb.GenerateResponse | None:
        return await self.messages.get()

    async def stop_generating(self, reason: str) -> None:
        self.stop_requests.append(reason)

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture(scope="module")
def local(tiny_tokenizer_dir: Path) -> LocalTokenizer:
    files = {name: (tiny_tokenizer_dir / name).read_bytes() for name in TOKENIZER_FILES
             if (tiny_tokenizer_dir / name).is_file()}
    return LocalTokenizer.from_files(files, content_hash_of(files))


async def relay(stream: MemoryStream, local: LocalTokenizer, deadline: Deadline,
                stops: tuple[str, ...] = ()) -> list[Delta | TurnOutcome]:
    detok = local.detokenizer([1], skip_special_tokens=True)
    return [item async for item in relay_turn(stream, detok, stops, started_at=0.0, prompt_tokens=1,  # type: ignore[arg-type]
                                              deadline=deadline)]


def test_tokens_that_are_ready_together_go_out_as_one_delta(local: LocalTokenizer) -> None:
    async def scenario() -> list[Delta | TurnOutcome]:
        stream = MemoryStream()
        for token_id in range(300, 310):  # ten messages waiting before the relay looks
            stream.tokens(token_id)
        stream.final(common_pb2.FINISH_REASON_LENGTH, 10)
        return await relay(stream, local, Deadline(None, None))

    items = asyncio.run(scenario())
    deltas = [i for i in items if isinstance(i, Delta) and i.token_ids]
    assert [d.token_ids for d in deltas] == [list(range(300, 310))]
    text = "".join(i.text for i in items if isinstance(i, Delta))
    assert text == local.decode(list(range(300, 310)), skip_special_tokens=True)
    assert isinstance(items[-1], TurnOutcome)
    assert generation_summary(items[-1]).finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_the_gateway_ends_a_turn_itself_at_its_deadline_with_the_text_so_far(local: LocalTokenizer) -> None:
    async def scenario() -> tuple[list[Delta | TurnOutcome], MemoryStream]:
        stream = MemoryStream()
        stream.tokens(300, 301, 302)  # then nothing: a replica that missed its own deadline
        loop = asyncio.get_running_loop()
        return await relay(stream, local, Deadline(final_at=loop.time() + 0.3, upstream_timeout_s=None)), stream

    items, stream = asyncio.run(scenario())
    outcome = items[-1]
    assert isinstance(outcome, TurnOutcome) and outcome.time_limited
    summary = generation_summary(outcome)
    assert summary.finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    assert summary.usage.completion_tokens == 3
    assert "".join(i.text for i in items if isinstance(i, Delta)) == local.decode([300, 301, 302],
                                                                                 skip_special_tokens=True)
    assert stream.cancelled  # the replica's slot is freed at once


def test_deadline_margins_leave_room_for_the_final_message() -> None:
    async def split(remaining: float | None, margin: float) -> tuple[float | None, float | None]:
        deadline = Deadline.split(remaining, margin)
        now = asyncio.get_running_loop().time()
        return (None if deadline.final_at is None else deadline.final_at - now), deadline.upstream_timeout_s

    own, upstream = asyncio.run(split(10.0, 0.25))
    assert own is not None and upstream is not None
    assert upstream < own < 10.0 and 10.0 - own == pytest.approx(0.25, abs=0.05)
    own, upstream = asyncio.run(split(0.5, 0.25))  # a short deadline keeps most of its time
    assert own is not None and upstream is not None and upstream == pytest.approx(0.4, abs=0.01)
    assert asyncio.run(split(None, 0.25)) == (None, None)


def test_files_that_do_not_hash_to_the_paired_hash_are_refused(tiny_tokenizer_dir: Path) -> None:
    files = {name: (tiny_tokenizer_dir / name).read_bytes() for name in TOKENIZER_FILES
             if (tiny_tokenizer_dir / name).is_file()}
    with pytest.raises(TokenizerFilesRejected, match="hash"):
        LocalTokenizer.from_files(files, "sha256:" + "0" * 64)


def test_logprobs_carry_each_tokens_text_and_exact_bytes(local: LocalTokenizer) -> None:
    ids = local.tokenizer.encode("héllo ✓ 日本", add_special_tokens=False).ids
    assert any("\ufffd" in local.decode([i], skip_special_tokens=False) for i in ids), "a character split over ids"

    async def scenario() -> list[Delta | TurnOutcome]:
        stream = MemoryStream()
        stream.messages.put_nowait(pb.GenerateResponse(tokens=pb.GeneratedTokens(token_ids=ids, logprobs=[
            common_pb2.PositionLogprobs(chosen=common_pb2.TokenLogprob(token_id=i, logprob=-1.0),
                                        top=[common_pb2.TokenLogprob(token_id=2, logprob=-2.0)]) for i in ids])))
        stream.final(common_pb2.FINISH_REASON_LENGTH, len(ids))
        detok = local.detokenizer([1], skip_special_tokens=True)
        return [item async for item in relay_turn(stream, detok, (), started_at=0.0, prompt_tokens=1,  # type: ignore[arg-type]
                                                  deadline=Deadline(None, None), token_piece=local.token_piece)]

    positions = [p for item in asyncio.run(scenario()) if isinstance(item, Delta) for p in item.logprobs]
    assert [p.chosen.token_id for p in positions] == ids
    assert b"".join(p.chosen.token_bytes for p in positions).decode("utf-8") == "héllo ✓ 日本"
    assert [p.chosen.token for p in positions] == [local.decode([i], skip_special_tokens=False) for i in ids]
    assert {(p.top[0].token, p.top[0].token_bytes) for p in positions} == {
        (local.decode([2], skip_special_tokens=False), local.decode([2], skip_special_tokens=False).encode())}


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_is_kept_at_the_end_only_when_asked(local: LocalTokenizer, include: bool) -> None:
    ids = local.tokenizer.encode("one two three four", add_special_tokens=False).ids

    async def scenario() -> list[Delta | TurnOutcome]:
        stream = MemoryStream()
        for token_id in ids:
            stream.tokens(token_id)
        stream.final(common_pb2.FINISH_REASON_LENGTH, len(ids))
        detok = local.detokenizer([1], skip_special_tokens=True)
        return [item async for item in relay_turn(stream, detok, ("three",), started_at=0.0, prompt_tokens=1,  # type: ignore[arg-type]
                                                  deadline=Deadline(None, None), include_stop_string=include)]

    items = asyncio.run(scenario())
    assert "".join(i.text for i in items if isinstance(i, Delta)) == ("one two three" if include else "one two ")
    outcome = items[-1]
    assert isinstance(outcome, TurnOutcome) and outcome.stopped_by_string
