"""What a failed call carries on the wire, for every service built on the bootstrap:
a specific code, bounded trailers, the request id, and INVALID_ARGUMENT for bytes
that do not decode."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from runtime.probe_app import ProbeApp, bidi, method, unary
from support import ServerThread

from llmsuite.client.errors import error_details, from_rpc_error
from llmsuite.runtime.errors import NotFound
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import SERVICE_NAME, TokenizerApp
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc

# A sequence that is not a valid protobuf encoding of any message: field 1 as a
# length-delimited value whose length runs past the end.
UNDECODABLE = b"\x0a\xff\xff\xff\xff\x0f"
C_CORE_METADATA_SOFT_LIMIT = 8192


def _trailer_bytes(error: grpc.RpcError) -> int:
    return sum(len(k) + len(v) for k, v in error.trailing_metadata() or ()) + len(error.details() or "")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())) as srv, srv.channel() as ch:
        yield ch


def test_a_huge_model_name_gets_not_found_with_bounded_trailers(tokenizer):
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(tokenizer)
    for name in ("m" * 5000, "東" * 5000):
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.GetModelInfo(pb.GetModelInfoRequest(model=name))
        # Before the cap, this C-core client refused the 15 KB trailer as RESOURCE_EXHAUSTED.
        assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND
        assert _trailer_bytes(exc_info.value) < C_CORE_METADATA_SOFT_LIMIT // 2
        assert error_details(exc_info.value)["reason"] == "MODEL_NOT_FOUND"


def test_details_are_capped_but_keep_code_reason_and_first_violation():
    async def fail(request, context):
        raise NotFound(message="x" * 20_000, reason="MODEL_NOT_FOUND",
                       metadata={f"key{i}": "v" * 5000 for i in range(50)})

    with ServerThread(ProbeApp({"Fail": unary(fail)})) as srv, srv.channel() as ch:
        with pytest.raises(grpc.RpcError) as exc_info:
            ch.unary_unary(method("Fail"))(b"")
    error = exc_info.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert _trailer_bytes(error) < C_CORE_METADATA_SOFT_LIMIT // 2
    details = error_details(error)
    assert details["reason"] == "MODEL_NOT_FOUND" and details["message"].endswith("…")


def test_memory_error_is_resource_exhausted_with_retry_info():
    async def allocate(request, context):
        raise MemoryError

    with ServerThread(ProbeApp({"Allocate": unary(allocate)})) as srv, srv.channel() as ch:
        with pytest.raises(grpc.RpcError) as exc_info:
            ch.unary_unary(method("Allocate"))(b"")
    assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(exc_info.value)
    assert details["reason"] == "OUT_OF_MEMORY" and details["retry_after_s"] > 0


def test_undecodable_bytes_are_invalid_argument_on_every_rpc_shape(tokenizer):
    calls = {
        "unary": lambda: tokenizer.unary_unary(f"/{SERVICE_NAME}/Encode")(UNDECODABLE),
        "unary admin": lambda: tokenizer.unary_unary(f"/{SERVICE_NAME}/Reload")(UNDECODABLE),
        "bidi first": lambda: list(tokenizer.stream_stream(f"/{SERVICE_NAME}/DecodeStream")(iter([UNDECODABLE]))),
        "bidi later": lambda: list(tokenizer.stream_stream(f"/{SERVICE_NAME}/DecodeStream")(iter([
            pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny")).SerializeToString(), UNDECODABLE]))),
        "health": lambda: tokenizer.unary_unary("/grpc.health.v1.Health/Check")(UNDECODABLE),
    }
    for shape, call in calls.items():
        with pytest.raises(grpc.RpcError) as exc_info:
            call()
        error = exc_info.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, error)
        assert error_details(error)["reason"] == "MALFORMED_REQUEST", shape
        assert "Request" not in error.details() and "protobuf" not in error.details().lower(), shape


def test_undecodable_bytes_later_in_a_request_stream():
    async def echo(requests, context):
        async for _request in requests:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    with ServerThread(ProbeApp({"Echo": bidi(echo)})) as srv, srv.channel() as ch:
        call = ch.stream_stream(method("Echo"))
        ok = health_pb2.HealthCheckRequest(service="a").SerializeToString()
        assert len(list(call(iter([ok, ok])))) == 2
        with pytest.raises(grpc.RpcError) as exc_info:
            list(call(iter([ok, UNDECODABLE])))
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_reaches_the_caller_of_a_failed_call_in_the_trailers(tokenizer):
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(tokenizer)
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"), metadata=(("x-request-id", "rid-7"),))
    assert ("x-request-id", "rid-7") in exc_info.value.trailing_metadata()
    assert from_rpc_error(exc_info.value).request_id == "rid-7"
    # a successful call has it in the headers that come with the response
    _, call = stub.ListModels.with_call(pb.ListModelsRequest(), metadata=(("x-request-id", "rid-8"),))
    assert ("x-request-id", "rid-8") in call.initial_metadata()


def test_a_request_id_that_is_no_valid_metadata_does_not_cost_the_status():
    from llmsuite.runtime.logs import set_request_id

    async def fail(request, context):
        set_request_id("k\b#\x1f")  # e.g. a request id a service took from the message itself
        raise NotFound(message="gone", reason="MODEL_NOT_FOUND")

    with ServerThread(ProbeApp({"Fail": unary(fail)})) as srv, srv.channel() as ch:
        with pytest.raises(grpc.RpcError) as exc_info:
            ch.unary_unary(method("Fail"))(b"")
    assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND
