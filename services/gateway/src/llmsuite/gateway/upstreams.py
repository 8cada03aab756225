"""The gateway's view of its upstreams: one tokenizer, N inference replicas.

Each inference address gets its own channel and circuit breaker, so the
gateway can spread requests round-robin, fail fast on a replica that is down
and spill a request over to another replica when one answers
RESOURCE_EXHAUSTED (or is unreachable) before streaming anything. A single
`dns:///name` target is one channel whose `round_robin` policy spreads calls
over every address the name resolves to.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from llmsuite.client.connection import auth_metadata
from llmsuite.gateway.circuit_breaker import CircuitBreaker
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.runtime.channels import ChannelSettings, create_channel
from llmsuite.runtime.errors import FailedPrecondition, NotFound, Unavailable
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger("llmsuite.gateway.upstreams")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
TOKENIZER_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
SPILL_OVER_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceStub
    breaker: CircuitBreaker


@dataclass(frozen=True)
class ServedModel:
    """A model both upstreams serve, with tokenizer and model proven to match."""

    name: str
    architecture: str
    context_length: int
    has_chat_template: bool
    execution_provider: str
    eos_token_ids: tuple[int, ...]


@dataclass
class OpenedStream:
    """An inference Generate stream that has produced its first message."""

    replica: Replica
    call: grpc.aio.StreamStreamCall
    first: inference_pb2.GenerateResponse


@dataclass
class Upstreams:
    tokenizer_channel: grpc.aio.Channel
    tokenizer: tokenizer_pb2_grpc.TokenizerServiceStub
    replicas: list[Replica]
    api_key: str | None
    models: dict[str, ServedModel] = field(default_factory=dict)
    _next: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def connect(cls, tokenizer_target: str, inference_targets: Sequence[str], settings: ChannelSettings, *,
                tracer_provider: object | None, breaker_threshold: int, breaker_reset_s: float) -> Upstreams:
        tok_channel = create_channel(tokenizer_target, settings, services=[TOKENIZER_SERVICE],
                                     tracer_provider=tracer_provider)
        replicas = []
        for address in inference_targets:
            channel = create_channel(address, settings, services=[INFERENCE_SERVICE], tracer_provider=tracer_provider)
            replicas.append(Replica(address, channel, inference_pb2_grpc.InferenceServiceStub(channel),
                                    CircuitBreaker(address, breaker_threshold, breaker_reset_s)))
        return cls(tok_channel, tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel), replicas, settings.api_key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self.api_key)

    async def refresh_models(self, *, wait_for_ready: bool = False, timeout_s: float = 10.0) -> None:
        """Pairs each inference model with the tokenizer of the same name and
        serves it only if their tokenizer content hashes agree."""
        tokenizers = await self.tokenizer.ListModels(tokenizer_pb2.ListModelsRequest(), metadata=self.metadata,
                                                     timeout=timeout_s, wait_for_ready=wait_for_ready)
        infos = await self.replicas[0].stub.ListModels(inference_pb2.ListModelsRequest(), metadata=self.metadata,
                                                       timeout=timeout_s, wait_for_ready=wait_for_ready)
        by_name = {t.name: t for t in tokenizers.models}
        served: dict[str, ServedModel] = {}
        for info in infos.models:
            tok = by_name.get(info.name)
            if tok is None:
                log.error("no tokenizer for model; not serving it", extra={"model": info.name})
                continue
            if tok.content_hash != info.tokenizer_content_hash:
                log.error("tokenizer does not belong to model; not serving it",
                          extra={"model": info.name, "tokenizer_hash": tok.content_hash,
                                 "model_tokenizer_hash": info.tokenizer_content_hash})
                continue
            served[info.name] = ServedModel(info.name, info.architecture, info.context_length,
                                            tok.has_chat_template, info.execution_provider, tuple(info.eos_token_ids))
        self.models = served

    async def model(self, name: str) -> ServedModel:
        if name not in self.models:
            await self.refresh_models()
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"model {name!r} is not served (available: {', '.join(sorted(self.models)) or 'none'})",
                           reason="MODEL_NOT_FOUND", metadata={"model": name}) from None

    def _candidates(self) -> list[Replica]:
        start = next(self._next)
        n = len(self.replicas)
        return [self.replicas[(start + i) % n] for i in range(n)]

    async def open_generate(self, start: inference_pb2.GenerateRequest, *,
                            time_limit_s: float | None, metadata: Sequence[tuple[str, str]]) -> OpenedStream:
        """Starts the stream on the next replica in round-robin order. A replica
        whose circuit is open is skipped; one that refuses before streaming
        anything (RESOURCE_EXHAUSTED, UNAVAILABLE) is spilled over once to the
        next. Caller mistakes (INVALID_ARGUMENT, ...) are raised at once."""
        last_error: grpc.aio.AioRpcError | Unavailable | None = None
        tries = 0
        for replica in self._candidates():
            if tries == 2:  # the first choice and one spill-over
                break
            try:
                replica.breaker.before_call()
            except Unavailable as exc:
                last_error = exc
                continue
            tries += 1
            call = replica.stub.Generate(timeout=time_limit_s, metadata=(*self.metadata, *metadata))
            try:
                await call.write(start)
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                replica.breaker.record_status(exc.code())
                if exc.code() in SPILL_OVER_CODES:
                    log.info("replica refused; spilling over",
                             extra={"replica": replica.address, "code": exc.code().name})
                    last_error = exc
                    continue
                raise
            except asyncio.CancelledError:
                call.cancel()
                replica.breaker.record_abandoned()
                raise
            if first is grpc.aio.EOF:
                replica.breaker.record_status(grpc.StatusCode.INTERNAL)
                raise Unavailable(f"inference replica {replica.address} closed the stream without a reply",
                                  reason="UPSTREAM_PROTOCOL_ERROR")
            replica.breaker.record_success()
            return OpenedStream(replica, call, first)
        if last_error is not None:
            raise last_error
        raise Unavailable("no inference replica is available", reason="NO_UPSTREAM", retry_after_s=1.0)

    async def decode_stream(self, model: str, prefix_ids: Sequence[int], *, skip_special_tokens: bool,
                            request_id: str, time_limit_s: float | None) -> DecodeStreamClient:
        call = self.tokenizer.DecodeStream(timeout=time_limit_s, metadata=self.metadata)
        await call.write(tokenizer_pb2.DecodeStreamRequest(start=tokenizer_pb2.DecodeStreamStart(
            model=model, request_id=request_id, skip_special_tokens=skip_special_tokens,
            prefix_token_ids=list(prefix_ids))))
        return DecodeStreamClient(call)

    async def close(self) -> None:
        await self.tokenizer_channel.close()
        for replica in self.replicas:
            await replica.channel.close()


class DecodeStreamClient:
    """Incremental detokenization through the tokenizer service's DecodeStream."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def push(self, ids: Sequence[int]) -> str:
        await self._call.write(tokenizer_pb2.DecodeStreamRequest(token_ids=tokenizer_pb2.TokenIds(token_ids=ids)))
        response = await self._call.read()
        if response is grpc.aio.EOF:
            raise FailedPrecondition("tokenizer closed the decode stream early", reason="UPSTREAM_PROTOCOL_ERROR")
        return response.text

    async def finish(self) -> str:
        await self._call.done_writing()
        text = ""
        async for response in _responses(self._call):
            text += response.text
        return text

    def cancel(self) -> None:
        self._call.cancel()


async def _responses(call: grpc.aio.StreamStreamCall) -> AsyncIterator[tokenizer_pb2.DecodeStreamResponse]:
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            return
        yield response

