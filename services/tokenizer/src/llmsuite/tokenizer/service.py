"""gRPC servicer for llmsuite.tokenizer.v1.TokenizerService.

Thin by design: each handler converts protobuf to domain values, calls the
registry's tokenizer snapshot, converts back (`convert`). Tokenizer work and
response building are CPU-bound, so both run on the bounded work queue and
never on the event loop; only tiny DecodeStream pushes run inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.registry import Collector

from llmsuite.runtime.errors import InvalidArgument
from llmsuite.runtime.health import HealthReporter
from llmsuite.runtime.logs import new_request_id
from llmsuite.runtime.messages import opening_message
from llmsuite.runtime.model_paths import tokenizer_directory
from llmsuite.tokenizer import convert
from llmsuite.tokenizer.engine import TokenizerLimits, TokenizerRegistry
from llmsuite.tokenizer.metrics import TokenizerMetrics
from llmsuite.tokenizer.reload_roots import ReloadRoots
from llmsuite.tokenizer.template_pool import TemplateLimits, TemplateRenderer
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from llmsuite.tokenizer.work_queue import BoundedWorkQueue

log = logging.getLogger("llmsuite.tokenizer")

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
# A DecodeStream push of at most this many ids decodes inline: a thread hop would
# cost more. Bigger ones (up to --max-tokens-per-sequence) go to the work queue.
INLINE_DECODE_IDS = 64


@dataclass(frozen=True)
class WorkSettings:
    """How tokenizer work is scheduled, and when being behind means not serving."""

    worker_threads: int = 4
    # A gateway sends one Encode per request it admits, so a burst as large as its
    # concurrency arrives at once; a waiting request holds only its already-received
    # message, so the bound is about latency, and 256 absorbs a c=64 burst several times.
    max_queued: int = 256
    # Health turns NOT_SERVING once a request has waited this long for a worker (every
    # worker busy and none finishing), and SERVING again once waits fall under half.
    stall_after_s: float = 10.0


def _require_model(model: str) -> str:
    if not model:
        raise InvalidArgument.for_field("model", "required: the tokenizer name given to --model NAME=DIR",
                                        reason="MISSING_FIELD")
    return model


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, registry: TokenizerRegistry, work: BoundedWorkQueue, metrics: TokenizerMetrics,
                 templates: TemplateRenderer, *, allow_request_templates: bool) -> None:
        self._registry = registry
        self._work = work
        self._metrics = metrics
        self._templates = templates
        self._allow_request_templates = allow_request_templates

    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext
                     ) -> tokenizer_pb2.EncodeResponse:
        tok = self._registry.get(_require_model(request.model))
        max_length, side = convert.truncation(request)
        response = await self._work.run(lambda: convert.encode_response(tok.encode(
            request.texts, add_special_tokens=convert.add_special_tokens(request),
            return_offsets=request.return_offsets, max_length=max_length, truncation_side=side)))
        response.content_hash = tok.content_hash
        self._metrics.encoded(tok.name, (len(e.token_ids) for e in response.encodings))
        return response

    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> tokenizer_pb2.DecodeResponse:
        tok = self._registry.get(_require_model(request.model))
        response = await self._work.run(lambda: tokenizer_pb2.DecodeResponse(texts=tok.decode(
            [s.token_ids for s in request.sequences], skip_special_tokens=request.skip_special_tokens),
            content_hash=tok.content_hash))
        self._metrics.decoded(tok.name, sum(len(s.token_ids) for s in request.sequences))
        return response

    async def CountTokens(self, request: tokenizer_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> tokenizer_pb2.CountTokensResponse:
        tok = self._registry.get(_require_model(request.model))
        counts = await self._work.run(
            lambda: tok.count(request.texts, add_special_tokens=convert.add_special_tokens(request)))
        self._metrics.encoded(tok.name, counts)
        return tokenizer_pb2.CountTokensResponse(counts=counts, total=sum(counts), content_hash=tok.content_hash)

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ApplyChatTemplateRequest,
                                context: grpc.aio.ServicerContext) -> tokenizer_pb2.ApplyChatTemplateResponse:
        tok = self._registry.get(_require_model(request.model))
        if request.chat_template and not self._allow_request_templates:
            raise InvalidArgument.for_field(
                "chat_template", "this server renders only the model's own template; request-supplied templates "
                "are off (the operator can allow them with --allow-request-templates)",
                reason="UNSUPPORTED_PARAMETER")
        if request.continue_final_message and request.add_generation_prompt:
            raise InvalidArgument.for_field("continue_final_message", "leaves the last message open; it cannot be "
                                            "combined with add_generation_prompt", reason="INVALID_FIELD")
        messages = convert.chat_messages(request.messages)
        continue_final = messages[-1].content if request.continue_final_message and messages else None
        job = await self._work.run(lambda: tok.prepare_chat(
            messages, add_generation_prompt=request.add_generation_prompt,
            template_override=request.chat_template or None, extra_context=convert.template_variables(request)))
        text = await self._templates.render(job, time_remaining_s=context.time_remaining())
        rendered = await self._work.run(lambda: tok.finish_chat(text, tokenize=request.tokenize,
                                                                continue_final=continue_final))
        if rendered.ids is not None:
            self._metrics.encoded(tok.name, [len(rendered.ids)])
        return tokenizer_pb2.ApplyChatTemplateResponse(text=rendered.text, token_ids=rendered.ids or (),
                                                       content_hash=tok.content_hash)

    async def DecodeStream(self, request_iterator: AsyncIterator[tokenizer_pb2.DecodeStreamRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[tokenizer_pb2.DecodeStreamResponse]:
        first = await opening_message(aiter(request_iterator), "DecodeStream")
        if first is None:
            return
        start = first.start
        tok = self._registry.get(_require_model(start.model))
        request_id = start.request_id or new_request_id()
        prefix = start.prefix_token_ids
        if len(prefix) <= INLINE_DECODE_IDS:
            detok = tok.new_decode_stream(skip_special_tokens=start.skip_special_tokens, prefix_ids=prefix)
        else:
            detok = await self._work.run(lambda: tok.new_decode_stream(
                skip_special_tokens=start.skip_special_tokens, prefix_ids=prefix))
        sequence = 0
        consumed = 0
        async for message in request_iterator:
            if message.WhichOneof("kind") != "token_ids":
                raise InvalidArgument.for_field("start", "`start` may only be sent once",
                                                reason="STREAM_ALREADY_STARTED")
            ids = message.token_ids.token_ids
            # Microseconds for a few ids: cheaper inline than a thread hop.
            text = detok.push(ids) if len(ids) <= INLINE_DECODE_IDS else await self._work.run(detok.push, ids)
            consumed += len(ids)
            self._metrics.decoded(tok.name, len(ids))
            yield tokenizer_pb2.DecodeStreamResponse(
                request_id=request_id, sequence_number=sequence, text=text, consumed_tokens=consumed)
            sequence += 1
        yield tokenizer_pb2.DecodeStreamResponse(
            request_id=request_id, sequence_number=sequence, text=detok.finish(), consumed_tokens=consumed,
            final=True)

    async def ListModels(self, request: tokenizer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> tokenizer_pb2.ListModelsResponse:
        return tokenizer_pb2.ListModelsResponse(
            models=[convert.info_proto(t) for t in sorted(self._registry.all(), key=lambda t: t.name)])

    async def GetModelInfo(self, request: tokenizer_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> tokenizer_pb2.GetModelInfoResponse:
        return tokenizer_pb2.GetModelInfoResponse(
            info=convert.info_proto(self._registry.get(_require_model(request.model))))

    async def GetTokenizerFiles(self, request: tokenizer_pb2.GetTokenizerFilesRequest,
                                context: grpc.aio.ServicerContext) -> tokenizer_pb2.GetTokenizerFilesResponse:
        tok = self._registry.get(_require_model(request.model))
        if request.known_content_hash == tok.content_hash:
            return tokenizer_pb2.GetTokenizerFilesResponse(content_hash=tok.content_hash)
        return tokenizer_pb2.GetTokenizerFilesResponse(content_hash=tok.content_hash, files=[
            tokenizer_pb2.TokenizerFile(name=name, content=content) for name, content in tok.hashed_files])

    async def Reload(self, request: tokenizer_pb2.ReloadRequest, context: grpc.aio.ServicerContext
                     ) -> tokenizer_pb2.ReloadResponse:
        name = _require_model(request.model)
        previous = self._registry.get(name)
        with self._metrics.reload(name):
            reloaded = await self._work.run(lambda: self._registry.reload(name, request.directory or None))
        log.info("tokenizer reloaded", extra={"model": name, "previous": previous.content_hash,
                                              "current": reloaded.content_hash})
        return tokenizer_pb2.ReloadResponse(info=convert.info_proto(reloaded),
                                            previous_content_hash=previous.content_hash)


class TokenizerApp:
    """The tokenizer service as the bootstrap sees it (see runtime.server.ServiceApp)."""

    service_names: Sequence[str] = (SERVICE_NAME,)
    # Reload can take a model offline for everyone or change what every Chat renders.
    admin_methods: Sequence[str] = (f"/{SERVICE_NAME}/Reload",)

    def __init__(self, models: dict[str, Path], limits: TokenizerLimits, *, work: WorkSettings | None = None,
                 reload_roots: Sequence[Path] | None = None, templates: TemplateLimits | None = None,
                 allow_request_templates: bool = False) -> None:
        """`reload_roots`: where Reload may read; None means the model directories.
        `allow_request_templates`: whether ApplyChatTemplate accepts a template from
        the caller (rendered under the same limits as the model's own). A model path that is an
        ONNX file (`REPO/onnx/model_q4.onnx`) serves the tokenizer beside it or in its parent,
        the directory the inference service hashes for the same path."""
        self._models = {name: tokenizer_directory(path) for name, path in models.items()}
        self.templates = TemplateRenderer(templates or TemplateLimits())
        self._allow_request_templates = allow_request_templates
        self.registry = TokenizerRegistry(
            limits, reload_roots=None if reload_roots is None else ReloadRoots(reload_roots))
        self.work_settings = work or WorkSettings()
        self.work = BoundedWorkQueue(self.work_settings.worker_threads, self.work_settings.max_queued)
        self._health: HealthReporter | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.metrics = TokenizerMetrics(self.registry, self.work)

    def collectors(self) -> Sequence[Collector]:
        return self.metrics.collectors()

    def register(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(TokenizerServicer(
            self.registry, self.work, self.metrics, self.templates,
            allow_request_templates=self._allow_request_templates), server)

    def attach_health(self, reporter: HealthReporter) -> None:
        self._health = reporter

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, directory in self._models.items():
            # Not through the work queue: loading is ours, not a request to refuse.
            tok = await loop.run_in_executor(None, self.registry.load, name, directory)
            log.info("tokenizer loaded", extra={"model": name, "directory": str(directory),
                                                "vocab_size": tok.vocab_size, "content_hash": tok.content_hash})
        if self._health is not None:
            self._watchdog = asyncio.create_task(self._watch_for_stalls(self._health))

    async def _watch_for_stalls(self, health: HealthReporter) -> None:
        """NOT_SERVING while requests wait longer than `stall_after_s` for a worker; a
        single slow call leaves the other workers free, so it never trips this."""
        stall_after = self.work_settings.stall_after_s
        stalled = False
        while True:
            await asyncio.sleep(stall_after / 4)
            waited = self.work.oldest_wait_s()
            if not stalled and waited > stall_after:
                stalled = True
                log.warning("tokenizer workers stalled; reporting NOT_SERVING",
                            extra={"oldest_wait_s": round(waited, 3), "queued": self.work.queued})
                await health.report(False)
            elif stalled and waited < stall_after / 2:
                stalled = False
                log.info("tokenizer workers caught up; reporting SERVING")
                await health.report(True)

    def health_names(self) -> Sequence[str]:
        return tuple(f"model:{name}" for name in self.registry.names())

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.templates.close()
        self.work.shutdown()
