"""Where `llmsuite bench` sends its requests: the gateway (text) or an inference
service (token ids). Each target runs one job (a single request, or a chat
conversation turn by turn) and reports one RequestRecord per request.

Chat conversations come in two modes:
* "resend" (what OpenAI-style clients do): every turn is a new call that carries the
  whole conversation so far; only a prefix cache in the server can avoid recomputing it;
* "session": one held-open stream per conversation (gateway Chat turns, or an
  inference session), where the server keeps the KV cache between turns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from llmsuite.client.bench_stats import RequestRecord
from llmsuite.client.bench_workload import Conversation, Prompt, Tokenize, exact_texts, random_ids
from llmsuite.client.errors import InvalidRequest, NotFound, rpc_errors
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc

CHAT_MODES = ("resend", "session")


@dataclass
class LiveCounters:
    """What the progress bar shows while a level runs."""

    done: int = 0
    errors: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class ModelFacts:
    """What a target knows about the model before the run (None: not reported)."""

    context_length: int | None
    vocab_size: int | None = None
    excluded_ids: tuple[int, ...] = ()  # eos and bos: kept out of random prompts
    details: dict[str, Any] = field(default_factory=dict)


Sink = Callable[[RequestRecord], None]


class Target(Protocol):
    kind: str

    async def model_facts(self, model: str) -> ModelFacts:
        """Raises LlmsuiteError (NotFound for an unknown model)."""

    async def prompts(self, lengths: Sequence[int], facts: ModelFacts, chat: bool, seed: int) -> list[Prompt]:
        """Prompts of exactly these token lengths (chat: user messages)."""

    async def run(self, job: Conversation, sink: Sink, live: LiveCounters) -> None:
        """Runs every turn of `job` in order, stopping after the first that fails."""


def _sampling(output_tokens: int, json_schema: str | None) -> common_pb2.SamplingParams:
    # Greedy with EOS ignored: every request generates exactly the length asked for (under a
    # JSON Schema too, as long as the schema's output cannot be complete that soon).
    params = common_pb2.SamplingParams(max_new_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    if json_schema is not None:
        params.constraint.json_schema = json_schema
    return params


class _Turn:
    """Fills one RequestRecord from the messages of one streamed reply."""

    def __init__(self, record: RequestRecord, live: LiveCounters) -> None:
        self.record = record
        self.live = live

    def tokens(self, ids: Sequence[int]) -> None:
        if ids:
            self.record.token_times.append((time.perf_counter(), len(ids)))
            self.record.output_token_ids.extend(ids)
            self.live.tokens += len(ids)

    def text_only(self, text: str) -> None:
        """A delta without ids (gateway Chat sends none): one arrival, counted as one
        token until the final's usage gives the real count."""
        if text:
            self.record.counted_by_usage = True
            self.record.token_times.append((time.perf_counter(), 1))
            self.live.tokens += 1

    def final(self, usage: common_pb2.Usage) -> None:
        self.record.finished = time.perf_counter()
        self.record.prompt_tokens = usage.prompt_tokens
        self.record.cached_tokens = usage.cached_tokens
        self.record.reported_output_tokens = usage.completion_tokens

    def failed(self, code: str, message: str) -> None:
        self.record.finished = time.perf_counter()
        self.record.code, self.record.error = code, " ".join(message.split())[:300]


async def _run_turns(job: Conversation, sink: Sink, live: LiveCounters,
                     turn: Callable[[int, _Turn], Any]) -> None:
    for t in range(len(job.prompts)):
        record = RequestRecord(index=job.index, turn=t, expected_output_tokens=job.output_tokens[t],
                               started=time.perf_counter())
        state = _Turn(record, live)
        try:
            await turn(t, state)
            if record.finished is None:
                state.failed("INTERNAL", "the stream ended without its final message")
        except grpc.aio.AioRpcError as exc:
            state.failed(exc.code().name, exc.details() or "")
        live.done += 1
        live.errors += 0 if record.ok else 1
        sink(record)
        if not record.ok:
            return


