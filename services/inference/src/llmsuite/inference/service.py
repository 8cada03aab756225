"""gRPC servicer for llmsuite.inference.v1.InferenceService.

Generate is one bidirectional stream per request: a reader task consumes
client messages (cancel, next turn, half-close) while the handler streams the
engine's tokens, so a Cancel lands within one decode step. The session is
closed (KV freed) however the stream ends: final message, error, client
cancel or deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from prometheus_client.registry import Collector

from llmsuite.inference.convert import (
    embeddings_to_proto,
    final_to_proto,
    logprobs_to_proto,
    model_info_to_proto,
    sampling_from_proto,
)
from llmsuite.inference.engine import (
    EngineSettings,
    FinishReason,
    GeneratedToken,
    GenerationSession,
    InferenceEngine,
    TurnResult,
)
from llmsuite.inference.metrics import InferenceMetrics
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument, LlmsuiteError, Unavailable
from llmsuite.runtime.health import HealthReporter
from llmsuite.runtime.logs import new_request_id, set_request_id
from llmsuite.runtime.messages import opening_message
from llmsuite.runtime.server import deferred_servicer

if TYPE_CHECKING:  # the servicer never touches the decoder; only tests' fault injection does
    from llmsuite.inference.engine.onnx_model import OnnxDecoder

log = logging.getLogger("llmsuite.inference")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
MAX_REQUEST_ID_CHARS = 128
MAX_FLUSH_EVERY = 256
# Tokens already produced are sent together, up to this many per message, when the stream
# falls behind the engine (under load), instead of one message each.
MAX_COALESCED_TOKENS = 64


@dataclass
class _ClientEvents:
    """What the reader task learned from the client while a turn ran."""

    cancelled: bool = False
    protocol_error: Exception | None = None


class _TurnRequest:
    def __init__(self, turn: pb.GenerateTurn) -> None:
        self.token_ids = list(turn.token_ids)
        self.sampling_msg = turn.sampling if turn.HasField("sampling") else None
        self.keep_history = turn.keep_history_tokens if turn.HasField("keep_history_tokens") else None


_END = object()  # the client half-closed


def _validate_start(start: pb.GenerateStart) -> None:
    if len(start.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument.for_field("start.request_id", f"at most {MAX_REQUEST_ID_CHARS} characters",
                                        limit=str(MAX_REQUEST_ID_CHARS))
    if not start.model:
        raise InvalidArgument.for_field("start.model", "required: a model name given to --model NAME=DIR",
                                        reason="MISSING_FIELD")
    if start.stream_options.flush_every_tokens > MAX_FLUSH_EVERY:
        raise InvalidArgument.for_field("start.stream_options.flush_every_tokens",
                                        f"must be in [0, {MAX_FLUSH_EVERY}]", limit=str(MAX_FLUSH_EVERY))


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine, metrics: InferenceMetrics) -> None:
        self._engine = engine
        self._metrics = metrics

    async def Generate(self, request_iterator: AsyncIterator[pb.GenerateRequest],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        requests = aiter(request_iterator)
        first = await opening_message(requests, "Generate")
        if first is None:
            return
        start = first.start
        _validate_start(start)
        request_id = start.request_id or new_request_id()
        set_request_id(request_id)
        if start.expected_tokenizer_hash:
            self._check_pairing(start.model, start.expected_tokenizer_hash)
        start_params = sampling_from_proto(start.sampling, field="start.sampling")
        flush_every = start.stream_options.flush_every_tokens or 1
        try:
            session = self._engine.open_session(start.model, multi_turn=start.session)
        except LlmsuiteError as exc:
            self._metrics.rejected_by_engine(start.model, exc)
            raise
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None

        inbox: asyncio.Queue[object] = asyncio.Queue()
        events = _ClientEvents()
        generating = asyncio.Event()
        reader = asyncio.create_task(self._read_client(requests, session, inbox, events, generating))
        sequence = 0
        turn_index = 0
        ids: list[int] = list(start.prompt_token_ids)
        params = start_params
        keep_history: int | None = None
        try:
            while True:
                ended_by: FinishReason | None = None
                generating.set()
                pending: list[GeneratedToken] = []
                async for item in self._metrics.observe_turn(start.model, session.generate(
                        ids, params, deadline=deadline, truncate_prompt=start.truncate_prompt,
                        keep_history=keep_history)):
                    if isinstance(item, TurnResult):
                        if pending:
                            yield self._tokens(request_id, sequence, turn_index, pending)
                            sequence += 1
                        generating.clear()
                        if events.protocol_error is not None:
                            raise events.protocol_error
                        yield pb.GenerateResponse(request_id=request_id, sequence_number=sequence,
                                                  turn=turn_index, final=final_to_proto(item))
                        sequence += 1
                        ended_by = item.finish_reason
                        break
                    pending.append(item)
                    if len(pending) >= flush_every and (len(pending) >= MAX_COALESCED_TOKENS
                                                        or not session.buffered()):
                        yield self._tokens(request_id, sequence, turn_index, pending)
                        sequence += 1
                        pending = []
                if not start.session or events.cancelled or ended_by in (FinishReason.CANCELLED,
                                                                         FinishReason.TIME_LIMIT):
                    return
                nxt = await inbox.get()
                if nxt is _END or events.cancelled:
                    return
                assert isinstance(nxt, _TurnRequest)
                turn_index += 1
                ids, keep_history = nxt.token_ids, nxt.keep_history
                params = (sampling_from_proto(nxt.sampling_msg, field="turn.sampling")
                          if nxt.sampling_msg is not None else start_params)
                if not ids and keep_history is None:
                    raise InvalidArgument.for_field("turn.token_ids", "a turn needs at least one token id "
                                                    "(or keep_history_tokens, to regenerate from a rewound history)",
                                                    reason="EMPTY_PROMPT")
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            session.close()

    def _check_pairing(self, model: str, expected_hash: str) -> None:
        """Ids from another tokenizer would mean other words here: refuse rather than generate."""
        actual = self._engine.model_info(model).tokenizer_hash
        if actual != expected_hash:
            raise Unavailable(
                f"model {model!r} on this replica is paired with tokenizer {actual}, not the {expected_hash} "
                "that produced the prompt ids; another replica (or a refreshed catalogue) may serve it",
                reason="TOKENIZER_MISMATCH", retry_after_s=1.0,
                metadata={"model": model, "tokenizer_content_hash": actual})

    @staticmethod
    def _tokens(request_id: str, sequence: int, turn: int, tokens: list[GeneratedToken]) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=request_id, sequence_number=sequence, turn=turn,
            tokens=pb.GeneratedTokens(token_ids=[t.token_id for t in tokens], logprobs=logprobs_to_proto(tokens)))

    @staticmethod
    async def _read_client(requests: AsyncIterator[pb.GenerateRequest], session: GenerationSession,
                           inbox: asyncio.Queue[object], events: _ClientEvents, generating: asyncio.Event) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "cancel":
                    events.cancelled = True
                    session.cancel()
                    inbox.put_nowait(_END)
                    return
                if kind == "turn":
                    if generating.is_set():
                        events.protocol_error = FailedPrecondition(
                            "a turn was sent while the previous one is still generating; wait for its final "
                            "message or send cancel", reason="TURN_IN_PROGRESS")
                        session.cancel()
                        return
                    inbox.put_nowait(_TurnRequest(message.turn))
                    continue
                events.protocol_error = InvalidArgument.for_field(
                    "start", "`start` may only be sent once", reason="STREAM_ALREADY_STARTED")
                session.cancel()
                return
        finally:
            inbox.put_nowait(_END)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument.for_field("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters",
                                            limit=str(MAX_REQUEST_ID_CHARS))
        if not request.model:
            raise InvalidArgument.for_field("model", "required: a model name given to --model NAME=DIR",
                                            reason="MISSING_FIELD")
        request_id = request.request_id or new_request_id()
        set_request_id(request_id)
        if request.expected_tokenizer_hash:
            self._check_pairing(request.model, request.expected_tokenizer_hash)
        remaining = context.time_remaining()
        try:
            result = await self._engine.embed(
                request.model, [list(i.token_ids) for i in request.inputs], dimensions=request.dimensions,
                truncate=request.truncate, deadline=time.monotonic() + remaining if remaining is not None else None)
        except LlmsuiteError as exc:
            self._metrics.rejected_by_engine(request.model, exc)
            raise
        return embeddings_to_proto(request_id, result)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        infos = sorted(self._engine.list_models(), key=lambda i: i.name)
        return pb.ListModelsResponse(models=[model_info_to_proto(i, self._engine.stats(i.name)) for i in infos])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> pb.GetModelInfoResponse:
        if not request.model:
            raise InvalidArgument.for_field("model", "required", reason="MISSING_FIELD")
        info = self._engine.model_info(request.model)
        return pb.GetModelInfoResponse(info=model_info_to_proto(info, self._engine.stats(request.model)))


class InferenceApp:
    """The inference service as the bootstrap sees it (see runtime.server.ServiceApp).

    When a model's engine gives up (it cannot step; EngineSettings.max_step_failures), health
    turns NOT_SERVING at once for the model and the service, and `wait_failed` returns, so that
    `serve` drains and exits non-zero for the orchestrator to restart the process.
    """

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, models: dict[str, Path], settings: EngineSettings, *,
                 prepare_decoder: Callable[[OnnxDecoder], None] | None = None) -> None:
        self._models = models
        self._settings = settings
        self._prepare_decoder = prepare_decoder  # tests only: fault injection
        self.engine: InferenceEngine | None = None
        self._servicer: InferenceServicer | None = None
        self._health: HealthReporter | None = None
        self._failed: asyncio.Future[str] | None = None
        self._reporting: set[asyncio.Task[None]] = set()
        self.metrics = InferenceMetrics(lambda: self.engine)

    def attach_health(self, reporter: HealthReporter) -> None:
        self._health = reporter

    def _failure(self) -> asyncio.Future[str]:
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return self._failed

    async def wait_failed(self) -> str:
        """Returns (with the cause) once a model's engine has given up; never while all serve."""
        return await self._failure()

    def _model_failed(self, model: str, cause: str) -> None:
        """On the event loop: health NOT_SERVING for everything this process reports, then
        `wait_failed` returns. A process with one failed model exits whole: an orchestrator
        restarts processes, not models."""
        log.error("model failed; reporting NOT_SERVING and exiting", extra={"model": model, "error": cause})
        if self._health is not None:
            task = asyncio.ensure_future(self._health.report(False))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)
        if not self._failure().done():
            self._failure().set_result(f"model {model}: {cause}")

    def collectors(self) -> Sequence[Collector]:
        return self.metrics.collectors()

    def _ready(self) -> InferenceServicer:
        if self._servicer is None:
            raise Unavailable("models are still loading; watch grpc.health.v1 for SERVING", reason="LOADING",
                              retry_after_s=1.0)
        return self._servicer

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(deferred_servicer(
            inference_pb2_grpc.InferenceServiceServicer, pb.DESCRIPTOR.services_by_name["InferenceService"],
            self._ready), server)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._failure()

        def model_failed(model: str, cause: str) -> None:  # on a scheduler thread
            loop.call_soon_threadsafe(self._model_failed, model, cause)

        self.engine = await asyncio.to_thread(InferenceEngine.load, self._models, self._settings,
                                              step_observer=self.metrics.observe_step,
                                              on_model_failed=model_failed, prepare_decoder=self._prepare_decoder)
        self._servicer = InferenceServicer(self.engine, self.metrics)
        for info in self.engine.list_models():
            log.info("model ready", extra={"model": info.name, "architecture": info.architecture,
                                           "execution_provider": info.execution_provider, "device": info.device,
                                           "context_length": info.context_length})

    def health_names(self) -> Sequence[str]:
        """Per-model and per-provider health names: a probe on
        `provider:CUDAExecutionProvider` fails when the GPU is not really in use."""
        if self.engine is None:
            return ()
        infos = self.engine.list_models()
        return (*(f"model:{i.name}" for i in infos), *sorted({f"provider:{i.execution_provider}" for i in infos}))

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.close()

