"""One decoder export behind onnxruntime: session checks, forwards, KV cache.

Everything architecture-specific is read, never assumed: which layout the path holds and
its input/output names, config and precision come from layouts.py (Optimum or ONNX Runtime
GenAI); which optional inputs exist (`position_ids` for RoPE models, absent in older GPT-2
and in GenAI exports), KV head count, head size and dtype from the session. Inputs are fed
by name, so exports whose input order differs work the same.

Every forward goes through IOBinding with the present key/values left where the
provider produced them (device memory on CUDA) and fed straight back as the next step's
past, so the KV cache never crosses to the host; only the logits are copied out. A
forward takes any number of rows (a batch, see batch.py); a single sequence is the
one-row case. The CPU path runs the same code with device "cpu", so the tests that run
here exercise it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llmsuite.inference.engine.device import Placement, create_session
from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.layouts import DetectedModel, ExportConfig, ModelLayout, decoder_layout
from llmsuite.inference.engine.ort_memory import run_detached
from llmsuite.inference.engine.types import EngineSettings

_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class DecoderSignature:
    """The export's inputs and outputs as onnxruntime reports them."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past_names: tuple[tuple[str, str], ...]  # per layer: (key input, value input)
    present_names: tuple[tuple[str, str], ...]  # per layer: (key output, value output)
    logits: str
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: Any  # numpy dtype of past/present
    input_ids_dtype: Any
    attention_mask_dtype: Any
    position_ids_dtype: Any

    @property
    def num_layers(self) -> int:
        return len(self.past_names)

    @classmethod
    def from_session(cls, session: ort.InferenceSession, layout: ModelLayout) -> DecoderSignature:
        """Checks the session against the names the layout detection read from the graph."""
        where, config, io = layout.model_file, layout.config, layout.io
        inputs = {node.name: node for node in session.get_inputs()}
        outputs = {node.name: node for node in session.get_outputs()}
        past = [io.past_names(layer) for layer in range(layout.num_layers)]
        present = [io.present_names(layer) for layer in range(layout.num_layers)]
        absent = sorted({name for pair in past for name in pair} - set(inputs)
                        | {name for pair in present for name in pair} - set(outputs))
        if absent:
            raise ModelLoadError(f"{where}: KV names {absent} are missing (expected one key and one value per layer)")

        first_past = inputs[past[0][0]]
        shape = first_past.shape
        if len(shape) != 4:
            raise ModelLoadError(
                f"{where}: past key shape {shape} is not [batch, kv_heads, past_sequence, head_dim]"
            )
        num_kv_heads = shape[1] if isinstance(shape[1], int) else config.num_kv_heads
        head_dim = shape[3] if isinstance(shape[3], int) else config.head_dim
        if not num_kv_heads or not head_dim:
            raise ModelLoadError(f"{where}: cannot tell KV heads / head size from the graph or its config")
        kv_types = {inputs[name].type for pair in past for name in pair} | {
            outputs[name].type for pair in present for name in pair
        }
        if len(kv_types) != 1 or next(iter(kv_types)) not in ("tensor(float)", "tensor(float16)"):
            raise ModelLoadError(f"{where}: past/present must all be float32 or all float16, got {sorted(kv_types)}")

        logits_shape = outputs[io.logits].shape
        vocab_size = logits_shape[-1] if isinstance(logits_shape[-1], int) else config.vocab_size
        if not vocab_size:
            raise ModelLoadError(f"{where}: cannot tell the vocabulary size from the logits shape or its config")

        def dtype_of(name: str | None) -> Any:
            if name is None:
                return np.int64
            node_type = inputs[name].type
            if node_type not in ("tensor(int64)", "tensor(int32)"):
                raise ModelLoadError(f"{where}: input {name} has type {node_type}; expected int64 or int32")
            return _ORT_DTYPES[node_type]

        attention_mask = io.attention_mask if io.attention_mask in inputs else None
        position_ids = io.position_ids if io.position_ids in inputs else None
        return cls(
            input_ids=io.input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_names=tuple(past),
            present_names=tuple(present),
            logits=io.logits,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(vocab_size),
            kv_dtype=_ORT_DTYPES[next(iter(kv_types))],
            input_ids_dtype=dtype_of(io.input_ids),
            attention_mask_dtype=dtype_of(attention_mask),
            position_ids_dtype=dtype_of(position_ids),
        )


