"""Which ONNX layout a model path holds, read from its files before any session exists.

Two decoder layouts are served, with everything read from their own files:

* **Optimum** (`optimum-cli export onnx --task text-generation-with-past`): `model.onnx`
  with `config.json` (+ `generation_config.json`) beside it, inputs `input_ids`,
  `attention_mask`, optionally `position_ids`, and `past_key_values.N.key/value`, outputs
  `logits` and `present.N.key/value`. Any other ONNX file of such a repository can be named
  directly (`REPO/onnx/model_q4.onnx`, as transformers.js-style repositories ship their
  quantized variants): `config.json` and the tokenizer are then looked for in the file's
  directory, then its parent.
* **ONNX Runtime GenAI** (`python -m onnxruntime_genai.models.builder`): a directory with
  `genai_config.json`, which names the model file, the input/output names
  (`past_key_names` patterns such as `past_key_values.%d.key`), heads, KV heads, head size,
  context length, eos/bos/pad ids and `past_present_share_buffer`. No `config.json`.

`detect_model` is the one place that decides what a path is. It classifies the graph by
its inputs and outputs (a causal LM with a KV cache, one without, an encoder, an Optimum
merged decoder with `use_cache_branch`), so a caller can route each kind to the code that
serves it; `decoder_layout` turns a servable decoder into the `ModelLayout` the decoder runs
from, and refuses everything else with a ModelLoadError naming the file, the layout
detected and what is missing.

The graph is read without its weights (`load_external_data=False`) and dropped before the
session is created, so detection never holds a second copy of external-data weights;
precision and quantization are read from the operators and initializer types.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx

from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.runtime.model_paths import model_home, tokenizer_directory

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GENAI_CONFIG_FILE = "genai_config.json"
# transformers.js-style repositories keep their ONNX files one level down.
ONNX_SUBDIRECTORY = "onnx"

LayoutName = Literal["optimum", "onnxruntime-genai"]
GraphKind = Literal["causal-lm", "causal-lm-without-cache", "merged-decoder", "encoder", "unknown"]

# Attention operators that take the KV cache right-padded (valid tokens from column 0,
# per-row lengths from attention_mask): a left-padded batch would give wrong tokens.
RIGHT_PADDED_ATTENTION_OPS = frozenset({"GroupQueryAttention", "PagedAttention", "SparseAttention"})

_OPTIMUM_IO = dict(
    input_ids="input_ids", attention_mask="attention_mask", position_ids="position_ids",
    past_key="past_key_values.%d.key", past_value="past_key_values.%d.value",
    present_key="present.%d.key", present_value="present.%d.value", logits="logits",
)
# Outputs by which an encoder (feature extraction, sentence embeddings) is recognised: the ones
# the embedding path (encoder.py) pools, per token or already pooled.
_ENCODER_OUTPUTS = ("last_hidden_state", "token_embeddings", "sentence_embedding")

# config.json keys differ by architecture; the first present one wins.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")

_FLOAT_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
}
_INT8_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
_INT4_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(payload, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return payload


@dataclass(frozen=True)
class ExportConfig:
    """What the model's config files say: config.json + generation_config.json (Optimum) or
    genai_config.json (ONNX Runtime GenAI)."""

    architecture: str
    context_length: int
    vocab_size: int | None
    num_attention_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None = None

    @classmethod
    def read(cls, directory: Path) -> ExportConfig:
        """config.json (+ generation_config.json) of an Optimum export in `directory`."""
        config = _read_json(directory / CONFIG_FILE)
        generation_path = directory / GENERATION_CONFIG_FILE
        generation = _read_json(generation_path) if generation_path.is_file() else {}

        context_length = _first_int(config, _CONTEXT_KEYS)
        if context_length is None or context_length < 2:
            raise ModelLoadError(f"{directory / CONFIG_FILE} names no context length (one of {_CONTEXT_KEYS})")
        heads = _first_int(config, _HEAD_KEYS)
        hidden = _first_int(config, _HIDDEN_KEYS)
        head_dim = _first_int(config, ("head_dim",))
        if head_dim is None and heads and hidden:
            head_dim = hidden // heads
        architectures = config.get("architectures") or []
        architecture = config.get("model_type") or (architectures[0] if architectures else "unknown")
        # transformers prefers generation_config's eos list; config.json's eos may name only
        # one of them (Llama 3 style), so take the union with generation_config first.
        eos: list[int] = []
        for token_id in _id_list(generation.get("eos_token_id")) + _id_list(config.get("eos_token_id")):
            if token_id not in eos:
                eos.append(token_id)
        bos = _id_list(generation.get("bos_token_id")) or _id_list(config.get("bos_token_id"))
        pad = _id_list(generation.get("pad_token_id")) or _id_list(config.get("pad_token_id"))
        return cls(
            architecture=str(architecture),
            context_length=context_length,
            vocab_size=_first_int(config, ("vocab_size",)),
            num_attention_heads=heads,
            num_kv_heads=_first_int(config, _KV_HEAD_KEYS) or heads,
            head_dim=head_dim,
            eos_token_ids=tuple(eos),
            bos_token_id=bos[0] if bos else None,
            pad_token_id=pad[0] if pad else None,
        )


@dataclass(frozen=True)
class DecoderIo:
    """Input and output names of a decoder graph; KV names are `%d` patterns over the layer."""

    input_ids: str
    attention_mask: str
    position_ids: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    logits: str

    def past_names(self, layer: int) -> tuple[str, str]:
        return self.past_key % layer, self.past_value % layer

    def present_names(self, layer: int) -> tuple[str, str]:
        return self.present_key % layer, self.present_value % layer


@dataclass(frozen=True)
class GenAiConfig:
    """genai_config.json: the model file, its I/O names and everything a server needs."""

    path: Path
    model_file: Path
    io: DecoderIo
    config: ExportConfig
    num_layers: int | None
    past_present_share_buffer: bool

    @classmethod
    def read(cls, path: Path) -> GenAiConfig:
        payload = _read_json(path)
        model = payload.get("model")
        decoder = model.get("decoder") if isinstance(model, dict) else None
        if not isinstance(model, dict) or not isinstance(decoder, dict):
            raise ModelLoadError(f"{path}: expected a model.decoder section (onnxruntime-genai's genai_config.json)")
        filename = decoder.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ModelLoadError(f"{path}: model.decoder.filename names no model file")
        inputs, outputs = decoder.get("inputs") or {}, decoder.get("outputs") or {}
        if "past_names" in inputs or "present_names" in outputs:
            raise ModelLoadError(
                f"{path}: combined past_names/present_names (one KV tensor per layer) are not supported; "
                "this engine needs separate past_key_names and past_value_names")

        def name(section: dict[str, Any], key: str, default: str) -> str:
            value = section.get(key, default)
            if not isinstance(value, str) or not value:
                raise ModelLoadError(f"{path}: model.decoder {key} must be a non-empty string")
            return value

        io = DecoderIo(
            input_ids=name(inputs, "input_ids", "input_ids"),
            attention_mask=name(inputs, "attention_mask", "attention_mask"),
            position_ids=name(inputs, "position_ids", "position_ids"),
            past_key=name(inputs, "past_key_names", "past_key_values.%d.key"),
            past_value=name(inputs, "past_value_names", "past_key_values.%d.value"),
            present_key=name(outputs, "present_key_names", "present.%d.key"),
            present_value=name(outputs, "present_value_names", "present.%d.value"),
            logits=name(outputs, "logits", "logits"),
        )
        for pattern in (io.past_key, io.past_value, io.present_key, io.present_value):
            if pattern.count("%d") != 1:
                raise ModelLoadError(f"{path}: KV name pattern {pattern!r} must hold exactly one %d (the layer)")
        search_section = payload.get("search")
        search: dict[str, Any] = search_section if isinstance(search_section, dict) else {}
        context_length = _first_int(model, ("context_length",)) or _first_int(search, ("max_length",))
        if context_length is None or context_length < 2:
            raise ModelLoadError(f"{path}: model.context_length is missing")
        heads = _first_int(decoder, ("num_attention_heads",))
        hidden = _first_int(decoder, ("hidden_size",))
        head_dim = _first_int(decoder, ("head_size",))
        if head_dim is None and heads and hidden:
            head_dim = hidden // heads
        bos, pad = _id_list(model.get("bos_token_id")), _id_list(model.get("pad_token_id"))
        config = ExportConfig(
            architecture=str(model.get("type") or "unknown"),
            context_length=context_length,
            vocab_size=_first_int(model, ("vocab_size",)),
            num_attention_heads=heads,
            num_kv_heads=_first_int(decoder, ("num_key_value_heads",)) or heads,
            head_dim=head_dim,
            eos_token_ids=tuple(dict.fromkeys(_id_list(model.get("eos_token_id")))),
            bos_token_id=bos[0] if bos else None,
            pad_token_id=pad[0] if pad else None,
        )
        return cls(
            path=path,
            model_file=path.parent / filename,
            io=io,
            config=config,
            num_layers=_first_int(decoder, ("num_hidden_layers",)),
            past_present_share_buffer=bool(search.get("past_present_share_buffer", False)),
        )


@dataclass(frozen=True)
class ModelFiles:
    """Where a model path's files are: the ONNX file, its config, its tokenizer."""

    layout: LayoutName
    model_file: Path
    config_directory: Path
    tokenizer_directory: Path
    genai: GenAiConfig | None = None

    @property
    def io(self) -> DecoderIo:
        return self.genai.io if self.genai is not None else DecoderIo(**_OPTIMUM_IO)


