"""Embeddings through the real processes: tokenizer, inference and an API-keyed gateway,
with `llmsuite-openai` in front.

Vectors through the cluster equal an in-process reference (the same ONNX file run by
onnxruntime on the texts tokenized by `tokenizers`, pooled in numpy) to cosine > 0.99999,
alone and batched with concurrent requests of other lengths, for the builder's encoder
(mean pooling) and, where ../shared exists, the real Optimum export (CLS pooling). Bad
input gets a clear status naming the field; the SDK, the CLI, the official `openai` client
and LangChain's `OpenAIEmbeddings` all work against it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from support import BIN, SHARED_EXPORTS, ServiceProcess, free_ports, processes, wait_http_ready
from tokenizers import Tokenizer

from llmsuite.builder.encoder import build_encoder
from llmsuite.client import AsyncLlmsuiteClient, InvalidRequest, LlmsuiteClient, RateLimited
from llmsuite.client.errors import error_details
from llmsuite.cluster import wait_serving
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc

KEY = "embed-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
BERT = SHARED_EXPORTS / "bert-encoder"
TEXTS = ["hello", "The quick brown fox jumps over the lazy dog.", "naïve café 東京 — déjà vu?",
         "def add(a, b):\n    return a + b", "a much longer input that goes on " * 8, "x y"]
COSINE = 0.99999


def gateway(tok: ServiceProcess, inf: ServiceProcess, *extra: str) -> ServiceProcess:
    return ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tok.address,
                           "--inference", inf.address, *extra], env={"LLMSUITE_API_KEYS": KEY})


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    encoder = tmp_path_factory.mktemp("tiny-embed")
    build_encoder(encoder)
    found = {"tiny": tiny_model_dir, "tiny-embed": encoder}
    if BERT.is_dir():
        found["bert"] = BERT
    return found


@pytest.fixture(scope="module")
def cluster(models: dict[str, Path]) -> Iterator[dict[str, ServiceProcess | str]]:
    specs = [arg for name, path in models.items() for arg in ("--model", f"{name}={path}")]
    tok = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", *specs])
    inf = ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--device", "cpu", "--intra-op-threads",
                          "1", "--embed-batch-tokens", "128", *specs])
    with processes(tok, inf):
        with processes(gateway(tok, inf)) as (gw,):
            http = ServiceProcess(["llmsuite-openai", "--listen", "127.0.0.1:0", "--gateway", gw.address],
                                  wait=False)
            with processes(http):
                base = wait_http_ready(http, ready=(200,))
                yield {"tokenizer": tok, "inference": inf, "gateway": gw, "base_url": f"{base}/v1"}


@pytest.fixture(scope="module")
def stub(cluster: dict) -> Iterator[gateway_pb2_grpc.GatewayServiceStub]:
    with grpc.insecure_channel(cluster["gateway"].address) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def reference(directory: Path, text: str, mode: str) -> np.ndarray:
    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    row = np.array([ids], dtype=np.int64)
    (states,) = session.run(["last_hidden_state"], {"input_ids": row, "attention_mask": np.ones_like(row),
                                                    "token_type_ids": np.zeros_like(row)})
    vector = states[0, 0] if mode == "cls" else states[0].mean(axis=0)
    return vector / np.linalg.norm(vector)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def vectors(answer: pb.EmbedResponse) -> list[np.ndarray]:
    return [np.array(e.values) for e in answer.embeddings]


def test_models_say_what_they_are_for(stub) -> None:
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), metadata=AUTH).models}
    assert listed["tiny-embed"].kind == common_pb2.MODEL_KIND_EMBEDDING
    assert listed["tiny-embed"].embedding_dimensions == 64 and not listed["tiny-embed"].has_chat_template
    assert listed["tiny"].kind == common_pb2.MODEL_KIND_GENERATION


@pytest.mark.parametrize(("model", "mode"), [("tiny-embed", "mean"), ("bert", "cls")])
def test_vectors_equal_the_in_process_reference_alone_and_batched(stub, models, model: str, mode: str) -> None:
    if model not in models:
        pytest.skip(f"{BERT} is absent: the real Optimum exports ship only beside the team's checkout")
    expected = [reference(models[model], text, mode) for text in TEXTS]
    alone = [vectors(stub.Embed(pb.EmbedRequest(model=model, texts=[t]), metadata=AUTH))[0] for t in TEXTS]

    def mixed(i: int) -> list[np.ndarray]:  # each request: one text first, then the others (other lengths)
        others = TEXTS[i + 1:] + TEXTS[:i]
        return vectors(stub.Embed(pb.EmbedRequest(model=model, texts=[TEXTS[i], *others]), metadata=AUTH))

    with ThreadPoolExecutor(len(TEXTS)) as pool:
        batched = list(pool.map(mixed, range(len(TEXTS))))
    for i, want in enumerate(expected):
        assert cosine(want, alone[i]) > COSINE
        assert cosine(want, batched[i][0]) > COSINE


def test_token_ids_truncation_and_usage(stub, models) -> None:
    ids = Tokenizer.from_file(str(models["tiny-embed"] / "tokenizer.json")).encode(TEXTS[1]).ids
    by_text = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=[TEXTS[1]]), metadata=AUTH)
    by_ids = stub.Embed(pb.EmbedRequest(model="tiny-embed", token_ids=[common_pb2.TokenIds(token_ids=ids)]),
                        metadata=AUTH)
    assert cosine(vectors(by_text)[0], vectors(by_ids)[0]) > COSINE
    assert by_text.usage.prompt_tokens == len(ids) and by_text.model == "tiny-embed" and by_text.request_id
    long = "word " * 700
    cut = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=[long], truncate=True), metadata=AUTH)
    assert cut.usage.prompt_tokens == 512
    short = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=[TEXTS[0]], dimensions=8), metadata=AUTH)
    assert len(short.embeddings[0].values) == 8
    # More texts than one Encode call carries (the tokenizer's --max-batch-size, 256): encoded in chunks.
    many = [f"text number {i}" for i in range(600)]
    answer = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=many), metadata=AUTH)
    assert len(answer.embeddings) == 600
    assert cosine(vectors(answer)[599], vectors(stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=many[599:]),
                                                          metadata=AUTH))[0]) > COSINE
    with pytest.raises(grpc.RpcError) as caught:  # a tokenizer refusal in the third chunk names the caller's index
        stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=[*many[:520], "x" * 1_000_001]), metadata=AUTH)
    assert [f for f, _ in error_details(caught.value)["field_violations"]] == ["texts[520]"]


@pytest.mark.parametrize(("request_", "code", "field", "reason"), [
    (pb.EmbedRequest(model="tiny-embed"), "INVALID_ARGUMENT", "texts", "EMPTY_INPUT"),
    (pb.EmbedRequest(model="tiny-embed", texts=["a", ""]), "INVALID_ARGUMENT", "texts[1]", "EMPTY_INPUT"),
    (pb.EmbedRequest(model="tiny-embed", texts=["ok", "word " * 700]), "INVALID_ARGUMENT", "texts[1]",
     "INPUT_TOO_LONG"),
    (pb.EmbedRequest(model="tiny-embed", token_ids=[common_pb2.TokenIds(token_ids=[1, 99999])]),
     "INVALID_ARGUMENT", "token_ids[0]", "TOKEN_ID_OUT_OF_RANGE"),
    (pb.EmbedRequest(model="tiny-embed", texts=["a"], dimensions=65), "INVALID_ARGUMENT", "dimensions",
     "DIMENSIONS_OUT_OF_RANGE"),
    (pb.EmbedRequest(model="tiny", texts=["a"]), "INVALID_ARGUMENT", "model", "WRONG_MODEL_KIND"),
    (pb.EmbedRequest(model="nope", texts=["a"]), "NOT_FOUND", None, "MODEL_NOT_FOUND"),
])
def test_bad_input_gets_a_clear_status(stub, request_: pb.EmbedRequest, code: str, field: str | None,
                                       reason: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(request_, metadata=AUTH)
    details = error_details(caught.value)
    assert caught.value.code().name == code and details["reason"] == reason
    if field is not None:
        assert [f for f, _ in details["field_violations"]] == [field]
    if reason == "INPUT_TOO_LONG":
        assert details["metadata"]["limit"] == "512"


def test_generate_on_an_embedding_model_and_a_missing_key_are_refused(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(pb.GenerateRequest(model="tiny-embed", prompt="hello"), metadata=AUTH)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value)["reason"] == "WRONG_MODEL_KIND"
    chat = pb.ChatRequest(start=pb.ChatStart(model="tiny-embed", messages=[common_pb2.ChatMessage(
        role="user", content="hello")]))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Chat(iter([chat]), metadata=AUTH))
    assert error_details(caught.value)["reason"] == "WRONG_MODEL_KIND"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=["a"]))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_embedded_tokens_count_against_the_token_rate_limit(cluster) -> None:
    limited = gateway(cluster["tokenizer"], cluster["inference"], "--token-rate-limit", "1", "--token-burst", "1000")
    with processes(limited), LlmsuiteClient(limited.address, api_key=KEY) as client:
        used = client.embed(["word " * 300], model="tiny-embed").usage.prompt_tokens
        assert 300 < used < 350
        with pytest.raises(RateLimited) as caught:  # three times as many tokens; about 700 left in the bucket
            client.embed(["word " * 300] * 3, model="tiny-embed")
    assert caught.value.reason == "RATE_LIMITED"


def test_sdk_sync_and_async_and_cli(cluster) -> None:
    address = cluster["gateway"].address
    with LlmsuiteClient(address, api_key=KEY) as client:
        result = client.embed(TEXTS[:2], model="tiny-embed", dimensions=16)
        with pytest.raises(InvalidRequest) as caught:
            client.embed("", model="tiny-embed")
    assert caught.value.reason == "EMPTY_INPUT"
    assert len(result.vectors) == 2 and len(result.vectors[0]) == 16 and result.usage.prompt_tokens > 2

    async def async_embed() -> tuple[tuple[float, ...], ...]:
        async with AsyncLlmsuiteClient(address, api_key=KEY) as client:
            return (await client.embed(TEXTS[:2], model="tiny-embed", dimensions=16)).vectors

    assert np.allclose(asyncio.run(async_embed()), result.vectors, atol=1e-6)
    done = subprocess.run([str(BIN / "llmsuite"), "--address", address, "--api-key", KEY, "embed", "--model",
                           "tiny-embed", "--dimensions", "16", *TEXTS[:2]], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    printed = [[float(x) for x in line.split()] for line in done.stdout.splitlines()]
    assert np.allclose(printed, result.vectors, atol=1e-5)
    assert "prompt_tokens" in done.stderr


def test_openai_client_float_base64_token_ids_and_dimensions(cluster) -> None:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=cluster["base_url"], api_key=KEY)
    floats = client.embeddings.create(model="tiny-embed", input=TEXTS[:3], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and len(floats.data[0].embedding) == 64
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 3
    default = client.embeddings.create(model="tiny-embed", input=TEXTS[:3])  # the client asks for base64
    assert np.allclose([d.embedding for d in default.data], [d.embedding for d in floats.data], atol=1e-6)
    raw = httpx.post(f"{cluster['base_url']}/embeddings", headers={"authorization": f"Bearer {KEY}"},
                     json={"model": "tiny-embed", "input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    one = client.embeddings.create(model="tiny-embed", input="hello")
    by_ids = client.embeddings.create(model="tiny-embed", input=[[1, 50, 60], [1, 70]])
    single_ids = client.embeddings.create(model="tiny-embed", input=[1, 50, 60])
    assert len(one.data) == 1 and len(by_ids.data) == 2
    assert np.allclose(single_ids.data[0].embedding, by_ids.data[0].embedding, atol=1e-6)
    short = client.embeddings.create(model="tiny-embed", input="hello", dimensions=8)
    assert len(short.data[0].embedding) == 8
    with pytest.raises(BadRequestError) as caught:
        client.embeddings.create(model="tiny-embed", input=["ok", "word " * 700])
    assert caught.value.body["param"] == "input[1]" and "512" in caught.value.body["message"]
    assert caught.value.body["code"] == "input_too_long"
    with pytest.raises(BadRequestError) as caught:
        client.embeddings.create(model="tiny", input="hello")
    assert caught.value.body["param"] == "model"


def test_langchain_openai_embeddings(cluster) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="tiny-embed", base_url=cluster["base_url"], api_key=KEY,
        # LangChain would tokenize with tiktoken (OpenAI's vocabulary) and send those ids: send text.
        check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(TEXTS[:3])
    query = embeddings.embed_query(TEXTS[0])
    assert len(documents) == 3 and len(query) == 64
    assert cosine(np.array(documents[0]), np.array(query)) > COSINE


def test_the_make_run_launcher_serves_the_embedding_model_beside_tiny(models, tmp_path: Path) -> None:
    ports = free_ports(4)
    log = tmp_path / "cluster.log"
    argv = [sys.executable, "-m", "llmsuite.cluster", "--model", f"tiny={models['tiny']}", "--embedding-model",
            f"tiny-embed={models['tiny-embed']}", "--device", "cpu",
            *(f"--{name}-port={port}" for name, port in zip(("gateway", "tokenizer", "inference", "openai"), ports,
                                                           strict=True))]
    with log.open("wb") as out:  # a file, not a pipe: nothing to drain
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_serving("the cluster", f"127.0.0.1:{ports[0]}", proc, timeout_s=180)
        give_up = time.monotonic() + 180
        while "Ctrl-C stops them all" not in log.read_text():  # the banner follows the HTTP API's start
            assert proc.poll() is None and time.monotonic() < give_up, log.read_text()
            time.sleep(0.1)
        with LlmsuiteClient(f"127.0.0.1:{ports[0]}") as client:
            kinds = {m.name: m.kind for m in client.list_models()}
            assert kinds == {"tiny": "generation", "tiny-embed": "embedding"}
            assert len(client.embed("Hello", model="tiny-embed").vectors[0]) == 64
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text()
    assert "embedding model 'tiny-embed'" in text and " embed --model tiny-embed" in text, text


def test_llmsuite_bench_embed_workload(cluster, tmp_path: Path) -> None:
    saved = tmp_path / "texts.jsonl"
    done = subprocess.run([str(BIN / "llmsuite"), "--address", cluster["gateway"].address, "--api-key", KEY, "bench",
                           "--workload", "embed", "--model", "tiny-embed", "-c", "2", "-n", "3",
                           "--texts-per-request", "4", "--warmup", "1", "--save-texts", str(saved), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (level,) = json.loads(done.stdout)["levels"]
    assert (level["concurrency"], level["requests"], level["succeeded"], level["texts"]) == (2, 3, 3, 12)
    assert level["errors"] == {} and level["texts_per_s"] > 0 and level["tokens"] > 12
    batches = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(batches) == 3 and all(len(b) == 4 and all(b) for b in batches)
