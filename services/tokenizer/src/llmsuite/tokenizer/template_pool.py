"""Chat templates rendered in worker processes, with limits that hold inside one expression.

A Jinja expression runs as one Python call (`'x' * 10**9`, a big-integer power), and a
thread cannot be stopped from outside, so limits checked between template steps can be
outrun and an abandoned render would keep its thread. Rendering therefore happens in
`llmsuite.tokenizer.template_worker` processes: the kernel caps their memory
(RLIMIT_AS) and CPU time (RLIMIT_CPU), the output is capped as it is produced, and the
pool kills a worker whose job overruns its time or whose caller went away, then starts
a fresh one. Templates and variables go over a pipe as JSON, so what crosses back is
only data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

from llmsuite.runtime import errors
from llmsuite.runtime.errors import (
    DeadlineExceeded,
    FieldViolation,
    LlmsuiteError,
    ResourceExhausted,
    Unavailable,
)
from llmsuite.tokenizer.chat_template import ChatJob, limit_exceeded
from llmsuite.tokenizer.template_worker import FRAME_HEADER, encode_frame

log = logging.getLogger("llmsuite.tokenizer.templates")

_ERROR_TYPES: dict[str, type[LlmsuiteError]] = {
    "InvalidArgument": errors.InvalidArgument,
    "FailedPrecondition": errors.FailedPrecondition,
}


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may use, and how many run at once."""

    timeout_s: float = 2.0
    memory_bytes: int = 256 * 1024 * 1024
    workers: int = 2
    max_queued: int = 32


class _WorkerGone(Exception):
    """The worker process ended (or its pipe broke) before answering."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"template worker ended with {returncode}")
        self.returncode = returncode


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def spawn(cls, limits: TemplateLimits) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmsuite.tokenizer.template_worker",
            "--max-memory-bytes", str(limits.memory_bytes),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            # Its own session: a Ctrl-C at the terminal is the tokenizer's to handle. An
            # idle worker exits when the tokenizer's end of the pipe closes.
            start_new_session=True,
        )
        return cls(process)

    async def ask(self, job: ChatJob, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        frame = encode_frame({"source": job.source, "context": job.context, "from_request": job.from_request,
                              "max_output_chars": job.max_output_chars, "cpu_seconds": timeout_s})
        try:
            self.process.stdin.write(frame)
            await self.process.stdin.drain()
            header = await self.process.stdout.readexactly(FRAME_HEADER.size)
            (length,) = FRAME_HEADER.unpack(header)
            body = await self.process.stdout.readexactly(length)
        except (asyncio.IncompleteReadError, BrokenPipeError, ConnectionResetError):
            raise _WorkerGone(await self.process.wait()) from None
        reply: dict[str, Any] = json.loads(body)
        return reply

    def alive(self) -> bool:
        return self.process.returncode is None

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


def _error_from(reply: dict[str, Any]) -> LlmsuiteError:
    error = reply["error"]
    cls = _ERROR_TYPES.get(error["type"], errors.InvalidArgument)
    return cls(message=error["message"], reason=error["reason"],
               violations=tuple(FieldViolation(field, description) for field, description in error["violations"]),
               metadata=dict(error["metadata"]))


class TemplateRenderer:
    """Renders ChatJobs on up to `limits.workers` processes, started on first use.

    At most `limits.max_queued` jobs wait for a worker; beyond that RESOURCE_EXHAUSTED
    (reason TEMPLATE_WORKERS_BUSY) with a retry delay.
    """

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots = asyncio.Semaphore(limits.workers)
        self._waiting = 0
        self._closed = False

    async def render(self, job: ChatJob, *, time_remaining_s: float | None = None) -> str:
        """The rendered text. Raises the template's own typed errors, InvalidArgument
        (reason CHAT_TEMPLATE_LIMIT) when a limit is hit, DeadlineExceeded when the
        caller's deadline comes first. A cancelled caller's render is killed."""
        if self._waiting >= self.limits.max_queued and self._slots.locked():
            raise ResourceExhausted(
                message=f"all {self.limits.workers} chat template workers are busy and "
                        f"{self.limits.max_queued} renders wait already",
                reason="TEMPLATE_WORKERS_BUSY", retry_after_s=self.limits.timeout_s)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            worker = await self._checkout()
            timeout = self.limits.timeout_s
            deadline_first = time_remaining_s is not None and time_remaining_s < timeout
            if deadline_first:
                timeout = max(0.0, time_remaining_s or 0.0)
            try:
                reply = await asyncio.wait_for(worker.ask(job, timeout), timeout)
            except TimeoutError:
                await self._discard(worker)
                if deadline_first:
                    raise DeadlineExceeded("the deadline passed while the chat template rendered",
                                           reason="DEADLINE_EXCEEDED") from None
                raise limit_exceeded("time", f"more than {self.limits.timeout_s:g} s",
                                     from_request=job.from_request) from None
            except _WorkerGone as gone:
                await self._discard(worker)
                if self._closed:
                    raise Unavailable("the tokenizer is shutting down", reason="SHUTTING_DOWN") from None
                # SIGXCPU: its CPU allowance ran out; anything else that kills a worker
                # mid-job is, in practice, the memory cap or the kernel's OOM killer.
                resource = "time" if gone.returncode == -signal.SIGXCPU else "memory"
                raise limit_exceeded(resource, f"the renderer process was stopped ({gone.returncode})",
                                     from_request=job.from_request) from None
            except BaseException:  # cancelled: the caller left, so the work must stop
                await self._discard(worker)
                raise
            if reply.get("recycle"):
                await self._discard(worker)
            else:
                await self._checkin(worker)
            if "error" in reply:
                raise _error_from(reply)
            text: str = reply["text"]
            return text
        finally:
            self._slots.release()

    async def _checkout(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive():
                self._busy.add(worker)
                return worker
            await worker.kill()
        if self._closed:
            raise Unavailable("the tokenizer is shutting down", reason="SHUTTING_DOWN")
        try:
            worker = await _Worker.spawn(self.limits)
        except OSError as exc:
            log.error("cannot start a chat template worker", extra={"error": str(exc)})
            raise Unavailable("chat templates cannot be rendered right now", reason="TEMPLATE_WORKER_FAILED",
                              retry_after_s=1.0) from exc
        self._busy.add(worker)
        return worker

    async def _checkin(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if self._closed:
            await worker.kill()
        else:
            self._idle.append(worker)

    async def _discard(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        await asyncio.shield(worker.kill())

    def worker_pids(self) -> tuple[set[int], set[int]]:
        """(busy, idle) worker process ids."""
        return {w.process.pid for w in self._busy}, {w.process.pid for w in self._idle}

    async def close(self) -> None:
        """Kills every worker; later renders get UNAVAILABLE."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        for worker in workers:
            await worker.kill()
