"""Builds small deterministic decoder-only models in the Hugging Face Optimum ONNX layout.

The output directory looks exactly like `optimum-cli export onnx --task
text-generation-with-past` output (`model.onnx`, `config.json`, `generation_config.json`,
tokenizer files), so the inference engine treats it as just another export. Weights are
seeded random numbers: the models are for tests and benchmarks, not for reading.

Two architectures share one graph writer:

* `llama` (the default, and the harder path for the engine): RoPE driven by a
  `position_ids` input, grouped-query attention, RMSNorm, SwiGLU, untied lm_head.
* `gpt2`: learned absolute positions computed inside the graph from the attention
  mask (cumsum, as Optimum's GPT-2 export does), multi-head attention, LayerNorm,
  tanh-GELU, lm_head tied to the token embedding, and no `position_ids` input.

Only numpy and onnx are used: no torch, nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmsuite.builder.tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID, build_tokenizer

Architecture = Literal["llama", "gpt2"]
ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2")

OPSET = 17
# IR 8 is the oldest IR that carries opset 17; older onnxruntime releases refuse newer IRs.
IR_VERSION = 8
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"  # the name Optimum gives it
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OUTPUT_FILES = (MODEL_FILE, EXTERNAL_DATA_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES)

# Symbolic dimension names as Optimum writes them.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "past_sequence_length + sequence_length"

# Score for masked attention positions. Finite (not -inf) so a fully masked row (a left
# padding query) softmaxes to a harmless uniform row instead of NaN.
MASKED_SCORE = -1.0e9


@dataclass(frozen=True)
class DecoderConfig:
    """Everything that fixes a model's graph and weight shapes (the seed fixes the values)."""

    arch: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    kv_dtype: Literal["float32", "float16"] = "float32"
    # Weights in a side file `model.onnx_data`, the layout Optimum uses for large models.
    external_data: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_kv_heads")
        if self.arch == "gpt2" and self.num_kv_heads != self.num_attention_heads:
            raise ValueError("gpt2 uses multi-head attention: num_kv_heads must equal num_attention_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE rotates pairs)")
        if self.kv_dtype not in ("float32", "float16"):
            raise ValueError(f"kv_dtype must be float32 or float16, got {self.kv_dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Sizes shared by both architectures; gpt2 forces num_kv_heads = num_attention_heads.
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough that a test session builds several in well under a second each.
    "tiny": dict(
        vocab_size=1024, hidden_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2,
        intermediate_size=256, max_position_embeddings=512,
    ),
    # About 100M parameters: large enough that decode is bound by weights, not overhead.
    "bench": dict(
        vocab_size=16384, hidden_size=768, num_layers=12, num_attention_heads=12, num_kv_heads=4,
        intermediate_size=2048, max_position_embeddings=2048, external_data=True,
    ),
}


def decoder_config(preset: str = "tiny", arch: Architecture = "llama", **overrides: Any) -> DecoderConfig:
    """Returns the config of `preset` for `arch`, with `overrides` (DecoderConfig fields) applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DecoderConfig)}
    if unknown:
        raise TypeError(f"unknown model overrides: {sorted(unknown)}")
    fields = {**PRESETS[preset], **overrides, "arch": arch}
    if arch == "gpt2" and "num_kv_heads" not in overrides:
        fields["num_kv_heads"] = fields["num_attention_heads"]
    return DecoderConfig(**fields)


# --------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class WeightSpec:
    """One initializer: its name, shape and how its random values are drawn."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0


# Init scales. Linear layers keep activations at unit scale (std = gain / sqrt(fan_in));
# the lm_head gain spreads the logits far enough apart that greedy decoding has clear
# margins between the top two tokens, so cache / no-cache comparisons never flip on
# float rounding. Norm weights get a jitter so they are not silently the identity.
_LINEAR_GAIN = 1.0
# GPT-2's attention has no RoPE to tell positions apart; a stronger gain makes its layers
# nonlinear enough that greedy output does not settle into repeating one token.
_GPT2_LINEAR_GAIN = 2.0
_LM_HEAD_GAIN = 6.0
_NORM_JITTER = 0.1
_BIAS_STD = 0.05
_EMBEDDING_STD = 1.0
# Small next to the unit-scale layer outputs: with tied embeddings a large token
# embedding makes every token its own best continuation and greedy output repeats.
_GPT2_EMBEDDING_STD = 0.1


