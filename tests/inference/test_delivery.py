"""The scheduler thread's hand-over to event loops (engine/delivery.py): order, one wake-up per
batch, and a closed loop refusing further posts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from llmsuite.inference.engine.delivery import LoopMailbox, batched_wakeups, mailbox_for


class CountingLoop:
    """Counts a real loop's call_soon_threadsafe calls (each is one write to its self-pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wakeups = 0
        original = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any) -> Any:
            self.wakeups += 1
            return original(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]


def _on_thread(work: Any) -> None:
    """Runs `work` on another thread (as the scheduler's worker) and re-raises what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def _take(queue: asyncio.Queue[Any], count: int) -> list[Any]:
    return [await queue.get() for _ in range(count)]


def test_a_batch_of_posts_wakes_the_loop_once_and_keeps_each_queues_order() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        counter = CountingLoop(loop)
        mailbox = mailbox_for(loop)
        assert mailbox_for(loop) is mailbox
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(16)]

        def one_step(step: int) -> None:
            with batched_wakeups(), batched_wakeups():  # nested: woken at the outermost end
                for row, queue in enumerate(queues):
                    mailbox.post(queue, (step, row))
                assert counter.wakeups == step  # nothing woken before the block ends

        for step in range(3):
            _on_thread(lambda step=step: one_step(step))
            assert counter.wakeups == step + 1
            await asyncio.sleep(0)  # the drain runs: the next batch needs a wake-up of its own
        for row, queue in enumerate(queues):
            assert await _take(queue, 3) == [(0, row), (1, row), (2, row)]

    asyncio.run(scenario())


def test_a_post_outside_a_batch_wakes_unless_a_wake_up_is_pending() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        counter = CountingLoop(loop)
        mailbox = LoopMailbox(loop)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        _on_thread(lambda: [mailbox.post(queue, i) for i in range(5)])
        assert counter.wakeups == 1  # the first post's drain was still pending for the other four
        assert await _take(queue, 5) == list(range(5))
        _on_thread(lambda: mailbox.post(queue, 5))
        assert counter.wakeups == 2
        assert await queue.get() == 5

    asyncio.run(scenario())


def test_posts_to_a_closed_loop_raise() -> None:
    loop = asyncio.new_event_loop()
    mailbox = LoopMailbox(loop)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    loop.close()
    mailbox.post(queue, "dropped")  # the wake-up finds the loop closed: nobody will read this
    with pytest.raises(RuntimeError, match="closed"):
        mailbox.post(queue, "refused")  # the scheduler then cancels the turn (Scheduler._deliver)
