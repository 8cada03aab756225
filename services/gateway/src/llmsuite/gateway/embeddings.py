"""Embed on the gateway: texts (or token ids) in, one vector per input out.

Texts are tokenized by the tokenizer service (cut to the model's maximum length when the
caller asks for truncation, else an over-long input is INVALID_ARGUMENT naming it and the
limit), the tokens are charged to the caller's rate limits like a prompt, and the ids go to
one replica serving the model, which batches them with other callers' inputs (see
docs/design.md, Embeddings). A replica that refuses before answering (overloaded, down)
is spilled over once to the next, as for generation.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import replace

import grpc

from llmsuite.gateway import conversions as conv
from llmsuite.gateway.admission import Admission
from llmsuite.gateway.catalogue import EMBEDDING, Catalogue, ServedModel, require_kind
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.runtime.errors import FieldViolation, InvalidArgument, LlmsuiteError
from llmsuite.runtime.logs import current_request_id, new_request_id

MAX_INPUTS = 2048  # as OpenAI's embeddings endpoint and the inference service
# Texts per Encode call: the tokenizer's default --max-batch-size. Larger requests are encoded in
# chunks of this size, concurrently (the tokenizer runs them on its worker threads).
ENCODE_CHUNK = 256
_REPLICA_FIELD = re.compile(r"^inputs\[(\d+)\]\.token_ids")
_TEXT_FIELD = re.compile(r"^texts\[(\d+)\]")


def _validated_inputs(request: pb.EmbedRequest) -> str:
    """Which field carries the inputs ("texts" or "token_ids"), after the checks that need no model."""
    if not request.model:
        raise InvalidArgument.for_field("model", "required", reason="MISSING_FIELD")
    if request.texts and request.token_ids:
        raise InvalidArgument.for_field("token_ids", "send texts or token_ids, not both", reason="INVALID_FIELD")
    field = "texts" if request.texts else "token_ids"
    count = len(request.texts) or len(request.token_ids)
    if count == 0:
        raise InvalidArgument.for_field("texts", "at least one text (or token_ids entry) is required",
                                        reason="EMPTY_INPUT")
    if count > MAX_INPUTS:
        raise InvalidArgument.for_field(field, f"{count} inputs exceeds the limit of {MAX_INPUTS} per request",
                                        reason="TOO_MANY_INPUTS", limit=str(MAX_INPUTS))
    for i in range(count):
        empty = not request.texts[i] if request.texts else not request.token_ids[i].token_ids
        if empty:
            raise InvalidArgument.for_field(f"{field}[{i}]", "an input must not be empty", reason="EMPTY_INPUT")
    return field


def _check_model(model: ServedModel, dimensions: int) -> None:
    require_kind(model, EMBEDDING)
    if dimensions > model.embedding_dimensions:
        raise InvalidArgument.for_field(
            "dimensions", f"must be in [1, {model.embedding_dimensions}] (model {model.name!r}'s vector length), or "
            f"0 for all; got {dimensions}", reason="DIMENSIONS_OUT_OF_RANGE", limit=str(model.embedding_dimensions))


def _check_lengths(inputs: Sequence[Sequence[int]], field: str, limit: int) -> None:
    for i, ids in enumerate(inputs):
        if len(ids) > limit:
            raise InvalidArgument.for_field(
                f"{field}[{i}]", f"{len(ids)} tokens exceeds the model's maximum length {limit}; shorten it or "
                "set truncate", reason="INPUT_TOO_LONG", limit=str(limit), tokens=str(len(ids)))


def _renamed(error: LlmsuiteError, pattern: re.Pattern[str], field: str, offset: int = 0) -> LlmsuiteError:
    """The error with field paths matching `pattern` (an index in group 1) renamed to `field[index + offset]`:
    a replica names `inputs[i].token_ids` where the caller sent `texts[i]` or `token_ids[i]`, and a chunk's
    Encode numbers its texts from 0."""
    if not error.violations:
        return error

    def rename(text: str) -> str:
        return pattern.sub(lambda m: f"{field}[{int(m.group(1)) + offset}]", text)

    violations = tuple(FieldViolation(rename(v.field), v.description) for v in error.violations)
    metadata = {**error.metadata, "field": violations[0].field} if "field" in error.metadata else error.metadata
    renamed = replace(error, violations=violations, metadata=metadata, message=rename(error.message))
    renamed.code = error.code
    return renamed


async def _encode(upstreams: Upstreams, catalogue: Catalogue, model: ServedModel, request: pb.EmbedRequest,
                  time_limit_s: float | None) -> list[list[int]]:
    """Token ids of every text, encoded in chunks of ENCODE_CHUNK texts at once."""

    async def chunk(start: int) -> list[list[int]]:
        encode = conv.encode_request(
            model.name, request.texts[start:start + ENCODE_CHUNK],
            add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else None,
            max_tokens=model.context_length if request.truncate else None)
        try:
            encoded = await upstreams.encode(encode, time_limit_s=time_limit_s)
        except LlmsuiteError as error:
            raise _renamed(error, _TEXT_FIELD, "texts", start) from None
        catalogue.check_pairing(model, encoded.content_hash)
        return [list(e.token_ids) for e in encoded.encodings]

    chunks = await asyncio.gather(*(chunk(start) for start in range(0, len(request.texts), ENCODE_CHUNK)))
    return [ids for part in chunks for ids in part]


async def embed(upstreams: Upstreams, catalogue: Catalogue, admission: Admission, request: pb.EmbedRequest,
                context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
    field = _validated_inputs(request)
    model = catalogue.lookup(request.model)
    _check_model(model, request.dimensions)
    limit = model.context_length
    if request.texts:
        inputs = await _encode(upstreams, catalogue, model, request, context.time_remaining())
    else:
        inputs = [list(t.token_ids)[:limit] if request.truncate else list(t.token_ids) for t in request.token_ids]
    _check_lengths(inputs, field, limit)
    tokens = sum(len(ids) for ids in inputs)
    # Per-input lengths are bounded by the model above; the rate limits count every token.
    charge = await admission.admit(0, tokens)
    used = 0
    try:
        forwarded = conv.embed_request(request_id=current_request_id() or new_request_id(), model=model,
                                       inputs=inputs, dimensions=request.dimensions)
        try:
            answer = await upstreams.embed(forwarded, catalogue.replicas_for(model),
                                             time_limit_s=context.time_remaining())
        except LlmsuiteError as error:
            raise _renamed(error, _REPLICA_FIELD, field) from None
        used = answer.usage.prompt_tokens
        return pb.EmbedResponse(request_id=current_request_id() or forwarded.request_id,
                                embeddings=answer.embeddings, usage=answer.usage, model=model.name)
    finally:
        charge.settle(used)
