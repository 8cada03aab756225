"""An inference service whose behaviour a test scripts (a real gRPC server on
the real bootstrap), and the real gateway in front of it: how the gateway
handles an upstream that refuses, misbehaves or runs out of time is then a
fact a test can arrange, not a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import grpc
from support import ServerThread

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.app import GatewayApp
from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.errors import LlmsuiteError
from llmsuite.runtime.settings import ServerSettings

INFERENCE = "llmsuite.inference.v1.InferenceService"
GENERATED = [300 + i for i in range(1000)]  # ids the scripted replica emits, in order


@dataclass
class Script:
    """What the scripted replica does with the next Generate calls."""

    refuse_with: LlmsuiteError | None = None  # raised before any token
    bare_abort: grpc.StatusCode | None = None  # a status with no llmsuite details, as grpc-core gives one
    tokens: int = 8  # then a LENGTH final, unless one of the below
    forever: bool = False  # tokens until cancelled; ignores its deadline
    honour_deadline: bool = False  # with forever: a TIME_LIMIT final shortly before its deadline
    silent: bool = False  # accepts the start, then sends nothing until cancelled (queued past its deadline)
    end_early: bool = False  # after `tokens`, end the stream (OK status) without a final
    token_interval_s: float = 0.0  # pacing between tokens (the model's speed, not a test wait)
    # The next N ListModels calls fail, with INTERNAL: channels retry UNAVAILABLE on their own.
    fail_list_models: int = 0


@dataclass
class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """A ServiceApp serving model `tiny` with the given tokenizer hash."""

    tokenizer_hash: str
    script: Script = field(default_factory=Script)
    starts: list[pb.GenerateStart] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)  # time_remaining() at each start
    cancelled: threading.Event = field(default_factory=threading.Event)
    service_names = (INFERENCE,)

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health_names(self) -> tuple[str, ...]:
        return ("model:tiny",)

    def _info(self) -> pb.ModelInfo:
        return pb.ModelInfo(name="tiny", architecture="llama", execution_provider="CPUExecutionProvider",
                            device="cpu", context_length=4096, vocab_size=1024, eos_token_ids=[2],
                            tokenizer_content_hash=self.tokenizer_hash)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        if self.script.fail_list_models:
            self.script.fail_list_models -= 1
            await context.abort(grpc.StatusCode.INTERNAL, "scripted failure")
        return pb.ListModelsResponse(models=[self._info()])

    async def Generate(self, request_iterator: AsyncIterator[pb.GenerateRequest], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        script = self.script
        first = await anext(aiter(request_iterator))
        self.starts.append(first.start)
        self.deadlines.append(context.time_remaining())
        if script.refuse_with is not None:
            raise script.refuse_with
        if script.bare_abort is not None:
            await context.abort(script.bare_abort, "Internal error from Core")
        usage = common_pb2.Usage(prompt_tokens=len(first.start.prompt_token_ids))
        sent = 0
        try:
            if script.silent:
                await asyncio.Event().wait()
            while script.forever or sent < script.tokens:
                remaining = context.time_remaining()
                if script.honour_deadline and remaining is not None and remaining < 0.2:
                    usage.completion_tokens = sent
                    yield pb.GenerateResponse(final=pb.GenerateFinal(
                        finish_reason=common_pb2.FINISH_REASON_TIME_LIMIT, usage=usage))
                    return
                yield pb.GenerateResponse(sequence_number=sent, tokens=pb.GeneratedTokens(
                    token_ids=[GENERATED[sent % len(GENERATED)]]))
                sent += 1
                await asyncio.sleep(script.token_interval_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if script.end_early:
            return
        usage.completion_tokens = sent
        yield pb.GenerateResponse(sequence_number=sent, final=pb.GenerateFinal(
            finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage))


@contextlib.contextmanager
def running_gateway(tokenizer: str, inference: list[str], *, limits: GatewayLimits | None = None,
                    rate_limiter: KeyedRateLimiter | None = None, refresh_interval_s: float = 30.0,
                    breaker_failures: int = 5, breaker_reset_s: float = 30.0,
                    channel: ChannelSettings | None = None,
                    api_keys: tuple[str, ...] = ()) -> Iterator[ServerThread]:
    """The real GatewayApp on the real bootstrap. A long refresh interval by
    default: tests that need a refresh ask the catalogue for one."""
    factory = partial(Upstreams.connect, tokenizer, inference, channel or ChannelSettings(), tracer_provider=None,
                      breaker_threshold=breaker_failures, breaker_reset_s=breaker_reset_s)
    unlimited = KeyedRateLimiter(0, 1, 0, 1)
    limits = limits or GatewayLimits()
    app = GatewayApp(factory, limits, unlimited if rate_limiter is None else rate_limiter,
                     refresh_interval_s=refresh_interval_s)
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=0.5, log_format="text", api_keys=api_keys)
    # The receive cap the gateway's main derives from its limits.
    settings = replace(settings, max_receive_message_bytes=limits.max_receive_bytes(settings.max_message_bytes))
    with ServerThread(app, settings) as srv:
        yield srv
