"""The model builder: determinism, the Optimum layout, the graph's masking, presets, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from llmsuite.builder.__main__ import main
from llmsuite.builder.model import build_model, decoder_config, parameter_count
from llmsuite.builder.tokenizer import END_OF_TURN_ID, EOS_ID


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama")
    build_model(out, arch="llama")
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt2")
    build_model(out, arch="gpt2")
    return out


def session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray | None = None
        ) -> np.ndarray:
    """Logits of one forward with an empty past (batch taken from `ids`)."""
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
    names = {i.name for i in sess.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = positions if positions is not None else np.cumsum(mask, axis=1) - 1
    for node in sess.get_inputs():
        if node.name.startswith("past_key_values."):
            dtype = np.float16 if node.type == "tensor(float16)" else np.float32
            feeds[node.name] = np.zeros((ids.shape[0], node.shape[1], 0, node.shape[3]), dtype=dtype)
    return sess.run(["logits"], feeds)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_seed_gives_byte_identical_files(tmp_path: Path, arch: str) -> None:
    build_model(tmp_path / "a", arch=arch, seed=3)
    build_model(tmp_path / "b", arch=arch, seed=3)
    build_model(tmp_path / "c", arch=arch, seed=4)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "model.onnx").read_bytes() != (tmp_path / "c" / "model.onnx").read_bytes()


def test_llama_layout_matches_optimum(llama_dir: Path) -> None:
    assert {p.name for p in llama_dir.iterdir()} == {
        "model.onnx", "config.json", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    }
    sess = session(llama_dir)
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    past = [f"past_key_values.{layer}.{part}" for layer in range(2) for part in ("key", "value")]
    present = [f"present.{layer}.{part}" for layer in range(2) for part in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outputs) == ["logits", *present]
    assert inputs["input_ids"].shape == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"].shape == ["batch_size", "past_sequence_length + sequence_length"]
    assert inputs["past_key_values.0.key"].shape == ["batch_size", 2, "past_sequence_length", 32]  # GQA: 2 KV heads
    assert outputs["present.1.value"].shape == ["batch_size", 2, "past_sequence_length + sequence_length", 32]
    assert outputs["logits"].shape == ["batch_size", "sequence_length", 1024]
    assert all(i.type == "tensor(int64)" for i in list(inputs.values())[:3])

    model = onnx.load(llama_dir / "model.onnx")
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_llama_config_is_hf_style(llama_dir: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["hidden_size"] == 128 and config["head_dim"] == 32 and config["num_hidden_layers"] == 2
    assert config["max_position_embeddings"] == 512 and config["tie_word_embeddings"] is False
    assert {"rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id"} <= set(config)
    generation = json.loads((llama_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [EOS_ID, END_OF_TURN_ID]
    tokenizer = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == config["vocab_size"]


def test_gpt2_layout_has_no_position_ids(gpt2_dir: Path) -> None:
    sess = session(gpt2_dir)
    names = [i.name for i in sess.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"] and "position_ids" not in names
    assert sess.get_inputs()[2].shape == ["batch_size", 4, "past_sequence_length", 32]  # MHA
    config = json.loads((gpt2_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_head"] == 4 and config["n_positions"] == 512
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize("model_fixture", ["llama_dir", "gpt2_dir"])
def test_left_padding_is_masked(model_fixture: str, request: pytest.FixtureRequest) -> None:
    """A left-padded row gives the same logits for its real tokens as the unpadded sequence."""
    sess = session(request.getfixturevalue(model_fixture))
    tokens = np.array([[11, 250, 37, 900, 4]], dtype=np.int64)
    alone = run(sess, tokens, np.ones_like(tokens))
    padded_ids = np.array([[0, 0, 0, 11, 250, 37, 900, 4], [5, 6, 7, 8, 9, 10, 11, 12]], dtype=np.int64)
    padded_mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=np.int64)
    batched = run(sess, padded_ids, padded_mask)
    np.testing.assert_allclose(batched[0, 3:], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_fixture", ["llama_dir", "gpt2_dir"])
def test_attention_is_causal(model_fixture: str, request: pytest.FixtureRequest) -> None:
    sess = session(request.getfixturevalue(model_fixture))
    a = np.array([[11, 250, 37, 900, 4]], dtype=np.int64)
    b = a.copy()
    b[0, -1] = 600
    logits_a, logits_b = run(sess, a, np.ones_like(a)), run(sess, b, np.ones_like(b))
    np.testing.assert_allclose(logits_a[0, :-1], logits_b[0, :-1], atol=1e-5, rtol=0)
    assert not np.allclose(logits_a[0, -1], logits_b[0, -1])


def test_greedy_margins_are_clear(llama_dir: Path) -> None:
    """The init scale separates the top two logits well beyond float noise."""
    logits = run(session(llama_dir), np.arange(7, 71, dtype=np.int64)[None], np.ones((1, 64), np.int64))[0]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) > 0.5
    assert logits.std() > 2.0


def test_parameter_count_matches_the_graph(llama_dir: Path, gpt2_dir: Path) -> None:
    for model_dir, arch in ((llama_dir, "llama"), (gpt2_dir, "gpt2")):
        model = onnx.load(model_dir / "model.onnx")
        weights = [t for t in model.graph.initializer if not t.name.startswith("const/")]
        assert sum(math.prod(t.dims) for t in weights) == parameter_count(decoder_config("tiny", arch))


def test_bench_preset_is_about_100m_parameters() -> None:
    # Counted from the weight plan the builder draws initializers from, without writing 400 MB.
    count = parameter_count(decoder_config("bench"))
    assert 90e6 <= count <= 110e6
    config = decoder_config("bench")
    assert config.external_data and config.num_kv_heads < config.num_attention_heads


def test_fp16_kv_and_external_data_overrides(tmp_path: Path, llama_dir: Path) -> None:
    build_model(tmp_path, num_layers=1, kv_dtype="float16", external_data=True)
    assert (tmp_path / "model.onnx_data").is_file()
    sess = session(tmp_path)
    assert {i.type for i in sess.get_inputs() if i.name.startswith("past_")} == {"tensor(float16)"}
    assert {o.type for o in sess.get_outputs() if o.name.startswith("present.")} == {"tensor(float16)"}
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 1


def test_bad_overrides_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        build_model(tmp_path, num_kv_heads=3)
    with pytest.raises(TypeError, match="unknown model overrides"):
        build_model(tmp_path, layers=3)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model(tmp_path, preset="huge")


def test_cli_builds_and_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "models" / "tiny"
    assert main(["--preset", "tiny", "--out", str(out), "--arch", "gpt2", "--seed", "1"]) == 0
    assert "gpt2 preset tiny" in capsys.readouterr().out
    assert main(["--preset", "tiny", "--out", str(out)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