def _linear(name: str, fan_in: int, fan_out: int, gain: float) -> WeightSpec:
    # Stored [in, out] so the graph uses a plain MatMul.
    return WeightSpec(name, (fan_in, fan_out), gain / math.sqrt(fan_in))


def _norm(name: str, size: int, gain: float = 1.0) -> WeightSpec:
    return WeightSpec(name, (size,), _NORM_JITTER * gain, mean=gain)


def _bias(name: str, size: int) -> WeightSpec:
    return WeightSpec(name, (size,), _BIAS_STD)


def weight_plan(config: DecoderConfig) -> list[WeightSpec]:
    """Lists every initializer of the model, in the order they are drawn from the seed."""
    h, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
    specs: list[WeightSpec] = []
    if config.arch == "llama":
        specs.append(WeightSpec("model.embed_tokens.weight", (config.vocab_size, h), _EMBEDDING_STD))
        for i in range(config.num_layers):
            p = f"model.layers.{i}"
            specs += [
                _norm(f"{p}.input_layernorm.weight", h),
                _linear(f"{p}.self_attn.q_proj.weight", h, h, _LINEAR_GAIN),
                _linear(f"{p}.self_attn.k_proj.weight", h, kv_width, _LINEAR_GAIN),
                _linear(f"{p}.self_attn.v_proj.weight", h, kv_width, _LINEAR_GAIN),
                _linear(f"{p}.self_attn.o_proj.weight", h, h, _LINEAR_GAIN),
                _norm(f"{p}.post_attention_layernorm.weight", h),
                _linear(f"{p}.mlp.gate_proj.weight", h, config.intermediate_size, _LINEAR_GAIN),
                _linear(f"{p}.mlp.up_proj.weight", h, config.intermediate_size, _LINEAR_GAIN),
                _linear(f"{p}.mlp.down_proj.weight", config.intermediate_size, h, _LINEAR_GAIN),
            ]
        specs.append(_norm("model.norm.weight", h))
        specs.append(_linear("lm_head.weight", h, config.vocab_size, gain=_LM_HEAD_GAIN))
        return specs

    specs.append(WeightSpec("transformer.wte.weight", (config.vocab_size, h), _GPT2_EMBEDDING_STD))
    specs.append(WeightSpec("transformer.wpe.weight", (config.max_position_embeddings, h), _GPT2_EMBEDDING_STD))
    for i in range(config.num_layers):
        p = f"transformer.h.{i}"
        specs += [_norm(f"{p}.ln_1.weight", h), _bias(f"{p}.ln_1.bias", h)]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [_linear(f"{p}.attn.{proj}.weight", h, h, _GPT2_LINEAR_GAIN), _bias(f"{p}.attn.{proj}.bias", h)]
        specs += [_norm(f"{p}.ln_2.weight", h), _bias(f"{p}.ln_2.bias", h)]
        specs += [
            _linear(f"{p}.mlp.c_fc.weight", h, config.intermediate_size, _GPT2_LINEAR_GAIN),
            _bias(f"{p}.mlp.c_fc.bias", config.intermediate_size),
            _linear(f"{p}.mlp.c_proj.weight", config.intermediate_size, h, _GPT2_LINEAR_GAIN),
            _bias(f"{p}.mlp.c_proj.bias", h),
        ]
    # The tied head is the small embedding matrix; the final-norm gain restores the
    # logit spread the untied llama head gets from _LM_HEAD_GAIN.
    final_gain = _LM_HEAD_GAIN / (_GPT2_EMBEDDING_STD * math.sqrt(h))
    specs += [_norm("transformer.ln_f.weight", h, gain=final_gain), _bias("transformer.ln_f.bias", h)]
    return specs


def parameter_count(config: DecoderConfig) -> int:
    """Number of trainable parameters (tied lm_head counted once), without building anything."""
    return sum(math.prod(spec.shape) for spec in weight_plan(config))


