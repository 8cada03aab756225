"""The blocking client: LlmsuiteClient, its text streams and chat sessions."""

from __future__ import annotations

import copy
import dataclasses
import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmsuite.client import conversions as conv
from llmsuite.client.connection import ConnectionSettings
from llmsuite.client.errors import REQUEST_ID_HEADER, InternalError, NotFound, header_value, rpc_errors
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


class LlmsuiteClient:
    """A blocking client for the llmsuite gateway.

    One gRPC channel per client (gzip, keepalive, retries of UNAVAILABLE up
    to `max_attempts` before any response arrived). `timeout_s` is the
    default deadline of each call (None: no deadline); every method takes its
    own `timeout_s` too. With `wait_for_ready` a call waits for the server to
    come up (within its deadline) instead of failing at once. `metadata` is
    sent with every call (see also `with_metadata`). Failed calls
    raise `llmsuite.client.LlmsuiteError` subclasses. Use it as a context
    manager, or call `close()`. Safe to share between threads; the streams and
    chat sessions it returns are not.
    """

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
        self._channel = self.settings.sync_channel()
        self._gateway = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def with_api_key(self, api_key: str | None) -> LlmsuiteClient:
        """A client that shares this one's channel but authenticates as
        `api_key` (None: no key), for servers that forward their callers'
        keys without opening a channel per key. Close only the original."""
        view = copy.copy(self)
        view.settings = dataclasses.replace(self.settings, api_key=api_key)
        return view

    def with_metadata(self, metadata: Sequence[tuple[str, str]]) -> LlmsuiteClient:
        """A client that shares this one's channel and sends `metadata` with every call
        besides its own (a proxy passing on its caller's `traceparent`, say). Close only
        the original."""
        view = copy.copy(self)
        view.settings = dataclasses.replace(self.settings, metadata=tuple(metadata))
        return view

    def __enter__(self) -> LlmsuiteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str | Sequence[int],
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """Generate a completion and return it whole. `options` are listed in
        GenerateOptions (sampling, request flags, request_id, timeout_s);
        sampling options left unset or None use the server's defaults
        (max_new_tokens 16, temperature 1)."""
        request = conv.generation_request(gateway_pb2.GenerateRequest, prompt, options)
        call_options = self.settings.call_options(request_id=options.get("request_id"),
                                                  timeout_s=options.get("timeout_s"))
        with rpc_errors():
            response, call = self._gateway.Generate.with_call(request, **call_options)
        return conv.completion(response, header_value(call.initial_metadata(), REQUEST_ID_HEADER))

    def generate_stream(
        self,
        prompt: str | Sequence[int],
        **options: Unpack[GenerateOptions],
    ) -> TextStream:
        """Start a streamed generation (same arguments as `generate`).
        Iterate the returned TextStream for TextChunks; its `completion` holds
        the summary once the stream has ended."""
        request = conv.generation_request(gateway_pb2.GenerateStreamRequest, prompt, options)
        call_options = self.settings.call_options(request_id=options.get("request_id"),
                                                  timeout_s=options.get("timeout_s"))
        with rpc_errors():
            return TextStream(self._gateway.GenerateStream(request, **call_options))

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
    ) -> ChatSession:
        """A multi-turn conversation over one bidirectional Chat stream.

        `messages` is the history so far and `system` (if given) a system
        prompt placed before it. `tools` are functions the model may call (the
        chat template renders them) and `tool_choice` ("auto" by default with
        tools, "none", "required", or `ToolChoice.named(name)`) whether it must;
        a reply's calls are in `Completion.tool_calls`, answered with
        `send(result, role="tool", tool_call_id=call.id)`. `sampling` applies to
        every reply unless a `send` overrides it. Nothing is sent until the first `send`. The
        client's default timeout does not apply: `timeout_s` (if given) is the
        deadline of the whole session. `stateless`: each reply is a plain
        generation from the whole conversation, with no inference session held
        between replies (for one-turn callers; see ChatStart.stateless).
        `chat_template_kwargs` are extra template variables,
        `add_generation_prompt` (default true) and `continue_final_message`
        say how the conversation ends, `keep_special_tokens` keeps them in
        the replies' text (see ChatStart).
        """
        history = conv.chat_messages(messages)
        if system is not None:
            history.insert(0, ChatMessage("system", system))
        conv.sampling_params(sampling)  # reject bad options now, not at the first send
        options = self.settings.call_options(request_id=request_id, timeout_s=timeout_s, deadline=False)
        return ChatSession(self._gateway, model, history, dict(sampling), options, stateless=stateless,
                     tool_options=conv.chat_tool_options(tools, tool_choice),
                     rendering=conv.chat_rendering(chat_template_kwargs, add_generation_prompt,
                                                   continue_final_message, keep_special_tokens))

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        with rpc_errors():
            response = self._gateway.ListModels(gateway_pb2.ListModelsRequest(),
                                                **self.settings.call_options(timeout_s=timeout_s))
        return [conv.model_info(m) for m in response.models]

    def embed(self, inputs: conv.EmbedInputs, *, model: str = "tiny-embed", dimensions: int | None = None,
              truncate: bool = False, add_special_tokens: bool | None = None, request_id: str | None = None,
              timeout_s: float | None = None) -> Embeddings:
        """One vector per input from an embedding model. `inputs`: a text, texts, token ids (a list of
        ints is one input) or lists of token ids. `dimensions` keeps the first components and
        re-normalises; `truncate` cuts inputs over the model's maximum length instead of failing."""
        request = conv.embed_request(inputs, model=model, dimensions=dimensions, truncate=truncate,
                                     add_special_tokens=add_special_tokens)
        with rpc_errors():
            response = self._gateway.Embed(request, **self.settings.call_options(request_id=request_id,
                                                                                  timeout_s=timeout_s))
        return conv.embeddings(response)

    def tokenize(self, texts: str | Iterable[str], *, model: str = "tiny", add_special_tokens: bool | None = None,
                 offsets: bool = False, request_id: str | None = None,
                 timeout_s: float | None = None) -> list[Encoding]:
        """One Encoding per text, in order (a lone string is one text)."""
        request = gateway_pb2.TokenizeRequest(model=model, texts=conv.text_list(texts), return_offsets=offsets)
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        with rpc_errors():
            response = self._gateway.Tokenize(request, **self.settings.call_options(request_id=request_id,
                                                                                   timeout_s=timeout_s))
        return [conv.encoding(e) for e in response.encodings]

    def detokenize(self, token_ids: Sequence[int], *, model: str = "tiny", keep_special_tokens: bool = False,
                   request_id: str | None = None, timeout_s: float | None = None) -> str:
        """The text `token_ids` make with the model's tokenizer (special tokens dropped unless kept)."""
        request = gateway_pb2.DetokenizeRequest(model=model, token_ids=token_ids,
                                                keep_special_tokens=keep_special_tokens)
        with rpc_errors():
            response: gateway_pb2.DetokenizeResponse = self._gateway.Detokenize(
                request, **self.settings.call_options(request_id=request_id, timeout_s=timeout_s))
        return response.text

    def count_tokens(self, texts: str | Iterable[str], *, model: str = "tiny", add_special_tokens: bool | None = None,
                     request_id: str | None = None, timeout_s: float | None = None) -> TokenCounts:
        request = gateway_pb2.CountTokensRequest(model=model, texts=conv.text_list(texts))
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        options = self.settings.call_options(request_id=request_id, timeout_s=timeout_s)
        with rpc_errors():
            response, call = self._gateway.CountTokens.with_call(request, **options)
        return TokenCounts(tuple(response.counts), response.total,
                           header_value(call.initial_metadata(), REQUEST_ID_HEADER))

    def health(self, service: str = "", *, wait_for_ready: bool = False, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", "UNKNOWN",
        or "SERVICE_UNKNOWN" when the server does not know `service`. Works
        against any llmsuite service. Does not wait for the server to come up
        unless asked, so that an unreachable server raises Unavailable at once."""
        options = self.settings.call_options(timeout_s=timeout_s, wait_for_ready=wait_for_ready)
        try:
            with rpc_errors():
                response = self._health.Check(health_pb2.HealthCheckRequest(service=service), **options)
        except NotFound:
            return "SERVICE_UNKNOWN"
        return cast(str, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class TextStream:
    """The chunks of one GenerateStream call.

    Iterate it (once) for TextChunks. `completion` is None until the final
    message has arrived, then holds the Completion (its text is all chunks
    joined). Leaving the loop early (break, an exception), `close()` or
    leaving a `with` block cancels the RPC, so the server stops generating.
    Errors, including one in the middle of the stream, raise LlmsuiteError.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._acc = conv.StreamAccumulator()
        self.completion: Completion | None = None

    @property
    def request_id(self) -> str | None:
        """The server's request id (waits for the response headers)."""
        if self._acc.request_id is None:
            with rpc_errors():
                self._acc.request_id = header_value(self._call.initial_metadata(), REQUEST_ID_HEADER)
        return self._acc.request_id

    def __iter__(self) -> Iterator[TextChunk]:
        try:
            with rpc_errors():
                for message in self._call:
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

    def wait(self) -> Completion:
        """Read the rest of the stream; return the Completion."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def close(self) -> None:
        """Cancel the RPC if it has not finished."""
        if self.completion is None:
            self._call.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_HALF_CLOSE = object()


class ChatSession:
    """One conversation over one bidirectional Chat stream.

    `send(text)` returns a ChatReply to iterate for TextChunks (the first send
    opens the stream with a `start` message carrying the history, later ones
    send a `turn`). Leaving a reply's loop early does not stop the reply: the
    next `send` reads the rest first, because the server takes a turn only
    after the previous reply ended. `last` is the last finished reply's
    Completion (`last.usage.cached_tokens` shows the KV cache reused);
    `messages` is the conversation so far. `cancel()` stops the current reply
    and ends the session; `close()` ends it. Use it as a context manager.
    """

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
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call: Any = None
        self._reply: ChatReply | None = None
        self._turns = 0
        self._closed = False

    def send(self, text: str, *, role: str = "user", name: str = "", tool_call_id: str = "",
             tool_calls: Sequence[ToolCall] = (), tool_choice: ToolChoice | str | None = None,
             **sampling: Unpack[SamplingOptions]) -> ChatReply:
        """Add a message and ask for the next reply. Sampling given here
        applies to this reply only, on top of the session's; so does
        `tool_choice`. A tool's result is sent as `role="tool"` with the
        `tool_call_id` it answers; `tool_calls` are an assistant message's."""
        if self._closed:
            raise RuntimeError("this chat session is closed")
        if self._reply is not None and self._reply.completion is None:
            self._reply.wait()
        message = ChatMessage(role, text, name, tuple(tool_calls), tool_call_id)
        if self._call is None:
            start = gateway_pb2.ChatStart(
                model=self.model, messages=conv.message_protos([*self.messages, message]),
                sampling=conv.sampling_params(self._sampling | sampling),
                stateless=self.stateless, **self._rendering,
            )
            self._tools.start(start, tool_choice)
            self._requests.put(gateway_pb2.ChatRequest(start=start))
            with rpc_errors():
                self._call = self._stub.Chat(iter(self._requests.get, _HALF_CLOSE), **self._call_options)
        else:
            turn = conv.chat_turn(message, tool_choice)
            if sampling:  # a turn's sampling replaces the start's whole, so send the merged set
                turn.sampling.CopyFrom(conv.sampling_params(self._sampling | sampling))
            self._requests.put(gateway_pb2.ChatRequest(turn=turn))
        self.messages.append(message)
        self._reply = ChatReply(self, self._turns)
        self._turns += 1
        return self._reply

    def _next_message(self) -> gateway_pb2.ChatResponse | None:
        with rpc_errors():
            message = next(self._call, None)
        if message is not None:
            self.request_id = message.request_id or self.request_id
        return message

    def _finished(self, completion: Completion) -> None:
        self.last = completion
        self.messages.append(ChatMessage("assistant", completion.text, tool_calls=completion.tool_calls))

    def cancel(self, reason: str = "") -> None:
        """Stop the current reply (its finish_reason becomes "cancelled") and
        end the session."""
        if self._reply is not None and self._reply.completion is None and not self._closed:
            self._requests.put(gateway_pb2.ChatRequest(cancel=gateway_pb2.ChatCancel(reason=reason)))
            self._reply.wait()
        self.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """End the session: half-close the stream and let the server finish
        it, or cancel the RPC when a reply is still running."""
        if self._closed:
            return
        self._closed = True
        if self._call is None:
            return
        if self._reply is not None and self._reply.completion is None:
            self._call.cancel()
            return
        self._requests.put(_HALF_CLOSE)
        try:
            self._call.exception(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self._call.cancel()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChatReply:
    """One reply of a ChatSession: iterate it for TextChunks; `completion`
    is set once its final message has arrived."""

    def __init__(self, session: ChatSession, turn: int) -> None:
        self.turn = turn
        self.completion: Completion | None = None
        self._session = session
        self._acc = conv.StreamAccumulator(turn)

    def __iter__(self) -> Iterator[TextChunk]:
        while self.completion is None:
            message = self._session._next_message()
            if message is None:
                raise InternalError("the chat stream ended before the reply's final message")
            kind = message.WhichOneof("kind")
            if kind == "delta":
                yield self._acc.delta(message.delta, message.request_id)
            elif kind == "final":
                self.completion = self._acc.finish(message.final, message.request_id, message)
                self._session._finished(self.completion)

    def wait(self) -> Completion:
        """Read the rest of the reply; return its Completion."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion
