"""The Starlette application: OpenAI's HTTP routes onto the gateway's gRPC API.

Each request is parsed and checked here, then becomes one gateway call per
choice (`n`, batched prompts: see choices.py), made with the caller's own API
key (`Generate` / `GenerateStream` for /v1/completions, a one-turn stateless
`Chat` for /v1/chat/completions: a plain generation that holds no inference
session), so
authentication, rate limits, validation and metrics stay the gateway's. A
caller that disconnects cancels its gateway call, and with it the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llmsuite.client import (
    AsyncChatReply,
    AsyncChatSession,
    AsyncLlmsuiteClient,
    AsyncTextStream,
    ChatMessage,
    Completion,
    Constraint,
    LlmsuiteError,
)
from llmsuite.gateway.openai import errors, responses, tools
from llmsuite.gateway.openai.choices import StreamedChoice, all_of, choice_seeds, close_all, merged
from llmsuite.gateway.openai.embeddings import embeddings
from llmsuite.gateway.openai.errors import ApiError
from llmsuite.gateway.openai.metrics import ApiMetrics, RequestMetrics
from llmsuite.gateway.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    chat_rendering,
    generation_options,
)
from llmsuite.gateway.openai.tokenization import detokenize, tokenize
from llmsuite.runtime.errors import InvalidArgument

log = logging.getLogger("llmsuite.openai")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class ApiSettings:
    """What the HTTP API needs besides where it listens."""

    gateway: str = "localhost:50050"
    gateway_tls_ca: Path | None = None
    request_timeout_s: float = 600.0
    default_max_tokens: int | None = None  # None: the gateway's default (16)
    max_body_bytes: int = 8 * 1024 * 1024
    sse_ping_s: float = 15.0
    shutdown_grace_s: float = 10.0  # how long running streams may go on once shutdown begins


class ClientDisconnected(Exception):
    """The caller went away before its response was ready."""


def _is_header_token(value: str) -> bool:
    return 0 < len(value) <= 1024 and value.isascii() and value.isprintable() and " " not in value


def api_key(request: Request) -> str | None:
    """The caller's bearer key, passed on to the gateway untouched (None: no key)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "The Authorization header must be 'Bearer <api key>'.", "authentication_error",
                       None, "malformed_authorization")
    if not _is_header_token(token):
        raise ApiError(401, "Invalid API key.", "authentication_error", None, "invalid_api_key")
    return token


# W3C trace context (https://www.w3.org/TR/trace-context/): version-traceid-parentid-flags.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
TRACE_HEADERS = ("traceparent", "tracestate")


def trace_context(request: Request) -> list[tuple[str, str]]:
    """The caller's W3C trace context, to go to the gateway as gRPC metadata so that the
    gateway's spans join the caller's trace; a malformed traceparent is dropped (the trace then
    starts at the gateway), as the W3C rules ask."""
    parent = request.headers.get("traceparent", "").strip()
    if not _TRACEPARENT.match(parent) or parent.startswith("ff"):
        return []
    state = request.headers.get("tracestate", "").strip()
    if state and len(state) <= 512 and _is_header_value(state):
        return [("traceparent", parent), ("tracestate", state)]
    return [("traceparent", parent)]


def _is_header_value(value: str) -> bool:
    return value.isascii() and value.isprintable()


