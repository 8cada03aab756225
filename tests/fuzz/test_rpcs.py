"""Hypothesis over every RPC of the three services, against real processes: any
request, any order of stream messages, bytes that do not decode. No answer may be a
server fault (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED) or leak internals, and
every service must still be healthy and serving afterwards."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ServiceProcess

from llmsuite.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from .conftest import Tally
from .rpcs import SERVER_FAULTS, Rpc, every_rpc

RPCS = every_rpc()
MAX_MESSAGE = [("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def assert_serving(cluster: dict[str, ServiceProcess]) -> None:
    """Every process alive, SERVING, and answering a real request."""
    for name, process in cluster.items():
        assert process.alive(), f"{name} died:\n{process.log()}"
        with grpc.insecure_channel(process.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
    with grpc.insecure_channel(cluster["tokenizer"].address) as ch:
        assert tokenizer_pb2_grpc.TokenizerServiceStub(ch).CountTokens(
            tokenizer_pb2.CountTokensRequest(model="tiny", texts=["canary"]), timeout=30).total > 0
    with grpc.insecure_channel(cluster["inference"].address) as ch:
        assert inference_pb2_grpc.InferenceServiceStub(ch).GetModelInfo(
            inference_pb2.GetModelInfoRequest(model="tiny"), timeout=30).info.name == "tiny"
    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(gateway_pb2.GenerateRequest(
            model="tiny", prompt="canary"), timeout=60)
        assert reply.summary.usage.completion_tokens > 0


def _check(rpc: Rpc, code: grpc.StatusCode, tally: Tally, label: str) -> None:
    tally[f"{rpc.name}{label}"][code.name] += 1
    assert code not in SERVER_FAULTS, f"{rpc.name}{label} answered {code.name}"


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
@settings(settings.get_profile("fuzz"))
@given(data=st.data())
def test_any_request_gets_a_specific_status(cluster, tally, rpc: Rpc, data):
    requests = data.draw(rpc.requests(), label="requests")
    with grpc.insecure_channel(cluster[rpc.service].address, options=MAX_MESSAGE) as ch:
        _check(rpc, rpc.call(ch, requests), tally, "")


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
@settings(settings.get_profile("fuzz"))
@given(data=st.data())
def test_undecodable_bytes_are_invalid_argument(cluster, tally, rpc: Rpc, data):
    frames = data.draw(rpc.raw(), label="frames")
    with grpc.insecure_channel(cluster[rpc.service].address, options=MAX_MESSAGE) as ch:
        code = rpc.call(ch, frames, raw=True)
    _check(rpc, code, tally, " (raw bytes)")


def test_every_service_is_healthy_after_the_fuzzing(cluster):
    # Runs after the tests above in file order; pytest-randomly is not used here.
    assert_serving(cluster)
