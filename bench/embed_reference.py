"""The in-process yardstick for the embeddings level of `make bench`.

The same encoder export and the same texts the gateway was sent, one request's texts at a
time: tokenized with Hugging Face `tokenizers` from the model's own tokenizer.json (batch
encode), right-padded into one forward of onnxruntime with the inference service's session
settings, pooled and normalised in numpy as the model's sentence-transformers files say.
Written straight against onnxruntime, never through llmsuite's engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


@dataclass(frozen=True)
class EmbedReference:
    requests: int
    texts: int
    tokens: int
    seconds: float

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"label": "in-process loop, one forward per request", "requests": self.requests, "texts": self.texts,
                "tokens": self.tokens, "seconds": round(self.seconds, 3), "texts_per_s": round(self.texts_per_s, 2)}


def _pooling(model_dir: Path) -> str:
    config = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    return "cls" if config.get("pooling_mode_cls_token") else "mean"


def run_embed_reference(model_dir: Path, batches: list[list[str]], *, intra_op_threads: int) -> EmbedReference:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # as the service's default
    session = ort.InferenceSession(str(model_dir / "model.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    mode = _pooling(model_dir)

    def embed(texts: list[str]) -> int:
        rows = [e.ids for e in tokenizer.encode_batch(texts)]
        lengths = np.array([len(r) for r in rows])
        ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        (states,) = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                        "token_type_ids": np.zeros_like(ids)})
        if mode == "cls":
            vectors = states[:, 0]
        else:
            vectors = (states * mask[:, :, None]).sum(axis=1) / lengths[:, None]
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # the service normalises too
        return int(lengths.sum())

    embed(batches[0])  # warm the session (arenas, kernels) outside the timing
    started = time.perf_counter()
    tokens = sum(embed(texts) for texts in batches)
    return EmbedReference(len(batches), sum(len(b) for b in batches), tokens, time.perf_counter() - started)
