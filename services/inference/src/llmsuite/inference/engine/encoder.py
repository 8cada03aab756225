"""Embedding exports behind onnxruntime: layout detection, pooling settings, batched forwards.

An Optimum `feature-extraction` export (BERT, E5, BGE, GTE and friends; also a decoder
exported without KV cache, as E5-mistral or GTE-Qwen are) takes `input_ids`,
`attention_mask` and, where the architecture has them, `token_type_ids` / `position_ids`,
and returns the token states `last_hidden_state` [batch, sequence, hidden] (or
`token_embeddings`), sometimes a pooled `sentence_embedding` [batch, hidden] too. Such a
directory is an embedding model; an export with `past_key_values.*` inputs is a decoder
for generation (onnx_model.py).

How token states become one vector comes from the model directory, as sentence-transformers
reads it: `modules.json` lists a Pooling module (its `config.json` says CLS, mean or
last-token) and optionally a Normalize module (L2). The operator may override both
(`--pooling NAME=MODE[:normalize|:no-normalize]`). Without those files an encoder pools its
first token (CLS, as BERT-style models are trained) and a causal architecture its last
token; both normalise. Modules the ONNX graph does not contain (a Dense projection) make
the model refuse to load instead of returning vectors its authors never meant.

Pooling runs in numpy on the host, over right-padded rows: padded positions are masked out
of attention by the graph and out of the pooling here, so a row's vector does not depend on
what it was batched with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llmsuite.inference.engine.device import Placement, create_session
from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.layouts import detect_model
from llmsuite.inference.engine.types import EngineSettings

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
MODULES_FILE = "modules.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

POOLING_MODES = ("cls", "mean", "last")
# Outputs with one state per token, in order of preference, then already-pooled outputs.
_TOKEN_STATE_OUTPUTS = ("last_hidden_state", "token_embeddings")
_POOLED_OUTPUTS = ("sentence_embedding",)
_KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
# Architectures whose attention is causal: only the last token has seen the whole input.
_CAUSAL_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2",
                                 "gpt_neox", "falcon", "mixtral", "stablelm"})
# RoBERTa-family position tables reserve the first pad_token_id + 1 rows.
_OFFSET_POSITION_MODEL_TYPES = frozenset({"roberta", "xlm-roberta", "camembert"})
# Tokenizers without a real limit write a huge model_max_length (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 10**6
NORMALIZE_EPS = 1e-12  # as torch.nn.functional.normalize


def is_embedding_export(directory: Path) -> bool:
    """True when `directory` holds an encoder: no KV inputs, token states or a pooled vector out.

    The rule is layouts.detect_model's, the one place that classifies a model path (it reads
    only the graph's declared inputs and outputs, never the external weights).
    """
    try:
        return detect_model(Path(directory)).kind == "encoder"
    except ModelLoadError:
        return False  # the decoder loader explains what is missing


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector."""

    mode: str  # one of POOLING_MODES
    normalize: bool


@dataclass(frozen=True)
class PoolingOverride:
    """`--pooling NAME=MODE[:normalize|:no-normalize]`: what the operator says instead of the model files."""

    mode: str
    normalize: bool | None = None

    @classmethod
    def parse(cls, text: str) -> PoolingOverride:
        mode, _, flag = text.strip().lower().partition(":")
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling mode must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
        if flag not in ("", "normalize", "no-normalize"):
            raise ValueError(f"after the pooling mode expected :normalize or :no-normalize, got {flag!r}")
        return cls(mode, None if not flag else flag == "normalize")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _pooling_from_module_config(path: Path) -> str:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    chosen = [mode for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                                     ("pooling_mode_lasttoken", "last")) if config.get(key)]
    unsupported = [key for key in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                   "pooling_mode_weightedmean_tokens") if config.get(key)]
    if unsupported or len(chosen) != 1:
        raise ModelLoadError(
            f"{path} asks for pooling {sorted(unsupported) or chosen or 'none'}; this server pools with exactly one "
            f"of {', '.join(POOLING_MODES)} (override with --pooling NAME=MODE)")
    return chosen[0]


def read_pooling(directory: Path, *, causal: bool, override: PoolingOverride | None) -> Pooling:
    """Pooling from sentence-transformers' modules.json, the architecture's default, or the override."""
    mode = "last" if causal else "cls"
    normalize = True
    modules_path = directory / MODULES_FILE
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise ModelLoadError(f"{modules_path} must hold a JSON list of modules")
        normalize = False
        for module in modules:
            kind = str(module.get("type", "")) if isinstance(module, dict) else ""
            short = kind.rsplit(".", 1)[-1]
            if short == "Pooling":
                if override is None:
                    mode = _pooling_from_module_config(directory / str(module.get("path", "")) / CONFIG_FILE)
            elif short == "Normalize":
                normalize = True
            elif short not in ("Transformer", "Pooling", "Normalize") and override is None:
                raise ModelLoadError(
                    f"{modules_path} lists a {kind or 'typeless'} module, which the ONNX export does not contain; "
                    "its vectors would not be the model's (override with --pooling NAME=MODE to serve the "
                    "token states pooled anyway)")
    if override is not None:
        mode = override.mode
        normalize = normalize if override.normalize is None else override.normalize
    return Pooling(mode, normalize)


