"""What a `--model` path holds is read from its files: layout, names, config, precision; and
what cannot be served is refused at load with the file, the layout detected and what is missing.

Layouts come from the builder (`--layout gqa`, `--precision int4`), rearranged the way
transformers.js-style repositories ship quantized files, and from ../shared/genai-exports
(onnxruntime-genai's own builder output) where that folder exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
from layout_support import SHARED_GENAI_EXPORTS, transformers_js_repository
from onnx import TensorProto, helper
from support import SHARED_EXPORTS

from llmsuite.builder.variants import build_variant
from llmsuite.inference.engine import EngineSettings, ModelLoadError
from llmsuite.inference.engine.layouts import decoder_layout, detect_model
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.runtime.model_paths import tokenizer_directory
from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

CPU = EngineSettings(device="cpu", intra_op_threads=1, warmup=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    dirs = {}
    for layout in ("optimum", "gqa"):
        for precision in ("fp32", "int4"):
            dirs[f"{layout}-{precision}"] = root / f"{layout}-{precision}"
            build_variant(dirs[f"{layout}-{precision}"], layout=layout, precision=precision)  # type: ignore[arg-type]
    dirs["repo"] = transformers_js_repository(dirs["optimum-fp32"], dirs["optimum-int4"] / "model.onnx",
                                              root / "repo")
    return dirs


def test_builder_gqa_layout_is_read_from_genai_config(built: dict[str, Path]) -> None:
    layout = decoder_layout(built["gqa-fp32"])
    genai = json.loads((built["gqa-fp32"] / "genai_config.json").read_text())
    assert not (built["gqa-fp32"] / "config.json").exists()
    assert (layout.name, layout.attention, layout.precision, layout.quantization) == (
        "onnxruntime-genai", "GroupQueryAttention", "fp32", "none")
    assert layout.past_present_share_buffer and not layout.has_position_ids and not layout.left_padding
    config = layout.config
    assert config.context_length == genai["model"]["context_length"] == 512
    assert config.eos_token_ids == tuple(genai["model"]["eos_token_id"])
    model = genai["model"]
    assert (config.bos_token_id, config.pad_token_id) == (model["bos_token_id"], model["pad_token_id"])
    assert (config.num_attention_heads, config.num_kv_heads, config.head_dim) == (4, 2, 32)
    assert layout.num_layers == genai["model"]["decoder"]["num_hidden_layers"]
    assert (layout.model_file.name, layout.tokenizer_directory) == ("model.onnx", built["gqa-fp32"])


def test_optimum_layout_keeps_left_padding(built: dict[str, Path]) -> None:
    layout = decoder_layout(built["optimum-fp32"])
    assert (layout.name, layout.attention, layout.precision) == ("optimum", "unfused", "fp32")
    assert layout.has_position_ids and layout.left_padding and not layout.past_present_share_buffer


@pytest.mark.parametrize("name", ["gqa-int4", "optimum-int4"])
def test_int4_builds_report_matmulnbits(built: dict[str, Path], name: str) -> None:
    layout = decoder_layout(built[name])
    assert layout.precision == "int4"
    assert layout.quantization.startswith("MatMulNBits int4, block 32, accuracy level 4")


def test_both_layouts_of_one_preset_pair_with_the_same_tokenizer(built: dict[str, Path]) -> None:
    hashes = {tokenizer_content_hash(decoder_layout(d).tokenizer_directory) for d in built.values()}
    assert len(hashes) == 1


def test_transformers_js_repository_serves_any_of_its_onnx_files(built: dict[str, Path]) -> None:
    repo = built["repo"]
    whole, quantized = decoder_layout(repo), decoder_layout(repo / "onnx" / "model_q4.onnx")
    assert whole.model_file == repo / "onnx" / "model.onnx" and whole.precision == "fp32"
    assert quantized.model_file == repo / "onnx" / "model_q4.onnx" and quantized.precision == "int4"
    # config.json and the tokenizer one level up, for both the engine and the tokenizer service.
    assert quantized.config.context_length == 512 and quantized.tokenizer_directory == repo
    assert tokenizer_directory(repo / "onnx" / "model_q4.onnx") == tokenizer_directory(repo) == repo
    decoder = OnnxDecoder.load(repo / "onnx" / "model_q4.onnx", CPU)
    assert decoder.directory == repo and decoder.signature.num_layers == 2


def test_external_data_side_files_load(tmp_path: Path) -> None:
    """Optimum names the side file model.onnx_data, onnxruntime-genai model.onnx.data."""
    optimum, genai = tmp_path / "optimum", tmp_path / "genai"
    build_variant(optimum, external_data=True)
    build_variant(genai, layout="gqa")
    assert (optimum / "model.onnx_data").is_file() and (genai / "model.onnx.data").is_file()
    for directory in (optimum, genai):
        decoder = OnnxDecoder.load(directory, CPU)
        result = decoder.forward([1, 2, 3], decoder.empty_cache())
        assert result.logits.shape == (3, 1024) and result.cache.length == 3


def test_dynamic_int8_quantization_is_reported(built: dict[str, Path], tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tmp_path / "int8"
    shutil.copytree(built["optimum-fp32"], target)
    (target / "model.onnx").unlink()
    quantize_dynamic(built["optimum-fp32"] / "model.onnx", target / "model.onnx", weight_type=QuantType.QInt8)
    layout = decoder_layout(target)
    assert layout.precision == "int8" and layout.quantization.startswith("dynamic int8 (MatMulInteger")
    decoder = OnnxDecoder.load(target, CPU)
    assert decoder.forward([1, 2], decoder.empty_cache()).logits.shape == (2, 1024)


def test_shared_genai_exports_are_read_from_their_config() -> None:
    if not SHARED_GENAI_EXPORTS.is_dir():
        pytest.skip(f"{SHARED_GENAI_EXPORTS} is absent: onnxruntime-genai's builder outputs ship only beside the "
                    "team's checkout")
    fp32 = decoder_layout(SHARED_GENAI_EXPORTS / "llama-fp32")
    int4 = decoder_layout(SHARED_GENAI_EXPORTS / "llama-int4")
    assert (fp32.name, fp32.attention, fp32.precision) == ("onnxruntime-genai", "GroupQueryAttention", "fp32")
    assert (int4.precision, int4.quantization.split(",")[:2]) == ("int4", ["MatMulNBits int4", " block 32"])
    assert fp32.config.eos_token_ids == (1532, 1535) and fp32.config.bos_token_id == 1531
    assert (fp32.config.context_length, fp32.num_layers, fp32.config.head_dim) == (256, 3, 32)


# ---- refusals ---------------------------------------------------------------------------------------------


def _graph(path: Path, inputs: list[str], outputs: list[str]) -> Path:
    """A minimal valid ONNX file with these float inputs/outputs (only the names matter to detection)."""
    nodes = [helper.make_node("Identity", [inputs[0]], [name]) for name in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b"]) for n in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b"]) for n in outputs])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    (path.parent / "config.json").write_text(json.dumps({"max_position_embeddings": 64, "model_type": "x"}))
    return path


def test_encoder_is_detected_and_refused(tmp_path: Path) -> None:
    model = _graph(tmp_path / "bert" / "model.onnx", ["input_ids", "attention_mask", "token_type_ids"],
                   ["last_hidden_state"])
    assert detect_model(model.parent).kind == "encoder"  # what a caller routes to an embedding path
    with pytest.raises(ModelLoadError) as refused:
        OnnxDecoder.load(model.parent, CPU)
    message = str(refused.value)
    assert str(model) in message and "detected Optimum encoder" in message and "missing a logits output" in message


def test_shared_encoder_export_is_refused() -> None:
    encoder = SHARED_EXPORTS / "bert-encoder"
    if not encoder.is_dir():
        pytest.skip(f"{encoder} is absent: the real Optimum exports ship only beside the team's checkout")
    with pytest.raises(ModelLoadError, match=r"model\.onnx: detected Optimum encoder .*missing a logits output"):
        OnnxDecoder.load(encoder, CPU)


def test_merged_decoder_is_refused(tmp_path: Path) -> None:
    names = ["input_ids", "attention_mask", "use_cache_branch", "past_key_values.0.key", "past_key_values.0.value"]
    model = _graph(tmp_path / "merged" / "model.onnx", names, ["logits", "present.0.key", "present.0.value"])
    with pytest.raises(ModelLoadError) as refused:
        OnnxDecoder.load(model, CPU)
    message = str(refused.value)
    assert str(model) in message and "merged decoder" in message and "missing a graph without use_cache_branch" \
        in message


def test_decoder_without_kv_outputs_is_refused(tmp_path: Path) -> None:
    model = _graph(tmp_path / "nokv" / "model.onnx", ["input_ids", "attention_mask"], ["logits"])
    with pytest.raises(ModelLoadError, match=r"causal LM without KV cache.*missing KV cache inputs "
                                             r"\(past_key_values\.0\.key"):
        OnnxDecoder.load(model.parent, CPU)


def test_unknown_inputs_are_refused(tmp_path: Path) -> None:
    names = ["input_ids", "attention_mask", "cache_indirection", "past_key_values.0.key", "past_key_values.0.value"]
    model = _graph(tmp_path / "beam" / "model.onnx", names, ["logits", "present.0.key", "present.0.value"])
    with pytest.raises(ModelLoadError, match=r"does not know how to feed: \['cache_indirection'\]"):
        OnnxDecoder.load(model.parent, CPU)


def test_genai_config_naming_a_missing_file_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    target = shutil.copytree(built["gqa-fp32"], tmp_path / "g")
    config = json.loads((target / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "decoder.onnx"
    (target / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"genai_config\.json \(onnxruntime-genai layout\) names the model file "
                                             r"decoder\.onnx, which is missing"):
        OnnxDecoder.load(target, CPU)


def test_genai_combined_kv_names_are_refused(built: dict[str, Path], tmp_path: Path) -> None:
    target = shutil.copytree(built["gqa-fp32"], tmp_path / "g")
    config = json.loads((target / "genai_config.json").read_text())
    config["model"]["decoder"]["inputs"]["past_names"] = "past_%d"
    (target / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="combined past_names"):
        OnnxDecoder.load(target, CPU)


def test_optimum_file_without_config_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "lonely").mkdir()
    model = shutil.copy(built["optimum-int4"] / "model.onnx", tmp_path / "lonely" / "model_q4.onnx")
    with pytest.raises(ModelLoadError, match=r"model_q4\.onnx \(Optimum layout\): missing config\.json"):
        OnnxDecoder.load(Path(model), CPU)


def test_engine_routes_an_encoder_to_embedding(tmp_path: Path, load_engine: Any) -> None:
    """The same detection that refuses an encoder as a decoder routes it to the embedding path."""
    from llmsuite.builder.encoder import build_encoder

    build_encoder(tmp_path / "enc", preset="tiny")
    assert detect_model(tmp_path / "enc").kind == "encoder"
    info = load_engine({"enc": tmp_path / "enc"}).model_info("enc")
    assert (info.kind, info.layout, info.precision, info.quantization) == ("embedding", "optimum", "fp32", "none")
