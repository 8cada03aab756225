"""gRPC servicer for llmsuite.gateway.v1.GatewayService: text in, text out.

Handlers validate and admit (caps, per-key rate limits), tokenize through the
tokenizer service, stream ids from an inference replica and relay them as
text (see generation.py). Upstream failures are translated in one place
(`_from_upstream`): the caller's own mistakes keep their code and details,
upstream breakage becomes UNAVAILABLE without internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.generation import Delta, TurnOutcome, relay_turn
from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.stop_strings import validate_stop_strings
from llmsuite.gateway.upstreams import OpenedStream, Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.auth import current_principal
from llmsuite.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, LlmsuiteError, Unavailable
from llmsuite.runtime.logs import current_request_id, new_request_id
from llmsuite.runtime.messages import DEFAULT_MAX_NEW_TOKENS
from llmsuite.runtime.server import deferred_servicer
from llmsuite.tokenizer.v1 import tokenizer_pb2

log = logging.getLogger("llmsuite.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE}
# Upstream request field paths -> the gateway request's own.
FIELD_RENAMES = (("start.sampling.", "sampling."), ("turn.sampling.", "sampling."), ("sampling.", "sampling."),
                 ("prompt_token_ids", "prompt"), ("texts[0]", "prompt"), ("start.model", "model"))


@dataclass(frozen=True)
class GatewayLimits:
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 2048
    max_chat_messages: int = 1024


def _rename(field: str) -> str:
    for old, new in FIELD_RENAMES:
        if field.startswith(old):
            return new + field[len(old):]
    return field


def _from_upstream(exc: grpc.aio.AioRpcError, upstream: str) -> LlmsuiteError:
    details = error_details(exc)
    if exc.code() in PASS_THROUGH:
        violations = tuple(FieldViolation(_rename(f), d) for f, d in details.get("field_violations", []))
        message = exc.details() or exc.code().name
        for old, new in FIELD_RENAMES:
            message = message.replace(old, new)
        error = LlmsuiteError(message, reason=details.get("reason", "UPSTREAM_ERROR"), violations=violations,
                              metadata=details.get("metadata", {}))
        error.code = exc.code()
        if "retry_after_s" in details:
            error.retry_after_s = details["retry_after_s"]  # type: ignore[attr-defined]
        return error
    log.warning("upstream failure", extra={"upstream": upstream, "code": exc.code().name, "detail": exc.details()})
    return Unavailable(f"the {upstream} service is unavailable; retry shortly", reason="UPSTREAM_UNAVAILABLE",
                       retry_after_s=1.0)


class _TranslateUpstreamErrors(contextlib.AbstractAsyncContextManager):
    def __init__(self, upstream: str) -> None:
        self._upstream = upstream

    async def __aexit__(self, exc_type, exc, tb):  # type: ignore[no-untyped-def]
        if isinstance(exc, grpc.aio.AioRpcError):
            raise _from_upstream(exc, self._upstream) from None
        return False


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, upstreams: Upstreams, limits: GatewayLimits, rate_limiter: KeyedRateLimiter) -> None:
        self._up = upstreams
        self._limits = limits
        self._rate = rate_limiter

    # -- admission -------------------------------------------------------------------------------------------

    def _check_sampling(self, sampling: common_pb2.SamplingParams) -> tuple[int, tuple[str, ...]]:
        max_new = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new > self._limits.max_new_tokens:
            raise InvalidArgument.for_field("sampling.max_new_tokens",
                                            f"{max_new} exceeds this gateway's cap {self._limits.max_new_tokens}",
                                            reason="MAX_NEW_TOKENS_TOO_LARGE", limit=str(self._limits.max_new_tokens))
        return max_new, validate_stop_strings(sampling.stop_strings)

    def _admit(self, prompt_tokens: int, max_new: int) -> str:
        if prompt_tokens > self._limits.max_prompt_tokens:
            raise InvalidArgument.for_field(
                "prompt", f"{prompt_tokens} tokens exceeds this gateway's cap {self._limits.max_prompt_tokens}",
                reason="PROMPT_TOO_LONG", limit=str(self._limits.max_prompt_tokens), prompt_tokens=str(prompt_tokens))
        principal = current_principal() or "anonymous"
        self._rate.check(principal, prompt_tokens + max_new)
        return principal

    async def _encode(self, model: str, texts: Sequence[str], *, add_special_tokens: bool | None,
                      return_offsets: bool = False, context: grpc.aio.ServicerContext) -> tokenizer_pb2.EncodeResponse:
        req = tokenizer_pb2.EncodeRequest(model=model, texts=texts, return_offsets=return_offsets)
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        async with _TranslateUpstreamErrors("tokenizer"):
            return await self._up.tokenizer.Encode(req, timeout=_remaining(context), metadata=self._up.metadata)

    @staticmethod
    def _forwarded_sampling(sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
        forwarded = common_pb2.SamplingParams()
        forwarded.CopyFrom(sampling)
        del forwarded.stop_strings[:]  # text-level: applied here, not upstream
        return forwarded

    async def _open(self, start: inference_pb2.GenerateStart, context: grpc.aio.ServicerContext) -> OpenedStream:
        async with _TranslateUpstreamErrors("inference"):
            return await self._up.open_generate(inference_pb2.GenerateRequest(start=start),
                                                time_limit_s=_remaining(context),
                                                metadata=(("x-request-id", start.request_id),))

    # -- Generate / GenerateStream ---------------------------------------------------------------------------

    async def _generate(self, req: pb.GenerateRequest | pb.GenerateStreamRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[Delta | TurnOutcome]:
        started_at = time.monotonic()
        if not req.model:
            raise InvalidArgument.for_field("model", "required", reason="MISSING_FIELD")
        if not req.prompt:
            raise InvalidArgument.for_field("prompt", "required", reason="EMPTY_PROMPT")
        max_new, stops = self._check_sampling(req.sampling)
        await self._up.model(req.model)
        add_special = req.add_special_tokens if req.HasField("add_special_tokens") else None
        prompt_ids = list((await self._encode(req.model, [req.prompt], add_special_tokens=add_special,
                                              context=context)).encodings[0].token_ids)
        principal = self._admit(len(prompt_ids), max_new)
        request_id = current_request_id() or new_request_id()
        opened = await self._open(inference_pb2.GenerateStart(
            request_id=request_id, model=req.model, prompt_token_ids=prompt_ids,
            sampling=self._forwarded_sampling(req.sampling), truncate_prompt=req.truncate_prompt), context)
        completion = 0
        try:
            async with _TranslateUpstreamErrors("tokenizer"):
                detok = await self._up.decode_stream(req.model, prompt_ids,
                                                     skip_special_tokens=not req.keep_special_tokens,
                                                     request_id=request_id, time_limit_s=_remaining(context))
            async with _TranslateUpstreamErrors("inference"):
                async for item in relay_turn(opened.call, opened.first, detok, stops, started_at=started_at,
                                             prompt_tokens=len(prompt_ids)):
                    if isinstance(item, TurnOutcome):
                        completion = item.summary.usage.completion_tokens
                    yield item
        finally:
            opened.call.cancel()  # no-op when finished; frees the inference slot when the client went away
            self._rate.refund(principal, max(0, max_new - completion))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=current_request_id() or "")
        text = []
        async for item in self._generate(request, context):
            if isinstance(item, Delta):
                text.append(item.text)
                if request.return_token_ids:
                    response.token_ids.extend(item.token_ids)
                response.logprobs.extend(item.logprobs)
            else:
                response.summary.CopyFrom(item.summary)
        response.text = "".join(text)
        return response

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        request_id = current_request_id() or ""
        sequence = 0
        async for item in self._generate(request, context):
            if isinstance(item, Delta):
                if not item.text and not request.return_token_ids and not item.logprobs:
                    continue  # nothing new to show yet (held-back bytes or stop-string prefix)
                yield pb.GenerateStreamResponse(request_id=request_id, sequence_number=sequence, delta=pb.TextDelta(
                    text=item.text, token_ids=item.token_ids if request.return_token_ids else (),
                    logprobs=item.logprobs))
            else:
                yield pb.GenerateStreamResponse(request_id=request_id, sequence_number=sequence, final=item.summary)
            sequence += 1

    # -- Chat ------------------------------------------------------------------------------------------------

    async def Chat(self, request_iterator: AsyncIterator[pb.ChatRequest], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.ChatResponse]:
        chat = _ChatSession(self, context)
        try:
            async for item in chat.run(aiter(request_iterator)):
                yield item
        finally:
            chat.close()

    # -- Catalog and tokenization ----------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        async with _TranslateUpstreamErrors("inference"):
            await self._up.refresh_models(timeout_s=_remaining(context) or 10.0)
        return pb.ListModelsResponse(models=[
            pb.ModelSummary(name=m.name, architecture=m.architecture, context_length=m.context_length,
                            has_chat_template=m.has_chat_template, execution_provider=m.execution_provider)
            for m in sorted(self._up.models.values(), key=lambda m: m.name)])

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        await self._up.model(request.model)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else None
        encoded = await self._encode(request.model, list(request.texts), add_special_tokens=add_special,
                                     return_offsets=request.return_offsets, context=context)
        return pb.TokenizeResponse(encodings=encoded.encodings)

    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CountTokensResponse:
        await self._up.model(request.model)
        req = tokenizer_pb2.CountTokensRequest(model=request.model, texts=request.texts)
        if request.HasField("add_special_tokens"):
            req.add_special_tokens = request.add_special_tokens
        async with _TranslateUpstreamErrors("tokenizer"):
            counted = await self._up.tokenizer.CountTokens(req, timeout=_remaining(context), metadata=self._up.metadata)
        return pb.CountTokensResponse(counts=counted.counts, total=counted.total)


class _ChatSession:
    """One Chat stream: the conversation, and one inference session whose KV
    cache carries it from turn to turn.

    Each turn renders the whole conversation with the chat template; the ids
    sent upstream are only what follows the text the inference session has
    already seen (prompt + generated ids, decoded), so earlier turns are never
    recomputed. If the rendering does not extend that text (a template that
    rewrites history, or a reply cut by a stop string, which ends the upstream
    turn), a fresh upstream session starts with the full prompt.
    """

    def __init__(self, servicer: GatewayServicer, context: grpc.aio.ServicerContext) -> None:
        self._s = servicer
        self._context = context
        self._request_id = current_request_id() or new_request_id()
        self._messages: list[common_pb2.ChatMessage] = []
        self._history_ids: list[int] = []
        self._stream: OpenedStream | None = None
        self._sequence = 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.call.cancel()
            self._stream = None

    async def run(self, requests: AsyncIterator[pb.ChatRequest]) -> AsyncIterator[pb.ChatResponse]:
        first = await anext(requests, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "start":
            raise InvalidArgument.for_field("start", "the first Chat message must be `start`",
                                            reason="STREAM_NOT_STARTED")
        start = first.start
        if not start.model:
            raise InvalidArgument.for_field("start.model", "required", reason="MISSING_FIELD")
        served = await self._s._up.model(start.model)
        if not served.has_chat_template:
            raise FailedPrecondition(f"model {start.model!r} has no chat template; use Generate",
                                     reason="NO_CHAT_TEMPLATE")
        self._model = start.model
        self._sampling = start.sampling
        new_messages, sampling = list(start.messages), start.sampling
        turn = 0
        while True:
            if not new_messages:
                raise InvalidArgument.for_field("turn.messages" if turn else "start.messages",
                                                "at least one message", reason="MISSING_FIELD")
            self._messages.extend(new_messages)
            if len(self._messages) > self._s._limits.max_chat_messages:
                raise InvalidArgument.for_field("turn.messages", "conversation exceeds "
                                                f"{self._s._limits.max_chat_messages} messages",
                                                reason="TOO_MANY_MESSAGES")
            reply: list[str] = []
            async for response in self._turn(turn, sampling, reply):
                yield response
            self._messages.append(common_pb2.ChatMessage(role="assistant", content="".join(reply)))
            nxt = await anext(requests, None)
            if nxt is None:
                return
            kind = nxt.WhichOneof("kind")
            if kind == "cancel":
                return
            if kind != "turn":
                raise InvalidArgument.for_field("start", "`start` may only be sent once",
                                                reason="STREAM_ALREADY_STARTED")
            turn += 1
            new_messages = list(nxt.turn.messages)
            sampling = nxt.turn.sampling if nxt.turn.HasField("sampling") else self._sampling

    async def _turn(self, turn: int, sampling: common_pb2.SamplingParams, reply: list[str]
                    ) -> AsyncIterator[pb.ChatResponse]:
        started_at = time.monotonic()
        up = self._s._up
        max_new, stops = self._s._check_sampling(sampling)
        async with _TranslateUpstreamErrors("tokenizer"):
            rendered = await up.tokenizer.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(
                model=self._model, messages=self._messages, add_generation_prompt=True, tokenize=True),
                timeout=_remaining(self._context), metadata=up.metadata)
        full_ids = list(rendered.token_ids)
        new_ids = await self._continuation(rendered.text) if self._stream is not None else None
        principal = self._s._admit(len(new_ids if new_ids is not None else full_ids), max_new)
        forwarded = self._s._forwarded_sampling(sampling)
        if new_ids is None:
            self.close()
            self._history_ids = []
            self._stream = await self._s._open(inference_pb2.GenerateStart(
                request_id=self._request_id, model=self._model, prompt_token_ids=full_ids, sampling=forwarded,
                session=True), self._context)
            first: inference_pb2.GenerateResponse | None = self._stream.first
            sent = full_ids
        else:
            async with _TranslateUpstreamErrors("inference"):
                await self._stream.call.write(inference_pb2.GenerateRequest(  # type: ignore[union-attr]
                    turn=inference_pb2.GenerateTurn(token_ids=new_ids, sampling=forwarded)))
            first, sent = None, new_ids
        context_ids = self._history_ids + sent
        completion = 0
        try:
            async with _TranslateUpstreamErrors("tokenizer"):
                detok = await up.decode_stream(self._model, context_ids, skip_special_tokens=True,
                                               request_id=self._request_id, time_limit_s=_remaining(self._context))
            async with _TranslateUpstreamErrors("inference"):
                assert self._stream is not None
                async for item in relay_turn(self._stream.call, first, detok, stops, started_at=started_at,
                                             prompt_tokens=len(sent)):
                    if isinstance(item, Delta):
                        if not item.text and not item.logprobs:
                            continue
                        reply.append(item.text)
                        yield pb.ChatResponse(request_id=self._request_id, sequence_number=self._sequence, turn=turn,
                                              delta=pb.TextDelta(text=item.text, logprobs=item.logprobs))
                    else:
                        completion = item.summary.usage.completion_tokens
                        self._history_ids = context_ids + item.generated_ids
                        if item.stopped_by_string or item.summary.finish_reason in (
                                common_pb2.FINISH_REASON_CANCELLED, common_pb2.FINISH_REASON_TIME_LIMIT):
                            self.close()  # the upstream stream ended with this turn
                        yield pb.ChatResponse(request_id=self._request_id, sequence_number=self._sequence, turn=turn,
                                              final=item.summary)
                    self._sequence += 1
        finally:
            self._s._rate.refund(principal, max(0, max_new - completion))

    async def _continuation(self, rendered_text: str) -> list[int] | None:
        """Ids for what the rendered conversation adds after the session's
        history, or None when it does not extend that history."""
        up = self._s._up
        async with _TranslateUpstreamErrors("tokenizer"):
            decoded = await up.tokenizer.Decode(tokenizer_pb2.DecodeRequest(
                model=self._model, sequences=[tokenizer_pb2.TokenIds(token_ids=self._history_ids)]),
                timeout=_remaining(self._context), metadata=up.metadata)
            seen = decoded.texts[0]
            if not rendered_text.startswith(seen) or len(rendered_text) == len(seen):
                return None
            encoded = await up.tokenizer.Encode(tokenizer_pb2.EncodeRequest(
                model=self._model, texts=[rendered_text[len(seen):]], add_special_tokens=False),
                timeout=_remaining(self._context), metadata=up.metadata)
        return list(encoded.encodings[0].token_ids)


class GatewayApp:
    """The gateway as the bootstrap sees it (see runtime.server.ServiceApp)."""

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, upstreams_factory, limits: GatewayLimits, rate_limiter: KeyedRateLimiter, *,  # type: ignore[no-untyped-def]
                 startup_timeout_s: float = 300.0) -> None:
        self._factory = upstreams_factory
        self._limits = limits
        self._rate = rate_limiter
        self._startup_timeout_s = startup_timeout_s
        self.upstreams: Upstreams | None = None
        self._servicer: GatewayServicer | None = None

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(deferred_servicer(
            gateway_pb2_grpc.GatewayServiceServicer, pb.DESCRIPTOR.services_by_name["GatewayService"],
            self._ready), server)

    def _ready(self) -> GatewayServicer:
        if self._servicer is None:
            raise Unavailable("the gateway is still connecting to its upstreams", reason="LOADING", retry_after_s=1.0)
        return self._servicer

    async def start(self) -> None:
        self.upstreams = self._factory()
        # wait_for_ready: in a cluster the upstreams may still be loading; health stays NOT_SERVING meanwhile.
        await self.upstreams.refresh_models(wait_for_ready=True, timeout_s=self._startup_timeout_s)
        self._servicer = GatewayServicer(self.upstreams, self._limits, self._rate)
        log.info("upstreams ready", extra={"models": ",".join(sorted(self.upstreams.models))})

    def health_names(self) -> Sequence[str]:
        return tuple(f"model:{name}" for name in sorted(self.upstreams.models)) if self.upstreams else ()

    async def stop(self) -> None:
        if self.upstreams is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.upstreams.close(), 5)

