"""Test support for the model layouts: the reference greedy loop and the layout fixtures' builds.

`reference_greedy` is a plain onnxruntime loop written here, independent of the engine: one
row, the KV cache fed back as it grows, attention_mask all ones, position_ids (when the graph
takes them) counting from 0. Every served layout must reproduce its tokens exactly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from support import REPO

SHARED_GENAI_EXPORTS = REPO.parent / "shared" / "genai-exports"


def reference_greedy(model_file: Path, prompt: Sequence[int], new_tokens: int,
                     provider: str = "CPUExecutionProvider") -> list[int]:
    """Greedy tokens of `model_file` (an ONNX file with Optimum/GenAI KV names) after `prompt`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model_file = Path(model_file)
    session = ort.InferenceSession(str(model_file), options, providers=[provider])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    kv_heads = inputs["past_key_values.0.key"].shape[1]
    head_dim = _head_dim(model_file, inputs["past_key_values.0.key"].shape)
    kv_dtype = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32
    present_index = {name: i for i, name in enumerate(outputs)}
    past: dict[str, np.ndarray] = {}
    sequence, generated = list(prompt), []
    feed_ids = list(prompt)
    while len(generated) < new_tokens:
        done = len(sequence) - len(feed_ids)
        feed = {
            "input_ids": np.asarray([feed_ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(sequence)), dtype=np.int64),
        }
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(done, len(sequence), dtype=np.int64).reshape(1, -1)
        for layer in range(layers):
            for part in ("key", "value"):
                name = f"past_key_values.{layer}.{part}"
                if name not in past:
                    past[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=kv_dtype)
                feed[name] = past[name]
        results = session.run(None, feed)
        for layer in range(layers):
            for part in ("key", "value"):
                past[f"past_key_values.{layer}.{part}"] = results[present_index[f"present.{layer}.{part}"]]
        token = int(np.argmax(results[present_index["logits"]][0, -1]))
        generated.append(token)
        sequence.append(token)
        feed_ids = [token]
    return generated


def _head_dim(model_file: Path, past_shape: Sequence[object]) -> int:
    if isinstance(past_shape[3], int):
        return past_shape[3]
    # Symbolic in GenAI exports: genai_config.json beside the file says it.
    config = json.loads((model_file.parent / "genai_config.json").read_text())
    return int(config["model"]["decoder"]["head_size"])


def transformers_js_repository(optimum_dir: Path, quantized_file: Path, target: Path) -> Path:
    """Lays out an Optimum model the way transformers.js-style repositories do: config and
    tokenizer at the top, `onnx/model.onnx` and a quantized `onnx/model_q4.onnx` below."""
    (target / "onnx").mkdir(parents=True)
    for item in optimum_dir.iterdir():
        if item.name.startswith("model.onnx"):
            shutil.copy(item, target / "onnx" / item.name)
        else:
            shutil.copy(item, target / item.name)
    shutil.copy(quantized_file, target / "onnx" / "model_q4.onnx")
    return target
