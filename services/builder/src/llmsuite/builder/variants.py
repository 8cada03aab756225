"""One preset's weights in either layout and either precision: what `llmsuite-build-model` writes.

* layout `optimum` (default): `model.build_model`, the Optimum export layout;
* layout `gqa`: `genai_layout`, the ONNX Runtime GenAI layout (GroupQueryAttention, fused
  norms, `genai_config.json`);
* precision `int4`: the fp32 graph's MatMul weights quantized to 4 bits by onnxruntime's
  own `MatMulNBitsQuantizer` (symmetric, block 32, accuracy level 4: the settings of
  onnxruntime-genai's `-p int4 -e cpu`), written as `MatMulNBits` operators. Round-to-nearest,
  so the same weights always quantize to the same bytes.

Quantizing needs onnxruntime (and `onnx-ir`, the `int4` extra of this distribution); it is
imported only then, so fp32 builds (the container images') stay numpy + onnx only.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import onnx

from llmsuite.builder import genai_layout
from llmsuite.builder.model import (
    EXTERNAL_DATA_FILE,
    MODEL_FILE,
    OUTPUT_FILES,
    Architecture,
    DecoderConfig,
    build_model,
    decoder_config,
)
from llmsuite.builder.tokenizer import build_tokenizer

Layout = Literal["optimum", "gqa"]
Precision = Literal["fp32", "int4"]
LAYOUTS: tuple[str, ...] = ("optimum", "gqa")
PRECISIONS: tuple[str, ...] = ("fp32", "int4")

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations in the kernel, as onnxruntime-genai's CPU int4 models use

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_GQA_OUTPUT_FILES = (*genai_layout.OUTPUT_FILES, *_TOKENIZER_FILES)


def quantize_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every MatMul by a constant weight as MatMulNBits int4 (block 32, symmetric)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise ValueError(f"--precision int4 needs onnxruntime and onnx-ir (pip install "
                         f"'llmsuite-builder[int4]' beside llmsuite-inference): {exc}") from exc
    # The quantizer logs every node it visits at INFO; a build reports its own summary.
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    quantized: Any = quantizer.model.model
    return quantized  # type: ignore[no-any-return]


def _clear(out_dir: Path, force: bool) -> None:
    """Removes either layout's files (a leftover genai_config.json would change what the
    directory is); refuses unless `force` when there are any."""
    existing = [name for name in (*OUTPUT_FILES, *_GQA_OUTPUT_FILES) if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already holds a model ({', '.join(sorted(set(existing)))}); "
                              "force replaces it")
    for name in set(existing):
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def build_variant(out_dir: Path, *, preset: str = "tiny", arch: Architecture = "llama", seed: int = 0,
                  layout: Layout = "optimum", precision: Precision = "fp32", force: bool = False,
                  **overrides: Any) -> DecoderConfig:
    """Writes one model directory in `layout` and `precision`; same arguments, same bytes.

    Both layouts of one preset and seed hold the same weights and tokenizer (the tokenizer
    content hash is the same too), so they generate the same greedy tokens in fp32.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir = Path(out_dir)
    config = decoder_config(preset, arch, **overrides)
    if layout == "gqa":
        genai_layout.check_config(config)
    _clear(out_dir, force)
    if layout == "optimum":
        config = build_model(out_dir, preset=preset, arch=arch, seed=seed, **overrides)
        if precision == "int4":
            model = quantize_int4(onnx.load(str(out_dir / MODEL_FILE)))
            for name in (MODEL_FILE, EXTERNAL_DATA_FILE):
                (out_dir / name).unlink(missing_ok=True)
            if config.external_data:
                genai_layout.save_model(model, out_dir, EXTERNAL_DATA_FILE)
            else:
                onnx.save_model(model, out_dir / MODEL_FILE)
        return config

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, vocab_size=config.vocab_size, seed=seed, model_max_length=config.max_position_embeddings)
    model = genai_layout.build_genai_graph(config, seed)
    if precision == "int4":
        model = quantize_int4(model)
    genai_layout.save_model(model, out_dir, genai_layout.EXTERNAL_DATA_FILE)
    genai_layout.write_config(out_dir, config)
    return config