def draw_weights(config: DecoderConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.Generator(np.random.PCG64(seed))
    for spec in weight_plan(config):
        values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(spec.std)
        yield spec.name, values + np.float32(spec.mean)


# --------------------------------------------------------------------------------------
# Graph writing


class _GraphWriter:
    """Collects nodes and initializers; every name it hands out is unique and deterministic."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: dict[str, int] = {}
        self._constants: dict[tuple[str, str, bytes], str] = {}

    def _unique(self, hint: str) -> str:
        count = self._used.get(hint, 0)
        self._used[hint] = count + 1
        return hint if count == 0 else f"{hint}_{count}"

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name=self._unique(name)))
        return self.initializers[-1].name

    def constant(self, hint: str, values: Any, dtype: Any = np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (hint, array.dtype.str, array.tobytes() + str(array.shape).encode())
        if key not in self._constants:
            self._constants[key] = self.initializer(f"const/{hint}", array)
        return self._constants[key]

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        return self.op_multi(op_type, inputs, hint, 1, **attrs)[0]

    def op_multi(self, op_type: str, inputs: list[str], hint: str, n_outputs: int, **attrs: Any) -> list[str]:
        node_name = self._unique(f"{hint}/{op_type}")
        outputs = [f"{node_name}_output_{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs

    def matmul(self, x: str, weight: str, hint: str, bias: str | None = None) -> str:
        y = self.op("MatMul", [x, weight], hint)
        return self.op("Add", [y, bias], hint) if bias else y


@dataclass
class _SharedTensors:
    """Per-forward tensors every layer uses: the attention mask and the position encoding."""

    allowed: str  # bool [batch, 1, 1, seq, past+seq]: causal AND not padding
    rope_cos: str | None = None  # [batch, 1, seq, head_dim]
    rope_sin: str | None = None


def _write_attention_mask(g: _GraphWriter) -> tuple[_SharedTensors, str, str]:
    """Causal + padding mask for queries at absolute positions past..past+seq-1.

    Returns the shared tensors plus the 1-D tensors [past_length] and [total_length],
    which the GPT-2 position computation reuses.
    """
    seq_len = g.op("Shape", ["input_ids"], "mask", start=1, end=2)
    total_len = g.op("Shape", ["attention_mask"], "mask", start=1, end=2)
    past_len = g.op("Sub", [total_len, seq_len], "mask")
    zero, one = g.constant("zero", 0), g.constant("one", 1)
    past_scalar = g.op("Squeeze", [past_len], "mask")
    total_scalar = g.op("Squeeze", [total_len], "mask")
    key_positions = g.op("Range", [zero, total_scalar, one], "mask")  # [total]
    query_positions = g.op("Range", [past_scalar, total_scalar, one], "mask")  # [seq]
    causal = g.op(
        "LessOrEqual",
        [
            g.op("Unsqueeze", [key_positions, g.constant("axes_0", [0])], "mask"),
            g.op("Unsqueeze", [query_positions, g.constant("axes_1", [1])], "mask"),
        ],
        "mask",
    )  # [seq, total]
    not_padding = g.op(
        "Unsqueeze",
        [g.op("Cast", ["attention_mask"], "mask", to=TensorProto.BOOL), g.constant("axes_123", [1, 2, 3])],
        "mask",
    )  # [batch, 1, 1, 1, total]
    allowed = g.op("And", [not_padding, causal], "mask")
    return _SharedTensors(allowed=allowed), past_len, total_len


def _write_rope_tables(g: _GraphWriter, config: DecoderConfig, shared: _SharedTensors) -> None:
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / config.head_dim))
    inv_freq_name = g.constant("rope_inv_freq", inv_freq, dtype=np.float32)
    positions = g.op("Cast", ["position_ids"], "rope", to=TensorProto.FLOAT)
    positions = g.op("Unsqueeze", [positions, g.constant("axes_last", [-1])], "rope")  # [b, s, 1]
    freqs = g.op("Mul", [positions, inv_freq_name], "rope")  # [b, s, half]
    angles = g.op("Concat", [freqs, freqs], "rope", axis=-1)  # [b, s, head_dim]
    axes_1 = g.constant("axes_1", [1])
    shared.rope_cos = g.op("Unsqueeze", [g.op("Cos", [angles], "rope"), axes_1], "rope")
    shared.rope_sin = g.op("Unsqueeze", [g.op("Sin", [angles], "rope"), axes_1], "rope")


def _apply_rope(g: _GraphWriter, x: str, shared: _SharedTensors, head_dim: int, hint: str) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1) (the HF Llama form)."""
    assert shared.rope_cos and shared.rope_sin
    halves = g.constant("rope_split", [head_dim // 2, head_dim // 2])
    x1, x2 = g.op_multi("Split", [x, halves], hint, 2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2], hint), x1], hint, axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, shared.rope_cos], hint), g.op("Mul", [rotated, shared.rope_sin], hint)],
        hint,
    )


