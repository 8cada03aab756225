"""Every layout served by the real processes: tokenizer, inference and gateway on loopback.

One cluster serves the builder's tiny preset as the Optimum layout, the fused GenAI layout
(`--layout gqa`) and its int4 build, a transformers.js-style `onnx/model_q4.onnx` named by
file, and (where ../shared/genai-exports exists) onnxruntime-genai's own builder outputs.
The gateway serving a model at all proves the tokenizer service found the same tokenizer
files the inference service hashed for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from layout_support import SHARED_GENAI_EXPORTS, reference_greedy, transformers_js_repository
from support import ServiceProcess, processes, watch_health

from llmsuite.builder.variants import build_variant
from llmsuite.client.cli import main as cli_main
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cluster-layouts")
    paths = {"optimum": root / "optimum", "gqa": root / "gqa", "gqa-int4": root / "gqa-int4"}
    build_variant(paths["optimum"])
    build_variant(paths["gqa"], layout="gqa")
    build_variant(paths["gqa-int4"], layout="gqa", precision="int4")
    build_variant(root / "optimum-int4", precision="int4")
    repo = transformers_js_repository(paths["optimum"], root / "optimum-int4" / "model.onnx", root / "repo")
    paths["q4"] = repo / "onnx" / "model_q4.onnx"
    if SHARED_GENAI_EXPORTS.is_dir():
        paths["genai"] = SHARED_GENAI_EXPORTS / "llama-fp32"
        paths["genai-int4"] = SHARED_GENAI_EXPORTS / "llama-int4"
    return paths


@pytest.fixture(scope="module")
def cluster(model_paths: dict[str, Path]) -> Iterator[dict[str, ServiceProcess]]:
    models = [arg for name, path in model_paths.items() for arg in ("--model", f"{name}={path}")]
    tokenizer = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", *models])
    inference = ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", *models, "--device", "cpu",
                                "--intra-op-threads", "1", "--max-running", "16"])
    with processes(tokenizer, inference):
        gateway = ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tokenizer.address,
                                  "--inference", inference.address])
        with processes(gateway):
            for name in model_paths:
                watch_health(gateway.address, health_pb2.HealthCheckResponse.SERVING, f"model:{name}", timeout=120)
            yield {"tokenizer": tokenizer, "inference": inference, "gateway": gateway}


@pytest.fixture(scope="module")
def inference(cluster: dict[str, ServiceProcess]) -> Iterator[Any]:
    with grpc.insecure_channel(cluster["inference"].address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def generate_ids(stub: Any, model: str, prompt: list[int], max_new_tokens: int, cancel_after: int | None = None
                 ) -> list[int]:
    """One request on the inference service's Generate stream; leaves it after `cancel_after` tokens."""
    sampling = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    call = stub.Generate(iter([inference_pb2.GenerateRequest(
        start=inference_pb2.GenerateStart(model=model, prompt_token_ids=prompt, sampling=sampling))]))
    tokens: list[int] = []
    for response in call:
        if response.WhichOneof("kind") == "tokens":
            tokens.extend(response.tokens.token_ids)
            if cancel_after is not None and len(tokens) >= cancel_after:
                call.cancel()
                break
        elif response.WhichOneof("kind") == "final":
            assert response.final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    return tokens


def test_each_model_reports_its_layout(cluster: dict[str, ServiceProcess], inference: Any,
                                       model_paths: dict[str, Path]) -> None:
    with grpc.insecure_channel(cluster["gateway"].address) as channel:
        listed = gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(gateway_pb2.ListModelsRequest()).models
    summaries = {m.name: (m.layout, m.precision, m.quantization.split(",")[0]) for m in listed}
    expected = {"optimum": ("optimum", "fp32", "none"), "gqa": ("onnxruntime-genai", "fp32", "none"),
                "gqa-int4": ("onnxruntime-genai", "int4", "MatMulNBits int4"),
                "q4": ("optimum", "int4", "MatMulNBits int4"),
                "genai": ("onnxruntime-genai", "fp32", "none"),
                "genai-int4": ("onnxruntime-genai", "int4", "MatMulNBits int4")}
    assert summaries == {name: expected[name] for name in model_paths}
    info = inference.GetModelInfo(inference_pb2.GetModelInfoRequest(model="gqa")).info
    assert (info.attention, info.uses_position_ids, info.context_length) == ("GroupQueryAttention", False, 512)
    assert inference.GetModelInfo(inference_pb2.GetModelInfoRequest(model="optimum")).info.attention == "unfused"
    with grpc.insecure_channel(cluster["tokenizer"].address) as channel:
        hashes = {t.name: t.content_hash for t in tokenizer_pb2_grpc.TokenizerServiceStub(channel).ListModels(
            tokenizer_pb2.ListModelsRequest()).models}
    assert hashes["q4"] == hashes["optimum"] == info.tokenizer_content_hash


