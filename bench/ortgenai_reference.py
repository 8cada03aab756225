"""onnxruntime-genai's own generation loop on a GenAI-layout folder: the yardstick for issue 16.

    build/bench-tools/ortgenai/bin/python bench/ortgenai_reference.py --model-dir models/bench-gqa \\
        --prompts prompts.json --new-tokens 128 --batch 16 --runs 2 --threads 2

Runs in its own virtual environment (`make bench` makes it from bench/requirements/ortgenai.txt),
never in the services' one: onnxruntime-genai brings its own onnxruntime build, and the services
must not import it (tests/test_packaging.py). So this file imports only the standard library,
numpy and onnxruntime_genai, and talks to bench/run.py through JSON on stdout.

Static batching, as onnxruntime-genai's Generator does it: one Generator over --batch prompts
of equal length, greedy, every row exactly --new-tokens tokens (min_length = max_length, so EOS
cannot end a row early), the KV buffer shared between past and present as the folder's
genai_config.json says. The session gets --threads intra-op threads through a config overlay, as
llmsuite-inference gets them from --intra-op-threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og


def _model(model_dir: Path, threads: int) -> Any:
    config = og.Config(str(model_dir))
    config.clear_providers()  # the CPU, as the reference loops use
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def generate(model: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """One static batch: prefill (append_tokens) then one token per row per step."""
    width = len(prompts[0])
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=len(prompts), max_length=width + new_tokens,
                              min_length=width + new_tokens)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    prefill_s = time.perf_counter() - started
    step_s = []
    while not generator.is_done():
        step = time.perf_counter()
        generator.generate_next_token()
        step_s.append(time.perf_counter() - step)
    total_s = time.perf_counter() - started
    tokens = [[int(t) for t in generator.get_sequence(r)[width:]] for r in range(len(prompts))]
    return {"tokens": tokens, "prefill_s": prefill_s, "step_s": step_s, "total_s": total_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a folder with genai_config.json")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON list of token-id lists, equal lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="rows of the static batch")
    parser.add_argument("--runs", type=int, default=2, help="timed batches (after one untimed warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    args = parser.parse_args(argv)
    prompts = json.loads(args.prompts.read_text())[:args.batch]
    if len({len(p) for p in prompts}) != 1:
        print("ortgenai_reference: the static batch needs prompts of equal length", file=sys.stderr)
        return 2
    model = _model(args.model_dir, args.threads)
    generate(model, prompts, 2)  # warm-up: allocator arenas and kernels, outside the timings
    runs = [generate(model, prompts, args.new_tokens) for _ in range(args.runs)]
    output_tokens = sum(len(row) for run in runs for row in run["tokens"])
    seconds = sum(run["total_s"] for run in runs)
    print(json.dumps({
        "label": f"onnxruntime-genai Generator, static batch of {len(prompts)}", "rows": len(prompts),
        "runs": len(runs), "output_tokens": output_tokens, "seconds": round(seconds, 3),
        "output_tokens_per_s": round(output_tokens / seconds, 2),
        "ttft_p50_ms": round(float(np.median([r["prefill_s"] for r in runs])) * 1e3, 2),
        "itl_p50_ms": round(float(np.median([s for r in runs for s in r["step_s"]])) * 1e3, 2),
        "onnxruntime_genai": og.__version__, "tokens": runs[0]["tokens"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
