"""The tokenizer's CPU work: a thread pool with a bounded backlog and a stall signal.

Tokenizer work is CPU-bound (the Rust library releases the GIL, Python-side
conversion does not), so it never runs on the event loop. The backlog in front of
the threads is bounded: past it, a request is refused at once with
RESOURCE_EXHAUSTED and a retry delay, instead of waiting behind work that may take
longer than the caller will wait. A job that has waited too long to start means
every thread is busy and not finishing: `oldest_wait_s` lets health report it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from llmsuite.runtime.errors import LlmsuiteError, ResourceExhausted

T = TypeVar("T")

# How much one finished job moves the running estimate of a job's duration.
_DURATION_SMOOTHING = 0.2
# Jobs at least this long allocated enough (hundreds of bytes per token, in the
# tokenizer library's threads) to be worth handing back to the OS afterwards.
_TRIM_AFTER_S = 0.1


def _find_malloc_trim() -> Callable[[int], int] | None:
    # glibc keeps freed memory in per-thread arenas; without a trim, one large request
    # leaves the process hundreds of MB larger for good. Other C libraries lack it.
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


class BoundedWorkQueue:
    """`workers` threads; at most `max_queued` jobs waiting for one."""

    def __init__(self, workers: int, max_queued: int, *, thread_name_prefix: str = "tokenizer") -> None:
        if workers < 1 or max_queued < 0:
            raise ValueError("workers must be >= 1 and max_queued >= 0")
        self.workers = workers
        self.max_queued = max_queued
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, float] = {}  # job id -> when it was queued (monotonic)
        self._running = 0
        self._mean_duration_s = 0.05

    @property
    def queued(self) -> int:
        """Jobs accepted but not yet started."""
        with self._lock:
            return len(self._waiting)

    def oldest_wait_s(self, now: float | None = None) -> float:
        """How long the job that has waited longest has been waiting to start (0 when none waits)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return now - min(self._waiting.values()) if self._waiting else 0.0

    def retry_after_s(self) -> float:
        """When a refused caller may find room: the time for the backlog to drain, roughly."""
        with self._lock:
            backlog = len(self._waiting) + self._running
            return min(5.0, max(0.05, self._mean_duration_s * backlog / self.workers))

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Runs `fn(*args)` on a worker thread. ResourceExhausted (reason
        TOKENIZER_OVERLOADED) when the backlog is full; a caller that goes away
        while its job waits takes the job out of the queue."""
        job = next(self._ids)
        with self._lock:
            if len(self._waiting) + self._running >= self.workers + self.max_queued:
                full = True
            else:
                full = False
                self._waiting[job] = time.monotonic()
        if full:
            raise ResourceExhausted(
                message=f"the tokenizer is busy: {self.workers} workers and {self.max_queued} queued requests",
                reason="TOKENIZER_OVERLOADED", retry_after_s=self.retry_after_s(),
                metadata={"max_queued": str(self.max_queued)})
        future: Future[T] = self._pool.submit(self._execute, job, fn, *args)
        future.add_done_callback(lambda _: self._forget(job))
        return await asyncio.wrap_future(future)

    def _execute(self, job: int, fn: Callable[..., T], *args: object) -> T:
        with self._lock:
            self._waiting.pop(job, None)
            self._running += 1
        started = time.monotonic()
        try:
            return fn(*args)
        except LlmsuiteError as error:
            # A typed error needs no traceback, and the frames it would keep alive hold
            # the job's work (a rejected encode's millions of tokens) until a GC pass.
            error.__traceback__ = None
            raise
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                self._running -= 1
                self._mean_duration_s += _DURATION_SMOOTHING * (elapsed - self._mean_duration_s)
            if elapsed >= _TRIM_AFTER_S and _malloc_trim is not None:
                _malloc_trim(0)

    def _forget(self, job: int) -> None:
        # A job cancelled before it started never ran _execute.
        with self._lock:
            self._waiting.pop(job, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