@dataclass(frozen=True)
class KvCache:
    """Past keys and values of `rows` sequences: per tensor [rows, kv_heads, length, head_dim].

    `tensors` holds layer 0's key and value, then layer 1's, ...: numpy arrays (an empty
    cache) or onnxruntime OrtValues on the session's device. In a batch, rows shorter than
    `length` are left-padded (see DecodeBatch). Immutable: each forward returns a new cache.
    """

    tensors: tuple[Any, ...]
    length: int
    rows: int = 1

    @property
    def layers(self) -> tuple[tuple[Any, Any], ...]:
        return tuple((self.tensors[i], self.tensors[i + 1]) for i in range(0, len(self.tensors), 2))

    @cached_property
    def nbytes(self) -> int:
        """Bytes of the tensors this cache keeps alive, read from their shapes (padding
        columns and rows included), so the budget counts what is really held."""
        return sum(tensor_nbytes(tensor) for tensor in self.tensors)


def tensor_nbytes(tensor: Any) -> int:
    """Size of one numpy array or OrtValue tensor: its shape times its element size."""
    if isinstance(tensor, np.ndarray):
        return int(tensor.nbytes)
    itemsize = int(np.dtype(_ORT_DTYPES[tensor.data_type()]).itemsize)
    return int(np.prod(tensor.shape(), dtype=np.int64)) * itemsize


@dataclass(frozen=True)
class ForwardResult:
    logits: np.ndarray  # float32 [new_tokens, vocab]: one row per token fed
    cache: KvCache