def request_id(request: Request) -> str:
    """The caller's x-request-id when it is usable as gRPC metadata, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _is_header_token(given) and len(given) <= 128 else uuid.uuid4().hex


async def _disconnected(request: Request) -> None:
    # Only after the body was read: from then on, receive() yields nothing but the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its gateway call) if the caller disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LlmsuiteError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


# JSON escapes every control character below U+0020 but leaves NEL, LINE SEPARATOR and
# PARAGRAPH SEPARATOR raw, and str.splitlines() breaks lines at them: httpx's aiter_lines (so
# guidellm and other httpx clients) would cut an SSE event carrying one in two. Written as
# \uXXXX escapes they mean the same JSON, and every event stays one line.
_SPLITLINES_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_SPLITLINES_BREAKS)


class OpenAiApi:
    """The routes and the one gateway client they share."""

    def __init__(self, settings: ApiSettings, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.created = int(time.time())
        self._client: AsyncLlmsuiteClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # The channel belongs to the server's event loop, so it is made here, not in __init__.
        # wait_for_ready=False: with the gateway down, callers get a 503 at once rather than
        # hanging until their deadline (the channel still retries brief connection failures).
        self._client = AsyncLlmsuiteClient(self.settings.gateway, ca_file=self.settings.gateway_tls_ca,
                                           timeout_s=self.settings.request_timeout_s, wait_for_ready=False)
        try:
            yield
        finally:
            await self._client.close()

    def client_for(self, request: Request) -> AsyncLlmsuiteClient:
        assert self._client is not None, "used outside the app's lifespan"
        client = self._client.with_api_key(api_key(request))
        trace = trace_context(request)
        return client.with_metadata(trace) if trace else client

    async def _body(self, request: Request, schema: type[M]) -> M:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise self._too_large()
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.settings.max_body_bytes:
                raise self._too_large()
        try:
            parsed = schema.model_validate_json(bytes(body))
        except ValidationError as exc:
            raise errors.from_validation(exc) from None
        refused = parsed.unsupported_fields()  # type: ignore[attr-defined]
        if refused:
            raise errors.unsupported(refused)
        self.metrics.fields_ignored(parsed.ignored_fields())  # type: ignore[attr-defined]
        try:
            parsed.check_sampling_values()  # type: ignore[attr-defined]
        except InvalidArgument as exc:
            raise errors.invalid_field(exc) from None
        return parsed

    def _too_large(self) -> ApiError:
        return ApiError(413, f"The request body is larger than {self.settings.max_body_bytes} bytes.",
                        code="request_too_large")

    def _sampling(self, req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int | None,
                  logprobs: bool, top_logprobs: int | None) -> dict[str, Any]:
        return generation_options(req, max_new_tokens or self.settings.default_max_tokens, logprobs, top_logprobs)

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        assert self._client is not None
        try:
            status = await self._client.health(timeout_s=5)
        except LlmsuiteError:
            status = "UNREACHABLE"
        return JSONResponse({"gateway": status}, status_code=200 if status == "SERVING" else 503)

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "llmsuite"}

    async def list_models(self, request: Request) -> Response:
        client = self.client_for(request)
        models = await until_disconnected(request, client.list_models(timeout_s=self.settings.request_timeout_s))
        return JSONResponse({"object": "list", "data": [self._model(m.name) for m in models]})

    async def retrieve_model(self, request: Request) -> Response:
        client = self.client_for(request)
        name = request.path_params["model"]
        models = await until_disconnected(request, client.list_models(timeout_s=self.settings.request_timeout_s))
        if name not in {m.name for m in models}:
            raise ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(self._model(name))

    async def completions(self, request: Request) -> Response:
        rid = request.state.request_id
        req = await self._body(request, CompletionRequest)
        client = self.client_for(request)
        logprobs = req.logprobs is not None
        sampling = self._sampling(req, req.max_tokens, logprobs, req.logprobs)
        n = req.n or 1
        seeds = choice_seeds(sampling.pop("seed"), n)
        prompts = [prompt for prompt in req.prompt for _ in range(n)]
        echo = [prompt if isinstance(prompt, str) else "" for prompt in prompts] if req.echo else []
        builder = responses.ResponseBuilder(chat=False, request_id=rid, created=int(time.time()), model=req.model,
                                            logprobs=logprobs, include_usage=req.include_usage,
                                            continuous_usage=req.continuous_usage, choices_per_prompt=n, echo=echo)
        renames = request.state.renames = {"top_logprobs": "logprobs", "keep_special_tokens": "skip_special_tokens"}
        options = dict(model=req.model, request_id=rid, timeout_s=self.settings.request_timeout_s, **sampling)
        if n > 1:
            await until_disconnected(request, all_of([self._warm_prefix(client, prompt, options)
                                                      for prompt in req.prompt]))
        if not req.stream:
            completions = await until_disconnected(request, all_of([
                client.generate(prompt, **options, seed=seeds[index % n]) for index, prompt in enumerate(prompts)]))
            return JSONResponse(builder.completions(completions, len(req.prompt)), headers={REQUEST_ID_HEADER: rid})
        streams = [client.generate_stream(prompt, **options, seed=seeds[index % n])
                   for index, prompt in enumerate(prompts)]
        return await self._stream(request, builder, [_streamed(index, stream) for index, stream in enumerate(streams)],
                                  renames, prompts=len(req.prompt))

    async def _warm_prefix(self, client: AsyncLlmsuiteClient, prompt: str | list[int],
                           options: Mapping[str, Any]) -> None:
        """One greedy token of `prompt`: its KV stays in the replica's prefix cache for the n
        choices that follow (see choices.py)."""
        await client.generate(prompt, model=options["model"], max_new_tokens=1, temperature=0.0,
                              request_id=options["request_id"], timeout_s=options["timeout_s"])

    async def chat_completions(self, request: Request) -> Response:
        rid = request.state.request_id
        req = await self._body(request, ChatCompletionRequest)
        client = self.client_for(request)
        sampling = self._sampling(req, req.max_new_tokens, bool(req.logprobs), req.top_logprobs)
        rendering = chat_rendering(req, keep_special_tokens=sampling.pop("keep_special_tokens"))
        sampling["constraint"] = _constraint(req.response_format)
        builder = responses.ResponseBuilder(chat=True, request_id=rid, created=int(time.time()), model=req.model,
                                            logprobs=bool(req.logprobs), include_usage=req.include_usage,
                                            continuous_usage=req.continuous_usage, choices_per_prompt=req.n or 1)
        renames = request.state.renames = {"prompt": "messages", "max_tokens": req.max_tokens_param,
                                           **_RESPONSE_FORMAT_RENAMES, **tools.renames(len(req.tools or ()))}
        # A stateless request carries the whole conversation: the history opens the
        # Chat stream and the last message asks for the one reply (one stream per choice).
        # `stateless`: each reply is a plain generation, not an inference session counted
        # against --max-sessions; a conversation sent again still reuses its KV through the
        # replica's prefix cache.
        *history, last = req.messages
        history_messages = [ChatMessage(m.template_role, m.content, m.name or "", tools.sdk_tool_calls(m.tool_calls),
                                        m.tool_call_id or "") for m in history]
        chat_options: dict[str, Any] = dict(
            tools=tools.sdk_tools(req.tools), tool_choice=tools.sdk_tool_choice(req.tool_choice), stateless=True,
            request_id=rid, timeout_s=self.settings.request_timeout_s, **rendering)
        last_message: dict[str, Any] = dict(role=last.template_role, name=last.name or "",
                                            tool_calls=tools.sdk_tool_calls(last.tool_calls),
                                            tool_call_id=last.tool_call_id or "")
        n = req.n or 1
        seeds = choice_seeds(sampling.pop("seed"), n)
        opened = []
        if n > 1:
            # One greedy token of the conversation first, so its KV is cached for the n choices (choices.py).
            warm = client.chat(req.model, history_messages, **chat_options, max_new_tokens=1, temperature=0.0)
            try:
                await until_disconnected(request, warm.send(last.content, **last_message).wait())
            finally:
                await warm.close()
        for index in range(n):
            session = client.chat(req.model, history_messages, **chat_options, seed=seeds[index], **sampling)
            opened.append((session, session.send(last.content, **last_message)))
        if not req.stream:
            try:
                completions = await until_disconnected(request, all_of([reply.wait() for _, reply in opened]))
            finally:
                for session, _ in opened:
                    await session.close()
            return JSONResponse(builder.completions(completions), headers={REQUEST_ID_HEADER: rid})
        return await self._stream(request, builder, [_chat_streamed(index, session, reply)
                                                     for index, (session, reply) in enumerate(opened)], renames)

    async def _stream(self, request: Request, builder: responses.ResponseBuilder, choices: list[StreamedChoice],
                      renames: Mapping[str, str], prompts: int = 1) -> Response:
        """Server-sent events: the role chunks (chat) or echoed prompts (completions), one chunk
        per delta of any choice, a finish chunk per choice, the usage chunk when asked for, then
        `[DONE]`.

        The first delta is awaited before the response starts, so a request
        the gateway refuses still gets its HTTP status; a failure after that
        becomes an `error` event and the stream ends without `[DONE]`."""
        chunks = merged(choices)
        try:
            first = await until_disconnected(request, anext(chunks, None))
        except BaseException:
            await chunks.aclose()
            await close_all(choices)
            raise

        async def events() -> AsyncIterator[str]:
            ended = False  # the last event went out: what follows is not a disconnect
            try:
                if first is not None:
                    builder.observe_usage(first[1], first[0])
                for opening in builder.first_chunks(len(choices)):
                    yield _json(opening)
                item = first
                while item is not None:
                    data = builder.text_chunk(item[1], item[0])
                    if data is not None:
                        yield _json(data)
                    item = await anext(chunks, None)
                for data in builder.final_chunks([choice.completion() for choice in choices], prompts):
                    yield _json(data)
                yield "[DONE]"
                ended = True
            except LlmsuiteError as exc:
                yield _json(errors.from_gateway(exc, renames).body())
                ended = True
            except ApiError as exc:
                yield _json(exc.body())
                ended = True
            finally:
                if not ended:
                    self.metrics.stream_disconnected(request.url.path)
                # Also reached when the caller disconnects (the task is cancelled): cancels the gateway calls.
                await chunks.aclose()
                await close_all(choices)

        # On SIGTERM a stream may finish within the grace period; then it is cut (and its generation cancelled).
        return EventSourceResponse(events(), headers={REQUEST_ID_HEADER: request.state.request_id}, sep="\n",
                                   ping=self.settings.sse_ping_s, shutdown_grace_period=self.settings.shutdown_grace_s)


def _streamed(index: int, stream: AsyncTextStream) -> StreamedChoice:
    async def close() -> None:
        stream.close()

    def completion() -> Completion:
        assert stream.completion is not None
        return stream.completion

    return StreamedChoice(index, aiter(stream), completion, close)


def _chat_streamed(index: int, session: AsyncChatSession, reply: AsyncChatReply) -> StreamedChoice:
    def completion() -> Completion:
        assert reply.completion is not None
        return reply.completion

    return StreamedChoice(index, aiter(reply), completion, session.close)


# The gateway's names for what response_format became, as the caller sent it.
_RESPONSE_FORMAT_RENAMES = {"constraint.json_schema": "response_format.json_schema.schema",
                            "constraint.json_object": "response_format", "constraint": "response_format"}


def _constraint(response_format: ResponseFormat | None) -> Constraint | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint.json_object()
    assert response_format.json_schema is not None and response_format.json_schema.schema_ is not None
    return Constraint.json_schema(response_format.json_schema.schema_)


def _with_request_id(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        request.state.request_id = request_id(request)
        request.state.renames = {}
        try:
            return await handler(request)
        except LlmsuiteError as exc:  # from the gateway, or from the SDK's own checks of a value
            raise errors.from_gateway(exc, request.state.renames) from None
    return handle


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response(getattr(request.state, "request_id", None))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return ApiError(exc.status_code, message, code=kind, headers=dict(exc.headers or {})).response()


async def _disconnected_response(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; the status names the case in access logs


async def _unexpected(request: Request, exc: Exception) -> Response:
    rid = getattr(request.state, "request_id", None)
    log.exception("unexpected error", extra={"request_id": rid, "path": request.url.path})
    return ApiError(500, f"internal error; see server logs for request id {rid}", "server_error").response(rid)


class TrailingSlashTolerant:
    """Serves `/v1/models/` as `/v1/models`, as vLLM's server does, instead of Starlette's bare
    307 redirect (which many HTTP clients do not follow for a POST): a pure ASGI middleware,
    so the path is rewritten before routing and streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            raw = scope.get("raw_path")
            if isinstance(raw, bytes):
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