@dataclass(frozen=True)
class GraphSummary:
    """What the ONNX graph is, read from its names, operators and initializer types."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    op_types: frozenset[str]
    precision: str  # "fp32", "fp16", "bf16", "int8", "int4"
    quantization: str  # "none" or how the weights are quantized
    weights_bytes: int = 0  # the ONNX file and the external data files its initializers name

    @classmethod
    def read(cls, model_file: Path) -> GraphSummary:
        try:
            model = onnx.load(str(model_file), load_external_data=False)
        except Exception as exc:  # onnx raises protobuf and OS errors alike; keep the reason
            raise ModelLoadError(f"cannot read the ONNX graph {model_file}: {exc}") from exc
        graph = model.graph
        initializers = {init.name for init in graph.initializer}
        nodes = list(_all_nodes(graph))
        precision, quantization = _precision(graph, nodes)
        return cls(
            inputs=tuple(i.name for i in graph.input if i.name not in initializers),
            outputs=tuple(o.name for o in graph.output),
            op_types=frozenset(node.op_type for node in nodes),
            precision=precision,
            quantization=quantization,
            weights_bytes=_weights_bytes(model_file, graph),
        )


def _weights_bytes(model_file: Path, graph: onnx.GraphProto) -> int:
    """Bytes of the file and of each external data file it names (other ONNX files of the same
    repository, beside it, are not this model's weights)."""
    locations = {entry.value for init in graph.initializer for entry in init.external_data if entry.key == "location"}
    paths = [model_file, *(model_file.parent / location for location in sorted(locations))]
    return sum(path.stat().st_size for path in paths if path.is_file())


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:  # If / Loop bodies (merged decoders)
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def _precision(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> tuple[str, str]:
    """The weights' precision and, for quantized graphs, how they were quantized."""
    ops = Counter(node.op_type for node in nodes)
    if ops["MatMulNBits"]:
        node = next(n for n in nodes if n.op_type == "MatMulNBits")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bits, block = int(attrs.get("bits", 4)), int(attrs.get("block_size", 0))
        accuracy = attrs.get("accuracy_level")
        detail = f", accuracy level {accuracy}" if accuracy else ""
        return f"int{bits}", f"MatMulNBits int{bits}, block {block}{detail} ({ops['MatMulNBits']} MatMuls)"
    if ops["MatMulInteger"] or ops["DynamicQuantizeMatMul"]:
        count = ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"]
        return "int8", f"dynamic int8 (MatMulInteger, {count} MatMuls)"
    if ops["QLinearMatMul"]:
        return "int8", f"static int8 (QLinearMatMul, {ops['QLinearMatMul']} MatMuls)"
    quantized = [init for init in graph.initializer if init.data_type in _INT8_TYPES | _INT4_TYPES]
    if ops["DequantizeLinear"] and quantized:
        bits = 4 if any(init.data_type in _INT4_TYPES for init in quantized) else 8
        return f"int{bits}", f"QDQ int{bits} (DequantizeLinear, {ops['DequantizeLinear']} nodes)"
    elements: Counter[str] = Counter()
    for init in graph.initializer:
        kind = _FLOAT_TYPES.get(int(init.data_type))
        if kind is not None:
            size = 1
            for dim in init.dims:
                size *= dim
            elements[kind] += size
    return (elements.most_common(1)[0][0] if elements else "fp32"), "none"


@dataclass(frozen=True)
class DetectedModel:
    """What a model path holds, before deciding whether (and how) it can be served."""

    files: ModelFiles
    graph: GraphSummary
    kind: GraphKind
    description: str  # the layout detected, in words, for logs and refusals


@dataclass(frozen=True)
class ModelLayout:
    """A decoder this engine can serve: files, names and config, all read from the export."""

    name: LayoutName
    model_file: Path
    tokenizer_directory: Path
    config: ExportConfig
    io: DecoderIo
    num_layers: int
    attention: str  # the fused attention operator, or "unfused"
    past_present_share_buffer: bool
    precision: str
    quantization: str
    has_position_ids: bool

    @property
    def left_padding(self) -> bool:
        """Whether rows of different lengths may share a batch left-padded: only when the
        graph takes position_ids (so padding cannot shift positions) and its attention reads
        the mask per key (not a right-padded fused op that derives lengths from the mask)."""
        return self.has_position_ids and self.attention not in RIGHT_PADDED_ATTENTION_OPS


def locate_model(path: Path) -> ModelFiles:
    """Finds the model file, its config and its tokenizer for a `--model NAME=PATH` path."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    home = model_home(path)
    genai_path = home / GENAI_CONFIG_FILE
    if genai_path.is_file():
        genai = GenAiConfig.read(genai_path)
        model_file = path if path.is_file() else genai.model_file
        if not model_file.is_file():
            raise ModelLoadError(
                f"{genai_path} (onnxruntime-genai layout) names the model file {genai.model_file.name}, "
                f"which is missing (found: {_listing(home)})")
        return ModelFiles("onnxruntime-genai", model_file, home, tokenizer_directory(path), genai)

    if path.is_file():
        model_file = path
    elif (path / MODEL_FILE).is_file():
        model_file = path / MODEL_FILE
    elif (path / ONNX_SUBDIRECTORY / MODEL_FILE).is_file():
        model_file = path / ONNX_SUBDIRECTORY / MODEL_FILE
    else:
        raise ModelLoadError(
            f"{path} holds no model this engine can read: missing {MODEL_FILE} (or {ONNX_SUBDIRECTORY}/{MODEL_FILE}) "
            f"of the Optimum layout and {GENAI_CONFIG_FILE} of the onnxruntime-genai layout; found: {_listing(path)}")
    file_home = model_file.parent
    config_directory = next((d for d in (file_home, file_home.parent) if (d / CONFIG_FILE).is_file()), None)
    if config_directory is None:
        raise ModelLoadError(
            f"{model_file} (Optimum layout): missing {CONFIG_FILE} in {file_home} or {file_home.parent} "
            f"(found: {_listing(file_home)})")
    return ModelFiles("optimum", model_file, config_directory, tokenizer_directory(model_file))


def _listing(directory: Path) -> str:
    try:
        return ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    except OSError:
        return "nothing readable"


def _has_layers(names: tuple[str, ...], pattern: str) -> bool:
    return (pattern % 0) in names


def detect_model(path: Path) -> DetectedModel:
    """Classifies what `path` holds; raises ModelLoadError only when it cannot be read at all.

    The one detection function: the engine routes `kind` "causal-lm" to the decoder and
    "encoder" to the embedding path (encoder.py), and refuses the rest with `refusal(detected)`.
    """
    files = locate_model(path)
    graph = GraphSummary.read(files.model_file)
    io = files.io
    layout = "onnxruntime-genai" if files.layout == "onnxruntime-genai" else "Optimum"
    has_logits = io.logits in graph.outputs
    has_past = _has_layers(graph.inputs, io.past_key)
    has_present = _has_layers(graph.outputs, io.present_key)
    if "use_cache_branch" in graph.inputs:
        kind: GraphKind = "merged-decoder"
        description = f"{layout} merged decoder (a use_cache_branch input selects a with-past or no-past subgraph)"
    elif has_logits and has_past and has_present:
        attention = next((op for op in sorted(graph.op_types) if op in RIGHT_PADDED_ATTENTION_OPS), "unfused attention")
        kind, description = "causal-lm", f"{layout} causal LM with KV cache ({attention}, {graph.precision})"
    elif has_logits:
        kind, description = "causal-lm-without-cache", f"{layout} causal LM without KV cache inputs/outputs"
    elif not has_past and io.input_ids in graph.inputs and any(name in graph.outputs for name in _ENCODER_OUTPUTS):
        kind, description = "encoder", f"{layout} encoder (outputs {', '.join(graph.outputs)})"
    else:
        kind, description = "unknown", f"graph with inputs {list(graph.inputs)} and outputs {list(graph.outputs)}"
    return DetectedModel(files, graph, kind, description)


def refusal(detected: DetectedModel) -> ModelLoadError:
    """Why a detected model cannot be served as a decoder: the file, the layout, what is missing."""
    file, io = detected.files.model_file, detected.files.io
    missing = {
        "merged-decoder": "a graph without use_cache_branch: export with `optimum-cli export onnx --task "
                          "text-generation-with-past` (recent Optimum writes model.onnx with the KV cache, "
                          "no branch), or serve the repository's decoder_with_past file",
        "causal-lm-without-cache": f"KV cache inputs ({io.past_key % 0}, ...) and outputs ({io.present_key % 0}, "
                                   "...): export with --task text-generation-with-past",
        "encoder": f"a {io.logits} output and KV cache inputs: an encoder is served as an embedding model "
                   "(Embed), not for generation",
        "unknown": f"inputs {io.input_ids} and {io.past_key % 0}..., outputs {io.logits} and "
                   f"{io.present_key % 0}...",
    }.get(detected.kind, "nothing")
    return ModelLoadError(f"{file}: detected {detected.description}; cannot serve it, missing {missing}")


def decoder_layout(path: Path, detected: DetectedModel | None = None) -> ModelLayout:
    """The layout of the causal LM at `path` (`detected`: detect_model's answer for it, if the
    caller has it); ModelLoadError (file, layout, what is missing) otherwise."""
    detected = detected or detect_model(path)
    if detected.kind != "causal-lm":
        raise refusal(detected)
    files, graph = detected.files, detected.graph
    io = files.io
    layers = 0
    while io.past_key % layers in graph.inputs:
        layers += 1
    config = files.genai.config if files.genai is not None else ExportConfig.read(files.config_directory)
    expected = {io.input_ids, io.attention_mask, io.position_ids}
    expected |= {name for layer in range(layers) for name in io.past_names(layer)}
    unknown = sorted(set(graph.inputs) - expected)
    if unknown:
        raise ModelLoadError(
            f"{files.model_file}: detected {detected.description}; it has inputs this engine does not know how "
            f"to feed: {unknown}")
    if io.attention_mask not in graph.inputs:
        raise ModelLoadError(f"{files.model_file}: detected {detected.description}; missing an "
                             f"{io.attention_mask} input")
    if files.genai is not None and files.genai.num_layers not in (None, layers):
        raise ModelLoadError(f"{files.genai.path} says {files.genai.num_layers} layers but "
                             f"{files.model_file} has KV inputs for {layers}")
    attention = next((op for op in sorted(graph.op_types) if op in RIGHT_PADDED_ATTENTION_OPS), "unfused")
    return ModelLayout(
        name=files.layout,
        model_file=files.model_file,
        tokenizer_directory=files.tokenizer_directory,
        config=config,
        io=io,
        num_layers=layers,
        attention=attention,
        past_present_share_buffer=files.genai.past_present_share_buffer if files.genai is not None else False,
        precision=graph.precision,
        quantization=graph.quantization,
        has_position_ids=io.position_ids in graph.inputs,
    )
