"""Embedding models in the engine: vectors equal an in-process reference (the same ONNX
session, one input at a time, numpy pooling) alone and batched with other callers' inputs
of other lengths; Matryoshka dimensions; batching under the token budget; the bounded
queue; bad input; wrong model kinds; pooling settings from the model files and the flag.

The real Optimum export in ../shared/optimum-exports/bert-encoder (CLS pooling, torch
references) is used where it exists and skipped with a message where it does not.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from support import SHARED_EXPORTS
from tokenizers import Tokenizer

from llmsuite.builder.encoder import build_encoder
from llmsuite.inference.engine import EngineSettings, InferenceEngine, ModelLoadError
from llmsuite.inference.engine.embedding import EmbeddingQueue, plan_forwards
from llmsuite.inference.engine.encoder import OnnxEncoder, PoolingOverride, is_embedding_export, read_pooling
from llmsuite.runtime.errors import InvalidArgument, LlmsuiteError, ResourceExhausted

BERT = SHARED_EXPORTS / "bert-encoder"
TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café 東京 — déjà vu?",
    "def add(a, b):\n    return a + b",
    "a much longer input " * 12,
    "x",
]
COSINE = 0.99999


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-encoder")
    build_encoder(out)
    return out


@pytest.fixture(scope="module")
def bert_dir() -> Path:
    if not BERT.is_dir():
        pytest.skip(f"{BERT} is absent: the real Optimum exports ship only beside the team's checkout")
    return BERT


def reference_vector(directory: Path, ids: Sequence[int], mode: str, normalize: bool) -> np.ndarray:
    """What the model says for one input alone: the same ONNX file, no padding, numpy pooling."""
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    row = np.array([ids], dtype=np.int64)
    feeds = {"input_ids": row, "attention_mask": np.ones_like(row), "token_type_ids": np.zeros_like(row)}
    names = {i.name for i in session.get_inputs()}
    (states,) = session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})
    states = states[0]
    vector = {"cls": states[0], "mean": states.mean(axis=0), "last": states[-1]}[mode]
    return vector / np.linalg.norm(vector) if normalize else vector


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def encode(directory: Path, texts: Sequence[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


@pytest.fixture
def engine(load_engine: Callable[..., InferenceEngine], encoder_dir: Path) -> InferenceEngine:
    return load_engine({"enc": encoder_dir})


def test_export_kinds_are_told_apart(encoder_dir: Path, tiny_llama_dir: Path) -> None:
    assert is_embedding_export(encoder_dir)
    assert not is_embedding_export(tiny_llama_dir)


def test_model_info_says_embedding_with_the_files_pooling(engine: InferenceEngine) -> None:
    info = engine.model_info("enc")
    assert (info.kind, info.pooling, info.normalize, info.embedding_dimensions) == ("embedding", "mean", True, 64)
    assert info.context_length == 512 and info.vocab_size == 1024


@pytest.mark.parametrize("which", ["builder", "bert"])
def test_vectors_equal_the_reference_alone_and_batched_with_other_lengths(
        which: str, load_engine: Callable[..., InferenceEngine], request: pytest.FixtureRequest) -> None:
    directory: Path = request.getfixturevalue("encoder_dir" if which == "builder" else "bert_dir")
    engine = load_engine({"m": directory}, embed_batch_tokens=96)
    info = engine.model_info("m")
    ids = encode(directory, TEXTS)
    assert len({len(i) for i in ids}) > 3, "the inputs must differ in length for padding to matter"
    expected = [reference_vector(directory, i, info.pooling, info.normalize) for i in ids]

    async def scenario() -> tuple[list[np.ndarray], list[np.ndarray]]:
        alone = [(await engine.embed("m", [i])).vectors[0] for i in ids]
        # Concurrent callers: every input is padded and batched beside others of other lengths.
        together = await asyncio.gather(*(engine.embed("m", [i, *ids[::-1]]) for i in ids))
        return alone, [result.vectors[0] for result in together]

    alone, batched = asyncio.run(scenario())
    for want, one, shared in zip(expected, alone, batched, strict=True):
        assert cosine(want, one) > COSINE
        assert cosine(want, shared) > COSINE
    assert engine.stats("m").steps > len(ids), "the budget of 96 tokens splits the batched calls"


def test_bert_export_matches_torch_references(load_engine: Callable[..., InferenceEngine], bert_dir: Path) -> None:
    reference = json.loads((bert_dir / "reference.json").read_text())
    assert reference["pooling"] == "cls" and reference["normalize"]
    engine = load_engine({"bert": bert_dir})
    result = asyncio.run(engine.embed("bert", encode(bert_dir, reference["texts"])))
    for got, want in zip(result.vectors, reference["embeddings"], strict=True):
        assert cosine(got, np.array(want)) > COSINE


def test_dimensions_truncate_and_renormalise(engine: InferenceEngine, encoder_dir: Path) -> None:
    ids = encode(encoder_dir, TEXTS[:3])
    full = asyncio.run(engine.embed("enc", ids)).vectors
    short = asyncio.run(engine.embed("enc", ids, dimensions=16))
    assert short.vectors.shape == (3, 16)
    for f, s in zip(full, short.vectors, strict=True):
        np.testing.assert_allclose(s, f[:16] / np.linalg.norm(f[:16]), rtol=1e-5, atol=1e-6)
        assert abs(np.linalg.norm(s) - 1.0) < 1e-5
    assert short.prompt_tokens == sum(len(i) for i in ids)


def _refusal(engine: InferenceEngine, model: str, inputs: Any, **kwargs: Any) -> LlmsuiteError:
    with pytest.raises(LlmsuiteError) as caught:
        asyncio.run(engine.embed(model, inputs, **kwargs))
    return caught.value


def test_bad_input_gets_a_clear_error_naming_the_field_and_limit(engine: InferenceEngine) -> None:
    cases = [
        (dict(inputs=[]), "inputs", "EMPTY_INPUT"),
        (dict(inputs=[[1, 2], []]), "inputs[1].token_ids", "EMPTY_INPUT"),
        (dict(inputs=[[1] * 513]), "inputs[0].token_ids", "INPUT_TOO_LONG"),
        (dict(inputs=[[1, 5000]]), "inputs[0].token_ids", "TOKEN_ID_OUT_OF_RANGE"),
        (dict(inputs=[[1, 2]], dimensions=65), "dimensions", "DIMENSIONS_OUT_OF_RANGE"),
        (dict(inputs=[[1, 2]], dimensions=-1), "dimensions", "DIMENSIONS_OUT_OF_RANGE"),
        (dict(inputs=[[1]] * 2049), "inputs", "TOO_MANY_INPUTS"),
    ]
    for kwargs, field, reason in cases:
        inputs = kwargs.pop("inputs")
        error = _refusal(engine, "enc", inputs, **kwargs)
        assert isinstance(error, InvalidArgument), (field, error)
        assert (error.violations[0].field, error.reason) == (field, reason)
    assert _refusal(engine, "enc", [[1] * 513]).metadata["limit"] == "512"


def test_truncation_keeps_the_first_context_length_ids(engine: InferenceEngine) -> None:
    long = [1, *range(10, 600)]
    cut = asyncio.run(engine.embed("enc", [long], truncate=True))
    first = asyncio.run(engine.embed("enc", [long[:512]]))
    assert cut.prompt_tokens == 512
    np.testing.assert_allclose(cut.vectors, first.vectors, rtol=1e-6, atol=1e-6)


def test_wrong_model_kinds_are_refused_both_ways(load_engine: Callable[..., InferenceEngine], encoder_dir: Path,
                                                 tiny_llama_dir: Path) -> None:
    engine = load_engine({"enc": encoder_dir, "tiny": tiny_llama_dir})
    assert {i.name: i.kind for i in engine.list_models()} == {"enc": "embedding", "tiny": "generation"}
    error = _refusal(engine, "tiny", [[1, 2, 3]])
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.reason == "WRONG_MODEL_KIND"
    assert "feature-extraction" in error.message
    with pytest.raises(InvalidArgument) as caught:
        engine.open_session("enc", multi_turn=False)
    assert caught.value.reason == "WRONG_MODEL_KIND" and "Embed" in caught.value.message
    assert _refusal(engine, "nope", [[1]]).reason == "MODEL_NOT_FOUND"


def test_the_queue_is_bounded_and_refuses_with_a_retry_delay(encoder_dir: Path) -> None:
    settings = EngineSettings(device="cpu", intra_op_threads=1, embed_max_queued_inputs=5)
    queue = EmbeddingQueue("enc", OnnxEncoder.load(encoder_dir, settings), settings)  # worker not started
    answers: list[Any] = []
    queue.submit([[1, 2], [3, 4], [5]], dimensions=0, truncate=False, deadline=None, deliver=answers.append)
    with pytest.raises(ResourceExhausted) as caught:
        queue.submit([[1], [2], [3]], dimensions=0, truncate=False, deadline=None, deliver=answers.append)
    assert caught.value.reason == "ENGINE_OVERLOADED" and caught.value.retry_after_s > 0
    assert queue.stats().rejected_overloaded == 1 and queue.stats().queued == 3
    assert queue.held_bytes() == 5 * 8, "queued ids are accounted where they are held"
    queue.stop()  # queued jobs are answered, not dropped silently
    assert len(answers) == 1 and isinstance(answers[0], LlmsuiteError) and answers[0].reason == "ENGINE_STOPPING"


def test_forwards_stay_within_the_token_budget_sorted_by_length(
        load_engine: Callable[..., InferenceEngine], encoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, int]] = []
    original = OnnxEncoder.embed

    def recording(self: OnnxEncoder, rows: Sequence[np.ndarray]) -> np.ndarray:
        shapes.append((len(rows), max(len(r) for r in rows)))
        return original(self, rows)

    monkeypatch.setattr(OnnxEncoder, "embed", recording)
    engine = load_engine({"enc": encoder_dir}, embed_batch_tokens=64, warmup=False)
    lengths = [3, 40, 5, 7, 33, 2, 9, 12, 4, 60, 6, 8]
    result = asyncio.run(engine.embed("enc", [[1] * n for n in lengths]))
    assert result.vectors.shape == (12, 64)
    assert all(rows * longest <= 64 for rows, longest in shapes)
    assert sum(rows for rows, _ in shapes) == len(lengths)
    assert len(shapes) < len(lengths), "short inputs share forwards"
    assert engine.stats("enc").kv_bytes == 0, "nothing is held once the answer is out"


def test_plan_forwards_groups_sorted_lengths_under_the_budget() -> None:
    lengths = [10, 1, 30, 2, 100]
    plan = plan_forwards(lengths, 32)
    assert [[lengths[i] for i in group] for group in plan] == [[1, 2, 10], [30], [100]]
    assert sorted(i for group in plan for i in group) == list(range(5))


def test_cancelled_callers_leave_nothing_behind(engine: InferenceEngine) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(engine.embed("enc", [[1] * 500] * 64))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The engine still answers others; the cancelled job's inputs left the queue.
        assert (await engine.embed("enc", [[1, 2, 3]])).vectors.shape == (1, 64)

    asyncio.run(scenario())
    stats = engine.stats("enc")
    assert stats.cancelled == 1 and stats.queued == 0 and stats.kv_bytes == 0


def test_pooling_comes_from_modules_json_or_the_override(encoder_dir: Path, tmp_path: Path) -> None:
    assert read_pooling(encoder_dir, causal=False, override=None).mode == "mean"
    override = PoolingOverride.parse("cls:no-normalize")
    pooling = read_pooling(encoder_dir, causal=False, override=override)
    assert (pooling.mode, pooling.normalize) == ("cls", False)
    assert read_pooling(encoder_dir, causal=False, override=PoolingOverride.parse("last")).normalize
    with pytest.raises(ValueError, match="pooling mode"):
        PoolingOverride.parse("max")
    bare = tmp_path / "bare"
    shutil.copytree(encoder_dir, bare)
    (bare / "modules.json").unlink()
    assert read_pooling(bare, causal=False, override=None) == read_pooling(bare, causal=False, override=None)
    assert read_pooling(bare, causal=False, override=None).mode == "cls"
    assert read_pooling(bare, causal=True, override=None).mode == "last"
    dense = tmp_path / "dense"
    shutil.copytree(encoder_dir, dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        read_pooling(dense, causal=False, override=None)


def test_the_pooling_flag_changes_what_the_engine_serves(load_engine: Callable[..., InferenceEngine],
                                                         encoder_dir: Path) -> None:
    engine = load_engine({"enc": encoder_dir}, pooling=(("enc", "cls:no-normalize"),))
    info = engine.model_info("enc")
    assert (info.pooling, info.normalize) == ("cls", False)
    ids = encode(encoder_dir, ["hello there"])[0]
    got = asyncio.run(engine.embed("enc", [ids])).vectors[0]
    np.testing.assert_allclose(got, reference_vector(encoder_dir, ids, "cls", False), rtol=1e-4, atol=1e-5)
