"""The inference service's Embed RPC on a real server: vectors and usage, model kinds in
ModelInfo, wrong-kind refusals both ways, bad input, the tokenizer pairing check, and the
`--pooling` flag of the real command."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from support import ServerThread, ServiceProcess

from llmsuite.builder.encoder import build_encoder
from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import InferenceApp
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-encoder")
    build_encoder(out)
    return out


@pytest.fixture(scope="module")
def stub(encoder_dir: Path, tiny_model_dir: Path):
    settings = EngineSettings(device="cpu", intra_op_threads=1)
    with ServerThread(InferenceApp({"enc": encoder_dir, "tiny": tiny_model_dir}, settings)) as srv, \
            srv.channel() as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def embed(*inputs: list[int], model: str = "enc", **fields: object) -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, inputs=[common_pb2.TokenIds(token_ids=i) for i in inputs], **fields)


def refusal(stub: inference_pb2_grpc.InferenceServiceStub, request: pb.EmbedRequest) -> tuple[grpc.StatusCode, dict]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(request)
    return caught.value.code(), error_details(caught.value)


def test_embed_returns_one_unit_vector_per_input_and_usage(stub) -> None:
    answer = stub.Embed(embed([1, 40, 41], [1, 42], request_id="emb-1"))
    assert answer.request_id == "emb-1"
    assert [len(e.values) for e in answer.embeddings] == [64, 64]
    for e in answer.embeddings:
        assert abs(np.linalg.norm(np.array(e.values)) - 1.0) < 1e-5
    assert answer.usage.prompt_tokens == 5
    short = stub.Embed(embed([1, 40, 41], dimensions=8))
    assert len(short.embeddings[0].values) == 8
    assert abs(np.linalg.norm(np.array(short.embeddings[0].values)) - 1.0) < 1e-5


def test_model_info_tells_generation_from_embedding(stub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert models["enc"].kind == common_pb2.MODEL_KIND_EMBEDDING
    assert models["enc"].embedding_dimensions == 64
    assert (models["enc"].pooling.mode, models["enc"].pooling.normalize) == ("mean", True)
    assert models["tiny"].kind == common_pb2.MODEL_KIND_GENERATION and models["tiny"].embedding_dimensions == 0


def test_wrong_model_kinds_are_invalid_argument_both_ways(stub) -> None:
    code, details = refusal(stub, embed([1, 2], model="tiny"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details["reason"] == "WRONG_MODEL_KIND"
    start = pb.GenerateRequest(start=pb.GenerateStart(model="enc", prompt_token_ids=[1, 2],
                                                      sampling=common_pb2.SamplingParams(max_new_tokens=2)))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(iter([start])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)["reason"] == "WRONG_MODEL_KIND"


@pytest.mark.parametrize(("request_", "field", "reason"), [
    (embed(), "inputs", "EMPTY_INPUT"),
    (embed([1], []), "inputs[1].token_ids", "EMPTY_INPUT"),
    (embed([1] * 600), "inputs[0].token_ids", "INPUT_TOO_LONG"),
    (embed([1], dimensions=65), "dimensions", "DIMENSIONS_OUT_OF_RANGE"),
    (embed([1], model=""), "model", "MISSING_FIELD"),
])
def test_bad_input_names_the_field(stub, request_: pb.EmbedRequest, field: str, reason: str) -> None:
    code, details = refusal(stub, request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details["reason"] == reason and field in [f for f, _ in details["field_violations"]]
    assert stub.Embed(embed([1] * 600, truncate=True)).usage.prompt_tokens == 512


def test_ids_from_another_tokenizer_are_refused(stub) -> None:
    code, details = refusal(stub, embed([1, 2], expected_tokenizer_hash="sha256:" + "0" * 64))
    assert code == grpc.StatusCode.UNAVAILABLE and details["reason"] == "TOKENIZER_MISMATCH"
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="enc")).info
    assert stub.Embed(embed([1, 2], expected_tokenizer_hash=info.tokenizer_content_hash)).embeddings


def test_the_pooling_flag_of_the_command(encoder_dir: Path) -> None:
    with ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--device", "cpu",
                         "--model", f"enc={encoder_dir}", "--pooling", "enc=cls:no-normalize"]) as proc, \
            grpc.insecure_channel(proc.address) as channel:
        info = inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(model="enc")).info
    assert (info.pooling.mode, info.pooling.normalize) == ("cls", False)