def _rms_norm(g: _GraphWriter, x: str, weight: str, eps: float, hint: str) -> str:
    mean_square = g.op("ReduceMean", [g.op("Mul", [x, x], hint)], hint, axes=[-1], keepdims=1)
    denominator = g.op("Sqrt", [g.op("Add", [mean_square, g.constant("eps", eps, np.float32)], hint)], hint)
    return g.op("Mul", [g.op("Div", [x, denominator], hint), weight], hint)


def _layer_norm(g: _GraphWriter, x: str, weight: str, bias: str, eps: float, hint: str) -> str:
    return g.op("LayerNormalization", [x, weight, bias], hint, axis=-1, epsilon=eps)


def _attention(
    g: _GraphWriter,
    config: DecoderConfig,
    layer: int,
    x: str,
    shared: _SharedTensors,
    weights: dict[str, str],
) -> tuple[str, str, str]:
    """Self-attention over [past ; new]; returns (output, present_key, present_value).

    Grouped-query attention without copying keys: queries are viewed as
    [b, kv_heads, group, s, d] and keys as [b, kv_heads, 1, d, t], so MatMul broadcasts
    each KV head over its group. Head h uses KV head h // group, as HF's repeat_kv does.
    """
    hint = f"layers.{layer}.attn"
    n_heads, n_kv, d = config.num_attention_heads, config.num_kv_heads, config.head_dim
    group = n_heads // n_kv
    kv_type = TensorProto.FLOAT16 if config.kv_dtype == "float16" else TensorProto.FLOAT

    def heads(projected: str, count: int) -> str:  # [b, s, count*d] -> [b, count, s, d]
        split = g.op("Reshape", [projected, g.constant(f"heads_{count}", [0, 0, count, d])], hint)
        return g.op("Transpose", [split], hint, perm=[0, 2, 1, 3])

    q = heads(g.matmul(x, weights["q"], hint, weights.get("q_bias")), n_heads)
    k = heads(g.matmul(x, weights["k"], hint, weights.get("k_bias")), n_kv)
    v = heads(g.matmul(x, weights["v"], hint, weights.get("v_bias")), n_kv)
    if shared.rope_cos:
        q = _apply_rope(g, q, shared, d, hint)
        k = _apply_rope(g, k, shared, d, hint)

    present_key, present_value = f"present.{layer}.key", f"present.{layer}.value"
    for new, past, present in ((k, "key", present_key), (v, "value", present_value)):
        if kv_type != TensorProto.FLOAT:
            new = g.op("Cast", [new], hint, to=kv_type)
        g.nodes.append(
            helper.make_node(
                "Concat", [f"past_key_values.{layer}.{past}", new], [present], name=f"{hint}/{past}/Concat", axis=2
            )
        )
    keys, values = present_key, present_value
    if kv_type != TensorProto.FLOAT:
        keys = g.op("Cast", [keys], hint, to=TensorProto.FLOAT)
        values = g.op("Cast", [values], hint, to=TensorProto.FLOAT)

    scale = g.constant("attn_scale", 1.0 / math.sqrt(d), np.float32)
    grouped_q = g.op(
        "Reshape", [g.op("Mul", [q, scale], hint), g.constant(f"grouped_{n_kv}_{group}", [0, n_kv, group, -1, d])], hint
    )  # [b, kv, group, s, d]
    axes_2 = g.constant("axes_2", [2])
    keys_t = g.op("Transpose", [g.op("Unsqueeze", [keys, axes_2], hint)], hint, perm=[0, 1, 2, 4, 3])
    scores = g.op("MatMul", [grouped_q, keys_t], hint)  # [b, kv, group, s, t]
    scores = g.op("Where", [shared.allowed, scores, g.constant("masked_score", MASKED_SCORE, np.float32)], hint)
    probs = g.op("Softmax", [scores], hint, axis=-1)
    context = g.op("MatMul", [probs, g.op("Unsqueeze", [values, axes_2], hint)], hint)  # [b, kv, group, s, d]
    context = g.op("Reshape", [context, g.constant(f"ungrouped_{n_heads}", [0, n_heads, -1, d])], hint)
    context = g.op("Transpose", [context], hint, perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, g.constant("merge_heads", [0, 0, n_heads * d])], hint)
    return g.matmul(context, weights["o"], hint, weights.get("o_bias")), present_key, present_value


