"""Sessions and the prefix cache: KV reuse across turns and requests, rewind, eviction, caps,
context limits; and the rule that the cache never changes the tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmsuite.inference.engine import FinishReason, SamplingParams
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

TURN_1 = [1, 4, 210, 33, 870, 12, 5, 77, 91, 300, 41, 42, 43, 44, 45, 46, 47, 48]  # 18: over one cache block
TURN_2 = [6, 4, 99, 451, 3, 5]
TURN_3 = [8, 8, 120, 7]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def ids(tokens: list[Any]) -> list[int]:
    return [t.token_id for t in tokens]


@pytest.fixture
def engine(load_engine: Any, tiny_llama_dir: Path) -> Any:
    return load_engine({"tiny": tiny_llama_dir})


@pytest.fixture
def cold(load_engine: Any, tiny_llama_dir: Path) -> Any:
    """The same model without a prefix cache: every token computed from scratch."""
    return load_engine({"tiny": tiny_llama_dir}, prefix_cache=False)


def test_second_turn_reuses_the_cache_and_matches_a_cold_request(engine: Any, cold: Any, helpers: Any) -> None:
    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        first, result_1 = await helpers.run_turn(session, TURN_1, greedy(6))
        assert result_1.usage.cached_tokens == 0
        history = TURN_1 + ids(first)
        assert session.history_length == len(history)
        assert session.cached_tokens == len(history) - 1  # the last sampled token is not fed yet

        second, result_2 = await helpers.run_turn(session, TURN_2, greedy(6))
        assert result_2.usage.cached_tokens == len(history) - 1
        # Computed: the new ids, and the first turn's last token (sampled, never fed until now).
        assert result_2.usage.prompt_tokens == len(TURN_2) + 1
        assert result_2.usage.prompt_tokens + result_2.usage.cached_tokens == len(history) + len(TURN_2)
        fresh, fresh_result = await helpers.generate_once(cold, "tiny", history + TURN_2, greedy(6))
        assert ids(second) == fresh
        assert fresh_result.usage.cached_tokens == 0
        await session.aclose()

    asyncio.run(scenario())


def test_a_turn_with_no_new_ids_continues_generation(engine: Any, helpers: Any) -> None:
    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        first, _ = await helpers.run_turn(session, TURN_1, greedy(4))
        more, _ = await helpers.run_turn(session, [], greedy(4))
        whole, _ = await helpers.generate_once(engine, "tiny", TURN_1, greedy(8))
        assert ids(first) + ids(more) == whole
        session.close()

    asyncio.run(scenario())


def test_single_requests_leave_their_kv_for_later_requests(engine: Any, cold: Any, helpers: Any) -> None:
    async def scenario() -> None:
        first, result = await helpers.generate_once(engine, "tiny", TURN_1, greedy(4))
        assert result.usage.cached_tokens == 0
        stats = engine.stats("tiny")
        assert (stats.running, stats.prefix_cache_entries, stats.cached_tokens) == (0, 1, len(TURN_1) + 3)
        # The same prompt again: all but its last token come from the cache (one must be fed).
        again, result = await helpers.generate_once(engine, "tiny", TURN_1, greedy(4))
        assert again == first and result.usage.cached_tokens == len(TURN_1) - 1
        # A prompt that extends the first request's whole sequence reuses all of it.
        longer = TURN_1 + first + TURN_2
        tokens, result = await helpers.generate_once(engine, "tiny", longer, greedy(4))
        assert result.usage.cached_tokens == len(TURN_1) + 3
        assert tokens == (await helpers.generate_once(cold, "tiny", longer, greedy(4)))[0]
        stats = engine.stats("tiny")
        assert stats.prefix_cache_hit_tokens == 2 * len(TURN_1) + 2
        assert stats.prefix_cache_query_tokens == 2 * len(TURN_1) + len(longer)

    asyncio.run(scenario())


def test_unused_cache_expires_then_recomputes_transparently(load_engine: Any, tiny_llama_dir: Path, cold: Any,
                                                            helpers: Any) -> None:
    # Long enough that a busy machine still sees the entry right after the turn, short enough to wait for.
    engine = load_engine({"tiny": tiny_llama_dir}, session_idle_timeout_s=3.0)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        first, _ = await helpers.run_turn(session, TURN_1, greedy(5))
        assert engine.stats("tiny").cached_tokens == session.cached_tokens > 0

        await helpers.wait_until(lambda: engine.stats("tiny").cached_tokens == 0, within_s=60.0)
        stats = engine.stats("tiny")
        assert stats.prefix_cache_evictions == 1 and stats.kv_bytes == 0 and stats.sessions == 1
        assert session.cached_tokens == 0
        assert session.history_length == len(TURN_1) + 5

        second, result = await helpers.run_turn(session, TURN_2, greedy(5))
        assert result.usage.cached_tokens == 0
        fresh, _ = await helpers.generate_once(cold, "tiny", TURN_1 + ids(first) + TURN_2, greedy(5))
        assert ids(second) == fresh
        session.close()

    asyncio.run(scenario())


def test_max_sessions_caps_retained_sessions_only(load_engine: Any, tiny_llama_dir: Path) -> None:
    engine = load_engine({"tiny": tiny_llama_dir}, max_sessions=2)
    first = engine.open_session("tiny", multi_turn=True)
    engine.open_session("tiny", multi_turn=True)
    with pytest.raises(ResourceExhausted) as error:
        engine.open_session("tiny", multi_turn=True)
    assert error.value.reason == "TOO_MANY_SESSIONS"
    engine.open_session("tiny", multi_turn=False)  # single requests are bounded by the queue instead

    first.close()
    first.close()  # idempotent
    assert engine.stats("tiny").sessions == 1
    engine.open_session("tiny", multi_turn=True)


def test_kv_budget_evicts_least_recently_used_cache_entries(load_engine: Any, tiny_llama_dir: Path,
                                                            helpers: Any) -> None:
    # Tiny KV is 1 KiB a token. A 54-token row reserves 108 KiB (its KV and a step's copy of it):
    # beside the first conversation's 53-token entry, that passes 150 KiB, so the entry goes.
    engine = load_engine({"tiny": tiny_llama_dir}, kv_cache_bytes=150 * 1024)
    prompts = [list(range(10, 60)), list(range(60, 110))]  # 50 tokens + 4 generated

    async def scenario() -> None:
        older = engine.open_session("tiny", multi_turn=True)
        newer = engine.open_session("tiny", multi_turn=True)
        await helpers.run_turn(older, prompts[0], greedy(4))
        await helpers.run_turn(newer, prompts[1], greedy(4))
        stats = engine.stats("tiny")
        assert stats.cached_tokens <= 100 and stats.kv_reserved_bytes <= 150 * 1024
        assert older.cached_tokens == 0 and newer.cached_tokens == 53
        assert stats.prefix_cache_evictions == 1

    asyncio.run(scenario())


def test_closing_a_session_ends_it_but_its_kv_stays_reusable(engine: Any, helpers: Any) -> None:
    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        first, _ = await helpers.run_turn(session, TURN_1, greedy(3))
        await session.aclose()
        stats = engine.stats("tiny")
        assert (stats.sessions, stats.running, stats.prefix_cache_entries) == (0, 0, 1)
        with pytest.raises(FailedPrecondition) as error:
            await helpers.run_turn(session, TURN_2, greedy(3))
        assert error.value.reason == "SESSION_CLOSED"
        # The conversation re-sent by a new request continues from the cached KV.
        _, result = await helpers.generate_once(engine, "tiny", TURN_1 + ids(first) + TURN_2, greedy(3))
        assert result.usage.cached_tokens == len(TURN_1) + 2

    asyncio.run(scenario())


def test_rewinding_keeps_a_prefix_of_the_history(engine: Any, cold: Any, helpers: Any) -> None:
    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        first, _ = await helpers.run_turn(session, TURN_1, greedy(5))
        await helpers.run_turn(session, TURN_2, greedy(5))
        after_first = TURN_1 + ids(first)

        # Edit the second message: keep the first exchange, send another one.
        edited, result = await helpers.run_turn(session, TURN_3, greedy(5), keep_history=len(after_first))
        assert result.usage.cached_tokens == len(after_first)
        assert session.history_length == len(after_first) + len(TURN_3) + 5
        assert ids(edited) == (await helpers.generate_once(cold, "tiny", after_first + TURN_3, greedy(5)))[0]

        # Regenerate the first reply: keep only the first prompt, add nothing.
        again, result = await helpers.run_turn(session, [], greedy(5), keep_history=len(TURN_1))
        assert ids(again) == ids(first) and result.usage.cached_tokens == len(TURN_1) - 1

        with pytest.raises(InvalidArgument) as error:
            await helpers.run_turn(session, TURN_2, greedy(2), keep_history=10_000)
        assert error.value.violations[0].field == "turn.keep_history_tokens"
        session.close()

    asyncio.run(scenario())


def test_one_conversation_gives_one_answer_whatever_the_cache_holds(load_engine: Any, tiny_llama_dir: Path,
                                                                    cold: Any, helpers: Any) -> None:
    """A session, fresh requests re-sending the history, a session whose cache is evicted
    mid-way, and a cache-less engine: the same tokens for every turn."""
    engine = load_engine({"tiny": tiny_llama_dir})
    user_turns = [TURN_1, TURN_2, TURN_3]

    async def as_session(target: Any, evict_after: int | None = None) -> list[list[int]]:
        session = target.open_session("tiny", multi_turn=True)
        replies = []
        for index, turn in enumerate(user_turns):
            tokens, _ = await helpers.run_turn(session, turn, greedy(5))
            replies.append(ids(tokens))
            if index == evict_after:
                scheduler = target._models["tiny"].scheduler
                with scheduler._cond:
                    for entry in scheduler._budget.prefix.least_recently_used():
                        scheduler._budget.evict(entry)
        session.close()
        return replies

    async def as_fresh_requests(target: Any) -> list[list[int]]:
        history: list[int] = []
        replies = []
        for turn in user_turns:
            history += turn
            tokens, _ = await helpers.generate_once(target, "tiny", history, greedy(5))
            history += tokens
            replies.append(tokens)
        return replies

    async def scenario() -> None:
        reference = await as_fresh_requests(cold)
        assert await as_session(engine) == reference
        assert await as_fresh_requests(engine) == reference
        assert engine.stats("tiny").prefix_cache_hit_tokens > 0
        assert await as_session(engine, evict_after=0) == reference

    asyncio.run(scenario())


def test_a_second_turn_while_one_runs_is_refused(engine: Any, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    helpers.slow_forward(monkeypatch, 0.01)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        running = session.generate(TURN_1, greedy(50))
        await running.__anext__()
        with pytest.raises(FailedPrecondition) as error:
            await session.generate(TURN_2, greedy(2)).__anext__()
        assert error.value.reason == "TURN_IN_PROGRESS"
        await running.aclose()

    asyncio.run(scenario())


def test_cancelled_turn_leaves_a_consistent_session(engine: Any, cold: Any, helpers: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    helpers.slow_forward(monkeypatch, 0.005)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=True)
        produced = []
        async for item in session.generate(TURN_1, greedy(100)):
            if hasattr(item, "token_id"):
                produced.append(item.token_id)
                if len(produced) == 3:
                    session.cancel()
            else:
                assert item.finish_reason is FinishReason.CANCELLED
        history = TURN_1 + produced
        assert session.history_length == len(history)
        second, result = await helpers.run_turn(session, TURN_2, greedy(4))
        assert result.usage.cached_tokens == len(history) - 1
        fresh, _ = await helpers.generate_once(cold, "tiny", history + TURN_2, greedy(4))
        assert ids(second) == fresh

    asyncio.run(scenario())


# ---- the context limit ---------------------------------------------------------------------


def test_session_runs_until_the_context_is_full(load_engine: Any, short_context_dir: Path, helpers: Any) -> None:
    engine = load_engine({"short": short_context_dir})
    prompt = list(range(10, 30))  # 20 of 32 positions

    async def scenario() -> None:
        session = engine.open_session("short", multi_turn=True)
        tokens, result = await helpers.run_turn(session, prompt, greedy(32))
        assert result.finish_reason is FinishReason.CONTEXT_FULL
        assert len(tokens) == 12 and session.history_length == 32

        with pytest.raises(InvalidArgument) as error:
            await helpers.run_turn(session, [5, 6], greedy(4))
        assert error.value.reason == "PROMPT_TOO_LONG"

        # Truncation keeps the most recent context - max_new_tokens tokens and recomputes them.
        history = prompt + [t.token_id for t in tokens]
        tokens, result = await helpers.run_turn(session, [5, 6], greedy(4), truncate_prompt=True)
        assert result.usage.cached_tokens == 0
        assert session.history_length == 28 + 4
        fresh, _ = await helpers.generate_once(engine, "short", [*history, 5, 6][-28:], greedy(4))
        assert [t.token_id for t in tokens] == fresh

    asyncio.run(scenario())


def test_single_request_must_fit_prompt_plus_max_new_tokens(load_engine: Any, short_context_dir: Path,
                                                            helpers: Any) -> None:
    engine = load_engine({"short": short_context_dir})
    prompt = list(range(10, 30))

    async def scenario() -> None:
        with pytest.raises(InvalidArgument) as error:
            await helpers.generate_once(engine, "short", prompt, greedy(20))
        assert error.value.reason == "PROMPT_TOO_LONG"
        assert error.value.violations[0].field == "prompt_token_ids"
        for number in ("20 tokens", "max_new_tokens is 20", "40", "32 tokens"):
            assert number in error.value.message
        assert error.value.metadata["context_length"] == "32"

        tokens, result = await helpers.generate_once(engine, "short", prompt, greedy(20), truncate_prompt=True)
        assert result.usage.prompt_tokens == 12 and result.finish_reason is FinishReason.LENGTH
        assert tokens == (await helpers.generate_once(engine, "short", prompt[-12:], greedy(20)))[0]

    asyncio.run(scenario())
