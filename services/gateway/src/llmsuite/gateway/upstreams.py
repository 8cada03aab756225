"""The gateway's upstreams: one tokenizer service and N inference replicas.

This module is the only one that calls them, and every failure of such a call
leaves it translated by `llmsuite.gateway.upstream_errors` (never as a raw
`AioRpcError`). Each upstream has its own channel and circuit breaker, so the
gateway fails fast on one that is down, and the breakers' state is what the
gateway's health reports (see catalogue.py).

A replica is one gRPC target. `--inference a:1,b:2` names two (round-robin,
per-replica breakers, spill-over); a target with a URI scheme
(`dns:///inference:50052`, `ipv4:10.0.0.1:50052,10.0.0.2:50052`) is one
channel whose `round_robin` policy spreads calls over every address it
resolves to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmsuite.client.connection import auth_metadata
from llmsuite.client.errors import error_details
from llmsuite.gateway.circuit_breaker import CircuitBreaker
from llmsuite.gateway.metrics import GatewayMetrics
from llmsuite.gateway.upstream_errors import ended_early, from_upstream, is_transport_failure, unavailable
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.runtime.calls import on_call_done
from llmsuite.runtime.channels import ChannelSettings, create_channel
from llmsuite.runtime.errors import DeadlineExceeded, LlmsuiteError, Unavailable
from llmsuite.runtime.logs import current_request_id
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger("llmsuite.gateway.upstreams")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
TOKENIZER_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
# A replica's answers, before its first message, that another replica may not share. CANCELLED
# here is the replica's doing (ours would surface as asyncio.CancelledError): a server that
# begins to drain cancels the calls it has received but not yet handed to a handler.
SPILL_OVER_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
REQUEST_ID_HEADER = "x-request-id"
# A gRPC target URI (dns:///name:port, ipv4:a:1,b:2, unix:/path, ...) rather than host:port.
_URI_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:(?!\d+$)(?!\d+,)")
Response = TypeVar("Response")


def _ran_out_of_time(exc: grpc.aio.AioRpcError) -> bool:
    """The call's own deadline expired. A replica's refusal (DEADLINE_TOO_SHORT: the deadline
    cannot cover prefill) carries an llmsuite ErrorInfo and stays the caller's error."""
    return exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and "reason" not in error_details(exc)


def parse_inference_targets(value: str) -> list[str]:
    """`host:port[,host:port...]` -> one replica per address; a value with a
    URI scheme (`dns:///name:port`, `ipv4:a:1,b:2`) -> one target, balanced by
    gRPC itself."""
    value = value.strip()
    if _URI_SCHEME.match(value):
        return [value]
    return [t.strip() for t in value.split(",") if t.strip()]


@dataclass
class Upstream:
    """One upstream target: its channel and its circuit breaker."""

    label: str  # what callers may see ("tokenizer", "inference replica 2")
    target: str  # for logs only
    channel: grpc.aio.Channel
    breaker: CircuitBreaker
    health: health_pb2_grpc.HealthStub
    # False from the channel's TRANSIENT_FAILURE (it could not connect) until it is READY again.
    reachable: bool = field(default=True, init=False)
    # Called when a request to it fails UNAVAILABLE: it may be down (see watch_connectivity).
    on_failure: Callable[[], None] | None = field(default=None, init=False)

    @property
    def usable(self) -> bool:
        return self.reachable and self.breaker.is_closed

    def record(self, code: grpc.StatusCode, *, callers_deadline: bool) -> None:
        """Feeds a failed call's code to the breaker. The caller's own deadline
        running out says nothing about the upstream."""
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and callers_deadline:
            self.breaker.record_abandoned()
            return
        self.breaker.record_status(code)
        # Only a request's failure wakes the catalogue: a failed probe (callers_deadline=False)
        # that did would start the next probe at once, for as long as the upstream is down.
        if code is grpc.StatusCode.UNAVAILABLE and callers_deadline and self.on_failure is not None:
            self.on_failure()

    async def follow_connectivity(self, changed: Callable[[], None]) -> None:
        """Follows the channel's connectivity state until cancelled, calling `changed` when the
        upstream became unreachable or reachable again. A connection that closes (the process
        died, or restarts) leaves the channel IDLE: it is asked to reconnect at once, so a peer
        that is gone shows as TRANSIENT_FAILURE within a connect attempt, not at the next call."""
        state = self.channel.get_state(try_to_connect=True)
        while True:
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=True)
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and self.reachable:
                log.warning("upstream unreachable", extra={"upstream": self.label, "target": self.target})
                self.reachable = False
                changed()
            elif state is grpc.ChannelConnectivity.READY and not self.reachable:
                log.info("upstream reachable again", extra={"upstream": self.label, "target": self.target})
                self.reachable = True
                changed()
            elif state is grpc.ChannelConnectivity.IDLE:
                changed()  # the connection went away: the next probe says whether the peer did


