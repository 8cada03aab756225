"""POST /tokenize and /detokenize in vLLM's shapes, onto the gateway's Tokenize and Detokenize.

`/tokenize` takes `{"model", "prompt", "add_special_tokens", "return_token_strs"}` and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; `/detokenize` takes `{"model", "tokens"}`
and answers `{"prompt"}`. vLLM's chat form of /tokenize (`messages`) is refused by name: the
gateway renders chat templates only for generation. `token_strs` are the pieces of the prompt
each token covers (from the tokenizer's offsets), where vLLM gives the vocabulary's raw
strings (`Ġword`); both concatenate to the text for byte-level tokenizers.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmsuite.client import LlmsuiteError
from llmsuite.gateway.openai.errors import ApiError
from llmsuite.gateway.openai.schemas import _Strict

if TYPE_CHECKING:
    from llmsuite.gateway.openai.app import OpenAiApi

REQUEST_ID_HEADER = "x-request-id"


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's completion form)."""

    model: str = Field(min_length=1)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False
    # vLLM's chat form: declared so that it is refused by name, not as unknown.
    messages: Any = None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        if self.messages is not None:
            return [("messages", "tokenizing a conversation is not supported; send its text as prompt")]
        return []

    def check_sampling_values(self) -> None:
        """Nothing is sampled: every request body answers it, this one with no checks."""


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: str = Field(min_length=1)
    tokens: list[int]

    def unsupported_fields(self) -> list[tuple[str, str]]:
        return []

    def check_sampling_values(self) -> None:
        """Nothing is sampled: every request body answers it, this one with no checks."""


async def tokenize(api: OpenAiApi, request: Request) -> Response:
    from llmsuite.gateway.openai.app import until_disconnected  # app.py imports this module: no cycle at import

    rid = request.state.request_id
    req = await api._body(request, TokenizeRequest)
    client = api.client_for(request)
    request.state.renames = {"texts": "prompt", "texts[0]": "prompt"}
    timeout_s = api.settings.request_timeout_s
    encodings, models = await until_disconnected(request, asyncio.gather(
        client.tokenize(req.prompt, model=req.model, add_special_tokens=req.add_special_tokens,
                        offsets=req.return_token_strs, request_id=rid, timeout_s=timeout_s),
        client.list_models(timeout_s=timeout_s)))
    (encoding,) = encodings
    max_model_len = next((m.context_length for m in models if m.name == req.model), None)
    token_strs = [req.prompt[start:end] for start, end in encoding.offsets] if req.return_token_strs else None
    return JSONResponse({"count": len(encoding.token_ids), "max_model_len": max_model_len,
                         "tokens": list(encoding.token_ids), "token_strs": token_strs},
                        headers={REQUEST_ID_HEADER: rid})


async def detokenize(api: OpenAiApi, request: Request) -> Response:
    from llmsuite.gateway.openai.app import until_disconnected

    rid = request.state.request_id
    req = await api._body(request, DetokenizeRequest)
    if any(t < 0 for t in req.tokens):
        index = next(i for i, t in enumerate(req.tokens) if t < 0)
        raise ApiError(400, f"Invalid value for 'tokens[{index}]': token ids are not negative",
                       param=f"tokens[{index}]", code="invalid_value")
    client = api.client_for(request)
    try:
        text = await until_disconnected(request, client.detokenize(
            req.tokens, model=req.model, keep_special_tokens=True, request_id=rid,
            timeout_s=api.settings.request_timeout_s))
    except LlmsuiteError as exc:  # the gateway's token_ids[i] are this request's tokens[i]
        if exc.field_violations:
            path = exc.field_violations[0].field
            request.state.renames = {path: path.replace("token_ids", "tokens", 1)}
        raise
    return JSONResponse({"prompt": text}, headers={REQUEST_ID_HEADER: rid})
