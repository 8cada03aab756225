"""`--layout gqa` and `--precision int4`: the same weights in the ONNX Runtime GenAI layout,
quantized by onnxruntime's MatMulNBitsQuantizer, deterministically."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from llmsuite.builder.__main__ import main
from llmsuite.builder.variants import build_variant


def _ops(model_dir: Path) -> Counter[tuple[str, str]]:
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return Counter((node.domain, node.op_type) for node in model.graph.node)


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_gqa_layout_is_byte_identical_across_builds(tmp_path: Path, precision: str) -> None:
    build_variant(tmp_path / "a", layout="gqa", precision=precision)  # type: ignore[arg-type]
    build_variant(tmp_path / "b", layout="gqa", precision=precision)  # type: ignore[arg-type]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_gqa_layout_is_what_the_genai_builder_writes(tmp_path: Path) -> None:
    build_variant(tmp_path, layout="gqa")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "genai_config.json", "model.onnx", "model.onnx.data", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    ops = _ops(tmp_path)
    assert ops[("com.microsoft", "GroupQueryAttention")] == 2
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 4
    assert ops[("", "SimplifiedLayerNormalization")] == 1
    decoder = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (32, 2, 2)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "attention_mask"]
    assert "position_ids" not in {i.name for i in session.get_inputs()}


def test_int4_is_matmulnbits_block_32(tmp_path: Path) -> None:
    build_variant(tmp_path / "gqa", layout="gqa", precision="int4")
    build_variant(tmp_path / "optimum", precision="int4")
    for model_dir in (tmp_path / "gqa", tmp_path / "optimum"):
        model = onnx.load(str(model_dir / "model.onnx"))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(n.domain == "com.microsoft" for n in nbits)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
        # Every weight MatMul is quantized: none multiplies by a float initializer any more.
        initializers = {i.name for i in model.graph.initializer}
        assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]


def test_both_layouts_compute_the_same_logits(tmp_path: Path) -> None:
    build_variant(tmp_path / "optimum")
    build_variant(tmp_path / "gqa", layout="gqa")
    ids = np.array([[1, 40, 300, 7, 99]], dtype=np.int64)
    mask = np.ones((1, 5), dtype=np.int64)
    empty = np.zeros((1, 2, 0, 32), dtype=np.float32)
    feeds = {f"past_key_values.{i}.{p}": empty for i in range(2) for p in ("key", "value")}
    optimum = ort.InferenceSession(str(tmp_path / "optimum" / "model.onnx"), providers=["CPUExecutionProvider"])
    gqa = ort.InferenceSession(str(tmp_path / "gqa" / "model.onnx"), providers=["CPUExecutionProvider"])
    a = optimum.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(5)[None],
                                 **feeds})[0]
    b = gqa.run(["logits"], {"input_ids": ids, "attention_mask": mask, **feeds})[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_switching_layout_in_one_directory_needs_force_and_leaves_no_stale_file(tmp_path: Path) -> None:
    build_variant(tmp_path)
    with pytest.raises(FileExistsError):
        build_variant(tmp_path, layout="gqa")
    build_variant(tmp_path, layout="gqa", force=True)
    assert not (tmp_path / "config.json").exists() and (tmp_path / "genai_config.json").is_file()
    build_variant(tmp_path, force=True)
    assert not (tmp_path / "genai_config.json").exists() and (tmp_path / "config.json").is_file()


def test_cli_layout_and_precision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "m"), "--layout", "gqa", "--precision", "int4"]) == 0
    assert "gqa layout, int4" in capsys.readouterr().out
    assert _ops(tmp_path / "m")[("com.microsoft", "MatMulNBits")] > 0
    assert main(["--out", str(tmp_path / "g"), "--layout", "gqa", "--arch", "gpt2"]) == 2
    assert "llama architecture" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
