"""The fused layout's in-place KV cache: one preallocated buffer per layer and key/value, a slot per row.

Each buffer is `[slots, kv_heads, max_length, head_dim]` on the provider's device, allocated
once at load. A running row owns one slot and its past is the slot's first `lengths[slot]`
columns (right-padded: GroupQueryAttention reads each row's length from attention_mask). A
forward binds the same memory as past and present, so the operator writes every row's new
key/value in place (what onnxruntime-genai calls `past_present_share_buffer`): a row joins
or leaves by taking or freeing a slot, and no other row is padded, compacted or copied.

Views of the buffer are bound through IOBinding by address and shape (`bind`): slots
`first..first+count` are one contiguous `[count, kv_heads, max_length, head_dim]` tensor,
because the slot is the outermost axis. onnxruntime's Python API has no other way to bind
part of an OrtValue, and this keeps the CUDA path on the device exactly as the CPU one.

Moving a cached sequence into a slot or out of it (prefix-cache hits, retained sessions)
copies only that sequence's own tokens, on the device, with small ONNX graphs (as kv_ops.py
does): into a slot, one output per layer, key/value and KV head, each bound to the
`[length, head_dim]` run of the slot it fills (the columns of one head are contiguous, those
of different heads are `max_length` apart); out of a slot, a Slice of the slot's view.

Not thread-safe: the scheduler's worker thread owns it (slot bookkeeping happens under the
scheduler's lock, KV work outside it, as for the padded batch).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.kv_ops import KV_ELEM_TYPES, KV_GRAPH_OPSET, kv_copy_session_options
from llmsuite.inference.engine.onnx_model import KvCache, OnnxDecoder
from llmsuite.inference.engine.ort_memory import run_detached
from llmsuite.inference.engine.types import EngineSettings


@dataclass(frozen=True)
class SlotPlan:
    """How many slots of how many tokens a KV budget buys, and what it leaves for the prefix cache."""

    slots: int
    max_length: int
    buffer_bytes: int

    @classmethod
    def choose(cls, *, budget_bytes: int, bytes_per_token: int, max_length: int, max_running: int) -> SlotPlan:
        """As many slots of `max_length` tokens as fit `budget_bytes`, at most `max_running`
        (a forward never runs more rows); 0 slots when one does not fit (the caller refuses)."""
        slot_bytes = max_length * bytes_per_token
        slots = min(max_running, budget_bytes // slot_bytes)
        return cls(slots=slots, max_length=max_length, buffer_bytes=slots * slot_bytes)


def serves_in_slots(decoder: OnnxDecoder, settings: EngineSettings) -> bool:
    """Whether `decoder` runs from a slot buffer: a GroupQueryAttention export whose
    genai_config.json shares past and present (the flag says the graph was built to be fed
    one max-length buffer; exports that say no keep the padded path), unless --no-slot-kv."""
    layout = decoder.layout
    return settings.slot_kv and layout.past_present_share_buffer and layout.attention == "GroupQueryAttention"


def slot_buffer_for(decoder: OnnxDecoder, settings: EngineSettings, budget_bytes: int,
                    intra_op_threads: int = 1) -> SlotKvBuffer:
    """The slot buffer `budget_bytes` buys for `decoder` (see SlotPlan); ModelLoadError when
    not even one slot of the served context fits."""
    plan = SlotPlan.choose(budget_bytes=budget_bytes, bytes_per_token=decoder.kv_bytes_per_token,
                           max_length=decoder.context_length, max_running=settings.max_running)
    if plan.slots == 0:
        slot_bytes = decoder.context_length * decoder.kv_bytes_per_token
        raise ModelLoadError(
            f"{decoder.layout.model_file}: its KV budget of {budget_bytes} bytes cannot hold one slot of "
            f"{decoder.context_length} tokens ({slot_bytes} bytes at {decoder.kv_bytes_per_token} bytes a token); "
            "raise --kv-cache-bytes, or lower --max-model-len")
    return SlotKvBuffer(decoder, plan.slots, plan.max_length, intra_op_threads)


def _into_slot_graph(tensors: int, kv_heads: int, elem_type: int) -> onnx.ModelProto:
    """out_i_h = Split(Slice(kv_i, columns 0..end, axis 2), axis 1)[h]: one `[1, 1, length,
    head_dim]` output per KV head, each bound to its run of the slot."""
    inputs = [helper.make_tensor_value_info(f"kv_{i}", elem_type, [1, kv_heads, "length", "dim"])
              for i in range(tensors)]
    inputs.append(helper.make_tensor_value_info("end", TensorProto.INT64, [1]))
    outputs, nodes = [], [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero_v", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["axis2"], value=helper.make_tensor("axis2_v", TensorProto.INT64, [1], [2])),
    ]
    for i in range(tensors):
        heads = [f"out_{i}_{h}" for h in range(kv_heads)]
        outputs += [helper.make_tensor_value_info(name, elem_type, None) for name in heads]
        nodes.append(helper.make_node("Slice", [f"kv_{i}", "zero", "end", "axis2"], [f"s_{i}"]))
        if kv_heads == 1:
            nodes.append(helper.make_node("Identity", [f"s_{i}"], heads))
        else:
            nodes.append(helper.make_node("Split", [f"s_{i}"], heads, axis=1, num_outputs=kv_heads))
    graph = helper.make_graph(nodes, "kv_into_slot", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", KV_GRAPH_OPSET)], ir_version=8)


def _out_of_slot_graph(tensors: int, elem_type: int) -> onnx.ModelProto:
    """out_i = Slice(kv_i, columns 0..end, axis 2): a slot's first `end` tokens as a new tensor."""
    inputs = [helper.make_tensor_value_info(f"kv_{i}", elem_type, [1, "heads", "max_length", "dim"])
              for i in range(tensors)]
    inputs.append(helper.make_tensor_value_info("end", TensorProto.INT64, [1]))
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero_v", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["axis2"], value=helper.make_tensor("axis2_v", TensorProto.INT64, [1], [2])),
    ]
    nodes += [helper.make_node("Slice", [f"kv_{i}", "zero", "end", "axis2"], [f"out_{i}"]) for i in range(tensors)]
    outputs = [helper.make_tensor_value_info(f"out_{i}", elem_type, None) for i in range(tensors)]
    graph = helper.make_graph(nodes, "kv_out_of_slot", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", KV_GRAPH_OPSET)], ir_version=8)


class SlotKvBuffer:
    """The preallocated KV of one fused-layout model: slots, their lengths, and copies in and out."""

    def __init__(self, decoder: OnnxDecoder, slots: int, max_length: int, intra_op_threads: int = 1) -> None:
        if slots < 1 or max_length < 2:
            raise ValueError(f"a slot buffer needs at least one slot of 2 tokens, got {slots} x {max_length}")
        sig = decoder.signature
        self._placement = placement = decoder.placement
        self._past_names = sig.past_names
        self._present_names = sig.present_names
        self.slots = slots
        self.max_length = max_length
        self.kv_heads = sig.num_kv_heads
        self.head_dim = sig.head_dim
        self.dtype = np.dtype(sig.kv_dtype)
        self._shape = [slots, self.kv_heads, max_length, self.head_dim]
        # Layer 0's key and value, then layer 1's, ...: the order of KvCache.tensors.
        self.tensors: tuple[Any, ...] = tuple(
            ort.OrtValue.ortvalue_from_shape_and_type(self._shape, self.dtype, placement.device_type,
                                                      placement.device_id)
            for _ in range(2 * sig.num_layers))
        self._head_bytes: int = max_length * self.head_dim * self.dtype.itemsize
        self._slot_bytes = self.kv_heads * self._head_bytes
        self.slot_bytes: int = self._slot_bytes * len(self.tensors)  # one slot, every layer's key and value
        self.nbytes: int = slots * self.slot_bytes
        self.lengths = [0] * slots  # tokens of past each slot holds
        self._free = list(range(slots))  # a heap: the lowest free slot is taken first
        self._owned: set[int] = set()

        options = kv_copy_session_options(intra_op_threads)
        elem_type = KV_ELEM_TYPES[self.dtype]
        providers = placement.providers()
        self._into = ort.InferenceSession(
            _into_slot_graph(len(self.tensors), self.kv_heads, elem_type).SerializeToString(), options,
            providers=providers)
        self._out_of = ort.InferenceSession(
            _out_of_slot_graph(len(self.tensors), elem_type).SerializeToString(), options, providers=providers)

    # ---- slots ---------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def owned(self) -> frozenset[int]:
        return frozenset(self._owned)

    def take(self) -> int:
        """The lowest free slot, now owned and empty; raises LookupError when none is free."""
        if not self._free:
            raise LookupError(f"all {self.slots} KV slots are taken")
        slot = heapq.heappop(self._free)
        self._owned.add(slot)
        self.lengths[slot] = 0
        return slot

    def take_run(self, count: int) -> list[int]:
        """`count` free slots, now owned: the lowest run of consecutive ones when there is one
        (rows in consecutive slots can share a prefill forward), else the lowest free ones."""
        if count == 0:
            return []
        if count > len(self._free):
            raise LookupError(f"{count} KV slots asked for, {len(self._free)} of {self.slots} free")
        free = sorted(self._free)
        start = next((i for i in range(len(free) - count + 1) if free[i + count - 1] - free[i] == count - 1), 0)
        chosen = free[start:start + count]
        self._free = [slot for slot in free if slot not in chosen]  # sorted: still a heap
        for slot in chosen:
            self._owned.add(slot)
            self.lengths[slot] = 0
        return chosen

    @property
    def length(self) -> int:
        """Tokens the owned slots hold (the buffer as a KV holder: see executor.StoredKv)."""
        return sum(self.lengths[slot] for slot in tuple(self._owned))

    def release(self, slot: int) -> None:
        """Frees `slot` (idempotent); its memory stays allocated for the next row."""
        if slot in self._owned:
            self._owned.remove(slot)
            self.lengths[slot] = 0
            heapq.heappush(self._free, slot)

    # ---- binding views -------------------------------------------------------------------

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        """Binds slots `first..first+count` as both past and present of every layer."""
        if not (0 <= first and count >= 1 and first + count <= self.slots):
            raise ValueError(f"slots {first}..{first + count} are outside the buffer's {self.slots}")
        shape = [count, self.kv_heads, self.max_length, self.head_dim]
        device_type, device_id = self._placement.device_type, self._placement.device_id
        offset = first * self._slot_bytes
        names = [name for pair in self._past_names for name in pair]
        outputs = [name for pair in self._present_names for name in pair]
        for tensor, past, present in zip(self.tensors, names, outputs, strict=True):
            address = tensor.data_ptr() + offset
            binding.bind_input(past, device_type, device_id, self.dtype, shape, address)
            binding.bind_output(present, device_type, device_id, self.dtype, shape, address)

    # ---- copies --------------------------------------------------------------------------

    def write(self, slot: int, cache: KvCache, length: int) -> None:
        """Copies the first `length` tokens of a one-row `cache` (a prefix-cache entry) into
        `slot`, which then holds exactly those tokens; nothing else in the buffer is touched."""
        if slot not in self._owned:
            raise ValueError(f"slot {slot} is not taken")
        if not (1 <= length <= min(cache.length, self.max_length)) or cache.rows != 1:
            raise ValueError(f"cannot copy {length} tokens of a {cache.rows}-row cache of {cache.length} "
                             f"into a slot of {self.max_length}")
        binding = self._into.io_binding()
        for i, tensor in enumerate(cache.tensors):
            if isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(f"kv_{i}", tensor)
            else:
                binding.bind_ortvalue_input(f"kv_{i}", tensor)
        binding.bind_cpu_input("end", np.array([length], dtype=np.int64))
        device_type, device_id = self._placement.device_type, self._placement.device_id
        shape = [1, 1, length, self.head_dim]
        for i, tensor in enumerate(self.tensors):
            base = tensor.data_ptr() + slot * self._slot_bytes
            for head in range(self.kv_heads):
                binding.bind_output(f"out_{i}_{head}", device_type, device_id, self.dtype, shape,
                                    base + head * self._head_bytes)
        run_detached(self._into, binding)
        self.lengths[slot] = length

    def read(self, slot: int, length: int | None = None) -> KvCache:
        """A copy of the first `length` tokens `slot` holds (all of them by default), as a
        one-row cache the prefix cache can keep after the slot is freed."""
        held = self.lengths[slot]
        length = held if length is None else length
        if not 1 <= length <= held:
            raise ValueError(f"slot {slot} holds {held} tokens; cannot read {length}")
        binding = self._out_of.io_binding()
        device_type, device_id = self._placement.device_type, self._placement.device_id
        shape = [1, self.kv_heads, self.max_length, self.head_dim]
        for i, tensor in enumerate(self.tensors):
            binding.bind_input(f"kv_{i}", device_type, device_id, self.dtype, shape,
                               tensor.data_ptr() + slot * self._slot_bytes)
        binding.bind_cpu_input("end", np.array([length], dtype=np.int64))
        for i in range(len(self.tensors)):
            binding.bind_output(f"out_{i}", device_type, device_id)
        return KvCache(tuple(run_detached(self._out_of, binding)), length, 1)

    def spans(self, slots: Sequence[int]) -> list[tuple[int, int]]:
        """`slots` as (first, count) runs of consecutive slot numbers, in order."""
        runs: list[tuple[int, int]] = []
        for slot in sorted(slots):
            if runs and runs[-1][0] + runs[-1][1] == slot:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((slot, 1))
        return runs
