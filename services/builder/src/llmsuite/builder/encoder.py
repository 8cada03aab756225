"""Builds small deterministic BERT-style sentence encoders in the Optimum `feature-extraction` layout.

The output directory looks like `optimum-cli export onnx --task feature-extraction` output
of a sentence-transformers model: `model.onnx` (`input_ids`, `attention_mask`,
`token_type_ids` in; `last_hidden_state` out), `config.json`, the tokenizer files, and
sentence-transformers' `modules.json` + `1_Pooling/config.json`, which tell a server how to
pool the token states into one vector (mean pooling here, then L2 normalisation). Weights
are seeded random numbers, as for the decoder (model.py): the vectors mean nothing, but
every server path (padding, masking, pooling, batching) is exercised without downloads.

The graph is BERT's: word + position + token-type embeddings and a LayerNorm, then
post-LayerNorm layers of bidirectional multi-head attention (padding masked out) and a
GELU MLP.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmsuite.builder.model import (
    BATCH,
    CONFIG_FILE,
    IR_VERSION,
    MASKED_SCORE,
    MODEL_FILE,
    OPSET,
    SEQUENCE,
    TOKENIZER_FILES,
    WeightSpec,
    _bias,
    _GraphWriter,
    _layer_norm,
    _linear,
    _norm,
)
from llmsuite.builder.tokenizer import PAD_ID, build_tokenizer

MODULES_FILE = "modules.json"
POOLING_DIR = "1_Pooling"
OUTPUT_FILES = (MODEL_FILE, CONFIG_FILE, MODULES_FILE, POOLING_DIR, *TOKENIZER_FILES)

# Pooling written into 1_Pooling/config.json: mean over the real tokens (the shared
# Optimum export uses CLS, so the tests cover both).
POOLING_MODE = "mean"


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that fixes an encoder's graph and weight shapes (the seed fixes the values)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and `make run`: builds in well under a second.
    "tiny": dict(vocab_size=1024, hidden_size=64, num_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=512),
    # MiniLM-L6 sized (about 15M parameters with this vocabulary): model time dominates serving overhead.
    "bench": dict(vocab_size=4096, hidden_size=384, num_layers=6, num_attention_heads=12, intermediate_size=1536,
                  max_position_embeddings=512),
}


def encoder_config(preset: str = "tiny", **overrides: Any) -> EncoderConfig:
    if preset not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder preset {preset!r}; expected one of {sorted(ENCODER_PRESETS)}")
    return EncoderConfig(**{**ENCODER_PRESETS[preset], **overrides})


_LINEAR_GAIN = 1.0
_EMBEDDING_STD = 0.5


def weight_plan(config: EncoderConfig) -> list[WeightSpec]:
    """Every initializer, in the order they are drawn from the seed (HF BertModel names)."""
    h, inner = config.hidden_size, config.intermediate_size
    specs = [
        WeightSpec("embeddings.word_embeddings.weight", (config.vocab_size, h), _EMBEDDING_STD),
        WeightSpec("embeddings.position_embeddings.weight", (config.max_position_embeddings, h), _EMBEDDING_STD),
        WeightSpec("embeddings.token_type_embeddings.weight", (config.type_vocab_size, h), _EMBEDDING_STD),
        _norm("embeddings.LayerNorm.weight", h),
        _bias("embeddings.LayerNorm.bias", h),
    ]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            specs += [_linear(f"{p}.attention.self.{proj}.weight", h, h, _LINEAR_GAIN),
                      _bias(f"{p}.attention.self.{proj}.bias", h)]
        specs += [
            _linear(f"{p}.attention.output.dense.weight", h, h, _LINEAR_GAIN),
            _bias(f"{p}.attention.output.dense.bias", h),
            _norm(f"{p}.attention.output.LayerNorm.weight", h),
            _bias(f"{p}.attention.output.LayerNorm.bias", h),
            _linear(f"{p}.intermediate.dense.weight", h, inner, _LINEAR_GAIN),
            _bias(f"{p}.intermediate.dense.bias", inner),
            _linear(f"{p}.output.dense.weight", inner, h, _LINEAR_GAIN),
            _bias(f"{p}.output.dense.bias", h),
            _norm(f"{p}.output.LayerNorm.weight", h),
            _bias(f"{p}.output.LayerNorm.bias", h),
        ]
    return specs


def parameter_count(config: EncoderConfig) -> int:
    return sum(math.prod(spec.shape) for spec in weight_plan(config))


def _gelu_erf(g: _GraphWriter, x: str, hint: str) -> str:
    """BERT's exact GELU: 0.5 x (1 + erf(x / sqrt(2)))."""
    scaled = g.op("Div", [x, g.constant("sqrt2", math.sqrt(2.0), np.float32)], hint)
    one_plus = g.op("Add", [g.op("Erf", [scaled], hint), g.constant("one_f", 1.0, np.float32)], hint)
    return g.op("Mul", [g.op("Mul", [x, one_plus], hint), g.constant("half_f", 0.5, np.float32)], hint)


