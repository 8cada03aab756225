"""gRPC servicer for llmsuite.gateway.v1.GatewayService: text in, text out.

Handlers validate and admit (caps, per-key rate limits: admission.py), tokenize
through the tokenizer service, stream ids from an inference replica and relay
them as text (see generation.py); protos are built in conversions.py. Which models exist and where they run comes from
the catalogue, never from an upstream call on the request path. Upstream
failures reach the caller already translated (upstream_errors.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import grpc

from llmsuite.gateway import conversions as conv
from llmsuite.gateway.admission import Admission
from llmsuite.gateway.affinity import prompt_key
from llmsuite.gateway.catalogue import GENERATION, Catalogue, ServedModel, require_kind
from llmsuite.gateway.chat import ChatSession
from llmsuite.gateway.embeddings import embed
from llmsuite.gateway.generation import Deadline, relay_turn
from llmsuite.gateway.turns import Delta, TurnOutcome
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.runtime.logs import current_request_id, new_request_id
from llmsuite.tokenizer.v1 import tokenizer_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, upstreams: Upstreams, catalogue: Catalogue, admission: Admission) -> None:
        self.up = upstreams
        self.catalogue = catalogue
        self.admission = admission
        self.limits = admission.limits

    async def encode(self, model: ServedModel, texts: Sequence[str], *, add_special_tokens: bool | None,
                     return_offsets: bool = False, time_limit_s: float | None,
                     max_tokens: int | None = None) -> tokenizer_pb2.EncodeResponse:
        """`max_tokens` has the tokenizer cut each encoding there (`truncated` says it did)."""
        encoded = await self.up.encode(conv.encode_request(model.name, texts, add_special_tokens=add_special_tokens,
                                                           return_offsets=return_offsets, max_tokens=max_tokens),
                                       time_limit_s=time_limit_s)
        self.catalogue.check_pairing(model, encoded.content_hash)
        return encoded

    # -- Generate / GenerateStream ---------------------------------------------------------------------------

    async def _generate(self, req: pb.GenerateRequest | pb.GenerateStreamRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[Delta | TurnOutcome]:
        started_at = time.monotonic()
        if not req.model:
            raise InvalidArgument.for_field("model", "required", reason="MISSING_FIELD")
        prompt = req.prompt  # each read of a string field makes a new str: read the prompt once
        given_ids = list(req.prompt_token_ids)
        if prompt and given_ids:
            raise InvalidArgument.for_field("prompt_token_ids", "set prompt or prompt_token_ids, not both",
                                            reason="INVALID_FIELD")
        if not prompt and not given_ids:
            raise InvalidArgument.for_field("prompt", "required", reason="EMPTY_PROMPT")
        self.limits.check_request_chars("prompt", [prompt])
        max_new, stops = self.admission.check_sampling(req.sampling)
        model = self.catalogue.lookup(req.model)
        require_kind(model, GENERATION)
        deadline = Deadline.split(context.time_remaining(), self.limits.deadline_margin_s)
        if given_ids:  # the affinity key of the text they stand for, as a text prompt's would be
            prompt_text = model.tokenizer.decode(given_ids[:self.limits.affinity_key_chars], skip_special_tokens=True)
        else:
            prompt_text = prompt
        candidates = self.catalogue.replicas_for(model, prompt_key(prompt_text, self.limits.affinity_key_chars))
        # Open the replica's stream while the prompt is being encoded.
        dialed = self.up.dial(candidates[0], time_limit_s=deadline.upstream_timeout_s) if candidates else None
        try:
            if given_ids:
                if len(given_ids) > self.limits.max_prompt_tokens:
                    raise self.admission.prompt_too_long(str(len(given_ids)))
                prompt_ids = given_ids
            else:
                prompt_ids = await self._encode_prompt(model, req, prompt, context)
            charge = await self.admission.admit(len(prompt_ids), max_new)
        except BaseException:
            if dialed is not None:
                dialed.cancel()
            raise
        used = 0  # tokens to keep charged: none unless a replica took the request
        try:
            detok = model.tokenizer.detokenizer(prompt_ids, skip_special_tokens=not req.keep_special_tokens)
            stream = await self.up.open_generate(conv.generate_start(
                request_id=current_request_id() or new_request_id(), model=model, prompt_ids=prompt_ids,
                sampling=req.sampling, truncate_prompt=req.truncate_prompt),
                candidates, time_limit_s=deadline.upstream_timeout_s, dialed=dialed)
            used = len(prompt_ids)
            try:
                async for item in relay_turn(stream, detok, stops, started_at=started_at,
                                             prompt_tokens=len(prompt_ids), deadline=deadline,
                                             token_piece=model.tokenizer.token_piece,
                                             include_stop_string=req.sampling.include_stop_str_in_output):
                    if isinstance(item, Delta):
                        used += len(item.token_ids)
                    yield item
                await stream.finish()
            finally:
                stream.cancel()  # no-op when finished; frees the replica's slot when the caller went away
        finally:
            charge.settle(used)

    async def _encode_prompt(self, model: ServedModel, req: pb.GenerateRequest | pb.GenerateStreamRequest,
                             prompt: str, context: grpc.aio.ServicerContext) -> list[int]:
        add_special = req.add_special_tokens if req.HasField("add_special_tokens") else None
        # One id past the cap is enough to refuse: a prompt of a million tokens never
        # travels back as ids (nor becomes a million Python ints) only to be refused here.
        encoded = await self.encode(model, [prompt], add_special_tokens=add_special,
                                    time_limit_s=context.time_remaining(),
                                    max_tokens=self.limits.max_prompt_tokens + 1)
        encoding = encoded.encodings[0]
        if encoding.truncated:
            raise self.admission.prompt_too_long(f"more than {self.limits.max_prompt_tokens}")
        return list(encoding.token_ids)

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
                response.summary.CopyFrom(conv.generation_summary(item))
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
                yield pb.GenerateStreamResponse(request_id=request_id, sequence_number=sequence,
                                                delta=conv.text_delta(item, token_ids=request.return_token_ids))
            else:
                yield pb.GenerateStreamResponse(request_id=request_id, sequence_number=sequence,
                                                final=conv.generation_summary(item))
            sequence += 1

    # -- Chat ------------------------------------------------------------------------------------------------

    async def Chat(self, request_iterator: AsyncIterator[pb.ChatRequest], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.ChatResponse]:
        chat = ChatSession(self.up, self.catalogue, self.admission, context)
        try:
            async for item in chat.run(aiter(request_iterator)):
                yield item
        finally:
            chat.close()

    # -- Catalog and tokenization ----------------------------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[conv.model_summary(m) for m in self.catalogue.served])

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await embed(self.up, self.catalogue, self.admission, request, context)

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
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else None
        counted = await self.up.count_tokens(conv.count_tokens_request(request.model, request.texts,
                                                                       add_special_tokens=add_special),
                                             time_limit_s=context.time_remaining())
        self.catalogue.check_pairing(model, counted.content_hash)
        return pb.CountTokensResponse(counts=counted.counts, total=counted.total)

    async def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DetokenizeResponse:
        model = self.catalogue.lookup(request.model)
        decoded = await self.up.decode(conv.decode_request(request.model, request.token_ids,
                                                           keep_special_tokens=request.keep_special_tokens),
                                       time_limit_s=context.time_remaining())
        self.catalogue.check_pairing(model, decoded.content_hash)
        return pb.DetokenizeResponse(text=decoded.texts[0])