@dataclass(frozen=True)
class EncoderConfig:
    """What config.json (and the tokenizer's limit) say about an embedding export."""

    architecture: str
    context_length: int
    vocab_size: int
    num_layers: int
    num_attention_heads: int
    pad_token_id: int
    causal: bool

    @classmethod
    def read(cls, directory: Path) -> EncoderConfig:
        config = _read_json(directory / CONFIG_FILE)
        if not isinstance(config, dict):
            raise ModelLoadError(f"{directory / CONFIG_FILE} must hold a JSON object")

        def integer(*keys: str) -> int | None:
            for key in keys:
                value = config.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            return None

        architectures = config.get("architectures") or []
        model_type = str(config.get("model_type") or (architectures[0] if architectures else "unknown"))
        pad = integer("pad_token_id") or 0
        context = integer("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
        if context is not None and model_type in _OFFSET_POSITION_MODEL_TYPES:
            context -= pad + 1
        tokenizer_config = directory / TOKENIZER_CONFIG_FILE
        if tokenizer_config.is_file():
            limit = _read_json(tokenizer_config).get("model_max_length")
            if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
                context = limit if context is None else min(context, limit)
        if context is None or context < 1:
            raise ModelLoadError(f"{directory}: neither config.json nor tokenizer_config.json names a maximum length")
        vocab = integer("vocab_size")
        if vocab is None:
            raise ModelLoadError(f"{directory / CONFIG_FILE} names no vocab_size")
        causal = bool(config.get("is_decoder")) or model_type in _CAUSAL_MODEL_TYPES
        return cls(model_type, context, vocab, integer("num_hidden_layers", "n_layer", "num_layers") or 0,
                   integer("num_attention_heads", "n_head") or 0, pad, causal)


@dataclass(frozen=True)
class EncoderSignature:
    """The export's inputs and the output vectors come from, as onnxruntime reports them."""

    input_names: tuple[str, ...]
    input_dtypes: tuple[Any, ...]
    output: str
    pooled_output: bool  # the output is already one vector per row
    dimensions: int

    @classmethod
    def from_session(cls, session: ort.InferenceSession, where: Path, hidden_size: int | None) -> EncoderSignature:
        inputs = {node.name: node for node in session.get_inputs()}
        outputs = {node.name: node for node in session.get_outputs()}
        unknown = sorted(set(inputs) - set(_KNOWN_INPUTS))
        if unknown or "input_ids" not in inputs:
            raise ModelLoadError(f"{where}: an embedding export takes {', '.join(_KNOWN_INPUTS)} (input_ids "
                                 f"required); this one has {sorted(inputs)}")
        dtypes = []
        for name in inputs:
            if inputs[name].type not in _INT_TYPES:
                raise ModelLoadError(f"{where}: input {name} has type {inputs[name].type}; expected int64 or int32")
            dtypes.append(_INT_TYPES[inputs[name].type])
        token_states = [name for name in _TOKEN_STATE_OUTPUTS if name in outputs]
        pooled = [name for name in _POOLED_OUTPUTS if name in outputs]
        output = (token_states or pooled)[0]
        node = outputs[output]
        if node.type != "tensor(float)":
            raise ModelLoadError(f"{where}: output {output} has type {node.type}; expected float32")
        width = node.shape[-1] if node.shape and isinstance(node.shape[-1], int) else hidden_size
        if not width:
            raise ModelLoadError(f"{where}: cannot tell the vector length from {output} or config.json")
        return cls(tuple(inputs), tuple(dtypes), output, not token_states, int(width))


def pool(states: np.ndarray, lengths: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Token states [rows, sequence, hidden] of right-padded rows -> float32 vectors [rows, hidden]."""
    if pooling.mode == "cls":
        vectors = states[:, 0, :]
    elif pooling.mode == "last":
        vectors = states[np.arange(states.shape[0]), lengths - 1, :]
    else:
        mask = (np.arange(states.shape[1])[None, :] < lengths[:, None]).astype(states.dtype)
        vectors = (states * mask[:, :, None]).sum(axis=1) / np.maximum(lengths, 1)[:, None].astype(states.dtype)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, NORMALIZE_EPS), dtype=np.float32)


class OnnxEncoder:
    """Runs batched forwards of an embedding export; call from one thread at a time."""

    def __init__(self, session: ort.InferenceSession, placement: Placement, signature: EncoderSignature,
                 config: EncoderConfig, pooling: Pooling, directory: Path) -> None:
        self.session = session
        self.placement = placement
        self.signature = signature
        self.config = config
        self.pooling = pooling
        self.directory = directory

    @classmethod
    def load(cls, directory: Path, settings: EngineSettings, override: PoolingOverride | None = None) -> OnnxEncoder:
        directory = Path(directory)
        config = EncoderConfig.read(directory)
        pooling = read_pooling(directory, causal=config.causal, override=override)
        session, placement = create_session(directory / MODEL_FILE, settings)
        hidden = _read_json(directory / CONFIG_FILE).get("hidden_size")
        signature = EncoderSignature.from_session(session, directory, hidden if isinstance(hidden, int) else None)
        return cls(session, placement, signature, config, pooling, directory)

    @property
    def dimensions(self) -> int:
        return self.signature.dimensions

    def feeds(self, rows: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Right-padded inputs for `rows` of ids, and the rows' lengths."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        ids = np.full((len(rows), width), self.config.pad_token_id, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                  "position_ids": np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape)}
        feeds = {name: np.ascontiguousarray(values[name], dtype=dtype)
                 for name, dtype in zip(self.signature.input_names, self.signature.input_dtypes, strict=True)}
        return feeds, lengths

    def embed(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """One forward over `rows` (token id arrays): pooled and, if the model says so, normalised
        float32 vectors [rows, dimensions]."""
        feeds, lengths = self.feeds(rows)
        (states,) = self.session.run([self.signature.output], feeds)
        states = np.asarray(states, dtype=np.float32)
        vectors = states if self.signature.pooled_output else pool(states, lengths, self.pooling)
        return normalized(vectors) if self.pooling.normalize else vectors
