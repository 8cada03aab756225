"""The decoder layer: IO introspection, KV-cache decoding against full recomputation, load errors, devices."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from llmsuite.inference.engine import EngineSettings, ModelLoadError
from llmsuite.inference.engine import device as device_module
from llmsuite.inference.engine.onnx_model import OnnxDecoder

PROMPT = [1, 17, 342, 99, 5, 801, 64, 12, 640, 33, 7]
DECODE_STEPS = 20


def greedy_with_cache(decoder: OnnxDecoder, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Prefill once, then feed one token per step against the growing cache."""
    result = decoder.forward(prompt, decoder.empty_cache())
    tokens, logits_per_step = [], []
    for _ in range(steps):
        logits = result.logits[-1]
        logits_per_step.append(logits)
        tokens.append(int(np.argmax(logits)))
        result = decoder.forward(tokens[-1:], result.cache)
    return tokens, logits_per_step


def greedy_without_cache(decoder: OnnxDecoder, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Recompute the whole sequence from scratch for every token."""
    sequence, tokens, logits_per_step = list(prompt), [], []
    for _ in range(steps):
        logits = decoder.forward(sequence, decoder.empty_cache()).logits[-1]
        logits_per_step.append(logits)
        tokens.append(int(np.argmax(logits)))
        sequence.append(tokens[-1])
    return tokens, logits_per_step


@pytest.mark.parametrize(
    ("model_fixture", "tolerance"),
    [("tiny_llama_dir", 1e-4), ("tiny_gpt2_dir", 1e-4), ("tiny_fp16_kv_dir", 1e-3)],
)
def test_kv_cache_decode_matches_full_recompute(model_fixture: str, tolerance: float, cpu_settings: EngineSettings,
                                                request: pytest.FixtureRequest) -> None:
    decoder = OnnxDecoder.load(request.getfixturevalue(model_fixture), cpu_settings)
    cached_tokens, cached_logits = greedy_with_cache(decoder, PROMPT, DECODE_STEPS)
    full_tokens, full_logits = greedy_without_cache(decoder, PROMPT, DECODE_STEPS)

    assert cached_tokens == full_tokens
    assert len(set(cached_tokens)) > 5, "a degenerate repeat would make the comparison weak"
    for step, (a, b) in enumerate(zip(cached_logits, full_logits, strict=True)):
        np.testing.assert_allclose(a, b, atol=tolerance, rtol=0, err_msg=f"step {step}")


def test_one_forward_gives_logits_for_every_position(llama_decoder: OnnxDecoder) -> None:
    sequence = [*PROMPT, 300, 301, 302]
    full = llama_decoder.forward(sequence, llama_decoder.empty_cache())
    prefix = llama_decoder.forward(PROMPT, llama_decoder.empty_cache())
    rest = llama_decoder.forward(sequence[len(PROMPT):], prefix.cache)

    assert full.logits.shape == (len(sequence), 1024)
    assert full.cache.length == rest.cache.length == len(sequence)
    np.testing.assert_allclose(full.logits[len(PROMPT):], rest.logits, atol=1e-4, rtol=0)


def test_signature_is_read_from_the_session(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tiny_fp16_kv_dir: Path,
                                            cpu_settings: EngineSettings) -> None:
    llama = OnnxDecoder.load(tiny_llama_dir, cpu_settings).signature
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim, llama.vocab_size) == (2, 2, 32, 1024)
    assert llama.position_ids == "position_ids"
    assert llama.kv_dtype == np.float32

    gpt2 = OnnxDecoder.load(tiny_gpt2_dir, cpu_settings).signature
    assert gpt2.position_ids is None
    assert gpt2.num_kv_heads == 4

    assert OnnxDecoder.load(tiny_fp16_kv_dir, cpu_settings).signature.kv_dtype == np.float16


def test_cache_reports_its_memory(llama_decoder: OnnxDecoder) -> None:
    result = llama_decoder.forward(PROMPT, llama_decoder.empty_cache())
    keys, values = llama_decoder.present_to_numpy(result.cache)[0]
    assert keys.shape == values.shape == (1, 2, len(PROMPT), 32)
    # 2 (key, value) x 2 layers x 2 KV heads x 32 dims x 4 bytes per token
    assert result.cache.nbytes == len(PROMPT) * 2 * 2 * 2 * 32 * 4


def test_chunked_prefill_gives_the_same_tokens(load_engine: Any, tiny_llama_dir: Path, helpers: Any) -> None:
    prompt = list(range(7, 107))
    engine = load_engine({"tiny": tiny_llama_dir})
    whole, _ = asyncio.run(helpers.generate_once(engine, "tiny", prompt))

    chunked_engine = load_engine({"tiny": tiny_llama_dir}, prefill_chunk_tokens=16)
    chunked, result = asyncio.run(helpers.generate_once(chunked_engine, "tiny", prompt))
    assert chunked == whole
    assert result.usage.prompt_tokens == 100


# ---- load errors ----------------------------------------------------------------------


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_missing_directory_is_a_clear_error(tmp_path: Path, cpu_settings: EngineSettings) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxDecoder.load(tmp_path / "nope", cpu_settings)


def test_missing_model_file_names_the_file(tmp_path: Path, tiny_llama_dir: Path, cpu_settings: EngineSettings) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path / "m")
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"missing model\.onnx"):
        OnnxDecoder.load(model_dir, cpu_settings)


def test_config_without_context_length_is_refused(tmp_path: Path, tiny_llama_dir: Path,
                                                  cpu_settings: EngineSettings) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    del config["max_position_embeddings"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="context length"):
        OnnxDecoder.load(model_dir, cpu_settings)


def test_export_without_kv_cache_is_refused(tmp_path: Path, cpu_settings: EngineSettings) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "no-cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                    model_dir / "model.onnx")
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    with pytest.raises(ModelLoadError, match="text-generation-with-past"):
        OnnxDecoder.load(model_dir, cpu_settings)


def test_engine_load_error_names_the_model(tmp_path: Path, load_engine: Any) -> None:
    with pytest.raises(ModelLoadError, match="model 'broken'"):
        load_engine({"broken": tmp_path})


# ---- devices --------------------------------------------------------------------------


def test_cpu_device_reports_cpu_provider(load_engine: Any, tiny_llama_dir: Path) -> None:
    info = load_engine({"tiny": tiny_llama_dir}).model_info("tiny")
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.device == "cpu"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_fails_at_load_when_onnxruntime_has_no_cuda(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        OnnxDecoder.load(tiny_llama_dir, EngineSettings(device="cuda"))


def _pretend_cuda_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime lists CUDA, but the session silently falls back to CPU (the onnxruntime-gpu trap)."""
    real_session = ort.InferenceSession

    def cpu_only_session(path: str, sess_options: Any = None, providers: Any = None) -> ort.InferenceSession:
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(device_module.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(device_module.ort, "InferenceSession", cpu_only_session)


def test_cuda_fails_at_load_when_the_session_falls_back(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_cuda_is_installed(monkeypatch)
    with pytest.raises(ModelLoadError, match="fell back"):
        OnnxDecoder.load(tiny_llama_dir, EngineSettings(device="cuda:0"))


def test_auto_falls_back_to_cpu_with_a_warning(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    _pretend_cuda_is_installed(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=device_module.__name__):
        decoder = OnnxDecoder.load(tiny_llama_dir, EngineSettings(device="auto"))
    assert decoder.placement.execution_provider == "CPUExecutionProvider"
    assert "running on CPU" in caplog.text


def test_session_options_follow_settings() -> None:
    options = device_module.session_options(
        EngineSettings(intra_op_threads=3, inter_op_threads=2, graph_optimization="basic", intra_op_spinning=False)
    )
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_default_threads_are_the_cpus_this_process_may_use() -> None:
    options = device_module.session_options(EngineSettings())
    assert options.intra_op_num_threads == device_module.available_cores() <= len(os.sched_getaffinity(0))
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


@pytest.mark.parametrize("bad", [{"device": "gpu"}, {"device": "cuda:x"}, {"graph_optimization": "max"},
                                 {"max_running": 0}, {"session_idle_timeout_s": 0}, {"prefill_chunk_tokens": 0},
                                 {"kv_cache_bytes": -1}])
def test_settings_reject_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EngineSettings(**bad)


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_cuda_keeps_kv_on_device_and_matches_cpu(tiny_llama_dir: Path, cpu_settings: EngineSettings) -> None:
    try:
        gpu = OnnxDecoder.load(tiny_llama_dir, EngineSettings(device="cuda"))
    except ModelLoadError as exc:
        pytest.skip(f"CUDA provider listed but not usable: {exc}")
    assert gpu.placement.execution_provider == "CUDAExecutionProvider"
    result = gpu.forward(PROMPT, gpu.empty_cache())
    key = result.cache.layers[0][0]
    assert isinstance(key, ort.OrtValue) and key.device_name().lower() == "cuda"

    cpu = OnnxDecoder.load(tiny_llama_dir, cpu_settings)
    gpu_tokens, gpu_logits = greedy_with_cache(gpu, PROMPT, DECODE_STEPS)
    cpu_tokens, cpu_logits = greedy_with_cache(cpu, PROMPT, DECODE_STEPS)
    assert gpu_tokens == cpu_tokens
    np.testing.assert_allclose(gpu_logits[-1], cpu_logits[-1], atol=1e-2, rtol=0)
