"""Writes the builder's Llama weights in the ONNX Runtime GenAI layout (`--layout gqa`).

The graph is the one onnxruntime-genai's model builder writes for a Llama on CPU, from the
same seeded weights as the Optimum layout of the same preset (`model.weight_plan`), so the
two layouts of one preset give the same greedy tokens:

* `GroupQueryAttention` (com.microsoft) over a packed QKV projection, with rotary inside
  (`do_rotary`, cos/sin caches of `max_position_embeddings` rows), fed the per-row lengths
  it derives from `attention_mask` (`seqlens_k` = sum - 1, `total_sequence_length` = the
  mask's width): no `position_ids` input;
* `SimplifiedLayerNormalization` once and `SkipSimplifiedLayerNormalization` (residual add
  fused into the RMSNorm) twice per layer;
* inputs `input_ids`, `attention_mask`, `past_key_values.N.key/value`; outputs `logits`,
  `present.N.key/value`; weights in `model.onnx.data`;
* `genai_config.json` as the GenAI builder writes it (names, heads, context, eos/bos/pad,
  `past_present_share_buffer`), the tokenizer files, and no `config.json`.

Only numpy and onnx are used, nothing is downloaded; the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmsuite.builder.model import DecoderConfig, draw_weights
from llmsuite.builder.tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"  # the name onnxruntime-genai's builder gives it
GENAI_CONFIG_FILE = "genai_config.json"
OUTPUT_FILES = (MODEL_FILE, EXTERNAL_DATA_FILE, GENAI_CONFIG_FILE)
# GenAI's builder writes opset 21; 17 is enough for every operator here and loads on older runtimes.
OPSET = 17
IR_VERSION = 8
MS_DOMAIN = "com.microsoft"

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


class _Graph:
    """Nodes and initializers with deterministic, unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name=name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int | list[str] = 1,
           domain: str = "", **attrs: Any) -> list[str]:
        self._count += 1
        name = f"/{hint}/{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain or None, **attrs))
        return names


