"""Scheduling: cancellation, deadlines, fairness, overload, a never-blocked event loop, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmsuite.inference.engine import FinishReason, GeneratedToken, SamplingParams, TurnResult
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.runtime.errors import DeadlineExceeded, LlmsuiteError, ResourceExhausted, Unavailable

PROMPT = [1, 4, 210, 33, 870, 12, 5]
LONG = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)


@pytest.fixture
def engine(load_engine: Any, tiny_llama_dir: Path) -> Any:
    # No prefix cache: these tests check that ended rows free their KV (sessions tests cover the cache).
    return load_engine({"tiny": tiny_llama_dir}, prefix_cache=False)


def test_cancel_ends_the_turn_within_a_step_and_frees_kv(engine: Any, monkeypatch: pytest.MonkeyPatch,
                                                         helpers: Any) -> None:
    helpers.slow_forward(monkeypatch, 0.01)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=False)
        before_cancel, after_cancel, result = 0, 0, None
        async for item in session.generate(PROMPT, LONG):
            if isinstance(item, TurnResult):
                result = item
            elif before_cancel < 3:
                before_cancel += 1
                if before_cancel == 3:
                    assert engine.stats("tiny").cached_tokens > 0
                    session.cancel()
            else:
                after_cancel += 1
        assert result is not None and result.finish_reason is FinishReason.CANCELLED
        assert after_cancel <= 1  # at most the token already in flight
        stats = engine.stats("tiny")
        assert (stats.running, stats.queued, stats.cached_tokens, stats.kv_bytes) == (0, 0, 0, 0)
        assert stats.cancelled == 1

    asyncio.run(scenario())


def test_leaving_the_stream_early_cancels_the_turn(engine: Any, monkeypatch: pytest.MonkeyPatch,
                                                    helpers: Any) -> None:
    helpers.slow_forward(monkeypatch, 0.01)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=False)
        async with contextlib.aclosing(session.generate(PROMPT, LONG)) as stream:
            async for _ in stream:
                break
        await helpers.wait_until(lambda: engine.stats("tiny").running == 0)
        stats = engine.stats("tiny")
        assert stats.cancelled == 1 and stats.cached_tokens == 0

    asyncio.run(scenario())


def test_cancelling_a_queued_turn(load_engine: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                  helpers: Any) -> None:
    engine = load_engine({"tiny": tiny_llama_dir}, max_running=1)
    helpers.slow_forward(monkeypatch, 0.01)

    async def scenario() -> None:
        first = engine.open_session("tiny", multi_turn=False)
        queued = engine.open_session("tiny", multi_turn=False)
        running = asyncio.create_task(helpers.run_turn(first, PROMPT, SamplingParams(temperature=0, max_new_tokens=20)))
        stream = queued.generate(PROMPT, LONG)
        waiting = asyncio.create_task(stream.__anext__())
        await helpers.wait_until(lambda: engine.stats("tiny").queued == 1)
        queued.cancel()
        item = await waiting
        assert isinstance(item, TurnResult) and item.finish_reason is FinishReason.CANCELLED
        assert item.usage.completion_tokens == 0
        await running

    asyncio.run(scenario())


def test_deadline_that_cannot_cover_prefill_is_refused(engine: Any, helpers: Any) -> None:
    async def scenario() -> None:
        for deadline in (time.monotonic() - 1.0, time.monotonic() + 1e-7):
            with pytest.raises(DeadlineExceeded) as error:
                await helpers.generate_once(engine, "tiny", PROMPT, LONG, deadline=deadline)
            assert error.value.reason == "DEADLINE_TOO_SHORT"
        assert engine.stats("tiny").total_requests == 0

    asyncio.run(scenario())


def test_deadline_mid_generation_ends_with_time_limit(engine: Any, monkeypatch: pytest.MonkeyPatch,
                                                      helpers: Any) -> None:
    helpers.slow_forward(monkeypatch, 0.02)

    async def scenario() -> None:
        tokens, result = await helpers.generate_once(engine, "tiny", PROMPT, LONG, deadline=time.monotonic() + 0.2)
        assert result.finish_reason is FinishReason.TIME_LIMIT
        assert 1 <= len(tokens) < 20
        stats = engine.stats("tiny")
        assert stats.time_limited == 1 and stats.cached_tokens == 0 and stats.running == 0

    asyncio.run(scenario())


def test_concurrent_streams_all_progress(load_engine: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         helpers: Any) -> None:
    """Round-robin: with 4 concurrent requests, each has its first token before any finishes."""
    engine = load_engine({"tiny": tiny_llama_dir}, max_running=4)
    helpers.slow_forward(monkeypatch, 0.005)
    # The first forward waits until all four requests are in the engine: on a busy machine the
    # event loop could otherwise submit the last ones only after the first had finished.
    everyone_submitted = helpers.gate_forwards(monkeypatch)
    events: list[tuple[int, str]] = []

    async def one(index: int) -> None:
        session = engine.open_session("tiny", multi_turn=False)
        params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
        async for item in session.generate([*PROMPT, index + 100], params):
            events.append((index, "done" if isinstance(item, TurnResult) else "token"))
        session.close()

    async def scenario() -> None:
        runs = [asyncio.ensure_future(one(i)) for i in range(4)]
        await helpers.wait_until(lambda: engine.stats("tiny").total_requests == 4, within_s=60)
        everyone_submitted.set()
        await asyncio.gather(*runs)

    asyncio.run(scenario())
    first_done = next(i for i, (_, kind) in enumerate(events) if kind == "done")
    first_tokens = [events.index((i, "token")) for i in range(4)]
    assert max(first_tokens) < first_done
    assert len(events) == 4 * 7


def test_overload_is_refused_immediately(load_engine: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                         helpers: Any) -> None:
    engine = load_engine({"tiny": tiny_llama_dir}, max_running=1, max_queued=1)
    helpers.slow_forward(monkeypatch, 0.01)

    async def scenario() -> None:
        sessions = [engine.open_session("tiny", multi_turn=False) for _ in range(3)]
        streams = [s.generate(PROMPT, LONG) for s in sessions]
        pending = [asyncio.create_task(stream.__anext__()) for stream in streams[:2]]
        await helpers.wait_until(lambda: engine.stats("tiny").total_requests == 2)
        started = time.monotonic()
        with pytest.raises(ResourceExhausted) as error:
            await streams[2].__anext__()
        assert time.monotonic() - started < 0.5
        assert error.value.reason == "ENGINE_OVERLOADED" and error.value.retry_after_s > 0
        stats = engine.stats("tiny")
        assert (stats.running + stats.queued, stats.rejected_overloaded) == (2, 1)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams[:2]:  # closing a stream cancels its turn
            await stream.aclose()
        await helpers.wait_until(lambda: engine.stats("tiny").running + engine.stats("tiny").queued == 0)

    asyncio.run(scenario())


def test_model_work_never_blocks_the_event_loop(engine: Any, monkeypatch: pytest.MonkeyPatch, helpers: Any) -> None:
    # Every forward waits until the event loop has run a coroutine while that forward is in
    # progress. If a forward ran on the loop's thread, the loop could not run the coroutine,
    # the forward would never be released, and the request would hit the test timeout: an
    # event decides this, not a measured gap.
    original = OnnxDecoder.run
    in_forward = threading.Event()
    loop_ran = threading.Event()
    forwards = 0

    def run(self: OnnxDecoder, *args: Any) -> Any:
        nonlocal forwards
        forwards += 1
        loop_ran.clear()
        in_forward.set()
        released = loop_ran.wait(timeout=60)
        in_forward.clear()
        assert released, "the event loop did not run while a forward was in progress"
        return original(self, *args)

    monkeypatch.setattr(OnnxDecoder, "run", run)

    async def scenario() -> None:
        finished = asyncio.Event()

        async def observer() -> None:
            while not finished.is_set():
                if await asyncio.to_thread(in_forward.wait, 0.05):
                    loop_ran.set()  # this runs on the loop while the forward waits

        watch = asyncio.create_task(observer())
        try:
            await helpers.generate_once(engine, "tiny", PROMPT, SamplingParams(temperature=0, max_new_tokens=4))
        finally:
            finished.set()
            loop_ran.set()
            await watch

    asyncio.run(scenario())
    assert forwards >= 4  # one prefill and the decode steps all went through the check


def test_close_cancels_running_turns_and_refuses_new_work(engine: Any, monkeypatch: pytest.MonkeyPatch,
                                                          helpers: Any) -> None:
    helpers.slow_forward(monkeypatch, 0.01)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        stream = session.generate(PROMPT, LONG)
        assert isinstance(await stream.__anext__(), GeneratedToken)
        await engine.close()
        last = None
        async for item in stream:
            last = item
        assert isinstance(last, TurnResult) and last.finish_reason is FinishReason.CANCELLED
        assert engine.stats("tiny").cached_tokens == 0
        with pytest.raises(Unavailable):
            engine.open_session("tiny", multi_turn=False)

    asyncio.run(scenario())


def test_a_failing_forward_fails_only_its_turn(engine: Any, monkeypatch: pytest.MonkeyPatch, helpers: Any) -> None:
    from llmsuite.inference.engine.onnx_model import OnnxDecoder

    original = OnnxDecoder.run
    calls = {"n": 0}

    def flaky(self: OnnxDecoder, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # the second decode forward
            raise RuntimeError("device lost")
        return original(self, *args)

    monkeypatch.setattr(OnnxDecoder, "run", flaky)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        with pytest.raises(LlmsuiteError) as failed:
            await helpers.run_turn(session, PROMPT, SamplingParams(temperature=0, max_new_tokens=5))
        # Named for the caller, with the cause left in the server's log.
        assert (failed.value.code.name, failed.value.reason) == ("INTERNAL", "MODEL_ERROR")
        assert "device lost" not in failed.value.message
        assert session.cached_tokens == 0 and engine.stats("tiny").running == 0
        # The session (history kept, cache dropped) and the engine keep working.
        _, result = await helpers.run_turn(session, [9, 10], SamplingParams(temperature=0, max_new_tokens=3))
        assert result.finish_reason is FinishReason.LENGTH and result.usage.cached_tokens == 0

    asyncio.run(scenario())
