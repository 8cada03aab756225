"""Faults stay with the request that met them.

Faults are injected into the decoder's `run` (the one call every forward goes through), chosen
by what a forward computes (a position, a token id), never by timing: NaN logits in one row, an
exception or a MemoryError from one forward, a decoder broken for good, a scheduler bug. Every
other request must get exactly the tokens it gets alone, the engine must go on stepping, and a
fault it cannot get past must end every turn with ENGINE_FAILED instead of a retry loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmsuite.inference.engine import (
    EngineSettings,
    GeneratedToken,
    GenerationSession,
    InferenceEngine,
    SamplingParams,
    TurnResult,
)
from llmsuite.inference.engine.batch import DecodeBatch
from llmsuite.inference.engine.fault_injection import BreakOnToken
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.runtime.errors import LlmsuiteError

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_new_tokens=8, ignore_eos=True)
POISON = 999  # a token id none of the other prompts holds
# Watchers that must still be running when a fault strikes are given far more tokens than the
# few steps it takes to submit the faulty request (the context is 512; the longest prompt 20).
LONG_RUNNING = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)


class InjectedFaults:
    """What the wrapped `run` does wrong; every field is checked on the scheduler thread."""

    def __init__(self) -> None:
        self.nan_at_position: int | None = None  # rows computing this position get a NaN logit
        self.raise_on_prefill_of: tuple[int, BaseException] | None = None  # (token id, error)
        self.fail_next_decode: BaseException | None = None  # one-shot, armed by the test
        self._lock = threading.Lock()

    def arm_decode_failure(self, error: BaseException) -> None:
        with self._lock:
            self.fail_next_decode = error

    def install(self, decoder: OnnxDecoder) -> None:
        run = decoder.run

        def faulty(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                   cache: Any) -> Any:
            if self.raise_on_prefill_of is not None and input_ids.shape[1] > 1:
                token_id, error = self.raise_on_prefill_of
                if (input_ids == token_id).any():
                    raise error
            with self._lock:
                error, self.fail_next_decode = (self.fail_next_decode, None) if input_ids.shape[1] == 1 \
                    else (None, self.fail_next_decode)
            if error is not None:
                raise error
            logits, new_cache = run(input_ids, attention_mask, position_ids, cache)
            if self.nan_at_position is not None:
                rows = np.flatnonzero(position_ids[:, -1] == self.nan_at_position)
                if rows.size:
                    logits = logits.copy()
                    logits[rows, -1, 7] = np.nan  # one entry is enough to make a row unusable
            return logits, new_cache

        decoder.run = faulty  # type: ignore[method-assign]


class Harness:
    """An engine over one model whose decoder `install` wraps; failures reported to the test."""

    def __init__(self, model_dir: Path, install: Any, **settings: Any) -> None:
        self.failures: list[tuple[str, str]] = []
        fields = {"device": "cpu", "intra_op_threads": 1, "max_step_failures": 2, **settings}
        self.engine = InferenceEngine.load({"tiny": model_dir}, EngineSettings(**fields),
                                           on_model_failed=lambda m, cause: self.failures.append((m, cause)),
                                           prepare_decoder=install)

    def session(self) -> GenerationSession:
        return self.engine.open_session("tiny", multi_turn=False)


@pytest.fixture
def harness(tiny_llama_dir: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def make(install: Any, **settings: Any) -> Harness:
        made.append(Harness(tiny_llama_dir, install, **settings))
        return made[-1]

    yield make
    for h in made:
        asyncio.run(h.engine.close())


async def consume(stream: AsyncIterator[GeneratedToken | TurnResult], tokens: list[int] | None = None
                  ) -> tuple[list[int], TurnResult | LlmsuiteError]:
    """Reads a turn to its end: (token ids, the TurnResult or the error that ended it)."""
    tokens = [] if tokens is None else tokens
    try:
        async for item in stream:
            if isinstance(item, TurnResult):
                return tokens, item
            tokens.append(item.token_id)
    except LlmsuiteError as exc:
        return tokens, exc
    raise AssertionError("the stream ended without a TurnResult")


async def alone(engine: InferenceEngine, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    session = engine.open_session("tiny", multi_turn=False)
    try:
        tokens, end = await consume(session.generate(prompt, params))
    finally:
        session.close()
    assert isinstance(end, TurnResult), end
    return tokens


async def started(session: GenerationSession, prompt: Sequence[int], params: SamplingParams
                  ) -> tuple[AsyncIterator[GeneratedToken | TurnResult], list[int]]:
    """A turn that has streamed its first token, so its row is in the decode batch."""
    stream = session.generate(prompt, params)
    first = await anext(stream)
    assert isinstance(first, GeneratedToken)
    return stream, [first.token_id]


def prompt_of(length: int, offset: int) -> list[int]:
    return [3 + (offset + 11 * i) % 500 for i in range(length)]


# Prompt lengths 1, 9 and 20 with 8 new tokens compute positions 0-7, 0-15 and 0-26: only the
# middle request's last logits come from position 8 (its prefill) or 11 (its third decode step).
SHORT, TARGET, LONG = prompt_of(1, 0), prompt_of(9, 1), prompt_of(20, 2)


@pytest.mark.parametrize("position, target_tokens", [(8, 0), (11, 3)], ids=["prefill-row", "decode-row"])
def test_nan_logits_in_one_row_end_only_that_request(harness: Any, position: int, target_tokens: int) -> None:
    faults = InjectedFaults()
    h = harness(faults.install)

    async def scenario() -> None:
        expected = {name: await alone(h.engine, prompt, params)
                    for name, prompt, params in (("short", SHORT, GREEDY), ("target", TARGET, GREEDY),
                                                 ("long", LONG, SAMPLED))}
        faults.nan_at_position = position
        sessions = [h.session() for _ in range(3)]
        short, target, long_ = await asyncio.gather(
            consume(sessions[0].generate(SHORT, GREEDY)), consume(sessions[1].generate(TARGET, GREEDY)),
            consume(sessions[2].generate(LONG, SAMPLED)))
        assert short == (expected["short"], short[1]) and isinstance(short[1], TurnResult)
        assert long_ == (expected["long"], long_[1]) and isinstance(long_[1], TurnResult)
        tokens, error = target
        assert isinstance(error, LlmsuiteError), error
        assert (error.code.name, error.reason) == ("INTERNAL", "NUMERIC_ERROR")
        assert "NaN" in error.message
        assert tokens == expected["target"][:target_tokens]
        faults.nan_at_position = None
        assert await alone(h.engine, TARGET, GREEDY) == expected["target"]  # the engine went on
        assert h.failures == []

    asyncio.run(scenario())
    stats = h.engine.stats("tiny")
    assert stats.running == 0 and stats.queued == 0


@pytest.mark.parametrize("error, code, reason", [
    (RuntimeError("injected: a kernel failed"), "INTERNAL", "MODEL_ERROR"),
    (MemoryError(), "RESOURCE_EXHAUSTED", "OUT_OF_MEMORY"),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"),
     "RESOURCE_EXHAUSTED", "OUT_OF_MEMORY"),
], ids=["exception", "memory-error", "onnxruntime-allocation"])
def test_a_forward_that_fails_ends_only_the_request_it_computed(harness: Any, error: BaseException, code: str,
                                                                reason: str) -> None:
    faults = InjectedFaults()
    h = harness(faults.install)
    poisoned = [*prompt_of(6, 3), POISON, 5]

    async def scenario() -> None:
        expected = [await alone(h.engine, SHORT, GREEDY), await alone(h.engine, LONG, SAMPLED)]
        faults.raise_on_prefill_of = (POISON, error)
        watchers = [await started(h.session(), SHORT, GREEDY), await started(h.session(), LONG, SAMPLED)]
        bad_tokens, bad_end = await consume(h.session().generate(poisoned, GREEDY))
        results = await asyncio.gather(*(consume(stream, tokens) for stream, tokens in watchers))
        assert [tokens for tokens, _ in results] == expected
        assert all(isinstance(end, TurnResult) for _, end in results)
        assert bad_tokens == []
        assert isinstance(bad_end, LlmsuiteError), bad_end
        assert (bad_end.code.name, bad_end.reason) == (code, reason)
        faults.raise_on_prefill_of = None
        assert await alone(h.engine, SHORT, GREEDY) == expected[0]
        assert h.failures == []

    asyncio.run(scenario())
    stats = h.engine.stats("tiny")
    assert stats.running == 0 and stats.queued == 0


def test_a_failed_decode_forward_ends_its_rows_frees_their_kv_and_the_engine_goes_on(harness: Any) -> None:
    faults = InjectedFaults()
    h = harness(faults.install, prefix_cache=False)

    async def scenario() -> None:
        expected = await alone(h.engine, SHORT, GREEDY)
        prompts = (SHORT, LONG)
        whole = [await alone(h.engine, prompt, LONG_RUNNING) for prompt in prompts]
        watchers = await asyncio.gather(*(started(h.session(), prompt, LONG_RUNNING) for prompt in prompts))
        faults.arm_decode_failure(MemoryError())
        for (stream, tokens), alone_tokens in zip(watchers, whole, strict=True):
            got, end = await consume(stream, tokens)
            assert isinstance(end, LlmsuiteError) and end.reason == "OUT_OF_MEMORY", end
            assert got == alone_tokens[:len(got)]
        assert h.engine.stats("tiny").kv_bytes == 0  # no prefix cache: nothing may be left behind
        assert await alone(h.engine, SHORT, GREEDY) == expected
        assert h.failures == []

    asyncio.run(scenario())


def test_a_decoder_broken_for_good_fails_every_turn_with_engine_failed(harness: Any) -> None:
    breaker = BreakOnToken(POISON)
    h = harness(breaker, max_running=3)

    async def scenario() -> None:
        watchers = await asyncio.gather(*(started(h.session(), SHORT, LONG_RUNNING) for _ in range(2)))
        bad_task = asyncio.ensure_future(consume(h.session().generate([*SHORT, POISON], GREEDY)))
        # max_running=3: this one waits in the queue (or, if the engine gave up first, is refused)
        queued_task = asyncio.ensure_future(consume(h.session().generate(LONG, GREEDY)))
        ends = [await bad_task, *(await asyncio.gather(*(consume(s, t) for s, t in watchers))), await queued_task]
        for _tokens, end in ends:
            assert isinstance(end, LlmsuiteError), end
            assert (end.code.name, end.reason) == ("UNAVAILABLE", "ENGINE_FAILED")
        with pytest.raises(LlmsuiteError) as refused:
            h.session()
        assert refused.value.reason == "ENGINE_FAILED"

    asyncio.run(scenario())
    assert [model for model, _ in h.failures] == ["tiny"]
    assert "check forwards" in h.failures[0][1]
    stats = h.engine.stats("tiny")
    assert (stats.running, stats.queued, stats.kv_bytes) == (0, 0, 0)


def test_a_scheduler_step_that_keeps_failing_gives_up_instead_of_retrying(harness: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(None)
    scheduler = h.engine._model("tiny").scheduler
    steps = []

    def broken_housekeeping(now: float) -> None:
        steps.append(now)
        raise RuntimeError("injected: a bookkeeping bug")

    async def scenario() -> None:
        monkeypatch.setattr(scheduler, "_expire_cache", broken_housekeeping)
        tokens, end = await consume(h.session().generate(SHORT, GREEDY))
        assert tokens == []
        assert isinstance(end, LlmsuiteError) and end.reason == "ENGINE_FAILED", end

    asyncio.run(scenario())
    assert len(steps) == 2  # max_step_failures, then no more steps
    assert [model for model, _ in h.failures] == ["tiny"]
    assert "RuntimeError: injected: a bookkeeping bug" in h.failures[0][1]


def test_one_failed_scheduler_step_ends_the_running_rows_and_the_engine_goes_on(
        harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(None)
    scheduler = h.engine._model("tiny").scheduler
    expire = scheduler._expire_cache
    armed = threading.Event()

    def fails_once(now: float) -> None:
        if armed.is_set():
            armed.clear()
            raise RuntimeError("injected: a bookkeeping bug")
        expire(now)

    monkeypatch.setattr(scheduler, "_expire_cache", fails_once)

    async def scenario() -> None:
        expected = await alone(h.engine, SHORT, GREEDY)
        stream, tokens = await started(h.session(), SHORT, LONG_RUNNING)
        armed.set()
        _, end = await consume(stream, tokens)
        assert isinstance(end, LlmsuiteError) and (end.code.name, end.reason) == ("INTERNAL", "MODEL_ERROR"), end
        assert await alone(h.engine, SHORT, GREEDY) == expected

    asyncio.run(scenario())
    assert h.failures == []


def test_a_failed_kv_release_ends_the_batch_it_held_but_not_the_turn_that_finished(
        harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(None)
    extract = DecodeBatch.extract
    armed = threading.Event()

    def failing_extract(self: DecodeBatch[Any], key: Any) -> Any:
        if armed.is_set():
            armed.clear()
            raise MemoryError
        return extract(self, key)

    monkeypatch.setattr(DecodeBatch, "extract", failing_extract)

    async def scenario() -> None:
        expected = await alone(h.engine, TARGET, GREEDY)
        stream, tokens = await started(h.session(), LONG, LONG_RUNNING)
        armed.set()  # the next row to leave a batch with its KV kept is the one below, 8 tokens in
        finished_tokens, finished = await consume(h.session().generate(TARGET, GREEDY))
        assert isinstance(finished, TurnResult) and finished_tokens == expected  # its result stands
        _, end = await consume(stream, tokens)
        assert isinstance(end, LlmsuiteError) and end.reason == "OUT_OF_MEMORY", end  # its batch went down
        assert await alone(h.engine, TARGET, GREEDY) == expected

    asyncio.run(scenario())
    assert h.failures == []
    stats = h.engine.stats("tiny")
    assert stats.running == 0 and stats.queued == 0
