"""`llmsuite-build-model`: writes a deterministic test/bench model in the Optimum ONNX layout,
or the same weights in the ONNX Runtime GenAI layout (`--layout gqa`), in fp32 or int4.

    python -m llmsuite.builder --preset tiny --out models/tiny
    python -m llmsuite.builder --preset tiny --layout gqa --precision int4 --out models/tiny-gqa-int4
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llmsuite.builder import encoder
from llmsuite.builder.model import ARCHITECTURES, PRESETS, parameter_count
from llmsuite.builder.variants import LAYOUTS, PRECISIONS, build_variant


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmsuite-build-model",
        description="Build a seeded random decoder model (ONNX + config + tokenizer) in the "
        "Hugging Face Optimum export layout, or the ONNX Runtime GenAI layout. Same arguments give "
        "byte-identical files.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: for tests (about 0.5M parameters); bench: about 100M parameters")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed (default 0)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama",
                        help="llama: RoPE + GQA + position_ids (default); gpt2: learned positions, MHA")
    parser.add_argument("--layout", choices=LAYOUTS, default="optimum",
                        help="optimum: model.onnx + config.json, unfused attention (default); gqa: the ONNX Runtime "
                             "GenAI layout (GroupQueryAttention, fused norms, genai_config.json) of the same weights "
                             "(llama only)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default), or int4: MatMul weights quantized by onnxruntime's MatMulNBitsQuantizer "
                             "(block 32, symmetric, accuracy level 4); needs onnxruntime and onnx-ir")
    parser.add_argument("--force", action="store_true", help="replace a model already in --out")
    parser.add_argument("--kind", choices=("decoder", "encoder"), default="decoder",
                        help="decoder: a causal LM for generation (default); encoder: a BERT-style sentence "
                             "encoder for embeddings (Optimum feature-extraction layout with sentence-transformers "
                             "mean pooling; --preset tiny or bench, --arch is ignored)")
    return parser


def _build_encoder(args: argparse.Namespace) -> int:
    config = encoder.build_encoder(args.out, preset=args.preset, seed=args.seed, force=args.force)
    print(f"built encoder preset {args.preset} ({encoder.parameter_count(config):,} parameters, "
          f"vocab {config.vocab_size}, {config.hidden_size} dimensions, context {config.max_position_embeddings}) "
          f"in {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.kind == "encoder":
            if (args.layout, args.precision) != ("optimum", "fp32"):
                raise ValueError("--kind encoder is written in the optimum layout in fp32 only")
            return _build_encoder(args)
        config = build_variant(args.out, preset=args.preset, arch=args.arch, seed=args.seed, layout=args.layout,
                               precision=args.precision, force=args.force)
    except FileExistsError as exc:
        print(f"llmsuite-build-model: {exc} (pass --force)", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"llmsuite-build-model: {exc}", file=sys.stderr)
        return 2
    print(
        f"built {args.arch} preset {args.preset} ({args.layout} layout, {args.precision}, "
        f"{parameter_count(config):,} parameters, "
        f"vocab {config.vocab_size}, context {config.max_position_embeddings}) in {args.out} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
