"""Faults in a real `llmsuite-inference` process, watched by real gRPC clients.

The model is the builder's tiny model with three real faults grafted onto its graph, each set
off by one token id in the forward's input: NaN logits at that position, an ONNX Runtime
kernel error (a Gather out of bounds), and an ONNX Runtime allocation failure (a buffer of
256 TiB). Requests streaming beside them must get exactly the tokens they get alone, and the
process must stay SERVING. A decoder broken for good (the test-only
`--test-only-break-on-token-id`) must turn health NOT_SERVING and make the process exit 70.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_scrape import metrics_port, scrape
from onnx import TensorProto, helper, numpy_helper
from support import ServiceProcess

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc

NAN_ID, KERNEL_ERROR_ID, ALLOCATION_FAILURE_ID, BREAK_ID = 900, 901, 902, 903
POISONS = {NAN_ID, KERNEL_ERROR_ID, ALLOCATION_FAILURE_ID, BREAK_ID}
EXIT_CANNOT_SERVE = 70
GREEDY = dict(temperature=0.0, ignore_eos=True)
WATCHERS = [([1, 40, 41, 42, 43], dict(GREEDY, max_new_tokens=120)),
            ([7, 8, 9], dict(temperature=0.9, top_p=0.9, seed=11, ignore_eos=True, max_new_tokens=120))]
# Watchers that run long: their first 480 tokens (seeded, so the same in any batch) hold no
# poison id. WATCHERS' greedy one samples KERNEL_ERROR_ID as its 226th token: where the failing
# request arrived that late (a busy machine), its batch rightly ended with MODEL_ERROR first.
LONG_WATCHERS = [([1, 50, 51, 52, 53], GREEDY), WATCHERS[1]]


def graft_faults(model_file: Path) -> None:
    """Adds to the logits a term that is 0 for every ordinary input and, per token id in
    input_ids: NaN at that position (NAN_ID), a Gather out of its table's bounds
    (KERNEL_ERROR_ID), a 2^46-float ConstantOfShape (ALLOCATION_FAILURE_ID)."""
    model = onnx.load(str(model_file))
    graph = model.graph
    next(node for node in graph.node if node.output[0] == "logits").output[0] = "clean_logits"
    for name, value in {
        "fault/nan_id": np.array(NAN_ID, np.int64), "fault/kernel_id": np.array(KERNEL_ERROR_ID, np.int64),
        "fault/alloc_id": np.array(ALLOCATION_FAILURE_ID, np.int64), "fault/nan": np.array(np.nan, np.float32),
        "fault/zero": np.array(0.0, np.float32), "fault/table": np.array([0.0], np.float32),
        "fault/out_of_bounds": np.array(1000, np.int64), "fault/huge": np.array([2**46], np.int64),
        "fault/one": np.array([1], np.int64), "fault/last_axis": np.array([-1], np.int64),
    }.items():
        graph.initializer.append(numpy_helper.from_array(value, name))
    node = helper.make_node
    graph.node.extend([
        node("Equal", ["input_ids", "fault/nan_id"], ["fault/is_nan"]),
        node("Where", ["fault/is_nan", "fault/nan", "fault/zero"], ["fault/nan_term"]),
        node("Equal", ["input_ids", "fault/kernel_id"], ["fault/is_kernel"]),
        node("Cast", ["fault/is_kernel"], ["fault/kernel_flag"], to=TensorProto.INT64),
        node("Mul", ["fault/kernel_flag", "fault/out_of_bounds"], ["fault/kernel_index"]),
        node("Gather", ["fault/table", "fault/kernel_index"], ["fault/kernel_term"], axis=0),
        node("Equal", ["input_ids", "fault/alloc_id"], ["fault/is_alloc"]),
        node("Cast", ["fault/is_alloc"], ["fault/alloc_flag"], to=TensorProto.INT64),
        node("ReduceMax", ["fault/alloc_flag"], ["fault/alloc_any"], keepdims=0),
        node("Mul", ["fault/alloc_any", "fault/huge"], ["fault/alloc_size"]),
        node("Add", ["fault/alloc_size", "fault/one"], ["fault/alloc_shape"]),
        node("ConstantOfShape", ["fault/alloc_shape"], ["fault/alloc_block"],
             value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        node("ReduceSum", ["fault/alloc_block"], ["fault/alloc_term"], keepdims=0),
        node("Add", ["fault/nan_term", "fault/kernel_term"], ["fault/term_2"]),
        node("Add", ["fault/term_2", "fault/alloc_term"], ["fault/term"]),
        node("Unsqueeze", ["fault/term", "fault/last_axis"], ["fault/term_per_token"]),
        node("Add", ["clean_logits", "fault/term_per_token"], ["logits"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(model_file))


@pytest.fixture(scope="module")
def faulty_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faulty") / "tiny"
    shutil.copytree(tiny_model_dir, out)
    graft_faults(out / "model.onnx")
    return out


def inference(model_dir: Path, *extra: str) -> ServiceProcess:
    return ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}",
                           "--device", "cpu", "--intra-op-threads", "1", "--max-running", "8", *extra])


@pytest.fixture(scope="module")
def server(faulty_model_dir: Path) -> Iterator[ServiceProcess]:
    with inference(faulty_model_dir, "--metrics-listen", "127.0.0.1:0") as proc:
        yield proc


def generate(stub: inference_pb2_grpc.InferenceServiceStub, prompt: list[int], sampling: dict[str, Any],
             first_token: threading.Event | None = None) -> tuple[list[int], grpc.RpcError | None]:
    """A whole Generate stream: (token ids, None) or (the ids before it failed, the error)."""
    request = pb.GenerateRequest(start=pb.GenerateStart(
        model="tiny", prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(**sampling)))
    tokens: list[int] = []
    try:
        for response in stub.Generate(iter([request]), timeout=120):
            tokens.extend(response.tokens.token_ids)
            if first_token is not None and tokens:
                first_token.set()
    except grpc.RpcError as exc:
        return tokens, exc
    finally:
        if first_token is not None:
            first_token.set()  # never leave the test waiting on a stream that ended
    return tokens, None


def reason_of(error: grpc.RpcError | None) -> tuple[Any, str | None]:
    assert error is not None, "the request was expected to fail"
    return error.code(), error_details(error).get("reason")


class Watchers:
    """Streams running in threads; started() returns once each has received a token."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub,
                 watchers: list[tuple[list[int], dict[str, Any]]] = WATCHERS, **changes: Any) -> None:
        self._stub = stub
        self._pool = ThreadPoolExecutor(len(watchers))
        self._firsts = [threading.Event() for _ in watchers]
        self._futures = [self._pool.submit(generate, stub, prompt, {**sampling, **changes}, first)
                         for (prompt, sampling), first in zip(watchers, self._firsts, strict=True)]

    def started(self) -> None:
        for first in self._firsts:
            assert first.wait(120), "a watcher never received a token"

    def results(self) -> list[tuple[list[int], grpc.RpcError | None]]:
        try:
            return [future.result(timeout=180) for future in self._futures]
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def statuses_until_not_serving(watch: Any) -> list[int]:
    """What a health Watch reported, up to NOT_SERVING or the stream's end (the server going away)."""
    seen: list[int] = []
    try:
        for response in watch:
            seen.append(response.status)
            if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    except grpc.RpcError:
        pass
    return seen


