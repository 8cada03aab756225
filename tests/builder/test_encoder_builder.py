"""The encoder builder: determinism, the Optimum feature-extraction layout, padding masking, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from llmsuite.builder.__main__ import main
from llmsuite.builder.encoder import OUTPUT_FILES, build_encoder, encoder_config, parameter_count


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("encoder")
    build_encoder(out)
    return out


def _states(directory: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    (states,) = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                    "token_type_ids": np.zeros_like(ids)})
    return np.asarray(states)


def test_same_arguments_give_identical_files(encoder_dir: Path, tmp_path: Path) -> None:
    build_encoder(tmp_path)
    for name in ("model.onnx", "config.json", "modules.json", "1_Pooling/config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (encoder_dir / name).read_bytes(), name


def test_layout_is_what_optimum_and_sentence_transformers_write(encoder_dir: Path) -> None:
    session = ort.InferenceSession(str(encoder_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
    config = json.loads((encoder_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    modules = json.loads((encoder_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((encoder_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert pooling["word_embedding_dimension"] == config["hidden_size"]
    assert "chat_template" not in json.loads((encoder_dir / "tokenizer_config.json").read_text())
    assert Tokenizer.from_file(str(encoder_dir / "tokenizer.json")).get_vocab_size() == config["vocab_size"]


def test_padding_is_masked_out_and_attention_is_bidirectional(encoder_dir: Path) -> None:
    ids = np.array([[1, 50, 60, 70, 80]], dtype=np.int64)
    alone = _states(encoder_dir, ids, np.ones_like(ids))
    padded_ids = np.concatenate([ids, np.array([[0, 0, 0]])], axis=1)
    padded = _states(encoder_dir, padded_ids, np.array([[1, 1, 1, 1, 1, 0, 0, 0]]))
    np.testing.assert_allclose(padded[:, :5], alone, rtol=1e-5, atol=1e-5)
    # The first token's state changes when a later token changes: every token sees every other.
    changed = _states(encoder_dir, np.array([[1, 50, 60, 70, 81]]), np.ones_like(ids))
    assert not np.allclose(changed[0, 0], alone[0, 0])


def test_presets_and_overrides(tmp_path: Path) -> None:
    assert parameter_count(encoder_config("tiny")) < parameter_count(encoder_config("bench"))
    with pytest.raises(ValueError, match="unknown encoder preset"):
        encoder_config("huge")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        encoder_config("tiny", hidden_size=66)


def test_cli_builds_an_encoder_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kind", "encoder", "--out", str(tmp_path)]) == 0
    assert "built encoder preset tiny" in capsys.readouterr().out
    assert all((tmp_path / name).exists() for name in OUTPUT_FILES)
    assert main(["--kind", "encoder", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--kind", "encoder", "--out", str(tmp_path), "--force"]) == 0
