"""Handing what the scheduler thread produces to the event loop that waits for it.

The scheduler delivers every sampled token and every turn's end from its own thread. Waking an
event loop from another thread (`call_soon_threadsafe`) writes to the loop's self-pipe, and
that write releases the GIL: the loop's thread, woken on the other core, takes the interpreter
at once, and the scheduler waits to get it back before it can deliver the next row's token.
Once per token, that was 16 hand-overs a decode step at 16 rows, and py-spy put 59% of the
scheduler thread's time outside onnxruntime into those writes (fused layout, c=16).

So deliveries go through a `LoopMailbox` per loop: `post` appends an item for a queue, and a
loop is woken once for everything posted to it. Inside `batched_wakeups()` (the scheduler
wraps each batch of sampled tokens in it) posts only append, and every mailbox that got one
is woken once when the block ends: a decode step's tokens for all its rows reach the loop in
one hand-over. Outside such a block a post wakes its loop unless a wake-up is already
pending. Items for one queue keep their order (one list, drained in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()
_holding = threading.local()  # .woken: the mailboxes to wake when this thread's batched_wakeups() ends


class LoopMailbox:
    """Items for queues of one event loop, handed over in batches; thread-safe."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._drain_pending = False
        self._closed = False

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Puts `item` on `queue` soon, from any thread; raises RuntimeError once the loop has
        closed (nobody is listening any more)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the event loop is closed")
            self._items.append((queue, item))
        woken: dict[int, LoopMailbox] | None = getattr(_holding, "woken", None)
        if woken is not None:
            woken[id(self)] = self
        else:
            self.wake()

    def wake(self) -> None:
        """Schedules the drain on the loop unless one is pending or nothing waits. A closed loop
        drops what waited, and later posts raise."""
        with self._lock:
            if self._drain_pending or not self._items or self._closed:
                return
            self._drain_pending = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed: its queues have no readers left
            with self._lock:
                self._closed = True
                self._items.clear()

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._drain_pending = False
        for queue, item in items:
            queue.put_nowait(item)


@contextlib.contextmanager
def batched_wakeups() -> Iterator[None]:
    """Within the block, this thread's posts wake each loop once, when the block ends (nested
    blocks wake at the outermost end)."""
    if getattr(_holding, "woken", None) is not None:
        yield
        return
    woken: dict[int, LoopMailbox] = {}
    _holding.woken = woken
    try:
        yield
    finally:
        _holding.woken = None
        for mailbox in woken.values():
            mailbox.wake()


def mailbox_for(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    """The one mailbox of `loop` (made on first use, gone with the loop)."""
    with _mailboxes_lock:
        mailbox = _mailboxes.get(loop)
        if mailbox is None:
            mailbox = _mailboxes[loop] = LoopMailbox(loop)
        return mailbox
