"""onnxruntime-genai's own generation loop on a GenAI-layout folder: the yardstick for issue 16.

    build/bench-tools/ortgenai/bin/python bench/ortgenai_reference.py --model-dir models/bench-gqa \\
        --prompts prompts.json --new-tokens 128 --batch 16 --runs 2 --threads 2

Runs in its own virtual environment (`make bench` makes it from bench/requirements/ortgenai.txt),
never in the services' one: onnxruntime-genai brings its own onnxruntime build, and the services
must not import it (tests/test_packaging.py). So this file imports only the standard library,
numpy and onnxruntime_genai, and talks to bench/run.py through JSON on stdout.

Two loops, each greedy with every row exactly --new-tokens tokens (so EOS cannot end one early)
and the KV buffer shared between past and present as the folder's genai_config.json says:

* `--mode generator`: static batching as its Generator does it, one Generator over --batch
  prompts of equal length (min_length = max_length);
* `--mode engine`: its own serving loop, `og.Engine` with `og.Request`s, as a server built on it
  would run: --engine-concurrency requests in flight over all the prompts given, a finished one
  replaced by the next (the closed loop `llmsuite bench` runs against the gateway). Without a
  paged cache (`engine.dynamic_batching`, which needs a paged-attention model and a provider
  that runs it) the Engine batches statically: `engine.static_batching.max_batch_size` is set
  to --engine-concurrency, and the Engine then takes up to 4 waiting requests into a batch that
  runs until all its rows end (0.18's StaticBatchScheduler caps a batch at 4, whatever that
  setting says; `--engine-concurrency` still sets how many wait).

The session gets --threads intra-op threads through a config overlay, as llmsuite-inference gets
them from --intra-op-threads.
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


def _model(model_dir: Path, threads: int, engine_batch: int | None = None) -> Any:
    config = og.Config(str(model_dir))
    config.clear_providers()  # the CPU, as the reference loops use
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    if engine_batch is not None:
        config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": engine_batch}}}))
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


def serve(engine: Any, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict[str, Any]:
    """The Engine's closed loop: `concurrency` requests in flight until every prompt is served."""
    events = engine.create_event_buffer(max(64, 4 * concurrency))
    waiting = list(enumerate(prompts))
    tokens: dict[int, list[int]] = {}
    live: dict[Any, int] = {}  # request -> prompt index (the event's request is the same object)
    # Closed after the loop: closing a finished request while its static batch still runs made
    # the Engine less than half as fast here (0.18), so the yardstick does not do it.
    done: list[Any] = []

    def begin(index: int, prompt: list[int]) -> None:
        request = engine.create_request()
        turn = og.TurnOptions(request)
        turn.set_do_sample(False)
        turn.set_max_generated_tokens(new_tokens)
        turn.set_min_generated_tokens(new_tokens)
        request.begin_turn(np.asarray(prompt, dtype=np.int32), turn)
        live[request] = index
        tokens[index] = []

    started = time.perf_counter()
    while waiting and len(live) < concurrency:
        begin(*waiting.pop(0))
    token_flag, finished_flag = og.EngineEventFlags.TOKEN.value, og.EngineEventFlags.TURN_FINISHED.value
    while live:
        for event in engine.run(events):
            flags = int(event.flags.value)
            request = event.request
            if flags & og.EngineEventFlags.FAILED.value:
                raise RuntimeError(f"onnxruntime-genai Engine: request {live.get(request)} failed "
                                   f"({event.error_code})")
            if flags & token_flag:
                tokens[live[request]].append(int(event.token))
            if flags & finished_flag:
                del live[request]
                done.append(request)
                if waiting:
                    begin(*waiting.pop(0))
    total_s = time.perf_counter() - started
    for request in done:
        request.close()
    return {"tokens": [tokens[i] for i in range(len(prompts))], "total_s": total_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="a folder with genai_config.json")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON list of token-id lists, equal lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="rows of the static batch")
    parser.add_argument("--runs", type=int, default=2, help="timed batches (after one untimed warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--mode", choices=["generator", "engine"], default="generator")
    parser.add_argument("--engine-concurrency", type=int, default=16, help="--mode engine: requests in flight")
    args = parser.parse_args(argv)
    if args.mode == "engine":
        return main_engine(args)
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


def main_engine(args: argparse.Namespace) -> int:
    """--mode engine: every prompt in --prompts (any lengths) through og.Engine, --runs times."""
    prompts = json.loads(args.prompts.read_text())
    model = _model(args.model_dir, args.threads, engine_batch=args.engine_concurrency)
    engine = og.Engine(model)
    serve(engine, prompts[:1], 2, 1)  # warm-up, outside the timings
    runs = [serve(engine, prompts, args.new_tokens, args.engine_concurrency) for _ in range(args.runs)]
    output_tokens = sum(len(row) for run in runs for row in run["tokens"])
    seconds = sum(run["total_s"] for run in runs)
    print(json.dumps({
        "label": f"onnxruntime-genai Engine, {len(prompts)} requests {args.engine_concurrency} at a time "
                 "(static batching)",
        "requests": len(prompts), "concurrency": args.engine_concurrency, "runs": len(runs),
        "output_tokens": output_tokens, "seconds": round(seconds, 3),
        "output_tokens_per_s": round(output_tokens / seconds, 2),
        "onnxruntime_genai": og.__version__, "tokens": runs[0]["tokens"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
