"""The tokenizer under more work than it has threads for: bounded backlog with a retry
delay, health that says when the workers are stuck, and CPU work kept off the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread

from llmsuite.client.errors import error_details
from llmsuite.runtime.errors import ResourceExhausted
from llmsuite.tokenizer import convert
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import SERVICE_NAME, TokenizerApp, WorkSettings
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc
from llmsuite.tokenizer.work_queue import BoundedWorkQueue

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Blocker:
    """Occupies one worker thread of a running app until released."""

    def __init__(self, srv: ServerThread, app: TokenizerApp) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.future = asyncio.run_coroutine_threadsafe(app.work.run(self._block), srv.loop)
        assert self.started.wait(30)

    def _block(self) -> None:
        self.started.set()
        self.release.wait(60)

    def done(self) -> None:
        self.release.set()
        self.future.result(30)


def test_full_backlog_is_refused_with_a_retry_delay_and_the_service_recovers(tiny_tokenizer_dir: Path):
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits(),
                       work=WorkSettings(worker_threads=1, max_queued=0))
    with ServerThread(app) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        blocker = Blocker(srv, app)
        try:
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["x"]), timeout=30)
        finally:
            blocker.done()
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(exc_info.value)
        assert details["reason"] == "TOKENIZER_OVERLOADED" and details["retry_after_s"] > 0
        assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["x"]), timeout=30).total >= 1


def test_health_is_not_serving_while_requests_wait_on_stuck_workers(tiny_tokenizer_dir: Path):
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits(),
                       work=WorkSettings(worker_threads=1, max_queued=4, stall_after_s=0.2))
    with ServerThread(app) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert next(watch).status == SERVING
        blocker = Blocker(srv, app)
        waiting = stub.CountTokens.future(pb.CountTokensRequest(model="tiny", texts=["queued"]), timeout=60)
        try:
            assert next(watch).status == NOT_SERVING  # a request is waiting on a stuck worker
        finally:
            blocker.done()
        assert waiting.result().total >= 1
        assert next(watch).status == SERVING
        watch.cancel()


def test_a_single_busy_worker_is_not_a_stall():
    # Only waiting work counts: a long job with nothing behind it leaves health alone.
    async def scenario() -> tuple[float, float]:
        queue = BoundedWorkQueue(workers=1, max_queued=1)
        started, release = threading.Event(), threading.Event()

        def long_job() -> None:
            started.set()
            release.wait(30)

        running = asyncio.ensure_future(queue.run(long_job))
        await asyncio.to_thread(started.wait, 30)
        alone = queue.oldest_wait_s(now=1e12)
        waiting = asyncio.ensure_future(queue.run(lambda: None))
        await asyncio.sleep(0)
        behind = queue.oldest_wait_s(now=1e12)
        waiting.cancel()  # a caller that goes away takes its job out of the queue
        await asyncio.gather(waiting, return_exceptions=True)
        assert queue.queued == 0
        release.set()
        await running
        queue.shutdown()
        return alone, behind

    alone, behind = asyncio.run(scenario())
    assert alone == 0.0 and behind > 0


def test_backlog_bound_counts_running_and_waiting_jobs():
    async def scenario() -> None:
        queue = BoundedWorkQueue(workers=1, max_queued=1)
        release = threading.Event()
        first = asyncio.ensure_future(queue.run(release.wait, 30))
        second = asyncio.ensure_future(queue.run(lambda: "second"))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted):
            await queue.run(lambda: "third")
        release.set()
        assert await first and await second == "second"
        queue.shutdown()

    asyncio.run(scenario())


def test_responses_are_built_on_worker_threads_not_the_event_loop(tiny_tokenizer_dir: Path, monkeypatch):
    built_on: list[str] = []
    original = convert.encode_response

    def spying(encoded):  # type: ignore[no-untyped-def]
        built_on.append(threading.current_thread().name)
        return original(encoded)

    monkeypatch.setattr(convert, "encode_response", spying)
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())
    with ServerThread(app) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        response = stub.Encode(pb.EncodeRequest(model="tiny", texts=["offsets for every token"] * 4,
                                                return_offsets=True))
        assert len(response.encodings) == 4 and response.encodings[0].offsets
    assert built_on and all(name.startswith("tokenizer") for name in built_on), built_on
