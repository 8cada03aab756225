"""The asyncio client: AsyncLlmsuiteClient, its text streams and chat sessions.

Same methods, arguments and results as the blocking client; streams are
async iterators. Create and use it inside a running event loop.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmsuite.client import conversions as conv
from llmsuite.client.connection import ConnectionSettings
from llmsuite.client.errors import (
    REQUEST_ID_HEADER,
    InternalError,
    LlmsuiteError,
    NotFound,
    header_value,
    rpc_errors,
)
from llmsuite.client.results import (
    ChatMessage,
    Completion,
    Embeddings,
    Encoding,
    GenerateOptions,
    ModelInfo,
    SamplingOptions,
    TextChunk,
    TokenCounts,
    Tool,
    ToolCall,
    ToolChoice,
)
from llmsuite.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class AsyncLlmsuiteClient:
    """The asyncio twin of LlmsuiteClient (same arguments and defaults).
    Use it as `async with`, or `await client.close()`."""

    def __init__(
        self,
        address: str = "localhost:50050",
        *,
        api_key: str | None = None,
        timeout_s: float | None = 60.0,
        compression: str = "gzip",
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        wait_for_ready: bool = True,
        max_attempts: int = 3,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.settings = ConnectionSettings(
            address=address, api_key=api_key, timeout_s=timeout_s, compression=compression, tls=tls,
            ca_file=ca_file, cert_file=cert_file, key_file=key_file, wait_for_ready=wait_for_ready,
            max_attempts=max_attempts, metadata=tuple(metadata),
        )
        self._channel = self.settings.aio_channel()
        self._gateway = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def with_api_key(self, api_key: str | None) -> AsyncLlmsuiteClient:
        """A client that shares this one's channel but authenticates as
        `api_key` (None: no key), for servers that forward their callers'
        keys without opening a channel per key. Close only the original."""
        view = copy.copy(self)
        view.settings = dataclasses.replace(self.settings, api_key=api_key)
        return view

    def with_metadata(self, metadata: Sequence[tuple[str, str]]) -> AsyncLlmsuiteClient:
        """A client that shares this one's channel and sends `metadata` with every call
        besides its own (a proxy passing on its caller's `traceparent`, say). Close only
        the original."""
        view = copy.copy(self)
        view.settings = dataclasses.replace(self.settings, metadata=tuple(metadata))
        return view

    async def __aenter__(self) -> AsyncLlmsuiteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(
        self,
        prompt: str | Sequence[int],
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """See LlmsuiteClient.generate."""
        request = conv.generation_request(gateway_pb2.GenerateRequest, prompt, options)
        call = self._gateway.Generate(request, **self.settings.call_options(
            request_id=options.get("request_id"), timeout_s=options.get("timeout_s")))
        with rpc_errors():
            response = await call
            headers = await call.initial_metadata()
        return conv.completion(response, header_value(headers, REQUEST_ID_HEADER))

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        **options: Unpack[GenerateOptions],
    ) -> AsyncTextStream:
        """Start a streamed generation; `async for chunk in ...` (not awaited)."""
        request = conv.generation_request(gateway_pb2.GenerateStreamRequest, prompt, options)
        call_options = self.settings.call_options(request_id=options.get("request_id"),
                                                  timeout_s=options.get("timeout_s"))
        return AsyncTextStream(self._gateway.GenerateStream(request, **call_options))

    def chat(
        self,
        model: str = "tiny",
        messages: Iterable[ChatMessage | Mapping[str, str]] = (),
        *,
        system: str | None = None,
        stateless: bool = False,
        tools: Sequence[Tool] = (),
        tool_choice: ToolChoice | str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        keep_special_tokens: bool = False,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncChatSession:
        """See LlmsuiteClient.chat; use the session with `async with`."""
        history = conv.chat_messages(messages)
        if system is not None:
            history.insert(0, ChatMessage("system", system))
        conv.sampling_params(sampling)
        options = self.settings.call_options(request_id=request_id, timeout_s=timeout_s, deadline=False)
        return AsyncChatSession(self._gateway, model, history, dict(sampling), options, stateless=stateless,
                     tool_options=conv.chat_tool_options(tools, tool_choice),
                     rendering=conv.chat_rendering(chat_template_kwargs, add_generation_prompt,
                                                   continue_final_message, keep_special_tokens))

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        with rpc_errors():
            response = await self._gateway.ListModels(gateway_pb2.ListModelsRequest(),
                                                      **self.settings.call_options(timeout_s=timeout_s))
        return [conv.model_info(m) for m in response.models]

    async def embed(self, inputs: conv.EmbedInputs, *, model: str = "tiny-embed", dimensions: int | None = None,
              truncate: bool = False, add_special_tokens: bool | None = None, request_id: str | None = None,
              timeout_s: float | None = None) -> Embeddings:
        """One vector per input from an embedding model. `inputs`: a text, texts, token ids (a list of
        ints is one input) or lists of token ids. `dimensions` keeps the first components and
        re-normalises; `truncate` cuts inputs over the model's maximum length instead of failing."""
        request = conv.embed_request(inputs, model=model, dimensions=dimensions, truncate=truncate,
                                     add_special_tokens=add_special_tokens)
        with rpc_errors():
            response = await self._gateway.Embed(request, **self.settings.call_options(request_id=request_id,
                                                                                  timeout_s=timeout_s))
        return conv.embeddings(response)

    async def tokenize(self, texts: str | Iterable[str], *, model: str = "tiny",
                       add_special_tokens: bool | None = None, offsets: bool = False,
                       request_id: str | None = None, timeout_s: float | None = None) -> list[Encoding]:
        request = gateway_pb2.TokenizeRequest(model=model, texts=conv.text_list(texts), return_offsets=offsets)
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        with rpc_errors():
            response = await self._gateway.Tokenize(request, **self.settings.call_options(request_id=request_id,
                                                                                         timeout_s=timeout_s))
        return [conv.encoding(e) for e in response.encodings]

    async def detokenize(self, token_ids: Sequence[int], *, model: str = "tiny", keep_special_tokens: bool = False,
                   request_id: str | None = None, timeout_s: float | None = None) -> str:
        """The text `token_ids` make with the model's tokenizer (special tokens dropped unless kept)."""
        request = gateway_pb2.DetokenizeRequest(model=model, token_ids=token_ids,
                                                keep_special_tokens=keep_special_tokens)
        with rpc_errors():
            response: gateway_pb2.DetokenizeResponse = await self._gateway.Detokenize(
                request, **self.settings.call_options(request_id=request_id, timeout_s=timeout_s))
        return response.text

    async def count_tokens(self, texts: str | Iterable[str], *, model: str = "tiny",
                           add_special_tokens: bool | None = None, request_id: str | None = None,
                           timeout_s: float | None = None) -> TokenCounts:
        request = gateway_pb2.CountTokensRequest(model=model, texts=conv.text_list(texts))
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        call = self._gateway.CountTokens(request, **self.settings.call_options(request_id=request_id,
                                                                              timeout_s=timeout_s))
        with rpc_errors():
            response = await call
            headers = await call.initial_metadata()
        return TokenCounts(tuple(response.counts), response.total, header_value(headers, REQUEST_ID_HEADER))

    async def health(self, service: str = "", *, wait_for_ready: bool = False,
                     timeout_s: float | None = None) -> str:
        """See LlmsuiteClient.health."""
        options = self.settings.call_options(timeout_s=timeout_s, wait_for_ready=wait_for_ready)
        try:
            with rpc_errors():
                response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), **options)
        except NotFound:
            return "SERVICE_UNKNOWN"
        return cast(str, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class AsyncTextStream:
    """The chunks of one GenerateStream call, as an async iterator.

    `completion` is set once the final message has arrived; `await
    stream.wait()` reads the rest and returns it. Leaving `async with` or
    calling `close()` cancels an unfinished RPC; so does breaking out of an
    `async for` loop (when the loop's generator is finalized, at once under
    CPython's asyncio).
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._acc = conv.StreamAccumulator()
        self.completion: Completion | None = None

    @property
    def request_id(self) -> str | None:
        """The request id, known once the first message has arrived."""
        return self._acc.request_id

    def __aiter__(self) -> AsyncIterator[TextChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[TextChunk]:
        try:
            with rpc_errors():
                self._acc.request_id = header_value(await self._call.initial_metadata(), REQUEST_ID_HEADER)
                async for message in self._call:
                    kind = message.WhichOneof("kind")
                    if kind == "delta":
                        yield self._acc.delta(message.delta, message.request_id)
                    elif kind == "final":
                        self.completion = self._acc.finish(message.final, message.request_id, message)
            if self.completion is None:
                raise InternalError("the stream ended without its final message")
        finally:
            if self.completion is None:
                self._call.cancel()

    async def wait(self) -> Completion:
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def close(self) -> None:
        if self.completion is None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncChatSession:
    """The asyncio twin of ChatSession. `send()` is not a coroutine: it
    returns an AsyncChatReply at once, which sends its message when first
    iterated or awaited (`async for chunk in chat.send(...)`, or
    `completion = await chat.send(...)`). Replies run in the order sent.
    Not for concurrent use by several tasks."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayServiceStub, model: str, history: list[ChatMessage],
                 sampling: dict[str, Any], call_options: dict[str, Any], *, stateless: bool = False,
                 tool_options: conv.ChatToolOptions | None = None,
                 rendering: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.stateless = stateless
        self._tools = tool_options or conv.ChatToolOptions()
        self._rendering = dict(rendering or {})  # ChatStart fields: template kwargs, prompt flags
        self.messages: list[ChatMessage] = history
        self.last: Completion | None = None
        self.request_id: str | None = None
        self._stub = stub
        self._sampling = sampling
        self._call_options = call_options
        self._call: Any = None
        self._unsent: collections.deque[AsyncChatReply] = collections.deque()
        self._active: AsyncChatReply | None = None
        self._turns = 0
        self._closed = False

    def send(self, text: str, *, role: str = "user", name: str = "", tool_call_id: str = "",
             tool_calls: Sequence[ToolCall] = (), tool_choice: ToolChoice | str | None = None,
             **sampling: Unpack[SamplingOptions]) -> AsyncChatReply:
        """See ChatSession.send."""
        if self._closed:
            raise RuntimeError("this chat session is closed")
        conv.sampling_params(sampling)
        reply = AsyncChatReply(self, self._turns, ChatMessage(role, text, name, tuple(tool_calls), tool_call_id),
                               dict(sampling), tool_choice)
        self._turns += 1
        self._unsent.append(reply)
        return reply

    async def _ensure_sent(self, reply: AsyncChatReply) -> None:
        while not reply.sent:
            if self._active is not None and self._active.completion is None:
                await self._active.wait()
            head = self._unsent.popleft()
            await self._write(head)
            head.sent = True
            self._active = head

    async def _write(self, reply: AsyncChatReply) -> None:
        if self._call is None:
            start = gateway_pb2.ChatStart(
                model=self.model, messages=conv.message_protos([*self.messages, reply.message]),
                sampling=conv.sampling_params(self._sampling | reply.sampling),
                stateless=self.stateless, **self._rendering,
            )
            self._tools.start(start, reply.tool_choice)
            request = gateway_pb2.ChatRequest(start=start)
            self._call = self._stub.Chat(**self._call_options)
        else:
            turn = conv.chat_turn(reply.message, reply.tool_choice)
            if reply.sampling:  # a turn's sampling replaces the start's whole, so send the merged set
                turn.sampling.CopyFrom(conv.sampling_params(self._sampling | reply.sampling))
            request = gateway_pb2.ChatRequest(turn=turn)
        try:
            with rpc_errors():
                await self._call.write(request)
        except InternalError as exc:
            if request.WhichOneof("kind") != "start" or not self._call.done():
                raise
            raise await self._status_behind_failed_start(exc) from None
        self.messages.append(reply.message)

    async def _status_behind_failed_start(self, failure: InternalError) -> LlmsuiteError:
        """The server's own error for a Chat it refused before reading `start`.

        grpc.aio reports a write that races the server's refusal (a bad API key,
        a server still loading) as INTERNAL and drops the server's status
        (grpc/grpc#36066). The same metadata on a unary call goes through the same
        checks and brings back the real error; if it passes, the INTERNAL stands."""
        options = {**self._call_options, "timeout": 10.0}
        try:
            with rpc_errors():
                await self._stub.ListModels(gateway_pb2.ListModelsRequest(), **options)
        except LlmsuiteError as probed:
            return probed
        return failure

    async def _next_message(self) -> gateway_pb2.ChatResponse | None:
        with rpc_errors():
            message = await self._call.read()
        if message is grpc.aio.EOF:
            return None
        self.request_id = message.request_id or self.request_id
        return cast(gateway_pb2.ChatResponse, message)

    def _finished(self, completion: Completion) -> None:
        self.last = completion
        self.messages.append(ChatMessage("assistant", completion.text, tool_calls=completion.tool_calls))

    async def cancel(self, reason: str = "") -> None:
        """Stop the running reply (finish_reason "cancelled") and end the session."""
        if self._active is not None and self._active.completion is None and not self._closed:
            with rpc_errors():
                await self._call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.ChatCancel(reason=reason)))
            await self._active.wait()
        await self.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        """End the session: half-close and let the server finish the stream,
        or cancel the RPC when a reply is still running. Unsent replies are dropped."""
        if self._closed:
            return
        self._closed = True
        self._unsent.clear()
        if self._call is None:
            return
        if self._active is not None and self._active.completion is None:
            self._call.cancel()
            return
        try:
            await self._call.done_writing()
            await asyncio.wait_for(self._call.code(), timeout_s)
        except (TimeoutError, grpc.RpcError):
            self._call.cancel()

    async def __aenter__(self) -> AsyncChatSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncChatReply:
    """One reply of an AsyncChatSession: `async for` its TextChunks, or
    `await` it for the Completion."""

    def __init__(self, session: AsyncChatSession, turn: int, message: ChatMessage, sampling: dict[str, Any],
                 tool_choice: ToolChoice | str | None = None) -> None:
        self.turn = turn
        self.message = message
        self.sampling = sampling
        self.tool_choice = tool_choice
        self.sent = False
        self.completion: Completion | None = None
        self._session = session
        self._acc = conv.StreamAccumulator(turn)

    def __aiter__(self) -> AsyncIterator[TextChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[TextChunk]:
        if self._session._closed and not self.sent:
            raise RuntimeError("this chat session is closed")
        await self._session._ensure_sent(self)
        while self.completion is None:
            message = await self._session._next_message()
            if message is None:
                raise InternalError("the chat stream ended before the reply's final message")
            kind = message.WhichOneof("kind")
            if kind == "delta":
                yield self._acc.delta(message.delta, message.request_id)
            elif kind == "final":
                self.completion = self._acc.finish(message.final, message.request_id, message)
                self._session._finished(self.completion)

    async def wait(self) -> Completion:
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def __await__(self) -> Generator[Any, None, Completion]:
        return self.wait().__await__()