@dataclass
class Replica(Upstream):
    stub: inference_pb2_grpc.InferenceServiceStub
    in_flight: int = 0  # Generate streams open on it now (prefix affinity keeps them balanced)

    def track(self, call: grpc.aio.StreamStreamCall) -> None:
        """Counts `call` as in flight until it ends, however it ends."""
        self.in_flight += 1

        def ended(_: object) -> None:
            self.in_flight -= 1

        call.add_done_callback(ended)


@dataclass
class TokenizerUpstream(Upstream):
    stub: tokenizer_pb2_grpc.TokenizerServiceStub


class InferenceStream:
    """An inference Generate stream that has produced its first message, or
    whose deadline ran out before it did (`first` is then that DeadlineExceeded:
    the relay ends the turn with TIME_LIMIT, as for a deadline mid-stream)."""

    def __init__(self, replica: Replica, call: grpc.aio.StreamStreamCall,
                 first: inference_pb2.GenerateResponse | DeadlineExceeded) -> None:
        self.replica = replica
        self._call = call
        self.first: inference_pb2.GenerateResponse | DeadlineExceeded | None = first

    async def read(self) -> inference_pb2.GenerateResponse | None:
        """The next message (the first one first), or None once the stream has
        ended; LlmsuiteError when it failed."""
        if self.first is not None:
            first, self.first = self.first, None
            if isinstance(first, DeadlineExceeded):
                raise first
            return first
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self.replica.record(exc.code(), callers_deadline=True)
            raise from_upstream(exc, "inference") from None
        return None if message is grpc.aio.EOF else message

    async def send_turn(self, token_ids: Sequence[int], sampling: object, *, keep_history: int | None = None) -> None:
        """Sends the session's next turn; keep_history rewinds its history to that many tokens first."""
        turn = inference_pb2.GenerateTurn(token_ids=token_ids, sampling=sampling)  # type: ignore[arg-type]
        if keep_history is not None:
            turn.keep_history_tokens = keep_history
        try:
            await self._call.write(inference_pb2.GenerateRequest(turn=turn))
        except grpc.aio.AioRpcError as exc:
            raise from_upstream(exc, "inference") from None
        except asyncio.InvalidStateError:  # the stream already ended
            raise ended_early("inference") from None

    async def stop_generating(self, reason: str) -> None:
        """Asks the replica to end the turn (it answers with a CANCELLED final);
        a stream that already ended is fine."""
        try:
            await self._call.write(inference_pb2.GenerateRequest(cancel=inference_pb2.GenerateCancel(reason=reason)))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass

    async def finish(self) -> None:
        """After the final message of a stream that ends with it: half-close and
        read to the end, so the call ends with the replica's own status rather
        than CANCELLED (as upstream metrics and the trace then show it)."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass

    def cancel(self) -> None:
        """Ends the RPC at once (a no-op once it has finished); frees the replica's slot."""
        self._call.cancel()


class Upstreams:
    """Channels, stubs and breakers for the tokenizer and every replica, and
    the calls the gateway makes on them."""

    def __init__(self, tokenizer: TokenizerUpstream, replicas: list[Replica], api_key: str | None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.tokenizer = tokenizer
        self.replicas = replicas
        self._auth = auth_metadata(api_key)
        self._next = itertools.count()
        self._metrics = metrics

    @classmethod
    def connect(cls, tokenizer_target: str, inference_targets: Sequence[str], settings: ChannelSettings, *,
                tracer_provider: object | None, breaker_threshold: int, breaker_reset_s: float,
                metrics: GatewayMetrics | None = None) -> Upstreams:
        """`metrics` counts every call to an upstream by how it ended, and spill-overs."""
        def breaker(label: str, target: str) -> CircuitBreaker:
            return CircuitBreaker(f"{label} ({target})", breaker_threshold, breaker_reset_s, public_name=label)

        tok_channel = create_channel(tokenizer_target, settings, services=[TOKENIZER_SERVICE],
                                     tracer_provider=tracer_provider)
        tokenizer = TokenizerUpstream("tokenizer", tokenizer_target, tok_channel,
                                      breaker("tokenizer", tokenizer_target), health_pb2_grpc.HealthStub(tok_channel),
                                      tokenizer_pb2_grpc.TokenizerServiceStub(tok_channel))
        replicas = []
        for index, target in enumerate(inference_targets):
            label = f"inference replica {index}" if len(inference_targets) > 1 else "inference"
            channel = create_channel(target, settings, services=[INFERENCE_SERVICE], tracer_provider=tracer_provider)
            replicas.append(Replica(label, target, channel, breaker(label, target), health_pb2_grpc.HealthStub(channel),
                                    inference_pb2_grpc.InferenceServiceStub(channel)))
        return cls(tokenizer, replicas, settings.api_key, metrics)

    def _count(self, kind: str, upstream: Upstream, method: str, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.upstream_call(kind, upstream.target, method, code)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        request_id = current_request_id()
        return (*self._auth, (REQUEST_ID_HEADER, request_id)) if request_id else self._auth

    async def _call(self, upstream: Upstream, kind: str, call: Callable[..., Awaitable[Response]], request: object,
                    *, time_limit_s: float | None, probe: bool = False) -> Response:
        """One unary call: breaker first, translated failure after. `probe`
        marks the gateway's own background calls (discovery, health): they go
        out even while the circuit is open, since they are how the gateway
        learns that the upstream is back, and their timeouts are the gateway's."""
        if not probe:
            upstream.breaker.before_call()
        method = type(request).__name__.removesuffix("Request")  # messages are named after their method
        try:
            response = await call(request, timeout=time_limit_s, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            self._count(kind, upstream, method, exc.code())
            upstream.record(exc.code(), callers_deadline=not probe)
            raise from_upstream(exc, kind) from None
        except asyncio.CancelledError:
            self._count(kind, upstream, method, grpc.StatusCode.CANCELLED)
            upstream.breaker.record_abandoned()
            raise
        self._count(kind, upstream, method, grpc.StatusCode.OK)
        if probe:
            upstream.breaker.record_probe_success()
        else:
            upstream.breaker.record_success()
        return response

    # -- tokenizer --------------------------------------------------------------------------------------------

    async def encode(self, request: tokenizer_pb2.EncodeRequest, *, time_limit_s: float | None
                     ) -> tokenizer_pb2.EncodeResponse:
        return await self._call(self.tokenizer, "tokenizer", self.tokenizer.stub.Encode, request,
                                time_limit_s=time_limit_s)

    async def decode(self, request: tokenizer_pb2.DecodeRequest, *, time_limit_s: float | None
                     ) -> tokenizer_pb2.DecodeResponse:
        return await self._call(self.tokenizer, "tokenizer", self.tokenizer.stub.Decode, request,
                                time_limit_s=time_limit_s)

    async def count_tokens(self, request: tokenizer_pb2.CountTokensRequest, *, time_limit_s: float | None
                           ) -> tokenizer_pb2.CountTokensResponse:
        return await self._call(self.tokenizer, "tokenizer", self.tokenizer.stub.CountTokens, request,
                                time_limit_s=time_limit_s)

    async def apply_chat_template(self, request: tokenizer_pb2.ApplyChatTemplateRequest, *, time_limit_s: float | None
                                  ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        return await self._call(self.tokenizer, "tokenizer", self.tokenizer.stub.ApplyChatTemplate, request,
                                time_limit_s=time_limit_s)

    async def _serving(self, upstream: Upstream, kind: str, *, time_limit_s: float) -> None:
        """The upstream's own health must say SERVING: one that answers NOT_SERVING
        (draining, wedged workers, still loading) is taken out of rotation at once."""
        try:  # success is recorded once the whole probe has succeeded
            answer = await upstream.health.Check(health_pb2.HealthCheckRequest(), timeout=time_limit_s)
        except grpc.aio.AioRpcError as exc:
            self._count(kind, upstream, "Check", exc.code())
            upstream.record(exc.code(), callers_deadline=False)
            raise from_upstream(exc, kind) from None
        self._count(kind, upstream, "Check", grpc.StatusCode.OK)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            upstream.breaker.trip()
            raise Unavailable(f"the {kind} service reports it is not serving", reason="UPSTREAM_NOT_SERVING",
                              retry_after_s=1.0, metadata={"upstream": upstream.label})

    async def tokenizer_models(self, *, time_limit_s: float) -> tokenizer_pb2.ListModelsResponse:
        """A probe: the tokenizer's health, then its models."""
        await self._serving(self.tokenizer, "tokenizer", time_limit_s=time_limit_s)
        return await self._call(self.tokenizer, "tokenizer", self.tokenizer.stub.ListModels,
                                tokenizer_pb2.ListModelsRequest(), time_limit_s=time_limit_s, probe=True)

    async def tokenizer_files(self, model: str, *, time_limit_s: float) -> tokenizer_pb2.GetTokenizerFilesResponse:
        return await self._call(self.tokenizer, "tokenizer", self.tokenizer.stub.GetTokenizerFiles,
                                tokenizer_pb2.GetTokenizerFilesRequest(model=model), time_limit_s=time_limit_s,
                                probe=True)

    # -- inference --------------------------------------------------------------------------------------------

    async def replica_models(self, replica: Replica, *, time_limit_s: float) -> inference_pb2.ListModelsResponse:
        """A probe: the replica's health, then its models."""
        await self._serving(replica, "inference", time_limit_s=time_limit_s)
        return await self._call(replica, "inference", replica.stub.ListModels, inference_pb2.ListModelsRequest(),
                                time_limit_s=time_limit_s, probe=True)

    def round_robin(self, replicas: Sequence[Replica]) -> list[Replica]:
        """`replicas` rotated by one more each call, so requests spread."""
        if not replicas:
            return []
        start = next(self._next) % len(replicas)
        return [*replicas[start:], *replicas[:start]]

    def dial(self, replica: Replica, *, time_limit_s: float | None) -> grpc.aio.StreamStreamCall:
        """Starts a Generate call (HTTP/2 stream and headers) before the request
        is known, so opening it overlaps the caller's other setup (encoding)."""
        call = replica.stub.Generate(timeout=time_limit_s, metadata=self._metadata())
        if self._metrics is not None:  # counted when it ends, however it ends
            on_call_done(call, lambda code: self._count("inference", replica, "Generate", code))
        return call

    async def open_generate(self, start: inference_pb2.GenerateStart, candidates: Sequence[Replica], *,
                            time_limit_s: float | None, dialed: grpc.aio.StreamStreamCall | None = None
                            ) -> InferenceStream:
        """Starts the stream on the first usable candidate (`dialed` is a call
        already started on candidates[0]). A replica whose circuit is open is
        skipped; one that refuses before streaming anything (RESOURCE_EXHAUSTED,
        UNAVAILABLE) is spilled over once to the next. Caller mistakes
        (INVALID_ARGUMENT, ...) are raised at once."""
        last_error: LlmsuiteError | None = None
        refused: tuple[Replica, grpc.StatusCode] | None = None  # the replica this try spills over from
        tries = 0
        for position, replica in enumerate(candidates):
            call = dialed if position == 0 else None
            if tries == 2:  # the first choice and one spill-over
                if call is not None:
                    call.cancel()
                break
            try:
                replica.breaker.before_call()
            except Unavailable as exc:
                last_error = exc
                if call is not None:
                    call.cancel()
                continue
            tries += 1
            if refused is not None and self._metrics is not None:
                self._metrics.spilled_over(refused[0].target, refused[1])
            call = call or self.dial(replica, time_limit_s=time_limit_s)
            try:
                await call.write(inference_pb2.GenerateRequest(start=start))
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                replica.record(exc.code(), callers_deadline=True)
                error = from_upstream(exc, "inference")
                if isinstance(error, DeadlineExceeded) and _ran_out_of_time(exc):
                    # Nothing came by the deadline the replica was given (queued behind others): not
                    # an error but a turn that ran out of time, so it ends with a TIME_LIMIT final.
                    return InferenceStream(replica, call, error)
                if exc.code() in SPILL_OVER_CODES or is_transport_failure(exc):
                    log.info("replica refused; spilling over", extra={"replica": replica.target,
                                                                       "code": exc.code().name})
                    last_error, refused = error, (replica, exc.code())
                    continue
                raise error from None
            except asyncio.InvalidStateError:  # the call ended before the start could be written
                replica.breaker.record_failure()
                last_error, refused = ended_early("inference"), (replica, await call.code())
                continue
            except asyncio.CancelledError:
                call.cancel()
                replica.breaker.record_abandoned()
                raise
            if first is grpc.aio.EOF:
                replica.breaker.record_failure()
                raise ended_early("inference")
            replica.breaker.record_success()
            replica.track(call)
            return InferenceStream(replica, call, first)
        if last_error is not None:
            raise last_error
        raise unavailable("inference", reason="NO_UPSTREAM")

    async def watch_connectivity(self, changed: Callable[[], None]) -> None:
        """Until cancelled: calls `changed` whenever an upstream's channel becomes unreachable
        or reachable again, or a request to it fails UNAVAILABLE. Whether
        an upstream is `usable` then follows within a connect attempt, not a probe period."""
        upstreams: list[Upstream] = [self.tokenizer, *self.replicas]
        for upstream in upstreams:
            upstream.on_failure = changed
        try:
            await asyncio.gather(*(upstream.follow_connectivity(changed) for upstream in upstreams))
        finally:
            for upstream in upstreams:
                upstream.on_failure = None

    async def embed(self, request: inference_pb2.EmbedRequest, candidates: Sequence[Replica], *,
                    time_limit_s: float | None) -> inference_pb2.EmbedResponse:
        """One Embed on candidates[0]; a replica that refuses (overloaded, down, circuit open) is
        spilled over once to the next. Caller mistakes are raised at once."""
        last_error: LlmsuiteError | None = None
        refused_by = ""
        for replica in candidates[:2]:  # the first choice and one spill-over
            if last_error is not None and self._metrics is not None:
                self._metrics.spilled_over(refused_by, last_error.code)
            try:
                return await self._call(replica, "inference", replica.stub.Embed, request, time_limit_s=time_limit_s)
            except LlmsuiteError as exc:
                if exc.code not in SPILL_OVER_CODES:
                    raise
                last_error, refused_by = exc, replica.target
        if last_error is not None:
            raise last_error
        raise unavailable("inference", reason="NO_UPSTREAM")

    def circuits(self) -> Iterator[tuple[str, str, CircuitBreaker]]:
        """Every upstream's circuit: (kind, configured target, breaker), as GatewayMetrics reads them."""
        yield "tokenizer", self.tokenizer.target, self.tokenizer.breaker
        for replica in self.replicas:
            yield "inference", replica.target, replica.breaker

    async def close(self) -> None:
        await self.tokenizer.channel.close()
        for replica in self.replicas:
            await replica.channel.close()
