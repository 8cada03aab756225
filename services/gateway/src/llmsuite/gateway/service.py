"""gRPC servicer for llmsuite.gateway.v1.GatewayService: text in, text out.

Handlers validate and admit (caps, per-key rate limits), tokenize through the
tokenizer service, stream ids from an inference replica and relay them as
text (see generation.py). Which models exist and where they run comes from
the catalogue, never from an upstream call on the request path. Upstream
failures reach the caller already translated (upstream_errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from prometheus_client.registry import Collector

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.affinity import DEFAULT_KEY_CHARS, prompt_key
from llmsuite.gateway.catalogue import EMBEDDING, GENERATION, Catalogue, HealthStatuses, ServedModel, require_kind
from llmsuite.gateway.chat import ChatSession
from llmsuite.gateway.embeddings import embed
from llmsuite.gateway.generation import Deadline, Delta, TurnOutcome, relay_turn
from llmsuite.gateway.metrics import GatewayMetrics
from llmsuite.gateway.rate_limit import RateLimiter
from llmsuite.gateway.stop_strings import validate_stop_strings
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.auth import current_principal
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from llmsuite.runtime.health import HealthReporter
from llmsuite.runtime.logs import current_request_id, new_request_id
from llmsuite.runtime.messages import DEFAULT_MAX_NEW_TOKENS
from llmsuite.runtime.sampling_limits import check_sampling_values
from llmsuite.runtime.server import deferred_servicer
from llmsuite.tokenizer.v1 import tokenizer_pb2

log = logging.getLogger("llmsuite.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
# Room in a request for everything but its text (model name, sampling, stop strings: at most
# a few KiB), on top of the text's worst-case UTF-8 size.
RECEIVE_HEADROOM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GatewayLimits:
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 2048
    max_chat_messages: int = 1024
    # How long before a request's deadline the gateway sends its own final
    # message (TIME_LIMIT); the replica's deadline is twice this much earlier.
    deadline_margin_s: float = 0.25
    # Characters of the input that pick a replica by prefix affinity (0 = plain round-robin).
    affinity_key_chars: int = DEFAULT_KEY_CHARS
    # Characters of text one request may carry (a prompt; Tokenize's or CountTokens' texts
    # together; a Chat conversation's messages together), checked before anything is forwarded.
    max_request_chars: int = 1_000_000

    def max_receive_bytes(self, max_message_bytes: int) -> int:
        """The gRPC server's receive cap: the largest request `max_request_chars` allows (4 UTF-8
        bytes a character) plus room for its other fields, at most `max_message_bytes`. gRPC
        refuses a larger message from its length prefix, before buffering it, so what a request
        can make the gateway hold is bounded by this, however large the message sent."""
        return min(max_message_bytes, 4 * self.max_request_chars + RECEIVE_HEADROOM_BYTES)

    def check_request_chars(self, field_path: str, texts: Iterable[str]) -> None:
        total = sum(len(text) for text in texts)
        if total > self.max_request_chars:
            raise InvalidArgument.for_field(
                field_path, f"{total} characters exceed this gateway's limit of {self.max_request_chars} per request",
                reason="REQUEST_TOO_LARGE", limit=str(self.max_request_chars))


class Charge:
    """Tokens one request was charged up front; `settle` refunds what it did not use."""

    def __init__(self, limiter: RateLimiter, principal: str, tokens: int) -> None:
        self._limiter = limiter
        self._principal = principal
        self._tokens = tokens
        self._charged_at = time.monotonic()
        self._settled = False

    def settle(self, used_tokens: int) -> None:
        if not self._settled:
            self._settled = True
            self._limiter.give_back(self._principal, max(0, self._tokens - used_tokens), self._charged_at)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, upstreams: Upstreams, catalogue: Catalogue, limits: GatewayLimits,
                 rate_limiter: RateLimiter, metrics: GatewayMetrics) -> None:
        self.up = upstreams
        self.catalogue = catalogue
        self.limits = limits
        self._rate = rate_limiter
        self.metrics = metrics

    # -- admission -------------------------------------------------------------------------------------------

    def check_sampling(self, sampling: common_pb2.SamplingParams) -> tuple[int, tuple[str, ...]]:
        # The replica checks these too; refusing here spares a tokenizer call and a replica slot.
        check_sampling_values(
            temperature=sampling.temperature if sampling.HasField("temperature") else None,
            top_p=sampling.top_p if sampling.HasField("top_p") else None,
            repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else None)
        max_new = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new > self.limits.max_new_tokens:
            raise InvalidArgument.for_field("sampling.max_new_tokens",
                                            f"{max_new} exceeds this gateway's cap {self.limits.max_new_tokens}",
                                            reason="MAX_NEW_TOKENS_TOO_LARGE", limit=str(self.limits.max_new_tokens))
        return max_new, validate_stop_strings(sampling.stop_strings)

    def prompt_too_long(self, prompt_tokens: str) -> InvalidArgument:
        return InvalidArgument.for_field(
            "prompt", f"{prompt_tokens} tokens exceeds this gateway's cap {self.limits.max_prompt_tokens}",
            reason="PROMPT_TOO_LONG", limit=str(self.limits.max_prompt_tokens), prompt_tokens=prompt_tokens)

    async def admit(self, prompt_tokens: int, max_new: int) -> Charge:
        """Checks the prompt cap and charges the caller's rate limits; the
        returned Charge must be settled on every path (see Charge)."""
        if prompt_tokens > self.limits.max_prompt_tokens:
            raise self.prompt_too_long(str(prompt_tokens))
        principal = current_principal() or "anonymous"
        try:
            await self._rate.charge(principal, prompt_tokens + max_new)
        except (ResourceExhausted, InvalidArgument) as refusal:
            # A shared store that cannot decide (Unavailable) is counted by the limiter, not here.
            self.metrics.rate_limit_refused(refusal)
            raise
        return Charge(self._rate, principal, prompt_tokens + max_new)

    async def encode(self, model: ServedModel, texts: Sequence[str], *, add_special_tokens: bool | None,
                     return_offsets: bool = False, time_limit_s: float | None,
                     max_tokens: int | None = None) -> tokenizer_pb2.EncodeResponse:
        """`max_tokens` has the tokenizer cut each encoding there (`truncated` says it did)."""
        req = tokenizer_pb2.EncodeRequest(model=model.name, texts=texts, return_offsets=return_offsets)
        if max_tokens is not None:
            req.truncation.max_length = max_tokens
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        encoded = await self.up.encode(req, time_limit_s=time_limit_s)
        self.catalogue.check_pairing(model, encoded.content_hash)
        return encoded

    @staticmethod
    def forwarded_sampling(sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
        forwarded = common_pb2.SamplingParams()
        forwarded.CopyFrom(sampling)
        del forwarded.stop_strings[:]  # text-level: applied here, not upstream
        return forwarded

    # -- Generate / GenerateStream ---------------------------------------------------------------------------

    async def _generate(self, req: pb.GenerateRequest | pb.GenerateStreamRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[Delta | TurnOutcome]:
        started_at = time.monotonic()
        if not req.model:
            raise InvalidArgument.for_field("model", "required", reason="MISSING_FIELD")
        prompt = req.prompt  # each read of a string field makes a new str: read the prompt once
        if not prompt:
            raise InvalidArgument.for_field("prompt", "required", reason="EMPTY_PROMPT")
        self.limits.check_request_chars("prompt", [prompt])
        max_new, stops = self.check_sampling(req.sampling)
        model = self.catalogue.lookup(req.model)
        require_kind(model, GENERATION)
        deadline = Deadline.split(context.time_remaining(), self.limits.deadline_margin_s)
        candidates = self.catalogue.replicas_for(model, prompt_key(prompt, self.limits.affinity_key_chars))
        # Open the replica's stream while the prompt is being encoded.
        dialed = self.up.dial(candidates[0], time_limit_s=deadline.upstream_timeout_s) if candidates else None
        try:
            add_special = req.add_special_tokens if req.HasField("add_special_tokens") else None
            # One id past the cap is enough to refuse: a prompt of a million tokens never
            # travels back as ids (nor becomes a million Python ints) only to be refused here.
            encoded = await self.encode(model, [prompt], add_special_tokens=add_special,
                                        time_limit_s=context.time_remaining(),
                                        max_tokens=self.limits.max_prompt_tokens + 1)
            encoding = encoded.encodings[0]
            if encoding.truncated:
                raise self.prompt_too_long(f"more than {self.limits.max_prompt_tokens}")
            prompt_ids = list(encoding.token_ids)
            charge = await self.admit(len(prompt_ids), max_new)
        except BaseException:
            if dialed is not None:
                dialed.cancel()
            raise
        used = 0  # tokens to keep charged: none unless a replica took the request
        try:
            detok = model.tokenizer.detokenizer(prompt_ids, skip_special_tokens=not req.keep_special_tokens)
            stream = await self.up.open_generate(inference_pb2.GenerateStart(
                request_id=current_request_id() or new_request_id(), model=req.model, prompt_token_ids=prompt_ids,
                sampling=self.forwarded_sampling(req.sampling), truncate_prompt=req.truncate_prompt,
                expected_tokenizer_hash=model.content_hash),
                candidates, time_limit_s=deadline.upstream_timeout_s, dialed=dialed)
            used = len(prompt_ids)
            try:
                async for item in relay_turn(stream, detok, stops, started_at=started_at,
                                             prompt_tokens=len(prompt_ids), deadline=deadline):
                    if isinstance(item, Delta):
                        used += len(item.token_ids)
                    yield item
                await stream.finish()
            finally:
                stream.cancel()  # no-op when finished; frees the replica's slot when the caller went away
        finally:
            charge.settle(used)

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
        chat = ChatSession(self, context)
        try:
            async for item in chat.run(aiter(request_iterator)):
                yield item
        finally:
            chat.close()

    # -- Catalog and tokenization ----------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelSummary(name=m.name, architecture=m.architecture, context_length=m.context_length,
                            has_chat_template=m.has_chat_template, execution_provider=m.execution_provider,
                            layout=m.layout, precision=m.precision, quantization=m.quantization,
                            kind=common_pb2.MODEL_KIND_EMBEDDING if m.kind == EMBEDDING
                            else common_pb2.MODEL_KIND_GENERATION, embedding_dimensions=m.embedding_dimensions)
            for m in self.catalogue.served])

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await embed(self, request, context)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        self.limits.check_request_chars("texts", request.texts)
        model = self.catalogue.lookup(request.model)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else None
        encoded = await self.encode(model, list(request.texts), add_special_tokens=add_special,
                                    return_offsets=request.return_offsets, time_limit_s=context.time_remaining())
        return pb.TokenizeResponse(encodings=encoded.encodings)

    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CountTokensResponse:
        self.limits.check_request_chars("texts", request.texts)
        model = self.catalogue.lookup(request.model)
        req = tokenizer_pb2.CountTokensRequest(model=request.model, texts=request.texts)
        if request.HasField("add_special_tokens"):
            req.add_special_tokens = request.add_special_tokens
        counted = await self.up.count_tokens(req, time_limit_s=context.time_remaining())
        self.catalogue.check_pairing(model, counted.content_hash)
        return pb.CountTokensResponse(counts=counted.counts, total=counted.total)


class GatewayApp:
    """The gateway as the bootstrap sees it (see runtime.server.ServiceApp).

    `start` returns once some model can be served (health turns SERVING
    then); until then the port answers, health says NOT_SERVING and calls get
    UNAVAILABLE. After that the catalogue keeps health current: NOT_SERVING
    while no model can be served, `model:NAME` per model.
    """

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, upstreams_factory: Callable[..., Upstreams], limits: GatewayLimits,
                 rate_limiter: RateLimiter, *, startup_timeout_s: float = 0.0,
                 refresh_interval_s: float = 2.0) -> None:
        self._factory = upstreams_factory
        self._limits = limits
        self._rate = rate_limiter
        self._startup_timeout_s = startup_timeout_s
        self._refresh_interval_s = refresh_interval_s
        self.upstreams: Upstreams | None = None
        self.catalogue: Catalogue | None = None
        self._servicer: GatewayServicer | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._health: HealthReporter | None = None
        self._started = False
        self._statuses: dict[str, bool] = {}
        self._reported: dict[str, bool] = {}
        self.metrics = GatewayMetrics(lambda: self.upstreams)
        rate_limiter.report_to(self.metrics)

    def collectors(self) -> Sequence[Collector]:
        return self.metrics.collectors()

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(deferred_servicer(
            gateway_pb2_grpc.GatewayServiceServicer, pb.DESCRIPTOR.services_by_name["GatewayService"],
            self._ready), server)

    def _ready(self) -> GatewayServicer:
        if self._servicer is None:
            raise Unavailable("the gateway is still connecting to its upstreams", reason="LOADING", retry_after_s=1.0)
        return self._servicer

    async def start(self) -> None:
        self.upstreams = self._factory(metrics=self.metrics)
        self.catalogue = Catalogue(self.upstreams, refresh_interval_s=self._refresh_interval_s,
                                   service_names=self.service_names, on_health=self._health_changed)
        self._servicer = GatewayServicer(self.upstreams, self.catalogue, self._limits, self._rate, self.metrics)
        self._refresher = asyncio.create_task(self.catalogue.run())
        log.info("waiting for a servable model", extra={"startup_timeout_s": self._startup_timeout_s})
        try:
            await asyncio.wait_for(self.catalogue.ready.wait(), self._startup_timeout_s or None)
        except TimeoutError:
            raise RuntimeError(f"no model became servable within --startup-timeout {self._startup_timeout_s:g}s "
                               "(are the tokenizer and inference services up, and do their tokenizers match?)"
                               ) from None
        log.info("upstreams ready", extra={"models": ",".join(m.name for m in self.catalogue.served)})
        self._started = True  # the bootstrap reports SERVING next; from then on the catalogue reports

    def health_names(self) -> Sequence[str]:
        return [name for name, serving in self._statuses.items() if name.startswith("model:") and serving]

    def attach_health(self, reporter: HealthReporter) -> None:
        self._health = reporter

    async def _health_changed(self, statuses: HealthStatuses) -> None:
        # A name that disappeared (its model is listed nowhere now) stays known, as NOT_SERVING.
        self._statuses = {**dict.fromkeys(self._statuses, False), **statuses}
        await self._report()

    async def _report(self) -> None:
        if self._health is None or not self._started:
            return
        changed = {name: serving for name, serving in self._statuses.items() if self._reported.get(name) != serving}
        self._reported.update(changed)
        await self._health.report_each(changed)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.upstreams is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.upstreams.close(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._rate.close(), 5)  # pending refunds to a shared store, its connections
