"""Gateway metrics scraped from a live gateway in front of real upstreams:
upstream calls by replica and code, spill-overs, circuit states, rate limits."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from metrics_scrape import Scrape, scrape, scrape_until
from support import ServerThread

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.app import GatewayApp
from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import SERVICE_NAME as INFERENCE
from llmsuite.inference.service import InferenceApp
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.errors import Unavailable
from llmsuite.runtime.settings import ServerSettings
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp

METRICS_ON = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text",
                            metrics_listen="127.0.0.1:0")
SMALL = common_pb2.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


class RefusingReplica(inference_pb2_grpc.InferenceServiceServicer):
    """An inference replica that lists the real replica's models (so the gateway
    routes to it) but refuses every generation as unavailable."""

    service_names = (INFERENCE,)

    def __init__(self, models: inference_pb2.ListModelsResponse) -> None:
        self._models = models

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self, server)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health_names(self) -> tuple[str, ...]:
        return ()

    async def ListModels(self, request, context):
        return self._models

    async def Generate(self, request_iterator, context):
        await anext(aiter(request_iterator))  # refuses the start, as the engine does
        raise Unavailable("this replica is stopping", reason="ENGINE_STOPPING", retry_after_s=1.0)
        yield  # a response-streaming handler


@pytest.fixture(scope="module")
def upstreams(tiny_model_dir: Path) -> Iterator[dict[str, ServerThread]]:
    tokenizer = TokenizerApp({"tiny": tiny_model_dir}, TokenizerLimits())
    inference = InferenceApp({"tiny": tiny_model_dir}, EngineSettings(device="cpu", intra_op_threads=1))
    with ServerThread(tokenizer) as tok, ServerThread(inference) as inf, inf.channel() as ch:
        models = inference_pb2_grpc.InferenceServiceStub(ch).ListModels(inference_pb2.ListModelsRequest())
        with ServerThread(RefusingReplica(models)) as refusing:
            yield {"tokenizer": tok, "inference": inf, "refusing": refusing}


def start_gateway(tokenizer: str, replicas: list[str], limiter: KeyedRateLimiter | None = None) -> ServerThread:
    # A long refresh interval and reset: the circuit states the test sees are the
    # ones its requests caused, not a background probe's.
    factory = partial(Upstreams.connect, tokenizer, replicas, ChannelSettings(retry_unavailable_attempts=1),
                      tracer_provider=None, breaker_threshold=1, breaker_reset_s=3600.0)
    unlimited = KeyedRateLimiter(0, 1, 0, 1)
    app = GatewayApp(factory, GatewayLimits(), unlimited if limiter is None else limiter, startup_timeout_s=60,
                     refresh_interval_s=3600.0)
    return ServerThread(app, METRICS_ON)


def generate(gateway: ServerThread, sampling: common_pb2.SamplingParams = SMALL) -> pb.GenerateResponse:
    with gateway.channel() as ch:
        return gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
            pb.GenerateRequest(model="tiny", prompt="Hello", sampling=sampling), timeout=60)


def upstream_calls(result: Scrape, replica: str, method: str, code: str) -> float:
    return result.get("llmsuite_gateway_upstream_requests_total", replica=replica, grpc_method=method, grpc_code=code)


def test_upstream_calls_spill_overs_and_circuits(upstreams):
    tok, inf, refusing = upstreams["tokenizer"].address, upstreams["inference"].address, upstreams["refusing"].address
    with start_gateway(tok, [refusing, inf]) as gw:
        port = gw.running.metrics_port
        idle = scrape(port)
        for replica in (refusing, inf):
            assert idle.get("llmsuite_gateway_circuit_breaker_state", upstream="inference", replica=replica,
                            state="closed") == 1
        assert idle.get("llmsuite_gateway_circuit_breaker_state", upstream="tokenizer", replica=tok,
                        state="closed") == 1
        assert upstream_calls(idle, tok, "ListModels", "OK") >= 1  # discovery goes through the same channels

        for _ in range(3):  # round-robin puts the refusing replica first for one of them
            assert generate(gw).summary.usage.completion_tokens == 8
        result = scrape_until(port, lambda r: upstream_calls(r, inf, "Generate", "OK") == 3)

        assert upstream_calls(result, inf, "Generate", "OK") == 3
        assert upstream_calls(result, tok, "Encode", "OK") == 3
        assert upstream_calls(result, refusing, "Generate", "UNAVAILABLE") == 1
        assert result.get("llmsuite_gateway_spillovers_total", replica=refusing, grpc_code="UNAVAILABLE") == 1
        assert result.get("llmsuite_gateway_spillovers_total") == 1
        # --breaker-failures 1: the refusal opened that replica's circuit, and only that one.
        assert result.get("llmsuite_gateway_circuit_breaker_state", replica=refusing, state="open") == 1
        assert result.get("llmsuite_gateway_circuit_breaker_state", replica=refusing, state="closed") == 0
        assert result.get("llmsuite_gateway_circuit_breaker_state", replica=inf, state="closed") == 1
        assert result.get("llmsuite_gateway_circuit_breaker_consecutive_failures", replica=refusing) == 1
        assert result.label_values("llmsuite_gateway_upstream_requests_total", "replica") == {tok, inf, refusing}
        # The gateway's own RPCs are counted like every service's.
        assert result.get("llmsuite_grpc_server_handled_total", grpc_method="Generate", grpc_code="OK") == 3


def test_rate_limit_refusals_are_counted_by_reason(upstreams):
    tok, inf = upstreams["tokenizer"].address, upstreams["inference"].address
    with start_gateway(tok, [inf], KeyedRateLimiter(1e-6, 1, 0, 1)) as gw:
        generate(gw)
        with pytest.raises(grpc.RpcError) as refused:
            generate(gw)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert scrape(gw.running.metrics_port).get("llmsuite_gateway_rate_limited_total", reason="requests") == 1

    first = generate_prompt_tokens(tok, inf)
    with start_gateway(tok, [inf], KeyedRateLimiter(0, 1, 1e-6, first + SMALL.max_new_tokens)) as gw:
        generate(gw)  # takes the whole token bucket
        with pytest.raises(grpc.RpcError) as refused:
            generate(gw)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as too_big:
            generate(gw, common_pb2.SamplingParams(max_new_tokens=SMALL.max_new_tokens + 1))
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        result = scrape(gw.running.metrics_port)
        assert result.get("llmsuite_gateway_rate_limited_total", reason="tokens") == 1
        assert result.get("llmsuite_gateway_rate_limited_total", reason="token_burst") == 1
        assert result.value("llmsuite_gateway_rate_limited_total", reason="requests") is None


def generate_prompt_tokens(tok: str, inf: str) -> int:
    """The prompt's token count, as the gateway will charge it."""
    with start_gateway(tok, [inf]) as gw, gw.channel() as ch:
        return gateway_pb2_grpc.GatewayServiceStub(ch).CountTokens(
            pb.CountTokensRequest(model="tiny", texts=["Hello"])).total
