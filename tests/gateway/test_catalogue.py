"""The catalogue with scripted replicas, refreshed by hand so every step is
exact: health that does not flap on one failure, replicas that disagree."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scripted_inference import Script, ScriptedInference, running_gateway
from support import ServerThread

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(gateway: ServerThread) -> tuple[int, int]:
    with gateway.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        return tuple(health.Check(health_pb2.HealthCheckRequest(service=name)).status  # type: ignore[return-value]
                     for name in ("", "model:tiny"))


def refresh(gateway: ServerThread) -> None:
    gateway.call(gateway.app.catalogue.refresh())


def test_one_failed_probe_changes_nothing_and_a_run_of_them_does(tokenizer_server, scripted):
    app, inference = scripted
    with running_gateway(tokenizer_server.address, [inference.address], breaker_failures=3,
                         breaker_reset_s=0.01) as gw:
        assert statuses(gw) == (SERVING, SERVING)
        app.script = Script(fail_list_models=1)
        refresh(gw)
        assert statuses(gw) == (SERVING, SERVING)  # one blip: still serving
        app.script = Script(fail_list_models=3)
        for _ in range(3):
            refresh(gw)
        assert statuses(gw) == (NOT_SERVING, NOT_SERVING)
        refresh(gw)  # answers again: the probe closes the circuit
        assert statuses(gw) == (SERVING, SERVING)


def test_replicas_that_disagree_serve_the_model_only_where_the_tokenizer_matches(tokenizer_server, scripted,
                                                                                 tiny_tokenizer_dir):
    matching, matching_server = scripted
    other = ScriptedInference("sha256:" + "f" * 64)  # a replica still running another version
    assert matching.tokenizer_hash == tokenizer_content_hash(tiny_tokenizer_dir)
    with ServerThread(other) as other_server, \
            running_gateway(tokenizer_server.address, [other_server.address, matching_server.address]) as gw, \
            gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for _ in range(4):
            reply = stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi",
                                                     sampling=common_pb2.SamplingParams(max_new_tokens=3)))
            assert reply.summary.usage.completion_tokens == Script().tokens
        assert (len(matching.starts), len(other.starts)) == (4, 0)
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["tiny"]
        assert statuses(gw) == (SERVING, SERVING)


def test_a_model_nobody_serves_is_not_found_without_asking_upstreams(tokenizer_server, scripted):
    _, inference = scripted
    with running_gateway(tokenizer_server.address, [inference.address]) as gw, gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for call in (lambda: stub.Generate(pb.GenerateRequest(model="nope", prompt="Hi")),
                     lambda: stub.Tokenize(pb.TokenizeRequest(model="nope", texts=["a"])),
                     lambda: stub.CountTokens(pb.CountTokensRequest(model="nope", texts=["a"]))):
            try:
                call()
                raise AssertionError("expected NOT_FOUND")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND


def test_a_replica_whose_health_says_not_serving_is_out_of_rotation_at_the_next_refresh(tokenizer_server, scripted):
    draining, draining_server = scripted
    other = ScriptedInference(draining.tokenizer_hash)
    with ServerThread(other) as other_server, \
            running_gateway(tokenizer_server.address, [draining_server.address, other_server.address]) as gw, \
            gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        draining_server.call(draining_server.running.health.set("", NOT_SERVING))  # e.g. its drain has begun
        refresh(gw)
        for _ in range(4):
            stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi"))
        assert (len(draining.starts), len(other.starts)) == (0, 4)
        assert statuses(gw) == (SERVING, SERVING)
        other_server.call(other_server.running.health.set("", NOT_SERVING))
        refresh(gw)
        assert statuses(gw) == (NOT_SERVING, NOT_SERVING)
        draining_server.call(draining_server.running.health.set("", SERVING))
        refresh(gw)
        assert statuses(gw) == (SERVING, SERVING)
        stub.Generate(pb.GenerateRequest(model="tiny", prompt="Hi"))
        assert len(draining.starts) == 1