class GatewayTarget:
    """Text through llmsuite.gateway.v1.GatewayService: GenerateStream, or Chat."""

    kind = "gateway"

    def __init__(self, channel: grpc.aio.Channel, call_options: Callable[[], dict[str, Any]], model: str,
                 tokenizer_model: str, chat_mode: str | None, json_schema: str | None = None) -> None:
        self._stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self._options = call_options
        self._model = model
        self._tokenizer_model = tokenizer_model
        self._chat_mode = chat_mode
        self._json_schema = json_schema

    async def model_facts(self, model: str) -> ModelFacts:
        with rpc_errors():
            listed = await self._stub.ListModels(gateway_pb2.ListModelsRequest(), **self._options())
        for m in listed.models:
            if m.name == model:
                return ModelFacts(context_length=m.context_length or None, details={
                    "architecture": m.architecture, "context_length": m.context_length,
                    "execution_provider": m.execution_provider, "has_chat_template": m.has_chat_template})
        served = ", ".join(m.name for m in listed.models) or "none"
        raise NotFound(f"model {model!r} is not served by this gateway (models: {served})",
                       reason="MODEL_NOT_FOUND")

    async def prompts(self, lengths: Sequence[int], facts: ModelFacts, chat: bool, seed: int) -> list[Prompt]:
        # GenerateStream adds the tokenizer's special tokens to the prompt; a chat
        # message is rendered by the template, so it is counted without them.
        special = not chat

        async def tokenize(texts: Sequence[str], offsets: bool) -> list[tuple[list[int], list[tuple[int, int]]]]:
            response = await self._stub.Tokenize(gateway_pb2.TokenizeRequest(
                model=self._tokenizer_model, texts=list(texts), add_special_tokens=special,
                return_offsets=offsets), **self._options())
            return [(list(e.token_ids), [(o.start, o.end) for o in e.offsets]) for e in response.encodings]

        checked: Tokenize = tokenize
        with rpc_errors(), _invalid_lengths():
            return await exact_texts(lengths, checked, seed)

    async def run(self, job: Conversation, sink: Sink, live: LiveCounters) -> None:
        if self._chat_mode is None:
            await _run_turns(job, sink, live, lambda t, state: self._generate(job.prompts[t], job.output_tokens[t],
                                                                               state))
        elif self._chat_mode == "resend":
            history: list[common_pb2.ChatMessage] = []

            async def resend(t: int, state: _Turn) -> None:
                user = common_pb2.ChatMessage(role="user", content=job.prompts[t].text or "")
                call = self._stub.Chat(**self._options())
                try:
                    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
                        model=self._model, messages=[*history, user],
                        sampling=_sampling(job.output_tokens[t], self._json_schema))))
                    reply = await _read_chat_reply(call, state)
                    await _close(call)
                finally:
                    call.cancel()  # a no-op once the call has ended
                history.extend([user, common_pb2.ChatMessage(role="assistant", content=reply)])

            await _run_turns(job, sink, live, resend)
        else:
            call = self._stub.Chat(**self._options())
            try:
                async def session_turn(t: int, state: _Turn) -> None:
                    user = common_pb2.ChatMessage(role="user", content=job.prompts[t].text or "")
                    sampling = _sampling(job.output_tokens[t], self._json_schema)
                    request = gateway_pb2.ChatRequest(
                        start=gateway_pb2.ChatStart(model=self._model, messages=[user], sampling=sampling)
                    ) if t == 0 else gateway_pb2.ChatRequest(turn=gateway_pb2.ChatTurn(messages=[user],
                                                                                       sampling=sampling))
                    await call.write(request)
                    await _read_chat_reply(call, state)

                await _run_turns(job, sink, live, session_turn)
                await _close(call)
            finally:
                call.cancel()

    async def _generate(self, prompt: Prompt, output_tokens: int, state: _Turn) -> None:
        call = self._stub.GenerateStream(gateway_pb2.GenerateStreamRequest(
            model=self._model, prompt=prompt.text or "", sampling=_sampling(output_tokens, self._json_schema),
            return_token_ids=True),
            **self._options())
        async for message in call:
            if message.WhichOneof("kind") == "delta":
                state.tokens(message.delta.token_ids)
            elif message.WhichOneof("kind") == "final":
                state.final(message.final.usage)


