"""The yardstick for `make bench`: greedy decoding written straight against onnxruntime.

Deliberately independent of llmsuite's engine (nothing from llmsuite.inference is
imported), so a bug or a slowdown there cannot move the reference too. Two loops over
one ONNX Runtime session, both with a KV cache kept where the provider produced it
(IOBinding, present outputs fed back as the next step's past):

* `greedy(session, [prompt], n)`: one sequence, the best a batch-1 server can do;
* `greedy(session, prompts, n)`: the same loop over a left-padded batch (pads get
  attention_mask 0, each row gets its own position_ids), the ceiling for this export
  layout when every row runs the whole way.

Every row runs exactly `new_tokens` steps (EOS ignored), as the benchmark's requests do.

Both layouts the inference service loads are read: an Optimum export (`model.onnx` and
`config.json`) and an ONNX Runtime GenAI folder (`genai_config.json` names the file, the KV
input and output names, the heads). Where the GenAI config says `past_present_share_buffer`,
the loop does what onnxruntime-genai does: one `[rows, kv_heads, max_length, head_dim]`
buffer per layer, bound as both past and present, written in place by GroupQueryAttention
(`attention_mask` is as wide as the tokens so far, which is how the op finds each row's
length); otherwise present is fed back as the next step's past.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32}
_OPTIMIZATION = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclass(frozen=True)
class ReferenceSession:
    """An ONNX Runtime session over an Optimum decoder export, and how to feed it."""

    session: ort.InferenceSession
    device_type: str  # "cpu" or "cuda", as IOBinding names it
    past_names: tuple[tuple[str, str], ...]
    present_names: tuple[tuple[str, str], ...]
    kv_heads: int
    head_dim: int
    kv_dtype: Any
    input_dtypes: dict[str, Any]
    share_buffer: bool = False  # GenAI's past_present_share_buffer: one max-length KV buffer per layer

    @classmethod
    def load(cls, model_dir: Path, *, intra_op_threads: int, inter_op_threads: int = 0,
             graph_optimization: str = "all", device: str = "cpu") -> ReferenceSession:
        """The session options mirror llmsuite-inference's flags of the same names."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = _OPTIMIZATION[graph_optimization]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        model_dir = Path(model_dir)
        genai_path = model_dir / "genai_config.json"
        genai = json.loads(genai_path.read_text())["model"] if genai_path.is_file() else None
        filename = genai["decoder"]["filename"] if genai else "model.onnx"
        session = ort.InferenceSession(str(model_dir / filename), sess_options=options, providers=providers)
        if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise RuntimeError("device cuda was asked for but onnxruntime fell back to the CPU")
        inputs = {i.name: i for i in session.get_inputs()}
        if genai:
            decoder = genai["decoder"]
            layers = range(decoder["num_hidden_layers"])
            past = tuple((decoder["inputs"]["past_key_names"] % i, decoder["inputs"]["past_value_names"] % i)
                         for i in layers)
            present = tuple((decoder["outputs"]["present_key_names"] % i, decoder["outputs"]["present_value_names"] % i)
                            for i in layers)
            kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
            search = json.loads(genai_path.read_text()).get("search", {})
            share = bool(search.get("past_present_share_buffer", False))
        else:
            by_layer: dict[int, dict[str, str]] = {}
            for name in inputs:
                if match := _PAST.match(name):
                    by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = name
            past = tuple((by_layer[i]["key"], by_layer[i]["value"]) for i in sorted(by_layer))
            present = tuple((k.replace("past_key_values", "present"), v.replace("past_key_values", "present"))
                            for k, v in past)
            config = json.loads((model_dir / "config.json").read_text())
            shape = inputs[past[0][0]].shape
            heads = config.get("num_attention_heads") or config.get("n_head")
            kv_heads = shape[1] if isinstance(shape[1], int) else config.get("num_key_value_heads") or heads
            head_dim = shape[3] if isinstance(shape[3], int) else \
                config.get("head_dim") or (config.get("hidden_size") or config["n_embd"]) // heads
            share = False
        return cls(session=session, device_type="cuda" if device == "cuda" else "cpu", past_names=past,
                   present_names=present, kv_heads=int(kv_heads), head_dim=int(head_dim),
                   kv_dtype=_DTYPES[inputs[past[0][0]].type],
                   input_dtypes={n: _DTYPES[i.type] for n, i in inputs.items() if n in
                                 ("input_ids", "attention_mask", "position_ids")},
                   share_buffer=share)