def _gelu_tanh(g: _GraphWriter, x: str, hint: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's "gelu_new" (Gelu op needs opset 20)."""
    cube = g.op("Mul", [g.op("Mul", [x, x], hint), x], hint)
    inner = g.op("Add", [x, g.op("Mul", [cube, g.constant("gelu_c", 0.044715, np.float32)], hint)], hint)
    inner = g.op("Mul", [inner, g.constant("gelu_k", math.sqrt(2.0 / math.pi), np.float32)], hint)
    one_plus = g.op("Add", [g.op("Tanh", [inner], hint), g.constant("one_f", 1.0, np.float32)], hint)
    return g.op("Mul", [g.op("Mul", [x, one_plus], hint), g.constant("half_f", 0.5, np.float32)], hint)


def _write_llama_body(g: _GraphWriter, config: DecoderConfig, shared: _SharedTensors) -> str:
    _write_rope_tables(g, config, shared)
    x = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embed", axis=0)
    eps = config.norm_eps
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        hint = f"layers.{i}"
        normed = _rms_norm(g, x, f"{p}.input_layernorm.weight", eps, hint)
        attn_weights = {key: f"{p}.self_attn.{key}_proj.weight" for key in ("q", "k", "v", "o")}
        attn_out, _, _ = _attention(g, config, i, normed, shared, attn_weights)
        x = g.op("Add", [x, attn_out], hint)
        normed = _rms_norm(g, x, f"{p}.post_attention_layernorm.weight", eps, hint)
        gate = g.matmul(normed, f"{p}.mlp.gate_proj.weight", hint)
        up = g.matmul(normed, f"{p}.mlp.up_proj.weight", hint)
        swiglu = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], hint)], hint), up], hint)
        x = g.op("Add", [x, g.matmul(swiglu, f"{p}.mlp.down_proj.weight", hint)], hint)
    x = _rms_norm(g, x, "model.norm.weight", eps, "final")
    return g.matmul(x, "lm_head.weight", "lm_head")


def _write_gpt2_body(g: _GraphWriter, config: DecoderConfig, shared: _SharedTensors, past_len: str,
                     total_len: str) -> str:
    # Position of each token = number of real tokens before it, so left padding does not
    # shift positions; padding slots get position 1 as HF does. Only the new tokens' slice
    # is looked up.
    cumulative = g.op("CumSum", ["attention_mask", g.constant("axis_1", 1)], "positions")
    positions = g.op("Sub", [cumulative, g.constant("one", 1)], "positions")
    is_padding = g.op("Equal", ["attention_mask", g.constant("zero", 0)], "positions")
    positions = g.op("Where", [is_padding, g.constant("one", 1), positions], "positions")
    positions = g.op("Slice", [positions, past_len, total_len, g.constant("axes_1", [1])], "positions")
    x = g.op(
        "Add",
        [
            g.op("Gather", ["transformer.wte.weight", "input_ids"], "embed", axis=0),
            g.op("Gather", ["transformer.wpe.weight", positions], "embed", axis=0),
        ],
        "embed",
    )
    eps = config.norm_eps
    for i in range(config.num_layers):
        p = f"transformer.h.{i}"
        hint = f"layers.{i}"
        normed = _layer_norm(g, x, f"{p}.ln_1.weight", f"{p}.ln_1.bias", eps, hint)
        attn_weights = {}
        for key, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            attn_weights[key] = f"{p}.attn.{proj}.weight"
            attn_weights[f"{key}_bias"] = f"{p}.attn.{proj}.bias"
        attn_out, _, _ = _attention(g, config, i, normed, shared, attn_weights)
        x = g.op("Add", [x, attn_out], hint)
        normed = _layer_norm(g, x, f"{p}.ln_2.weight", f"{p}.ln_2.bias", eps, hint)
        hidden = _gelu_tanh(g, g.matmul(normed, f"{p}.mlp.c_fc.weight", hint, f"{p}.mlp.c_fc.bias"), hint)
        x = g.op("Add", [x, g.matmul(hidden, f"{p}.mlp.c_proj.weight", hint, f"{p}.mlp.c_proj.bias")], hint)
    x = _layer_norm(g, x, "transformer.ln_f.weight", "transformer.ln_f.bias", eps, "final")
    # Tied head: logits = x @ wte^T. ORT folds the transpose once at session creation.
    tied_head = g.op("Transpose", ["transformer.wte.weight"], "lm_head", perm=[1, 0])
    return g.matmul(x, tied_head, "lm_head")


