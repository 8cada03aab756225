"""Start, fail and recover in any order, as real processes: a gateway started
before its upstreams, upstreams that die and come back on the same port, a
tokenizer reloaded under it, a replica drained in the middle of a stream, and
mTLS between them. Health must say what is true at every step."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import BIN, ServiceProcess, free_ports, processes, watch_health

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SMALL = common_pb2.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
# Fast discovery and a breaker that counts a replica down after two failures, so
# every state change below is seen within a fraction of a second.
QUICK = ("--refresh-interval", "0.2", "--breaker-failures", "2", "--breaker-reset", "0.5")


def upstream(kind: str, model_dir: Path, port: int = 0, *extra: str, **kwargs) -> ServiceProcess:
    argv = [f"llmsuite-{kind}", "--listen", f"127.0.0.1:{port}", "--model", f"tiny={model_dir}", *extra]
    if kind == "inference":
        argv += ["--device", "cpu", "--intra-op-threads", "1"]
    return ServiceProcess(argv, **kwargs)


def gateway(tokenizer: str, inference: str, *extra: str, **kwargs) -> ServiceProcess:
    return ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tokenizer,
                           "--inference", inference, *QUICK, *extra], **kwargs)


def generate(address: str, prompt: str = "Hello", **kwargs) -> pb.GenerateResponse:
    with grpc.insecure_channel(address) as ch:
        return gateway_pb2_grpc.GatewayServiceStub(ch).Generate(
            pb.GenerateRequest(model="tiny", prompt=prompt, sampling=SMALL), timeout=30, **kwargs)


def refusal(address: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc_info:
        generate(address)
    return exc_info.value


def check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_gateway_first_then_upstreams_then_an_upstream_restart(tiny_model_dir):
    tok_port, inf_port = free_ports(2)
    gw = gateway(f"127.0.0.1:{tok_port}", f"127.0.0.1:{inf_port}", wait=False)
    with processes(gw):
        # Nothing upstream: the gateway runs, says NOT_SERVING and refuses with a retry hint.
        assert check(gw.address) == NOT_SERVING
        error = refusal(gw.address)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and error_details(error)["retry_after_s"] > 0

        tok = upstream("tokenizer", tiny_model_dir, tok_port)
        with processes(tok, upstream("inference", tiny_model_dir, inf_port)):
            watch_health(gw.address, SERVING)
            assert generate(gw.address).summary.usage.completion_tokens == 4

            tok.kill()  # the tokenizer dies: the gateway notices and says so
            watch_health(gw.address, NOT_SERVING)
            assert refusal(gw.address).code() == grpc.StatusCode.UNAVAILABLE
            with processes(upstream("tokenizer", tiny_model_dir, tok_port)):  # back on the same port
                watch_health(gw.address, SERVING)
                assert generate(gw.address).summary.usage.completion_tokens == 4
        assert gw.alive(), gw.log()


def test_replicas_lost_and_back_and_a_tokenizer_reload_that_breaks_the_pairing(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    port_b = free_ports(1)[0]
    tok, inf_a, inf_b = (upstream("tokenizer", model_dir), upstream("inference", model_dir),
                         upstream("inference", model_dir, port_b))
    with processes(tok, inf_a, inf_b):
        gw = gateway(tok.address, f"{inf_a.address},{inf_b.address}")
        with processes(gw):
            assert check(gw.address, "model:tiny") == SERVING
            inf_a.kill()
            assert generate(gw.address).summary.usage.completion_tokens == 4  # the other replica serves
            assert check(gw.address) == SERVING
            inf_b.kill()  # every replica gone
            watch_health(gw.address, NOT_SERVING, "model:tiny")
            watch_health(gw.address, NOT_SERVING)
            assert refusal(gw.address).code() == grpc.StatusCode.UNAVAILABLE
            with processes(upstream("inference", model_dir, port_b)):  # a replica comes back: no gateway restart
                watch_health(gw.address, SERVING)
                assert check(gw.address, "model:tiny") == SERVING
                assert generate(gw.address).summary.usage.completion_tokens == 4

                # The tokenizer is reloaded with files that no longer match the model: the very
                # next request is refused, health follows, and matching files bring it back.
                config = model_dir / "tokenizer_config.json"
                original = config.read_text()
                config.write_text(original.replace("{", '{"note": "changed", ', 1))
                with grpc.insecure_channel(tok.address) as ch:
                    reload = tokenizer_pb2_grpc.TokenizerServiceStub(ch).Reload
                    reload(tokenizer_pb2.ReloadRequest(model="tiny"))
                    error = refusal(gw.address)
                    assert (error.code(), error_details(error)["reason"]) == \
                        (grpc.StatusCode.UNAVAILABLE, "TOKENIZER_MISMATCH")
                    watch_health(gw.address, NOT_SERVING, "model:tiny")
                    config.write_text(original)
                    reload(tokenizer_pb2.ReloadRequest(model="tiny"))
                watch_health(gw.address, SERVING, "model:tiny")
                assert generate(gw.address).summary.usage.completion_tokens == 4


def test_draining_a_replica_finishes_its_stream_and_sends_new_requests_elsewhere(tiny_model_dir):
    tok, inf_a, inf_b = (upstream("tokenizer", tiny_model_dir),
                         upstream("inference", tiny_model_dir, 0, "--grace-period", "30"),
                         upstream("inference", tiny_model_dir))
    with processes(tok, inf_a, inf_b):
        gw = gateway(tok.address, f"{inf_a.address},{inf_b.address}")
        with processes(gw), grpc.insecure_channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            long = common_pb2.SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
            streams = [stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="long", sampling=long),
                                           timeout=60) for _ in range(2)]
            firsts = [next(s) for s in streams]  # both streams are generating, one on each replica
            assert all(f.WhichOneof("kind") == "delta" for f in firsts)
            inf_a.proc.send_signal(signal.SIGTERM)
            for _ in range(4):  # new requests land on the replica that is not draining
                assert stub.Generate(pb.GenerateRequest(model="tiny", prompt="more", sampling=SMALL),
                                     timeout=30).summary.usage.completion_tokens == 4
            for stream in streams:  # and the stream on the draining replica still completes
                final = list(stream)[-1].final
                assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert final.usage.completion_tokens == 400
            assert inf_a.proc.wait(60) == 0
            assert check(gw.address) == SERVING


def test_requests_spread_over_replicas_behind_one_target_and_survive_losing_one(tiny_model_dir):
    """One gRPC target that resolves to every replica (as a headless Service's
    dns:/// name does): gRPC's round_robin spreads calls, and a lost replica is
    dropped from the rotation."""
    replicas = [upstream("inference", tiny_model_dir) for _ in range(3)]
    tok = upstream("tokenizer", tiny_model_dir)
    with processes(tok, *replicas):
        target = "ipv4:" + ",".join(r.address for r in replicas)
        gw = gateway(tok.address, target)
        with processes(gw):
            for _ in range(9):
                generate(gw.address, "spread")

            def requests_seen() -> list[int]:
                seen = []
                for replica in replicas:
                    if not replica.alive():
                        continue
                    with grpc.insecure_channel(replica.address) as ich:
                        seen.append(inference_pb2_grpc.InferenceServiceStub(ich).GetModelInfo(
                            inference_pb2.GetModelInfoRequest(model="tiny")).info.stats.requests_total)
                return seen

            assert all(n >= 2 for n in requests_seen()), requests_seen()  # each request picks a replica
            before = requests_seen()
            replicas[0].kill()
            for _ in range(9):
                assert generate(gw.address, "still").summary.usage.completion_tokens == 4
            after = requests_seen()
            assert all(b > a for a, b in zip(before[1:], after, strict=True)), (before, after)
            assert check(gw.address) == SERVING


def test_startup_timeout_gives_up_and_sigterm_ends_a_wait_without_one():
    nowhere = [f"127.0.0.1:{port}" for port in free_ports(2)]
    done = subprocess.run([str(BIN / "llmsuite-gateway"), "--listen", "127.0.0.1:0", "--tokenizer", nowhere[0],
                           "--inference", nowhere[1], "--startup-timeout", "1", "--log-format", "text"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no model became servable within --startup-timeout 1s" in done.stderr

    waiting = gateway(*nowhere, wait=False)  # no --startup-timeout: it would wait for ever
    with processes(waiting):
        assert check(waiting.address) == NOT_SERVING
        assert waiting.terminate() == 0  # a stop request ends the wait at once
