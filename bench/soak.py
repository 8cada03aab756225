"""`make soak`: does the inference process's memory stay where its budget says, for minutes on end?

    python bench/soak.py                                   # tiny then bench preset, 10 minutes each
    python bench/soak.py --preset tiny --minutes 3         # a shorter look
    python bench/soak.py --preset tiny --kv-cache-bytes 64MiB

For each preset: builds it into models/<preset> unless it is there, starts the local cluster
(bench/run.py's Cluster: `python -m llmsuite.cluster` on free ports, default flags, prefix
cache on) and runs `llmsuite bench` through the gateway with --concurrency streams for
--minutes, prompts uniform over 32-1,024 tokens (capped so prompt + output fits the
model's context: the tiny preset has 512) and outputs over 16-256. Meanwhile it samples
the inference process's resident memory from /proc every second and its reported KV bytes
and budget from GetModelInfo.

It prints, per run: peak RSS, the weights (model file sizes), the KV budget, the drift
over the last half (median RSS of its last 30 s against its first 30 s), and PASS or FAIL
against issue 15's targets:
  * peak RSS <= weights + KV budget + 512 MiB;
  * drift over the last half < 5%;
  * with --kv-cache-bytes 64MiB (or any budget under 600 MiB): peak RSS <= weights + 600 MiB.
The exit status is 1 when a target is missed (it is a soak, not a test: run it by hand).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from run import BIN, REPO, Cluster, _default_device, _usable_cores, llmsuite_bench, machine

from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc

MIB = 1024**2
WORKING_MARGIN = 512 * MIB
SMALL_BUDGET_CEILING = 600 * MIB  # issue 15: with --kv-cache-bytes 64MiB, peak <= weights + 600 MiB
DRIFT_LIMIT = 0.05
DRIFT_WINDOW_S = 30.0
PAGE_BYTES = 4096


def _rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class RssSampler:
    """Samples one process's RSS every `period_s`, and the model's KV counters, until stopped."""

    pid: int
    address: str
    model: str
    period_s: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    peak_kv_bytes: int = 0
    budget_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not self._stop.wait(self.period_s):
                rss = _rss_bytes(self.pid)
                if rss is not None:
                    self.samples.append((time.monotonic() - self._started, rss))
                try:
                    stats = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model=self.model), timeout=5).info.stats
                except grpc.RpcError:
                    continue
                self.peak_kv_bytes = max(self.peak_kv_bytes, stats.kv_cache_bytes)
                self.budget_bytes = stats.kv_cache_budget_bytes

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.name.endswith((".onnx", ".onnx_data")))


def drift(samples: list[tuple[float, int]]) -> float:
    """Relative growth over the last half of the run: median RSS of its last DRIFT_WINDOW_S
    against that of its first DRIFT_WINDOW_S (medians, so one step's transient copy does not count)."""
    end = samples[-1][0]
    half = [(t, rss) for t, rss in samples if t >= end / 2]
    start = half[0][0]
    first = [rss for t, rss in half if t <= start + DRIFT_WINDOW_S]
    last = [rss for t, rss in half if t >= end - DRIFT_WINDOW_S]
    return statistics.median(last) / statistics.median(first) - 1.0


def verdict(peak: int, weights: int, budget: int, growth: float) -> list[tuple[str, bool]]:
    checks = [(f"peak <= weights + KV budget + 512 MiB ({(weights + budget + WORKING_MARGIN) / MIB:.0f} MiB)",
               peak <= weights + budget + WORKING_MARGIN),
              (f"drift over the last half < {DRIFT_LIMIT:.0%}", growth < DRIFT_LIMIT)]
    if budget < SMALL_BUDGET_CEILING:
        checks.append((f"small budget: peak <= weights + 600 MiB ({(weights + SMALL_BUDGET_CEILING) / MIB:.0f} MiB)",
                       peak <= weights + SMALL_BUDGET_CEILING))
    return checks


def soak(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    model_dir = args.models_dir / preset
    if not (model_dir / "model.onnx").is_file():
        print(f"building the {preset} preset into {model_dir} ...", file=sys.stderr, flush=True)
        subprocess.run([str(BIN / "llmsuite-build-model"), "--preset", preset, "--out", str(model_dir)], check=True)
    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    longest_prompt = min(args.max_prompt_tokens, context - args.max_output_tokens)
    env = {"LLMSUITE_KV_CACHE_BYTES": args.kv_cache_bytes} if args.kv_cache_bytes else {}
    results_dir = args.results_dir / f"{preset}-{args.kv_cache_bytes or 'auto'}"
    results_dir.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    print(f"soak: {preset}, {args.concurrency} streams for {seconds:.0f} s, prompts 32-{longest_prompt}, outputs "
          f"16-{args.max_output_tokens}, --kv-cache-bytes {args.kv_cache_bytes or 'auto'}", file=sys.stderr, flush=True)
    with Cluster(model_dir, args.device, args.threads, results_dir / "cluster.log", model_name=preset,
                 env=env) as cluster:
        pid = cluster.service_pid("inference")
        if pid is None:
            raise SystemExit("no inference process found under the cluster")
        with RssSampler(pid, cluster.address("inference"), preset) as sampler:
            bench, bench_argv = llmsuite_bench(cluster, [
                "-c", str(args.concurrency), "-z", str(seconds), "--warmup", "0", "--seed", str(args.seed),
                "--prompt-tokens", f"uniform:32:{longest_prompt}",
                "--output-tokens", f"uniform:16:{args.max_output_tokens}"], results_dir / "bench.json", model=preset)
    samples = sampler.samples
    if len(samples) < 4:
        raise SystemExit("too few RSS samples to judge")
    peak = max(rss for _, rss in samples)
    weights = weights_bytes(model_dir)
    growth = drift(samples)
    checks = verdict(peak, weights, sampler.budget_bytes, growth)
    level = bench["levels"][0]
    result = {
        "preset": preset, "kv_cache_bytes": args.kv_cache_bytes or "auto", "seconds": seconds,
        "concurrency": args.concurrency, "llmsuite_bench": " ".join(bench_argv),
        "requests": level.get("requests"), "errors": sum((level.get("errors") or {}).values()),
        "idle_rss_mib": round(samples[0][1] / MIB, 1), "peak_rss_mib": round(peak / MIB, 1),
        "weights_mib": round(weights / MIB, 1), "kv_budget_mib": round(sampler.budget_bytes / MIB, 1),
        "peak_reported_kv_mib": round(sampler.peak_kv_bytes / MIB, 1),
        "peak_over_weights_plus_budget": round(peak / (weights + sampler.budget_bytes), 3),
        "drift_last_half": round(growth, 4),
        "checks": [{"target": name, "pass": ok} for name, ok in checks],
    }
    (results_dir / "soak.json").write_text(json.dumps({**result, "rss_samples": samples}, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=["tiny", "bench"],
                        help="model preset to soak (repeatable; default: tiny, then bench)")
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration per preset (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="streams in flight (default 64)")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024,
                        help="prompts are uniform over 32..this, capped by the context (default 1024)")
    parser.add_argument("--max-output-tokens", type=int, default=256, help="outputs are uniform over 16..this")
    parser.add_argument("--kv-cache-bytes", default="",
                        help="passed to the inference service (e.g. 64MiB; default: its own default, auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=_usable_cores(), help="inference intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=_default_device())
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--results-dir", type=Path, default=REPO / "build" / "soak")
    args = parser.parse_args(argv)
    failed = False
    print(json.dumps({"machine": machine()}))
    for preset in args.preset or ["tiny", "bench"]:
        result = soak(preset, args)
        print(json.dumps(result))
        print(f"{preset} (--kv-cache-bytes {result['kv_cache_bytes']}): peak RSS {result['peak_rss_mib']} MiB, "
              f"weights {result['weights_mib']} MiB, KV budget {result['kv_budget_mib']} MiB (peak reported KV "
              f"{result['peak_reported_kv_mib']} MiB), peak / (weights + budget) "
              f"{result['peak_over_weights_plus_budget']}, drift over the last half "
              f"{result['drift_last_half']:+.2%}, {result['requests']} requests, {result['errors']} errors")
        for check in result["checks"]:
            print(f"  {'PASS' if check['pass'] else 'FAIL'}  {check['target']}")
            failed |= not check["pass"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
