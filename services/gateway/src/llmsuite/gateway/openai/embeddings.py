"""POST /v1/embeddings: OpenAI's embeddings endpoint onto the gateway's Embed.

`input` is a string, a list of strings, a list of token ids or a list of token-id lists,
as OpenAI accepts; `encoding_format` is `float` (JSON numbers) or `base64` (the vector's
little-endian float32 bytes, what the official client asks for by default and decodes
with numpy); `dimensions` shortens and re-normalises the vectors. One request is one
gateway call with the caller's key, so limits, rate limits and errors are the gateway's.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmsuite.client import LlmsuiteError
from llmsuite.gateway.openai.schemas import _Strict

if TYPE_CHECKING:
    from llmsuite.gateway.openai.app import OpenAiApi

REQUEST_ID_HEADER = "x-request-id"
_INPUT_FIELD = re.compile(r"^(texts|token_ids)")
EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings."""

    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = ("user",)
    user: Any = None  # the caller's own bookkeeping
    # llmsuite extension (extra_body): cut inputs over the model's maximum length instead of a 400.
    truncate: bool | None = None

    @field_validator("input", mode="plain")
    @classmethod
    def _input(cls, value: Any) -> EmbeddingInput:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                return value
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return value
            if all(isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                   for v in value):
                return value
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")

    def unsupported_fields(self) -> list[tuple[str, str]]:
        return []

    def check_sampling_values(self) -> None:
        """Nothing is sampled: every request body answers it, this one with no checks."""

    @property
    def texts(self) -> list[str] | None:
        if isinstance(self.input, str):
            return [self.input]
        return self.input if self.input and isinstance(self.input[0], str) else None

    @property
    def token_ids(self) -> list[list[int]]:
        if self.input and isinstance(self.input[0], int):
            return [self.input]  # type: ignore[list-item]
        return self.input  # type: ignore[return-value]


def _encoded(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


async def embeddings(api: OpenAiApi, request: Request) -> Response:
    from llmsuite.gateway.openai.app import until_disconnected  # app.py imports this module: no cycle at import

    rid = request.state.request_id
    req = await api._body(request, EmbeddingRequest)
    client = api.client_for(request)
    texts = req.texts
    try:
        result = await until_disconnected(request, client.embed(
            texts if texts is not None else req.token_ids, model=req.model, dimensions=req.dimensions,
            truncate=bool(req.truncate), request_id=rid, timeout_s=api.settings.request_timeout_s))
    except LlmsuiteError as exc:  # the gateway's texts[i] / token_ids[i] are this request's input[i]
        if exc.field_violations:
            path = exc.field_violations[0].field
            request.state.renames = {path: _INPUT_FIELD.sub("input", path)}
        raise
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encoded(vector, req.encoding_format)}
                 for i, vector in enumerate(result.vectors)],
        "model": req.model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
    }
    return JSONResponse(body, headers={REQUEST_ID_HEADER: rid})