def _rope_caches(config: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position_embeddings, head_dim / 2], computed in float32 exactly as the
    Optimum graph computes its angles (position * inv_freq), so both layouts rotate alike."""
    half = config.head_dim // 2
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / config.head_dim))
                ).astype(np.float32)
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)[:, None]
    angles = positions * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def check_config(config: DecoderConfig) -> None:
    """Raises ValueError when `config` cannot be written in this layout."""
    if config.arch != "llama":
        raise ValueError("the gqa layout is written for the llama architecture (RoPE + GQA) only")
    if config.kv_dtype != "float32":
        raise ValueError("the gqa layout is written in float32 (use --precision int4 for a smaller model)")
    if config.head_dim % 16:
        raise ValueError("GroupQueryAttention's rotary needs head_dim to be a multiple of 16")


def build_genai_graph(config: DecoderConfig, seed: int = 0) -> onnx.ModelProto:
    """The GenAI-layout ONNX model of `config` (arch llama, float32) with the seed's weights."""
    check_config(config)
    weights = dict(draw_weights(config, seed))
    g = _Graph()
    n_heads, n_kv, d = config.num_attention_heads, config.num_kv_heads, config.head_dim
    eps = config.norm_eps

    g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    cos, sin = _rope_caches(config)
    g.weight("cos_cache", cos)
    g.weight("sin_cache", sin)
    one = g.weight("/model/constants/INT64/[1]", np.array([1], dtype=np.int64))
    one_scalar = g.weight("/model/constants/INT64/1", np.array(1, dtype=np.int64))

    # Per-row lengths for GroupQueryAttention, from the mask: the KV cache is right-padded.
    mask_sum = g.op("ReduceSum", ["attention_mask", one], "model/attn_mask", keepdims=0)[0]
    seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, one], "model/attn_mask")[0]], "model/attn_mask",
                     to=TensorProto.INT32)[0]
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], "model/attn_mask")[0], one_scalar],
                 "model/attn_mask", axis=0)[0]
    total_length = g.op("Cast", [total], "model/attn_mask", to=TensorProto.INT32)[0]

    x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "model/embed_tokens", axis=0)[0]
    residual = x
    normed = g.op("SimplifiedLayerNormalization", [x, g.weight("model.layers.0.input_layernorm.weight",
                                                               weights["model.layers.0.input_layernorm.weight"])],
                  "model/layers.0/input_layernorm", axis=-1, epsilon=eps, stash_type=1)[0]
    for i in range(config.num_layers):
        p, hint = f"model.layers.{i}", f"model/layers.{i}"
        qkv_weight = np.concatenate([weights[f"{p}.self_attn.{k}_proj.weight"] for k in ("q", "k", "v")], axis=1)
        qkv = g.op("MatMul", [normed, g.weight(f"{p}.attn.qkv_proj.weight", qkv_weight)], f"{hint}/attn/qkv_proj")[0]
        attention = g.op(
            "GroupQueryAttention",
            [qkv, "", "", PAST_KEY % i, PAST_VALUE % i, seqlens_k, total_length, "cos_cache", "sin_cache"],
            f"{hint}/attn", outputs=[f"/{hint}/attn/GroupQueryAttention/output_0", PRESENT_KEY % i,
                                     PRESENT_VALUE % i],
            domain=MS_DOMAIN, num_heads=n_heads, kv_num_heads=n_kv, scale=1.0 / math.sqrt(d),
            local_window_size=-1, do_rotary=1, rotary_interleaved=0,
        )[0]
        o_weight = g.weight(f"{p}.self_attn.o_proj.weight", weights[f"{p}.self_attn.o_proj.weight"])
        attn_out = g.op("MatMul", [attention, o_weight], f"{hint}/attn/o_proj")[0]
        post_norm = g.weight(f"{p}.post_attention_layernorm.weight", weights[f"{p}.post_attention_layernorm.weight"])
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, post_norm],
                                      f"{hint}/post_attention_layernorm", outputs=4, domain=MS_DOMAIN,
                                      epsilon=eps)
        gate = g.op("MatMul", [normed, g.weight(f"{p}.mlp.gate_proj.weight", weights[f"{p}.mlp.gate_proj.weight"])],
                    f"{hint}/mlp/gate_proj")[0]
        up = g.op("MatMul", [normed, g.weight(f"{p}.mlp.up_proj.weight", weights[f"{p}.mlp.up_proj.weight"])],
                  f"{hint}/mlp/up_proj")[0]
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{hint}/mlp/act_fn")[0]], f"{hint}/mlp/act_fn")[0]
        down_weight = g.weight(f"{p}.mlp.down_proj.weight", weights[f"{p}.mlp.down_proj.weight"])
        mlp_out = g.op("MatMul", [g.op("Mul", [silu, up], f"{hint}/mlp")[0], down_weight], f"{hint}/mlp/down_proj")[0]
        last = i == config.num_layers - 1
        norm_name = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        norm_hint = "model/layers.final_norm_layernorm" if last else f"model/layers.{i + 1}/input_layernorm"
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                      [mlp_out, residual, g.weight(norm_name, weights[norm_name])],
                                      norm_hint, outputs=4, domain=MS_DOMAIN, epsilon=eps)
    g.op("MatMul", [normed, g.weight("lm_head.MatMul.weight", weights["lm_head.weight"])], "lm_head",
         outputs=["logits"])

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", config.vocab_size])]
    for pattern, target, length in ((PAST_KEY, inputs, "past_sequence_length"),
                                    (PAST_VALUE, inputs, "past_sequence_length"),
                                    (PRESENT_KEY, outputs, "total_sequence_length"),
                                    (PRESENT_VALUE, outputs, "total_sequence_length")):
        for i in range(config.num_layers):
            target.append(helper.make_tensor_value_info(pattern % i, TensorProto.FLOAT,
                                                        ["batch_size", n_kv, length, d]))
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, initializer=g.initializers)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="llmsuite-builder", ir_version=IR_VERSION,
    )


def genai_config(config: DecoderConfig) -> dict[str, Any]:
    """genai_config.json with the keys onnxruntime-genai's model builder writes for a decoder."""
    return {
        "model": {
            "bos_token_id": BOS_ID,
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_layers,
                "num_key_value_heads": config.num_kv_heads,
            },
            "eos_token_id": [EOS_ID, END_OF_TURN_ID],
            "pad_token_id": PAD_ID,
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": config.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def save_model(model: onnx.ModelProto, out_dir: Path, external_data_file: str) -> None:
    """Writes `model` with its weights in `external_data_file` beside it, as both builders do."""
    onnx.save_model(model, out_dir / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_data_file, size_threshold=1024)
    # onnx creates the side file owner-only; give it the same mode as model.onnx.
    (out_dir / external_data_file).chmod((out_dir / MODEL_FILE).stat().st_mode & 0o777)


def write_config(out_dir: Path, config: DecoderConfig) -> None:
    (out_dir / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(config), indent=4) + "\n", encoding="utf-8")