def _self_attention(g: _GraphWriter, config: EncoderConfig, layer: int, x: str, allowed: str) -> str:
    hint = f"layers.{layer}.attn"
    p = f"encoder.layer.{layer}.attention"
    n_heads, d = config.num_attention_heads, config.head_dim

    def heads(proj: str) -> str:  # [b, s, h] -> [b, heads, s, d]
        projected = g.matmul(x, f"{p}.self.{proj}.weight", hint, f"{p}.self.{proj}.bias")
        split = g.op("Reshape", [projected, g.constant(f"heads_{n_heads}", [0, 0, n_heads, d])], hint)
        return g.op("Transpose", [split], hint, perm=[0, 2, 1, 3])

    q, k, v = heads("query"), heads("key"), heads("value")
    q = g.op("Mul", [q, g.constant("attn_scale", 1.0 / math.sqrt(d), np.float32)], hint)
    scores = g.op("MatMul", [q, g.op("Transpose", [k], hint, perm=[0, 1, 3, 2])], hint)  # [b, heads, s, s]
    scores = g.op("Where", [allowed, scores, g.constant("masked_score", MASKED_SCORE, np.float32)], hint)
    context = g.op("MatMul", [g.op("Softmax", [scores], hint, axis=-1), v], hint)
    context = g.op("Transpose", [context], hint, perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, g.constant("merge_heads", [0, 0, n_heads * d])], hint)
    return g.matmul(context, f"{p}.output.dense.weight", hint, f"{p}.output.dense.bias")


def build_graph(config: EncoderConfig, seed: int = 0) -> onnx.ModelProto:
    """The ONNX encoder in memory, with Optimum's feature-extraction input/output names."""
    g = _GraphWriter()
    rng = np.random.Generator(np.random.PCG64(seed))
    for spec in weight_plan(config):
        values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(spec.std)
        g.initializer(spec.name, values + np.float32(spec.mean))

    seq_len = g.op("Squeeze", [g.op("Shape", ["input_ids"], "positions", start=1, end=2)], "positions")
    positions = g.op("Range", [g.constant("zero", 0), seq_len, g.constant("one", 1)], "positions")
    x = g.op("Add", [g.op("Gather", ["embeddings.word_embeddings.weight", "input_ids"], "embed", axis=0),
                     g.op("Gather", ["embeddings.position_embeddings.weight", positions], "embed", axis=0)], "embed")
    x = g.op("Add", [x, g.op("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"], "embed",
                             axis=0)], "embed")
    eps = config.norm_eps
    x = _layer_norm(g, x, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", eps, "embed")
    # Every query may see every real key: only padding is masked (bidirectional).
    allowed = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "mask", to=TensorProto.BOOL),
                                 g.constant("axes_12", [1, 2])], "mask")  # [b, 1, 1, s]
    for i in range(config.num_layers):
        p, hint = f"encoder.layer.{i}", f"layers.{i}"
        attended = g.op("Add", [x, _self_attention(g, config, i, x, allowed)], hint)
        x = _layer_norm(g, attended, f"{p}.attention.output.LayerNorm.weight",
                        f"{p}.attention.output.LayerNorm.bias", eps, hint)
        hidden = _gelu_erf(g, g.matmul(x, f"{p}.intermediate.dense.weight", hint, f"{p}.intermediate.dense.bias"),
                           hint)
        mlp = g.matmul(hidden, f"{p}.output.dense.weight", hint, f"{p}.output.dense.bias")
        x = _layer_norm(g, g.op("Add", [x, mlp], hint), f"{p}.output.LayerNorm.weight",
                        f"{p}.output.LayerNorm.bias", eps, hint)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state/Identity"))

    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, [BATCH, SEQUENCE])
              for name in ("input_ids", "attention_mask", "token_type_ids")]
    outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                             [BATCH, SEQUENCE, config.hidden_size])]
    graph = helper.make_graph(g.nodes, "llmsuite_bert_encoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="llmsuite-builder", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def hf_config(config: EncoderConfig) -> dict[str, Any]:
    """config.json as transformers writes it for a BertModel."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu",
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
        "pad_token_id": PAD_ID,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


def sentence_transformers_modules() -> list[dict[str, Any]]:
    return [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]


def pooling_config(config: EncoderConfig) -> dict[str, Any]:
    return {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": POOLING_MODE == "cls",
        "pooling_mode_mean_tokens": POOLING_MODE == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_lasttoken": False,
    }


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _drop_chat_template(out_dir: Path) -> None:
    """An embedding model is never chatted with: its tokenizer carries no template."""
    path = out_dir / "tokenizer_config.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload.pop("chat_template", None)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def build_encoder(out_dir: Path, *, preset: str = "tiny", seed: int = 0, force: bool = False,
                  **overrides: Any) -> EncoderConfig:
    """Writes a complete encoder directory (ONNX, configs, pooling, tokenizer); returns its config.

    The same arguments give byte-identical files. Refuses to write over a model unless
    `force`, which first removes the files this builder owns.
    """
    config = encoder_config(preset, **overrides)
    out_dir = Path(out_dir)
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds a model ({', '.join(existing)}); force replaces it")
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, vocab_size=config.vocab_size, seed=seed,
                    model_max_length=config.max_position_embeddings)
    _drop_chat_template(out_dir)
    onnx.save_model(build_graph(config, seed), out_dir / MODEL_FILE)
    _write_json(out_dir / CONFIG_FILE, hf_config(config))
    _write_json(out_dir / MODULES_FILE, sentence_transformers_modules())
    (out_dir / POOLING_DIR).mkdir()
    _write_json(out_dir / POOLING_DIR / "config.json", pooling_config(config))
    return config