@dataclass(frozen=True)
class GreedyRun:
    """One greedy generation of a batch: its tokens and where the time went."""

    tokens: list[list[int]]  # per row, new_tokens ids
    prefill_s: float  # prompt forward, i.e. the time to every row's first token
    step_s: list[float]  # each later decode step (one token for every row)

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.step_s)

    @property
    def output_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)


def greedy(ref: ReferenceSession, prompts: Sequence[Sequence[int]], new_tokens: int) -> GreedyRun:
    """Greedy decoding of `prompts` as one left-padded batch, `new_tokens` tokens per row."""
    rows, width = len(prompts), max(len(p) for p in prompts)
    if any(len(p) != width for p in prompts) and not {"attention_mask", "position_ids"} <= set(ref.input_dtypes):
        # Without both inputs a padded row would see its pads, or positions shifted by them.
        raise ValueError("prompts of different lengths need an export with attention_mask and position_ids")
    ids = np.zeros((rows, width), dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = prompt
        mask[r, width - len(prompt):] = 1
    # Each row counts its own positions from its first real token; pads get 0 and are masked anyway.
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    past: list[Any]
    if ref.share_buffer:
        # Room for every token this run will hold; GroupQueryAttention writes each step's KV in place.
        full = (rows, ref.kv_heads, width + new_tokens, ref.head_dim)
        past = [ort.OrtValue.ortvalue_from_shape_and_type(full, ref.kv_dtype, ref.device_type)
                for _ in range(2 * len(ref.past_names))]
    else:
        past = [np.zeros((rows, ref.kv_heads, 0, ref.head_dim), dtype=ref.kv_dtype)] * (2 * len(ref.past_names))
    tokens: list[list[int]] = [[] for _ in range(rows)]
    step_s: list[float] = []
    prefill_s = 0.0
    for step in range(new_tokens):
        started = time.perf_counter()
        logits, past = _forward(ref, ids, mask, positions, past)
        chosen = np.argmax(logits, axis=-1)
        elapsed = time.perf_counter() - started
        if step == 0:
            prefill_s = elapsed
        else:
            step_s.append(elapsed)
        for r in range(rows):
            tokens[r].append(int(chosen[r]))
        ids = chosen.reshape(rows, 1).astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
    return GreedyRun(tokens=tokens, prefill_s=prefill_s, step_s=step_s)


def _forward(ref: ReferenceSession, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[Any]) -> tuple[np.ndarray, list[Any]]:
    binding = ref.session.io_binding()
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for name, dtype in ref.input_dtypes.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name], dtype=dtype))
    names = [name for pair in ref.past_names for name in pair]
    for name, tensor in zip(names, past, strict=True):
        if isinstance(tensor, np.ndarray):
            binding.bind_cpu_input(name, tensor)
        else:
            binding.bind_ortvalue_input(name, tensor)
    binding.bind_output("logits", "cpu")
    presents = [n for pair in ref.present_names for n in pair]
    for name, tensor in zip(presents, past, strict=True):
        if ref.share_buffer:
            binding.bind_ortvalue_output(name, tensor)  # the same buffer as past: written in place
        else:
            binding.bind_output(name, ref.device_type)
    ref.session.run_with_iobinding(binding)
    outputs = binding.get_outputs()
    return outputs[0].numpy()[:, -1, :], past if ref.share_buffer else list(outputs[1:])