async def _close(call: Any) -> None:
    """Half-closes a bidirectional call and reads it to its end, so the server sees
    a clean finish rather than a cancellation."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass


async def _read_chat_reply(call: Any, state: _Turn) -> str:
    text: list[str] = []
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("kind") == "delta":
            text.append(message.delta.text)
            if message.delta.token_ids:
                state.tokens(message.delta.token_ids)
            else:
                state.text_only(message.delta.text)
        elif message.WhichOneof("kind") == "final":
            state.final(message.final.usage)
            return "".join(text)
    return "".join(text)


class InferenceTarget:
    """Token ids straight to llmsuite.inference.v1.InferenceService.Generate."""

    kind = "inference"

    def __init__(self, channel: grpc.aio.Channel, call_options: Callable[[], dict[str, Any]], model: str,
                 chat_mode: str | None, json_schema: str | None = None) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._options = call_options
        self._model = model
        self._chat_mode = chat_mode
        self._json_schema = json_schema

    async def model_facts(self, model: str) -> ModelFacts:
        with rpc_errors():
            info = (await self._stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model=model),
                                                  **self._options())).info
        excluded = tuple(info.eos_token_ids) + ((info.bos_token_id,) if info.HasField("bos_token_id") else ())
        return ModelFacts(context_length=info.context_length or None, vocab_size=info.vocab_size,
                          excluded_ids=excluded, details={
                              "architecture": info.architecture, "context_length": info.context_length,
                              "vocab_size": info.vocab_size, "execution_provider": info.execution_provider,
                              "device": info.device, "kv_cache_dtype": info.kv_cache_dtype})

    async def prompts(self, lengths: Sequence[int], facts: ModelFacts, chat: bool, seed: int) -> list[Prompt]:
        assert facts.vocab_size is not None
        with _invalid_lengths():
            return random_ids(lengths, facts.vocab_size, facts.excluded_ids, seed)

    async def run(self, job: Conversation, sink: Sink, live: LiveCounters) -> None:
        if self._chat_mode == "session":
            call = self._stub.Generate(**self._options())
            try:
                async def session_turn(t: int, state: _Turn) -> None:
                    sampling = _sampling(job.output_tokens[t], self._json_schema)
                    ids = job.prompts[t].token_ids
                    await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
                        model=self._model, prompt_token_ids=ids, sampling=sampling, session=True))
                        if t == 0 else inference_pb2.GenerateRequest(turn=inference_pb2.GenerateTurn(
                            token_ids=ids, sampling=sampling)))
                    await _read_inference_turn(call, state)

                await _run_turns(job, sink, live, session_turn)
                await _close(call)
            finally:
                call.cancel()
            return
        history: list[int] = []  # resend: the whole conversation goes out every turn

        async def one_call(t: int, state: _Turn) -> None:
            prompt = [*history, *job.prompts[t].token_ids]
            call = self._stub.Generate(**self._options())
            try:
                await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
                    model=self._model, prompt_token_ids=prompt,
                    sampling=_sampling(job.output_tokens[t], self._json_schema))))
                await _read_inference_turn(call, state)
                await _close(call)
            finally:
                call.cancel()
            history[:] = [*prompt, *state.record.output_token_ids]

        await _run_turns(job, sink, live, one_call)


async def _read_inference_turn(call: Any, state: _Turn) -> None:
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("kind") == "tokens":
            state.tokens(message.tokens.token_ids)
        elif message.WhichOneof("kind") == "final":
            state.final(message.final.usage)
            return


@contextlib.contextmanager
def _invalid_lengths() -> Iterator[None]:
    try:
        yield
    except ValueError as exc:  # a length the tokenizer or vocabulary cannot produce
        raise InvalidRequest(f"--prompt-tokens: {exc}", reason="INVALID_PROMPT_LENGTH") from None
