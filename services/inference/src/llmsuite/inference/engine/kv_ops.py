"""KV-cache reshaping on the provider's device: small ONNX graphs run by onnxruntime.

A batch's past is one tensor per layer and per key/value, `[rows, kv_heads, length,
head_dim]`, living wherever the model's session put it (device memory on CUDA). Rows
join, leave and are extracted between forwards, which needs gather, slice, pad and concat
along the batch and sequence axes. onnxruntime's Python API has no tensor operations of
its own, and pulling the cache to the host (numpy) and back would cost two PCIe copies
of the whole batch on every join, so the operations are tiny ONNX graphs run with the
model's own execution provider through IOBinding: outputs stay on the device, and the
CPU path runs exactly the same code.

One graph handles every layer's tensors at once (one run per operation, not one per
tensor), and the graphs are built for this model's layer count and KV dtype at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from llmsuite.inference.engine.device import Placement
from llmsuite.inference.engine.ort_memory import run_detached, share_cpu_arena

KV_GRAPH_OPSET = 18  # of the small graphs that copy KV (here and slot_kv.py)
KV_ELEM_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}

KvTensors = tuple[Any, ...]  # 2 x layers OrtValues (or numpy arrays), key/value interleaved per layer


def _reshape_graph(tensors: int, elem_type: int) -> onnx.ModelProto:
    """out_i = Pad(Slice(Gather(kv_i, rows, axis 0), start..end, axis 2), front pad on axis 2).

    Selects rows (compaction, or extracting one row), keeps the columns start..end (dropping
    leading padding, or cutting a cached sequence to a prefix), and adds front padding; any
    of the three may be a no-op.
    """
    shape = ["rows", "heads", "length", "dim"]
    inputs = [helper.make_tensor_value_info(f"kv_{i}", elem_type, shape) for i in range(tensors)]
    inputs += [
        helper.make_tensor_value_info("rows", TensorProto.INT64, ["kept"]),
        helper.make_tensor_value_info("start", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("end", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("pads", TensorProto.INT64, [8]),
    ]
    outputs = [helper.make_tensor_value_info(f"out_{i}", elem_type, None) for i in range(tensors)]
    consts = [
        helper.make_node("Constant", [], ["axis2"], value=helper.make_tensor("axis2_v", TensorProto.INT64, [1], [2])),
    ]
    nodes = list(consts)
    for i in range(tensors):
        nodes += [
            helper.make_node("Gather", [f"kv_{i}", "rows"], [f"g_{i}"], axis=0),
            helper.make_node("Slice", [f"g_{i}", "start", "end", "axis2"], [f"s_{i}"]),
            helper.make_node("Pad", [f"s_{i}", "pads"], [f"out_{i}"], mode="constant"),
        ]
    graph = helper.make_graph(nodes, "kv_reshape", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", KV_GRAPH_OPSET)], ir_version=8)


def _join_graph(tensors: int, elem_type: int) -> onnx.ModelProto:
    """out_i = Concat(Pad(a_i, pads_a), Pad(b_i, pads_b), axis 0): b's rows join a's."""
    shape = ["rows", "heads", "length", "dim"]
    inputs = [helper.make_tensor_value_info(f"a_{i}", elem_type, shape) for i in range(tensors)]
    inputs += [helper.make_tensor_value_info(f"b_{i}", elem_type, shape) for i in range(tensors)]
    inputs += [
        helper.make_tensor_value_info("pads_a", TensorProto.INT64, [8]),
        helper.make_tensor_value_info("pads_b", TensorProto.INT64, [8]),
    ]
    outputs = [helper.make_tensor_value_info(f"out_{i}", elem_type, None) for i in range(tensors)]
    nodes = []
    for i in range(tensors):
        nodes += [
            helper.make_node("Pad", [f"a_{i}", "pads_a"], [f"pa_{i}"], mode="constant"),
            helper.make_node("Pad", [f"b_{i}", "pads_b"], [f"pb_{i}"], mode="constant"),
            helper.make_node("Concat", [f"pa_{i}", f"pb_{i}"], [f"out_{i}"], axis=0),
        ]
    graph = helper.make_graph(nodes, "kv_join", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", KV_GRAPH_OPSET)], ir_version=8)


def _front_pads(columns: int) -> np.ndarray:
    # ONNX Pad: all begin values, then all end values, for [rows, heads, length, dim].
    return np.array([0, 0, columns, 0, 0, 0, 0, 0], dtype=np.int64)


def kv_copy_session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Session options of the KV-copy graphs: quiet, on the process's shared CPU arena, and not
    spinning (memory-bound copies: more threads or busy-waiting only contend with the model's own)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, intra_op_threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    share_cpu_arena(options)
    return options


class KvOps:
    """Gather/slice/pad/concat over a model's whole KV cache, on the model's device."""

    def __init__(self, placement: Placement, providers: Sequence[Any], num_layers: int, kv_dtype: Any,
                 intra_op_threads: int = 1) -> None:
        self._placement = placement
        self._tensors = 2 * num_layers
        elem_type = KV_ELEM_TYPES[np.dtype(kv_dtype)]
        options = kv_copy_session_options(intra_op_threads)
        self._reshape = ort.InferenceSession(
            _reshape_graph(self._tensors, elem_type).SerializeToString(), options, providers=list(providers))
        self._join = ort.InferenceSession(
            _join_graph(self._tensors, elem_type).SerializeToString(), options, providers=list(providers))

    def reshape(self, kv: KvTensors, rows: Sequence[int], drop_front: int = 0, pad_front: int = 0,
                keep: int | None = None) -> KvTensors:
        """Keeps `rows` (in that order), drops `drop_front` leading columns, then keeps at most
        `keep` columns (a prefix of what is left), and adds `pad_front` zero columns in front."""
        binding = self._reshape.io_binding()
        for i, tensor in enumerate(kv):
            _bind(binding, f"kv_{i}", tensor)
        end = np.iinfo(np.int64).max if keep is None else drop_front + keep
        binding.bind_cpu_input("rows", np.asarray(rows, dtype=np.int64))
        binding.bind_cpu_input("start", np.array([drop_front], dtype=np.int64))
        binding.bind_cpu_input("end", np.array([end], dtype=np.int64))
        binding.bind_cpu_input("pads", _front_pads(pad_front))
        return self._run(self._reshape, binding)

    def join(self, a: KvTensors, b: KvTensors, pad_a: int, pad_b: int) -> KvTensors:
        """Rows of `b` appended after the rows of `a`, each front-padded so their lengths agree."""
        binding = self._join.io_binding()
        for i, tensor in enumerate(a):
            _bind(binding, f"a_{i}", tensor)
        for i, tensor in enumerate(b):
            _bind(binding, f"b_{i}", tensor)
        binding.bind_cpu_input("pads_a", _front_pads(pad_a))
        binding.bind_cpu_input("pads_b", _front_pads(pad_b))
        return self._run(self._join, binding)

    def _run(self, session: ort.InferenceSession, binding: ort.IOBinding) -> KvTensors:
        for i in range(self._tensors):
            binding.bind_output(f"out_{i}", self._placement.device_type, self._placement.device_id)
        return tuple(run_detached(session, binding))


def _bind(binding: ort.IOBinding, name: str, tensor: Any) -> None:
    if isinstance(tensor, np.ndarray):
        binding.bind_cpu_input(name, tensor)
    else:
        binding.bind_ortvalue_input(name, tensor)