class OnnxDecoder:
    """Runs forwards of an Optimum decoder export; call from one thread at a time."""

    def __init__(self, session: ort.InferenceSession, placement: Placement, signature: DecoderSignature,
                 layout: ModelLayout, max_model_len: int = 0) -> None:
        self.session = session
        self.placement = placement
        self.signature = signature
        self.layout = layout
        self.config: ExportConfig = layout.config
        self.directory = layout.tokenizer_directory  # where the tokenizer files it pairs with live
        # The context served: the model's own, or less (--max-model-len).
        self.context_length: int = (min(max_model_len, layout.config.context_length) if max_model_len
                                    else layout.config.context_length)
        kv_itemsize = int(np.dtype(signature.kv_dtype).itemsize)
        per_layer = signature.num_kv_heads * signature.head_dim * kv_itemsize
        # A forecast only (what a row may grow to); held bytes are read from the tensors.
        self.kv_bytes_per_token: int = 2 * signature.num_layers * per_layer

    @classmethod
    def load(cls, path: Path, settings: EngineSettings, *, detected: DetectedModel | None = None) -> OnnxDecoder:
        """Loads a model directory or file (see layouts.py; `detected`: what detect_model already
        found there); raises ModelLoadError naming what is wrong."""
        layout = decoder_layout(Path(path), detected)
        session, placement = create_session(layout.model_file, settings)
        signature = DecoderSignature.from_session(session, layout)
        vocab_size = layout.config.vocab_size
        if vocab_size is not None and vocab_size != signature.vocab_size:
            raise ModelLoadError(
                f"{layout.model_file}: its config says vocab_size {vocab_size} but the logits have "
                f"{signature.vocab_size} columns"
            )
        return cls(session, placement, signature, layout, settings.max_model_len)

    @property
    def uses_position_ids(self) -> bool:
        return self.signature.position_ids is not None

    @property
    def left_padding(self) -> bool:
        """Whether rows of different lengths may be left-padded into one batch. Without a
        position_ids input the graph derives positions itself, so a left pad would shift them;
        a fused GroupQueryAttention reads the KV cache right-padded (lengths from the mask).
        Such exports are batched only across equal lengths (see layouts.py)."""
        return self.layout.left_padding

    def empty_cache(self, rows: int = 1) -> KvCache:
        sig = self.signature
        empty = np.zeros((rows, sig.num_kv_heads, 0, sig.head_dim), dtype=sig.kv_dtype)
        return KvCache(tuple(empty for _ in range(2 * sig.num_layers)), 0, rows)

    def forward(self, token_ids: Any, cache: KvCache) -> ForwardResult:
        """Feeds `token_ids` of one sequence after the `cache.length` tokens already in `cache`.

        Positions continue from the cache (no padding), so the logits equal those of one
        forward over the whole sequence without a cache.
        """
        sig = self.signature
        ids = np.asarray(token_ids, dtype=sig.input_ids_dtype).reshape(1, -1)
        total = cache.length + ids.shape[1]
        mask = np.ones((1, total), dtype=sig.attention_mask_dtype)
        positions = np.arange(cache.length, total, dtype=sig.position_ids_dtype).reshape(1, -1)
        logits, new_cache = self.run(ids, mask, positions, cache)
        return ForwardResult(logits=logits[0], cache=new_cache)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: KvCache) -> tuple[np.ndarray, KvCache]:
        """One forward over `cache.rows` rows: input_ids [rows, new], attention_mask [rows, past + new]
        (0 on left padding), position_ids [rows, new] (ignored by exports without that input).

        Returns logits [rows, new, vocab] on the host and the new cache, left on the device.
        """
        sig = self.signature
        binding = self.session.io_binding()
        binding.bind_cpu_input(sig.input_ids, input_ids)
        if sig.attention_mask:
            binding.bind_cpu_input(sig.attention_mask, attention_mask)
        if sig.position_ids:
            binding.bind_cpu_input(sig.position_ids, position_ids)
        for (key_name, value_name), (key, value) in zip(sig.past_names, cache.layers, strict=True):
            _bind_past(binding, key_name, key)
            _bind_past(binding, value_name, value)
        binding.bind_output(sig.logits, "cpu")
        device_type, device_id = self.placement.device_type, self.placement.device_id
        for key_name, value_name in sig.present_names:
            binding.bind_output(key_name, device_type, device_id)
            binding.bind_output(value_name, device_type, device_id)

        outputs = run_detached(self.session, binding)
        logits = outputs[0].numpy().astype(np.float32, copy=False)  # fp16 exports give fp16 logits
        new_cache = KvCache(tuple(outputs[1:]), cache.length + input_ids.shape[1], cache.rows)
        return logits, new_cache

    def run_in_place(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                     bind_kv: Callable[[ort.IOBinding], None]) -> np.ndarray:
        """One forward whose past and present are the same preallocated memory, bound by
        `bind_kv` (slot_kv.py): GroupQueryAttention then writes each row's new key/value in
        place and reads each row's own length from attention_mask. Returns logits [rows, new,
        vocab] on the host; nothing else is allocated for the KV."""
        sig = self.signature
        binding = self.session.io_binding()
        binding.bind_cpu_input(sig.input_ids, input_ids)
        if sig.attention_mask:
            binding.bind_cpu_input(sig.attention_mask, attention_mask)
        binding.bind_output(sig.logits, "cpu")  # first: run_detached's outputs[0]
        bind_kv(binding)
        outputs = run_detached(self.session, binding)
        logits: np.ndarray = outputs[0].numpy().astype(np.float32, copy=False)
        return logits

    def present_to_numpy(self, cache: KvCache) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host copies of a cache's tensors per layer (for tests and debugging; copies from the device)."""
        return [(_to_numpy(key), _to_numpy(value)) for key, value in cache.layers]


def _bind_past(binding: ort.IOBinding, name: str, tensor: Any) -> None:
    if isinstance(tensor, np.ndarray):
        binding.bind_cpu_input(name, tensor)
    else:
        binding.bind_ortvalue_input(name, tensor)


def _to_numpy(tensor: Any) -> np.ndarray:
    return tensor if isinstance(tensor, np.ndarray) else tensor.numpy()