_ROUTES = ("/health", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/v1/models/{model}",
           "/v1/completions", "/v1/chat/completions", "/v1/embeddings")


def build_app(settings: ApiSettings) -> Starlette:
    metrics = ApiMetrics(_ROUTES)
    api = OpenAiApi(settings, metrics)
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", _with_request_id(api.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", _with_request_id(api.retrieve_model), methods=["GET"]),
        Route("/v1/completions", _with_request_id(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", _with_request_id(api.chat_completions), methods=["POST"]),
        Route("/v1/embeddings", _with_request_id(functools.partial(embeddings, api)), methods=["POST"]),
        Route("/tokenize", _with_request_id(functools.partial(tokenize, api)), methods=["POST"]),
        Route("/detokenize", _with_request_id(functools.partial(detokenize, api)), methods=["POST"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=api.lifespan,
                    middleware=[Middleware(RequestMetrics, metrics=metrics), Middleware(TrailingSlashTolerant)],
                    exception_handlers={
                        ApiError: _api_error,
                        HTTPException: _http_error,
                        ClientDisconnected: _disconnected_response,
                        ClientDisconnect: _disconnected_response,  # gone while sending its body
                        Exception: _unexpected,
                    })
    app.router.redirect_slashes = False  # an unknown path is a 404 in OpenAI's shape, never a redirect
    return app
