"""A deterministic stand-in gateway for the client tests, served by the real
bootstrap (`start_server`: request ids, error mapping, API-key auth, health)
on a loopback port, plus a recording TCP proxy to look at the wire.

The fake echoes the prompt's words: word i is token i (text "w0", " w1", ...,
id `word_id(w)`), at most max_new_tokens of them (then finish "length";
otherwise "stop" on the EOS id 2). Stop strings cut the text. A word in
MAGIC_ERRORS makes the stream fail with that error once it gets there. Chat
replies echo the last message; cached_tokens counts all earlier turns' tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from google.protobuf import duration_pb2
from support import ServerThread

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from llmsuite.runtime.logs import current_request_id
from llmsuite.runtime.settings import ServerSettings

API_KEY = "test-key"
GATEWAY = "llmsuite.gateway.v1.GatewayService"
BOS, EOS = 1, 2

MAGIC_ERRORS = {
    "crash": lambda: Unavailable("inference upstream went away", reason="UPSTREAM_CIRCUIT_OPEN", retry_after_s=1.5),
    "ratelimit": lambda: ResourceExhausted("request bucket empty", reason="RATE_LIMITED", retry_after_s=2.5),
}


def word_id(word: str) -> int:
    return 3 + sum(word.encode()) % 997


def _duration(ms: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(ms * 1e6))
    return d


TIMINGS = common_pb2.Timings(queue_time=_duration(1), prefill_time=_duration(2), time_to_first_token=_duration(3),
                             mean_inter_token_latency=_duration(0.5), total_time=_duration(12.5))


@dataclass
class RecordedCall:
    method: str
    metadata: dict[str, str]
    request: Any


def _validate(model: str, sampling: common_pb2.SamplingParams) -> None:
    if model != "tiny":
        raise NotFound(f"model {model!r} not found; loaded: tiny", reason="MODEL_NOT_FOUND")
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        raise InvalidArgument.for_field("sampling.top_p", "must be in (0, 1]")
    if sampling.HasField("temperature") and not 0 <= sampling.temperature <= 100:
        raise InvalidArgument.for_field("sampling.temperature", "must be in [0, 100]")


@dataclass
class Step:
    """One generated token, or the end of the generation."""

    text: str = ""
    token_id: int | None = None
    summary: pb.GenerationSummary | None = None


def echo(words: list[str], sampling: common_pb2.SamplingParams, prompt_tokens: int,
         cached_tokens: int = 0) -> Iterator[Step]:
    limit = sampling.max_new_tokens or 16
    text = ""
    for i, word in enumerate(words[:limit]):
        if word in MAGIC_ERRORS:
            raise MAGIC_ERRORS[word]()
        piece = word if i == 0 else " " + word
        stop = next((s for s in sampling.stop_strings if s in text + piece), None)
        if stop is not None:
            cut = (text + piece).index(stop)
            yield Step(text=(text + piece)[len(text):cut])
            yield Step(summary=_summary(common_pb2.FINISH_REASON_STOP, prompt_tokens, i + 1, cached_tokens,
                                        matched_stop_string=stop))
            return
        text += piece
        yield Step(text=piece, token_id=word_id(word))
    n = min(len(words), limit)
    if len(words) >= limit:
        yield Step(summary=_summary(common_pb2.FINISH_REASON_LENGTH, prompt_tokens, n, cached_tokens))
    else:
        yield Step(summary=_summary(common_pb2.FINISH_REASON_STOP, prompt_tokens, n, cached_tokens,
                                    matched_stop_token_id=EOS))


def _summary(reason: int, prompt: int, completion: int, cached: int, **kw: Any) -> pb.GenerationSummary:
    return pb.GenerationSummary(
        finish_reason=reason, timings=TIMINGS,
        usage=common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached), **kw)


def _logprobs(token_id: int, sampling: common_pb2.SamplingParams) -> list[common_pb2.PositionLogprobs]:
    if not sampling.logprobs:
        return []
    top = [common_pb2.TokenLogprob(token_id=token_id + k, logprob=-0.25 * (k + 1))
           for k in range(sampling.top_logprobs)]
    return [common_pb2.PositionLogprobs(chosen=common_pb2.TokenLogprob(token_id=token_id, logprob=-0.25), top=top)]


class FakeGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """A ServiceApp for `start_server` whose GatewayService records every call."""

    service_names = (GATEWAY,)

    def __init__(self) -> None:
        self.calls: list[RecordedCall] = []
        self.chat_requests: list[pb.ChatRequest] = []
        self.cancelled = threading.Event()  # set when a streaming RPC saw the client cancel
        self.token_delay_s = 0.0
        # After its first token a GenerateStream waits for the client to cancel: "still
        # generating" is then a fact a test can rely on, not a race against a delay.
        self.hold_after_first_token = False

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self, server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health_names(self) -> tuple[str, ...]:
        return ()

    def reset(self) -> None:
        self.calls.clear()
        self.chat_requests.clear()
        self.cancelled.clear()
        self.token_delay_s = 0.0
        self.hold_after_first_token = False

    def last(self, method: str) -> RecordedCall:
        return next(c for c in reversed(self.calls) if c.method == method)

    def _record(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        md = {k: (v if isinstance(v, str) else v.decode("latin-1")) for k, v in context.invocation_metadata() or ()}
        self.calls.append(RecordedCall(method, md, request))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        self._record("Generate", request, context)
        _validate(request.model, request.sampling)
        prompt_tokens = len(request.prompt.split()) + (BOS if request.add_special_tokens or
                                                       not request.HasField("add_special_tokens") else 0)
        response = pb.GenerateResponse(request_id=current_request_id() or "")
        for step in echo(request.prompt.split(), request.sampling, prompt_tokens):
            if step.summary is not None:
                response.summary.CopyFrom(step.summary)
                continue
            response.text += step.text
            if step.token_id is not None:
                if request.return_token_ids:
                    response.token_ids.append(step.token_id)
                response.logprobs.extend(_logprobs(step.token_id, request.sampling))
        return response

    async def GenerateStream(self, request: pb.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        self._record("GenerateStream", request, context)
        _validate(request.model, request.sampling)
        rid = current_request_id() or ""
        try:
            seq = 0
            for step in echo(request.prompt.split(), request.sampling, len(request.prompt.split()) + BOS):
                if step.summary is not None:
                    yield pb.GenerateStreamResponse(request_id=rid, sequence_number=seq, final=step.summary)
                    return
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                delta = pb.TextDelta(text=step.text)
                if step.token_id is not None:
                    if request.return_token_ids:
                        delta.token_ids.append(step.token_id)
                    delta.logprobs.extend(_logprobs(step.token_id, request.sampling))
                yield pb.GenerateStreamResponse(request_id=rid, sequence_number=seq, delta=delta)
                seq += 1
                if self.hold_after_first_token:
                    await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def Chat(self, request_iterator: AsyncIterator[pb.ChatRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatResponse]:
        self._record("Chat", None, context)
        rid = current_request_id() or ""
        inbox: asyncio.Queue[pb.ChatRequest | None] = asyncio.Queue()

        async def read() -> None:
            async for r in request_iterator:
                self.chat_requests.append(r)
                await inbox.put(r)
            await inbox.put(None)

        reader = asyncio.create_task(read())
        seq, turn, cached, sampling = 0, 0, 0, common_pb2.SamplingParams()
        try:
            while (req := await inbox.get()) is not None:
                kind = req.WhichOneof("kind")
                if kind == "cancel":
                    return
                if turn == 0 and kind != "start":
                    raise FailedPrecondition("the first chat message must be start", reason="MISSING_START")
                if kind == "start":
                    _validate(req.start.model, req.start.sampling)
                    sampling, messages, turn_sampling = req.start.sampling, req.start.messages, req.start.sampling
                else:
                    messages = req.turn.messages
                    turn_sampling = req.turn.sampling if req.turn.HasField("sampling") else sampling
                    _validate("tiny", turn_sampling)
                prompt_tokens = sum(len(m.content.split()) for m in messages)
                completion_tokens = 0
                for step in echo(messages[-1].content.split(), turn_sampling, prompt_tokens, cached):
                    pending = None if inbox.empty() else inbox.get_nowait()
                    if pending is not None and pending.WhichOneof("kind") == "cancel":
                        step = Step(summary=_summary(common_pb2.FINISH_REASON_CANCELLED, prompt_tokens,
                                                     completion_tokens, cached))
                    elif pending is not None:
                        raise FailedPrecondition("a turn arrived before the reply ended", reason="TURN_IN_PROGRESS")
                    if step.summary is not None:
                        yield pb.ChatResponse(request_id=rid, sequence_number=seq, turn=turn, final=step.summary)
                        seq += 1
                        if step.summary.finish_reason == common_pb2.FINISH_REASON_CANCELLED:
                            return
                        break
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    completion_tokens += 1
                    yield pb.ChatResponse(request_id=rid, sequence_number=seq, turn=turn,
                                          delta=pb.TextDelta(text=step.text))
                    seq += 1
                cached += prompt_tokens + completion_tokens
                turn += 1
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            reader.cancel()

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        self._record("ListModels", request, context)
        return pb.ListModelsResponse(models=[
            pb.ModelSummary(name="tiny", architecture="llama", context_length=512, has_chat_template=True,
                            execution_provider="CPUExecutionProvider", layout="optimum", precision="fp32",
                            quantization="none"),
            pb.ModelSummary(name="tiny-gpt2", architecture="gpt2", context_length=256, has_chat_template=False,
                            execution_provider="CPUExecutionProvider", layout="onnxruntime-genai",
                            precision="int4", quantization="MatMulNBits int4, block 32", kv_cache_slots=16,
                            kv_cache_slot_tokens=256),
        ])

    def _encode(self, request: Any) -> list[common_pb2.Encoding]:
        _validate(request.model, common_pb2.SamplingParams())
        if not request.texts:
            raise InvalidArgument.for_field("texts", "at least one text is required", reason="MISSING_FIELD")
        special = request.add_special_tokens or not request.HasField("add_special_tokens")
        offsets_wanted = getattr(request, "return_offsets", False)
        out = []
        for text in request.texts:
            enc = common_pb2.Encoding()
            if special:
                enc.token_ids.append(BOS)
                if offsets_wanted:
                    enc.offsets.add(start=0, end=0)
            pos = 0
            for word in text.split():
                start = text.index(word, pos)
                pos = start + len(word)
                enc.token_ids.append(word_id(word))
                if offsets_wanted:
                    enc.offsets.add(start=start, end=pos)
            out.append(enc)
        return out

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self._record("Tokenize", request, context)
        return pb.TokenizeResponse(encodings=self._encode(request))

    async def CountTokens(self, request: pb.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> pb.CountTokensResponse:
        self._record("CountTokens", request, context)
        counts = [len(e.token_ids) for e in self._encode(request)]
        return pb.CountTokensResponse(counts=counts, total=sum(counts))


@dataclass
class GatewayServer:
    """The running fake, and the constants tests need (conftest is not importable by name)."""

    app: FakeGateway
    thread: ServerThread
    api_key = API_KEY
    eos = EOS
    word_id = staticmethod(word_id)

    @property
    def address(self) -> str:
        return self.thread.address

    def set_health(self, status: int, service: str = "") -> None:
        assert self.thread.running is not None
        self.thread.call(self.thread.running.health.set(service, status))


@pytest.fixture(scope="session")
def gateway_server() -> Iterator[GatewayServer]:
    app = FakeGateway()
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=0.2, log_format="text", api_keys=(API_KEY,))
    with ServerThread(app, settings) as thread:
        yield GatewayServer(app, thread)


@pytest.fixture
def gateway(gateway_server: GatewayServer) -> Iterator[GatewayServer]:
    """The shared fake gateway, with its recordings cleared for this test."""
    gateway_server.app.reset()
    yield gateway_server
    gateway_server.app.reset()


class RecordingProxy:
    """A TCP relay in front of `upstream` that keeps every byte the client sent."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def requests(self) -> list[tuple[dict[str, str], bytes]]:
        """(headers, body) of every request stream the client opened."""
        with self._lock:
            data = bytes(self.sent)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        headers: dict[int, dict[str, str]] = {}
        bodies: dict[int, bytearray] = {}
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers[event.stream_id] = dict(event.headers)
                bodies[event.stream_id] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] += event.data
        return [(headers[s], bytes(bodies[s])) for s in headers]

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture
def recording_proxy(gateway: GatewayServer) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(gateway.address)
    yield proxy
    proxy.close()