def test_slots_reach_gateway_callers_and_the_cli(cluster: dict[str, ServiceProcess], inference: Any,
                                                model_paths: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    infos = {name: inference.GetModelInfo(inference_pb2.GetModelInfoRequest(model=name)).info for name in model_paths}
    slots = {name: (info.kv_cache_slots, info.kv_cache_slot_tokens) for name, info in infos.items()}
    # --max-running 16 slots of the builder's 512-token context; the Optimum layout has none.
    assert (slots["gqa"], slots["gqa-int4"], slots["optimum"], slots["q4"]) == ((16, 512), (16, 512), (0, 0), (0, 0))
    with grpc.insecure_channel(cluster["gateway"].address) as channel:
        listed = gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(gateway_pb2.ListModelsRequest()).models
    assert {m.name: (m.kv_cache_slots, m.kv_cache_slot_tokens) for m in listed} == slots

    monkeypatch.delenv("LLMSUITE_API_KEY", raising=False)
    assert cli_main(["--address", cluster["gateway"].address, "models"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    column = header.split().index("SLOTS")
    shown = {row.split()[0]: row.split()[column] for row in rows}
    assert (shown["gqa"], shown["gqa-int4"], shown["optimum"], shown["q4"]) == ("16x512", "16x512", "-", "-")


def test_fused_layout_gives_the_optimum_tokens_alone_and_batched_over_grpc(inference: Any) -> None:
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 1024, size=2 + (i * 7) % 29)] for i in range(16)]
    budgets = [4 + (i * 5) % 13 for i in range(16)]
    cancel = {3: 2, 11: 3}
    alone = [generate_ids(inference, "optimum", p, n) for p, n in zip(prompts, budgets, strict=True)]
    assert [generate_ids(inference, "gqa", p, n) for p, n in zip(prompts, budgets, strict=True)] == alone
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(lambda i: generate_ids(inference, "gqa", prompts[i], budgets[i], cancel.get(i)),
                                range(16)))
    for i, (got, expected) in enumerate(zip(batched, alone, strict=True)):
        assert got == (expected[: len(got)] if i in cancel else expected), f"request {i}"


@pytest.mark.parametrize("model", ["gqa-int4", "q4"])
def test_int4_through_the_gateway_equals_a_plain_onnxruntime_loop(cluster: dict[str, ServiceProcess],
                                                                   model_paths: dict[str, Path], model: str) -> None:
    prompt = "Once upon a time, a server loaded a quantized model"
    sampling = common_pb2.SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    with grpc.insecure_channel(cluster["gateway"].address) as gch, \
            grpc.insecure_channel(cluster["tokenizer"].address) as tch:
        reply = gateway_pb2_grpc.GatewayServiceStub(gch).Generate(gateway_pb2.GenerateRequest(
            model=model, prompt=prompt, sampling=sampling, return_token_ids=True))
        ids = list(tokenizer_pb2_grpc.TokenizerServiceStub(tch).Encode(
            tokenizer_pb2.EncodeRequest(model=model, texts=[prompt])).encodings[0].token_ids)
    model_file = model_paths[model] if model_paths[model].is_file() else model_paths[model] / "model.onnx"
    assert list(reply.token_ids) == reference_greedy(model_file, ids, 16)


def test_genai_builder_exports_through_the_cluster(cluster: dict[str, ServiceProcess], inference: Any) -> None:
    if not SHARED_GENAI_EXPORTS.is_dir():
        pytest.skip(f"{SHARED_GENAI_EXPORTS} is absent: onnxruntime-genai's builder outputs ship only beside the "
                    "team's checkout")
    cases = json.loads((SHARED_GENAI_EXPORTS / "llama-fp32" / "reference.json").read_text())["cases"]
    with ThreadPoolExecutor(len(cases)) as pool:
        fp32 = list(pool.map(lambda c: generate_ids(inference, "genai", c["prompt_ids"], 24), cases))
        int4 = list(pool.map(lambda c: generate_ids(inference, "genai-int4", c["prompt_ids"], 24), cases))
    assert fp32 == [c["greedy_ids"] for c in cases]
    int4_file = SHARED_GENAI_EXPORTS / "llama-int4" / "model.onnx"
    assert int4 == [reference_greedy(int4_file, c["prompt_ids"], 24) for c in cases]
    # Text in, through the tokenizer service serving the GenAI folder unchanged.
    sampling = common_pb2.SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    text_cases = [c for c in cases if c["kind"] == "text" and c["add_special_tokens"]]
    with grpc.insecure_channel(cluster["gateway"].address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for case in text_cases:
            reply = stub.Generate(gateway_pb2.GenerateRequest(model="genai", prompt=case["prompt"], sampling=sampling,
                                                              return_token_ids=True))
            assert list(reply.token_ids) == case["greedy_ids"], case["name"]
    assert text_cases
