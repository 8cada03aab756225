"""gRPC servicer for llmsuite.tokenizer.v1.TokenizerService.

Thin by design: each handler converts protobuf to domain values, calls the
registry's tokenizer snapshot, converts back. Tokenizer work is CPU-bound
(the Rust library releases the GIL), so it runs in a thread pool and never
blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import json_format, timestamp_pb2

from llmsuite.common.v1 import common_pb2
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.runtime.logs import new_request_id
from llmsuite.tokenizer.chat_template import ChatMessage
from llmsuite.tokenizer.engine import LoadedTokenizer, TokenizerLimits, TokenizerRegistry
from llmsuite.tokenizer.reload_roots import ReloadRoots
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger("llmsuite.tokenizer")

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
T = TypeVar("T")


def _require_model(model: str) -> str:
    if not model:
        raise InvalidArgument.for_field("model", "required: the tokenizer name given to --model NAME=DIR",
                                        reason="MISSING_FIELD")
    return model


def _info_proto(tok: LoadedTokenizer) -> tokenizer_pb2.TokenizerInfo:
    sp = tok.special_tokens

    def special(content: str | None, token_id: int | None) -> tokenizer_pb2.SpecialToken | None:
        if content is None or token_id is None:
            return None
        return tokenizer_pb2.SpecialToken(content=content, id=token_id)

    loaded_at = timestamp_pb2.Timestamp()
    loaded_at.FromSeconds(int(tok.loaded_at))
    return tokenizer_pb2.TokenizerInfo(
        name=tok.name,
        vocab_size=tok.vocab_size,
        special_tokens=tokenizer_pb2.SpecialTokens(
            bos=special(sp.bos, sp.bos_id),
            eos=special(sp.eos, sp.eos_id),
            pad=special(sp.pad, sp.pad_id),
            unk=special(sp.unk, sp.unk_id),
            additional=[tokenizer_pb2.SpecialToken(content=c, id=i) for c, i in sp.additional_with_ids()],
        ),
        model_max_length=tok.model_max_length or 0,
        has_chat_template=tok.chat_template is not None,
        content_hash=tok.content_hash,
        directory=str(tok.directory),
        loaded_at=loaded_at,
    )


def _truncation(request: tokenizer_pb2.EncodeRequest) -> tuple[int | None, str]:
    if not request.HasField("truncation") or request.truncation.max_length == 0:
        return None, "right"
    side = "left" if request.truncation.side == common_pb2.TRUNCATION_SIDE_LEFT else "right"
    return request.truncation.max_length, side


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, registry: TokenizerRegistry, executor: ThreadPoolExecutor) -> None:
        self._registry = registry
        self._executor = executor

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext
                     ) -> tokenizer_pb2.EncodeResponse:
        tok = self._registry.get(_require_model(request.model))
        max_length, side = _truncation(request)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        encoded = await self._run(lambda: tok.encode(
            list(request.texts), add_special_tokens=add_special, return_offsets=request.return_offsets,
            max_length=max_length, truncation_side=side))
        return tokenizer_pb2.EncodeResponse(encodings=[
            common_pb2.Encoding(
                token_ids=e.ids,
                offsets=[common_pb2.CharSpan(start=s, end=t) for s, t in e.offsets or ()],
                truncated=e.truncated,
            ) for e in encoded
        ])

    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context: grpc.aio.ServicerContext
                     ) -> tokenizer_pb2.DecodeResponse:
        tok = self._registry.get(_require_model(request.model))
        sequences = [list(s.token_ids) for s in request.sequences]
        texts = await self._run(lambda: tok.decode(sequences, skip_special_tokens=request.skip_special_tokens))
        return tokenizer_pb2.DecodeResponse(texts=texts)

    async def CountTokens(self, request: tokenizer_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> tokenizer_pb2.CountTokensResponse:
        tok = self._registry.get(_require_model(request.model))
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        counts = await self._run(lambda: tok.count(list(request.texts), add_special_tokens=add_special))
        return tokenizer_pb2.CountTokensResponse(counts=counts, total=sum(counts))

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ApplyChatTemplateRequest,
                                context: grpc.aio.ServicerContext) -> tokenizer_pb2.ApplyChatTemplateResponse:
        tok = self._registry.get(_require_model(request.model))
        messages = [ChatMessage(role=m.role, content=m.content, name=m.name or None) for m in request.messages]
        extra = json_format.MessageToDict(request.template_variables) if request.HasField(
            "template_variables") else None
        rendered = await self._run(lambda: tok.apply_chat_template(
            messages, add_generation_prompt=request.add_generation_prompt, tokenize=request.tokenize,
            template_override=request.chat_template or None, extra_context=extra))
        return tokenizer_pb2.ApplyChatTemplateResponse(text=rendered.text, token_ids=rendered.ids or ())

    async def DecodeStream(self, request_iterator: AsyncIterator[tokenizer_pb2.DecodeStreamRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[tokenizer_pb2.DecodeStreamResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("kind") != "start":
            raise InvalidArgument.for_field("start", "the first DecodeStream message must be `start`",
                                            reason="STREAM_NOT_STARTED")
        start = first.start
        tok = self._registry.get(_require_model(start.model))
        request_id = start.request_id or new_request_id()
        detok = tok.new_decode_stream(skip_special_tokens=start.skip_special_tokens,
                                      prefix_ids=list(start.prefix_token_ids))
        sequence = 0
        consumed = 0
        async for message in request_iterator:
            if message.WhichOneof("kind") != "token_ids":
                raise InvalidArgument.for_field("start", "`start` may only be sent once",
                                                reason="STREAM_ALREADY_STARTED")
            ids = list(message.token_ids.token_ids)
            text = detok.push(ids)  # microseconds per token: cheaper inline than a thread hop
            consumed += len(ids)
            yield tokenizer_pb2.DecodeStreamResponse(
                request_id=request_id, sequence_number=sequence, text=text, consumed_tokens=consumed)
            sequence += 1
        yield tokenizer_pb2.DecodeStreamResponse(
            request_id=request_id, sequence_number=sequence, text=detok.finish(), consumed_tokens=consumed,
            final=True)

    async def ListModels(self, request: tokenizer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> tokenizer_pb2.ListModelsResponse:
        return tokenizer_pb2.ListModelsResponse(
            models=[_info_proto(t) for t in sorted(self._registry.all(), key=lambda t: t.name)])

    async def GetModelInfo(self, request: tokenizer_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> tokenizer_pb2.GetModelInfoResponse:
        return tokenizer_pb2.GetModelInfoResponse(info=_info_proto(self._registry.get(_require_model(request.model))))

    async def Reload(self, request: tokenizer_pb2.ReloadRequest, context: grpc.aio.ServicerContext
                     ) -> tokenizer_pb2.ReloadResponse:
        name = _require_model(request.model)
        previous = self._registry.get(name)
        reloaded = await self._run(lambda: self._registry.reload(name, request.directory or None))
        log.info("tokenizer reloaded", extra={"model": name, "previous": previous.content_hash,
                                              "current": reloaded.content_hash})
        return tokenizer_pb2.ReloadResponse(info=_info_proto(reloaded), previous_content_hash=previous.content_hash)


class TokenizerApp:
    """The tokenizer service as the bootstrap sees it (see runtime.server.ServiceApp)."""

    service_names: Sequence[str] = (SERVICE_NAME,)
    # Reload can take a model offline for everyone or change what every Chat renders.
    admin_methods: Sequence[str] = (f"/{SERVICE_NAME}/Reload",)

    def __init__(self, models: dict[str, Path], limits: TokenizerLimits, *, worker_threads: int = 4,
                 reload_roots: Sequence[Path] | None = None) -> None:
        """`reload_roots`: where Reload may read; None means the model directories."""
        self._models = models
        self.registry = TokenizerRegistry(
            limits, reload_roots=None if reload_roots is None else ReloadRoots(reload_roots))
        self._executor = ThreadPoolExecutor(max_workers=worker_threads, thread_name_prefix="tokenizer")

    def register(self, server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
            TokenizerServicer(self.registry, self._executor), server)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, directory in self._models.items():
            tok = await loop.run_in_executor(self._executor, self.registry.load, name, directory)
            log.info("tokenizer loaded", extra={"model": name, "directory": str(directory),
                                                "vocab_size": tok.vocab_size, "content_hash": tok.content_hash})

    def health_names(self) -> Sequence[str]:
        return tuple(f"model:{name}" for name in self.registry.names())

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
