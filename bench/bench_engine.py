"""Engine throughput: prefill and decode tokens/s, and what the KV cache buys, measured in one run.

    python bench/bench_engine.py                       # tiny model, built into a temp dir
    python bench/bench_engine.py --bench-model models/bench   # also the ~100M preset (built if absent)
    python bench/bench_engine.py --model path/to/optimum-export

For each model it reports, on the same session and the same tokens:
  * prefill tokens/s (one forward over the prompt),
  * decode tokens/s with the KV cache (one token per forward, present fed back as past),
  * decode tokens/s recomputing the whole sequence every step (no cache), and the ratio,
  * end-to-end through InferenceEngine: time to first token, one stream's tokens/s, and
    aggregate tokens/s of several concurrent streams (continuous batching: one forward per
    step over every decoding row), as a ratio to the single stream;
  * the sampler's cost per token on a Qwen2-sized vocabulary (151,936 logits per row): the
    batched greedy argmax, top-k/top-p and logprobs, next to the model's decode forward.
It prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from llmsuite.builder.model import build_model
from llmsuite.inference.engine import EngineSettings, InferenceEngine, SamplingParams, TurnResult
from llmsuite.inference.engine.device import available_cores
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.sampling import TokenSampler, choose_batch


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_decoder(decoder: OnnxDecoder, prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, float]:
    vocab = decoder.signature.vocab_size
    prompt = [int(i) for i in np.random.default_rng(0).integers(7, vocab, size=prompt_tokens)]
    decoder.forward(prompt, decoder.empty_cache())  # warm-up

    prefill_s = _median_time(lambda: decoder.forward(prompt, decoder.empty_cache()), repeats)

    def decode_with_cache() -> None:
        result = decoder.forward(prompt, decoder.empty_cache())
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(result.logits[-1]))
            result = decoder.forward([token], result.cache)
        timings.append(time.perf_counter() - start)

    def decode_without_cache() -> None:
        sequence = list(prompt)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = decoder.forward(sequence, decoder.empty_cache()).logits[-1]
            sequence.append(int(np.argmax(logits)))
        timings.append(time.perf_counter() - start)

    timings: list[float] = []
    for _ in range(repeats):
        decode_with_cache()
    cached_s = statistics.median(timings)
    timings = []
    for _ in range(max(1, repeats // 2)):
        decode_without_cache()
    recompute_s = statistics.median(timings)
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s_kv_cache": new_tokens / cached_s,
        "decode_tokens_per_s_recompute": new_tokens / recompute_s,
        "kv_cache_speedup": recompute_s / cached_s,
    }


QWEN2_VOCAB = 151_936


def measure_sampling(rows: int, repeats: int) -> dict[str, float]:
    """Microseconds per sampled token on [rows, 151936] float32 logits.

    "zipf" logits fall off like a language model's (logit = -1.2 log rank, ranks shuffled
    over the ids); "flat" ones are Gaussian noise, the worst case for top-p (a nucleus of
    tens of thousands of tokens).
    """
    rng = np.random.default_rng(3)
    ranks = np.arange(1, QWEN2_VOCAB + 1, dtype=np.float32)
    zipf = np.stack([rng.permutation(-1.2 * np.log(ranks)) for _ in range(rows)]).astype(np.float32)
    flat = (rng.standard_normal((rows, QWEN2_VOCAB)) * 3).astype(np.float32)

    threads = available_cores()
    pool = ThreadPoolExecutor(threads) if threads > 1 else None  # as the scheduler samples

    def per_token_us(logits: np.ndarray, params: SamplingParams) -> float:
        samplers = [TokenSampler(params, QWEN2_VOCAB) for _ in range(rows)]
        choose_batch(samplers, logits, pool)  # warm-up
        return _median_time(lambda: choose_batch(samplers, logits, pool), repeats) / rows * 1e6

    return {
        "sampling_us_per_token_greedy": per_token_us(zipf, SamplingParams(temperature=0.0)),
        "sampling_us_per_token_temperature_0.8": per_token_us(zipf, SamplingParams(temperature=0.8, seed=1)),
        "sampling_us_per_token_top_p_0.9_zipf": per_token_us(zipf, SamplingParams(temperature=0.8, top_p=0.9,
                                                                                   seed=1)),
        "sampling_us_per_token_top_p_0.9_flat": per_token_us(flat, SamplingParams(temperature=0.8, top_p=0.9,
                                                                                   seed=1)),
        "sampling_us_per_token_top_k_50_top_p_0.95": per_token_us(
            zipf, SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=1)),
        "sampling_us_per_token_logprobs_top5": per_token_us(
            zipf, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)),
    }


async def measure_engine(engine: InferenceEngine, model: str, prompt_tokens: int, new_tokens: int,
                         streams: int) -> dict[str, float]:
    vocab = engine.model_info(model).vocab_size
    prompt = [int(i) for i in np.random.default_rng(1).integers(7, vocab, size=prompt_tokens)]
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)

    async def one() -> TurnResult:
        session = engine.open_session(model, multi_turn=False)
        try:
            async for item in session.generate(prompt, params):
                if isinstance(item, TurnResult):
                    return item
        finally:
            session.close()
        raise AssertionError("stream ended without a TurnResult")

    await one()  # warm the scheduler path
    single = await one()
    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(streams)))
    wall = time.perf_counter() - started
    generated = sum(r.usage.completion_tokens for r in results)
    single_rate = new_tokens / single.timings.total_s
    return {
        "time_to_first_token_ms": single.timings.time_to_first_token_s * 1e3,
        "single_stream_tokens_per_s": single_rate,
        f"aggregate_tokens_per_s_{streams}_streams": generated / wall,
        f"aggregate_vs_single_{streams}_streams": generated / wall / single_rate,
        f"worst_ttft_ms_{streams}_streams": max(r.timings.time_to_first_token_s for r in results) * 1e3,
    }


def bench_model(name: str, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    # No prefix cache: every stream repeats one prompt, and the figures are about computing it.
    settings = EngineSettings(device=args.device, intra_op_threads=args.threads, prefix_cache=False)
    decoder = OnnxDecoder.load(directory, settings)
    report: dict[str, Any] = {
        "model": name,
        "provider": decoder.placement.execution_provider,
        "layers": decoder.signature.num_layers,
        "kv_heads": decoder.signature.num_kv_heads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }
    report.update(measure_decoder(decoder, args.prompt_tokens, args.new_tokens, args.repeats))
    engine = InferenceEngine.load({name: directory}, settings)
    try:
        for streams in args.streams:
            report.update(asyncio.run(measure_engine(engine, name, args.prompt_tokens, args.new_tokens, streams)))
    finally:
        asyncio.run(engine.close())
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[], help="an export directory (repeatable)")
    parser.add_argument("--bench-model", type=Path, help="directory of the ~100M bench preset; built if absent")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny model built into a temp dir")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 16],
                        help="concurrent streams for the aggregate figures")
    parser.add_argument("--sampling-rows", type=int, default=16, help="batch rows for the sampling cost")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = the CPUs this process may use)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    sampling = measure_sampling(args.sampling_rows, args.repeats)
    print(json.dumps({"sampling_rows": args.sampling_rows, "vocab": QWEN2_VOCAB,
                      **{k: round(v, 1) for k, v in sampling.items()}}))
    models: list[tuple[str, Path]] = [(path.name, path) for path in args.model]
    with tempfile.TemporaryDirectory() as scratch:
        if not args.no_tiny:
            tiny = Path(scratch) / "tiny"
            build_model(tiny, preset="tiny")
            models.insert(0, ("tiny", tiny))
        if args.bench_model is not None:
            if not (args.bench_model / "model.onnx").is_file():
                print(f"building the bench preset into {args.bench_model} ...", file=sys.stderr)
                build_model(args.bench_model, preset="bench")
            models.append(("bench", args.bench_model))
        for name, directory in models:
            report = bench_model(name, directory, args)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in report.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
