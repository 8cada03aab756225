"""`llmsuite-build-model`: writes a deterministic test/bench model in the Optimum ONNX layout.

    python -m llmsuite.builder --preset tiny --out models/tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llmsuite.builder import encoder
from llmsuite.builder.model import ARCHITECTURES, PRESETS, build_model, parameter_count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmsuite-build-model",
        description="Build a seeded random decoder model (ONNX + config + tokenizer) in the "
        "Hugging Face Optimum export layout. Same arguments give byte-identical files.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: for tests (about 0.5M parameters); bench: about 100M parameters")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="weights and tokenizer seed (default 0)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama",
                        help="llama: RoPE + GQA + position_ids (default); gpt2: learned positions, MHA")
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
            return _build_encoder(args)
        config = build_model(args.out, preset=args.preset, arch=args.arch, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        print(f"llmsuite-build-model: {exc} (pass --force)", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"llmsuite-build-model: {exc}", file=sys.stderr)
        return 2
    print(
        f"built {args.arch} preset {args.preset} ({parameter_count(config):,} parameters, "
        f"vocab {config.vocab_size}, context {config.max_position_embeddings}) in {args.out} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