def build_graph(config: DecoderConfig, seed: int = 0) -> onnx.ModelProto:
    """Builds the ONNX model in memory: Optimum input/output names, order and symbolic dims."""
    g = _GraphWriter()
    for name, values in draw_weights(config, seed):
        g.initializer(name, values)
    shared, past_len, total_len = _write_attention_mask(g)
    if config.arch == "llama":
        logits = _write_llama_body(g, config, shared)
    else:
        logits = _write_gpt2_body(g, config, shared, past_len, total_len)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits/Identity"))

    kv_type = TensorProto.FLOAT16 if config.kv_dtype == "float16" else TensorProto.FLOAT
    kv_heads, head_dim = config.num_kv_heads, config.head_dim
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQUENCE]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL_SEQUENCE]),
    ]
    if config.arch == "llama":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, [BATCH, SEQUENCE]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, SEQUENCE, config.vocab_size])]
    for i in range(config.num_layers):
        for part in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{part}", kv_type, [BATCH, kv_heads, PAST_SEQUENCE, head_dim]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{part}", kv_type, [BATCH, kv_heads, TOTAL_SEQUENCE, head_dim]
                )
            )

    graph = helper.make_graph(g.nodes, f"llmsuite_{config.arch}", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="llmsuite-builder",
        ir_version=IR_VERSION,
    )
    if not config.external_data:
        # The checker serializes the whole model; skip it for the large external-data preset.
        onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------
# Config files


def hf_config(config: DecoderConfig) -> dict[str, Any]:
    """config.json in the keys transformers itself writes for the architecture."""
    common = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "vocab_size": config.vocab_size,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if config.arch == "llama":
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rope_theta": config.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": config.norm_eps,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
        }
    return {
        **common,
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": config.hidden_size,
        "n_inner": config.intermediate_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "n_positions": config.max_position_embeddings,
        "n_ctx": config.max_position_embeddings,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": True,
    }


def generation_config() -> dict[str, Any]:
    # Chat turns end with <|end|>, plain text with </s>: either stops generation.
    return {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID], "pad_token_id": PAD_ID}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Entry point


def build_model(
    out_dir: Path,
    *,
    preset: str = "tiny",
    arch: Architecture = "llama",
    seed: int = 0,
    force: bool = False,
    **overrides: Any,
) -> DecoderConfig:
    """Writes a complete model directory (ONNX, configs, tokenizer) and returns its config.

    The same arguments give byte-identical files. `overrides` are DecoderConfig fields
    (e.g. `num_layers=1`, `kv_dtype="float16"`). Refuses to write into a directory that
    already holds a model unless `force`, which first removes the files this builder owns.
    """
    config = decoder_config(preset, arch, **overrides)
    out_dir = Path(out_dir)
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds a model ({', '.join(existing)}); force replaces it")
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    # The tokenizer fixes the vocabulary; it refuses sizes it cannot fill exactly, so the
    # model's vocab_size always equals the tokenizer's.
    build_tokenizer(
        out_dir, vocab_size=config.vocab_size, seed=seed, model_max_length=config.max_position_embeddings
    )
    model = build_graph(config, seed)
    if config.external_data:
        onnx.save_model(
            model,
            out_dir / MODEL_FILE,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=1024,
        )
        # onnx creates the side file owner-only; give it the same mode as model.onnx.
        (out_dir / EXTERNAL_DATA_FILE).chmod((out_dir / MODEL_FILE).stat().st_mode & 0o777)
    else:
        onnx.save_model(model, out_dir / MODEL_FILE)
    _write_json(out_dir / CONFIG_FILE, hf_config(config))
    _write_json(out_dir / GENERATION_CONFIG_FILE, generation_config())
    return config