def test_faults_in_one_request_leave_the_requests_beside_it_untouched(server: ServiceProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        alone = [generate(stub, prompt, sampling) for prompt, sampling in WATCHERS]
        companion = ([2, 3, 4, 5], dict(GREEDY, max_new_tokens=6))
        companion_alone = generate(stub, *companion)
        for tokens, error in [*alone, companion_alone]:
            assert error is None and not POISONS & set(tokens), "the fixture needs outputs free of fault ids"

        watchers = Watchers(stub)
        watchers.started()
        with ThreadPoolExecutor(2) as pool:  # NaN in one row of a prefill the companion may share
            nan_request = pool.submit(generate, stub, [5, 6, NAN_ID], dict(GREEDY, max_new_tokens=4))
            companion_now = pool.submit(generate, stub, *companion)
            nan_tokens, nan_error = nan_request.result(timeout=120)
            assert companion_now.result(timeout=120) == companion_alone
        assert nan_tokens == []
        assert reason_of(nan_error) == (grpc.StatusCode.INTERNAL, "NUMERIC_ERROR")
        assert "NaN" in (nan_error.details() or "")

        kernel_tokens, kernel_error = generate(stub, [5, KERNEL_ERROR_ID, 6], dict(GREEDY, max_new_tokens=4))
        assert kernel_tokens == [] and reason_of(kernel_error) == (grpc.StatusCode.INTERNAL, "MODEL_ERROR")
        assert "Gather" not in (kernel_error.details() or ""), "internals stay in the server's log"

        alloc_tokens, alloc_error = generate(stub, [5, ALLOCATION_FAILURE_ID], dict(GREEDY, max_new_tokens=4))
        assert alloc_tokens == []
        assert reason_of(alloc_error) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY")
        assert error_details(alloc_error)["retry_after_s"] > 0

        assert watchers.results() == alone
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "model:tiny"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stats = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info.stats
        assert stats.running == 0
    failed = scrape(metrics_port(server))
    for reason in ("NUMERIC_ERROR", "MODEL_ERROR", "OUT_OF_MEMORY"):
        assert failed.get("llmsuite_inference_requests_failed_total", model="tiny", reason=reason) == 1
    assert server.alive()


def test_a_model_that_cannot_run_fails_every_request_turns_not_serving_and_exits(faulty_model_dir: Path) -> None:
    with inference(faulty_model_dir, "--test-only-break-on-token-id", str(BREAK_ID), "--max-step-failures", "2",
                   "--drain-delay", "0") as proc, grpc.insecure_channel(proc.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="model:tiny"), timeout=120)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING
        # Far more tokens than the few steps the failing request takes to arrive (context 512).
        watchers = Watchers(stub, LONG_WATCHERS, max_new_tokens=480)
        watchers.started()

        tokens, error = generate(stub, [5, 6, BREAK_ID], dict(GREEDY, max_new_tokens=4))
        assert tokens == [] and reason_of(error) == (grpc.StatusCode.UNAVAILABLE, "ENGINE_FAILED")
        assert error_details(error)["retry_after_s"] > 0
        for watched, watcher_error in watchers.results():
            assert not POISONS & set(watched), f"a watcher fed a poison id of its own: {watched}"
            assert reason_of(watcher_error) == (grpc.StatusCode.UNAVAILABLE, "ENGINE_FAILED"), watched
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses_until_not_serving(health)

        assert proc.proc is not None
        assert proc.proc.wait(timeout=120) == EXIT_CANNOT_SERVE
    checks = re.findall(r"check forward \d+ of \d+ failed", proc.log())
    assert len(checks) <= 2, f"one line per check, never a retry loop: {checks}"
