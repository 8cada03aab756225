"""`make bench`: the serving benchmark against its in-process yardsticks, in one run.

    python bench/run.py                      # what `make bench` runs: three builds of the bench preset
    python bench/run.py --layouts gqa        # one layout only (optimum, gqa, int4; comma-separated)
    python bench/run.py --requests 8,32,128,256 --reference-runs 3   # longer, steadier
    python bench/run.py --output-tokens 32 --requests 2,4,16,64 --no-write   # a quick look

For each layout in --layouts (issue 16: the same seeded weights as the Optimum export, as
ONNX Runtime GenAI's fused layout `--layout gqa`, and that layout quantized to int4):
1. Builds the `bench` preset in that layout into --models-dir unless it is there.
2. Starts the local cluster (`python -m llmsuite.cluster`) on free ports, the inference
   service with --threads intra-op threads.
3. Runs `llmsuite bench` through the gateway at each concurrency level (greedy, EOS
   ignored), sampling the inference process's memory and KV counters meanwhile. With
   --profile, py-spy records the inference and gateway processes meanwhile (to find what
   bounds a missed target).
4. On the fused fp32 layout (gqa): --paired-rounds rounds of the gateway at c=--batch, each
   followed by every yardstick of issue 16 on that level's prompts (in-process fused and
   Optimum batches, onnxruntime-genai's Engine serving the same requests --batch at a time,
   and its Generator), so each ratio is taken within a round (this machine's speed drifts by
   more than the targets' margins over minutes); the targets use the median over rounds.
5. On the --http-layout: the HTTP hop (issue 17), c=--http-concurrency through the gateway
   over gRPC and then the same prompts through `llmsuite-openai` (bench/http_bench.py),
   alternated --http-rounds times on the same cluster.
6. On the first layout only: issue 17's constrained level (c=16 with every request under
   bench/structured_output.schema.json against plain c=16, alternated), with --chat issue
   11's multi-turn workload, and the embeddings level (issue 18): the cluster also serves the
   encoder bench preset, `llmsuite bench --workload embed` at --embed-concurrency, and after
   the cluster stops bench/embed_reference.py embeds the same texts straight on onnxruntime.
7. Stops the cluster, then runs the references on a quiet machine, straight on onnxruntime
   with the same session settings and the very prompt tokens the gateway sent
   (bench/reference.py): one sequence at a time, and one batch (left-padded; in the fused
   layout also with the KV buffer shared in place, as onnxruntime-genai runs it).
After the fused fp32 layout's references: onnxruntime-genai's own Generator (static batch of
--batch) on its files with the c=--batch prompts, in its own virtual environment
(bench/ortgenai_reference.py; `make bench` installs it, --no-ortgenai skips it and the paired
rounds' onnxruntime-genai sides).
Then it prints issue 7's ratios per layout and issue 16's and 17's across them, and writes
them, with the machine, the command and the run's duration, to docs/performance.md (unless
--no-write). Raw results go to --results-dir.

It asserts nothing: a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import onnxruntime as ort
import performance_doc
from embed_reference import run_embed_reference
from prometheus_client.parser import text_string_to_metric_families
from reference import GreedyRun, ReferenceSession, greedy

from llmsuite.cluster import wait_serving
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MODEL_NAME = "bench"
ORTGENAI_PYTHON = REPO / "build" / "bench-tools" / "ortgenai" / "bin" / "python"


@dataclass(frozen=True)
class Layout:
    """One build of the bench preset: the same seeded weights, a different export."""

    name: str
    folder: str  # under --models-dir
    builder_args: tuple[str, ...]
    title: str


LAYOUTS = {layout.name: layout for layout in (
    Layout("optimum", "bench", (), "Optimum layout, fp32"),
    Layout("gqa", "bench-gqa", ("--layout", "gqa"), "fused GroupQueryAttention (ONNX Runtime GenAI) layout, fp32"),
    Layout("int4", "bench-gqa-int4", ("--layout", "gqa", "--precision", "int4"),
           "fused layout, int4 (MatMulNBits, block 32)"),
)}


def parse_layouts(text: str) -> list[Layout]:
    """--layouts: names from LAYOUTS, comma-separated, each at most once, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--layouts takes one or more of {', '.join(LAYOUTS)}, comma-separated, each once (got {text!r})")
    return [LAYOUTS[n] for n in names]
STRUCTURED_OUTPUT_SCHEMA = Path(__file__).resolve().parent / "structured_output.schema.json"
EMBED_MODEL_NAME = "bench-embed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _default_device() -> str:
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


class Cluster:
    """`python -m llmsuite.cluster` on free ports; its log goes to a file (nothing to drain)."""

    def __init__(self, model_dir: Path, device: str, threads: int, log_path: Path, *, model_name: str = MODEL_NAME,
                 env: dict[str, str] | None = None, embed_model_dir: Path | None = None) -> None:
        self.ports = {name: _free_port() for name in ("gateway", "tokenizer", "inference", "openai")}
        self.argv = [str(BIN / "python"), "-m", "llmsuite.cluster", "--model", f"{model_name}={model_dir}",
                     "--device", device, *(f"--{n}-port={p}" for n, p in self.ports.items())]
        if embed_model_dir is not None:
            self.argv += ["--embedding-model", f"{EMBED_MODEL_NAME}={embed_model_dir}"]
        # The services read every flag from its LLMSUITE_* variable too; the cluster passes its env on.
        self.env = {**os.environ, "LLMSUITE_INTRA_OP_THREADS": str(threads), "LLMSUITE_INTER_OP_THREADS": "0",
                    "LLMSUITE_GRAPH_OPTIMIZATION": "all", **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def wait_http(self, timeout_s: float = 300.0) -> str:
        """The adapter's base URL once its /health answers 200 (the launcher starts it after the gateway)."""
        url = f"http://{self.address('openai')}"
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"the cluster exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"llmsuite-openai not ready within {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.5)

    def __enter__(self) -> Cluster:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            # The launcher waits for each service in turn; the gateway comes last.
            assert self.proc is not None
            wait_serving("the cluster", self.address("gateway"), self.proc, timeout_s=600.0,
                         log_hint=f"see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def service_pid(self, service: str) -> int | None:
        """The launcher's child running llmsuite-SERVICE (each is exec'd in place, so its parent is the launcher)."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and f"llmsuite-{service}".encode() in cmdline:
                return int(entry.name)
        return None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher drains and stops its children
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def profiling(pids: dict[str, int | None], out_dir: Path) -> Iterator[None]:
    """py-spy samples each process while the block runs (without pausing it) and writes
    a speedscope profile per process (open it at https://www.speedscope.app)."""
    recorders = []
    for name, pid in pids.items():
        if pid is None:
            raise SystemExit(f"--profile: no {name} process found")
        output = out_dir / f"{name}.speedscope.json"
        recorders.append(subprocess.Popen(
            [str(BIN / "py-spy"), "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
             "--format", "speedscope", "--output", str(output)],
            stdout=subprocess.DEVNULL, stderr=(out_dir / f"{name}.py-spy.log").open("wb")))
        print(f"profiling {name} (pid {pid}) into {output}", file=sys.stderr)
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its profile when interrupted
        for recorder in recorders:
            recorder.wait(120)


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class MemoryWatch:
    """Samples the inference process's resident memory and the service's KV counters."""

    pid: int | None
    address: str
    model: str = MODEL_NAME
    peak_rss_kib: int = 0
    peak_kv_bytes: int = 0
    peak_running: int = 0
    peak_queued: int = 0
    hwm_kib: int | None = None
    budget: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> MemoryWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not self._stop.wait(0.5):
                if self.pid is not None:
                    self.peak_rss_kib = max(self.peak_rss_kib, _status_kib(self.pid, "VmRSS") or 0)
                try:
                    info = stub.GetModelInfo(inference_pb2.GetModelInfoRequest(model=self.model), timeout=5).info
                except grpc.RpcError:
                    continue
                self.peak_kv_bytes = max(self.peak_kv_bytes, info.stats.kv_cache_bytes)
                self.peak_running = max(self.peak_running, info.stats.running)
                self.peak_queued = max(self.peak_queued, info.stats.queued)
                self.budget = {"kv_cache_budget_bytes": info.stats.kv_cache_budget_bytes}

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            self.hwm_kib = _status_kib(self.pid, "VmHWM")  # the process's peak, read before it stops
        self._stop.set()
        self._thread.join(10)


def engine_steps(cluster: Cluster, model: str = MODEL_NAME) -> dict[str, Any] | None:
    """What the inference engine's scheduler did so far, from its /metrics (inference gRPC port
    + 1000): decode steps, rows per step and step time. A layout that batches only rows of equal
    length shows it here as few rows per step."""
    port = cluster.ports["inference"] + 1000
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.name.endswith(("_sum", "_count")):
                sums[sample.name] = sample.value
    steps = sums.get("llmsuite_inference_batch_size_count")
    timed = sums.get("llmsuite_inference_step_duration_seconds_count")
    if not steps or not timed:
        return None
    return {"decode_steps": int(steps), "mean_rows_per_decode_step": round(sums["llmsuite_inference_batch_size_sum"]
                                                                            / steps, 2),
            "steps": int(timed),
            "mean_step_ms": round(sums["llmsuite_inference_step_duration_seconds_sum"] / timed * 1e3, 2)}


def llmsuite_bench(cluster: Cluster, options: list[str], json_path: Path, *, model: str = MODEL_NAME
                   ) -> tuple[dict[str, Any], list[str]]:
    """Runs `llmsuite bench --json` against the cluster's gateway; its progress bar shows on a terminal."""
    argv = ["llmsuite", "--address", cluster.address("gateway"), "bench", "--model", model, *options, "--json"]
    print("$ " + shlex.join(argv), file=sys.stderr, flush=True)
    done = subprocess.run([str(BIN / argv[0]), *argv[1:]], stdout=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llmsuite bench failed with exit code {done.returncode}")
    json_path.write_bytes(done.stdout)
    return json.loads(done.stdout), argv


def run_gateway_bench(cluster: Cluster, args: argparse.Namespace, out_dir: Path) -> tuple[dict[str, Any], list[str]]:
    return llmsuite_bench(cluster, [
        "-c", args.concurrency, "-n", args.requests, "--prompt-tokens", str(args.prompt_tokens),
        "--output-tokens", str(args.output_tokens), "--warmup", str(args.warmup), "--seed", str(args.seed),
        "--save-requests", str(out_dir / "requests.jsonl"), "--save-prompts", str(out_dir / "prompts.jsonl")],
        out_dir / "gateway.json")


def run_chat_bench(cluster: Cluster, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Issue 11's workload: conversations re-sent whole each turn, one at a time, and the
    time to first token of the last turn against that of an unrelated prompt of the same
    length (nothing to reuse, so uncached whatever the server keeps)."""
    chat, chat_argv = llmsuite_bench(cluster, [
        "--workload", "chat", "--chat-mode", "resend", "--turns", str(args.chat_turns), "-c", "1",
        "-n", str(args.chat_conversations), "--prompt-tokens", str(args.chat_prompt_tokens),
        "--output-tokens", str(args.chat_output_tokens), "--warmup", "1", "--seed", str(args.seed),
        "--save-requests", str(out_dir / "chat-requests.jsonl")], out_dir / "chat.json")
    records = [json.loads(line) for line in (out_dir / "chat-requests.jsonl").read_text().splitlines()]
    last = [r for r in records if r["code"] == "OK" and r["turn"] == args.chat_turns - 1]
    if not last:
        return {"command": shlex.join(chat_argv), "levels": chat["levels"], "error": "no last turn succeeded"}
    last_prompt = round(statistics.median(r["prompt_tokens"] + r["cached_tokens"] for r in last))
    uncached, uncached_argv = llmsuite_bench(cluster, [
        "-c", "1", "-n", str(args.chat_conversations), "--prompt-tokens", str(last_prompt), "--output-tokens", "4",
        "--warmup", "0", "--seed", str(args.seed + 1)], out_dir / "chat-uncached.json")
    (level,), (baseline,) = chat["levels"], uncached["levels"]
    last_ttft = level["turns"][-1]["ttft_ms"]["p50"] if level["turns"] else None
    return {
        "command": shlex.join(chat_argv), "uncached_command": shlex.join(uncached_argv),
        "turns": level["turns"], "errors": level["errors"], "cache_hit_rate": level["cache_hit_rate"],
        "last_turn_prompt_tokens": last_prompt, "last_turn_ttft_p50_ms": last_ttft,
        "uncached_ttft_p50_ms": baseline["ttft_ms"]["p50"],
    }


def run_constraint_bench(cluster: Cluster, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Issue 17's cost of constrained decoding: c=N with every request under a JSON Schema
    against plain c=N, alternated (plain, constrained, plain, constrained) so that drift in a
    shared machine's load falls on both sides."""
    c = str(args.constraint_concurrency)
    common = ["-c", c, "-n", str(args.constraint_requests), "--prompt-tokens", str(args.prompt_tokens),
              "--output-tokens", str(args.output_tokens), "--warmup", "1", "--seed", str(args.seed + 2)]
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "constrained": []}
    commands = {}
    for round_ in range(args.constraint_rounds):
        for side, extra in (("plain", []), ("constrained", ["--json-schema", str(STRUCTURED_OUTPUT_SCHEMA)])):
            result, argv = llmsuite_bench(cluster, [*common, *extra], out_dir / f"constraint-{side}-{round_}.json")
            (level,) = result["levels"]
            runs[side].append(level)
            commands[side] = shlex.join(argv)

    def total(side: str, key: str) -> float:
        return float(sum(level[key] for level in runs[side]))

    def tokens_per_s(side: str) -> float | None:
        seconds = total(side, "duration_s")
        return total(side, "output_tokens") / seconds if seconds else None

    return {
        "concurrency": args.constraint_concurrency, "rounds": args.constraint_rounds, "commands": commands,
        "schema": str(STRUCTURED_OUTPUT_SCHEMA.relative_to(REPO)),
        "plain_output_tokens_per_s": tokens_per_s("plain"),
        "constrained_output_tokens_per_s": tokens_per_s("constrained"),
        "errors": {side: sum(sum(level["errors"].values()) for level in levels) for side, levels in runs.items()},
        "length_mismatches": {side: sum(level["length_mismatches"] for level in levels)
                              for side, levels in runs.items()},
        "itl_p50_ms": {side: [level["itl_ms"]["p50"] for level in levels] for side, levels in runs.items()},
    }


def run_embed_bench(cluster: Cluster, args: argparse.Namespace, out_dir: Path) -> tuple[dict[str, Any], list[str]]:
    return llmsuite_bench(cluster, [
        "--workload", "embed", "-c", str(args.embed_concurrency), "-n", str(args.embed_requests),
        "--texts-per-request", str(args.texts_per_request), "--warmup", "2", "--seed", str(args.seed),
        "--save-texts", str(out_dir / "embed-texts.jsonl")], out_dir / "embed.json", model=EMBED_MODEL_NAME)


def embeddings_results(args: argparse.Namespace, out_dir: Path, gateway: dict[str, Any], argv: list[str]
                       ) -> dict[str, Any]:
    """The gateway's texts/s against the in-process loop over the same texts (run with the cluster stopped)."""
    batches = [json.loads(line) for line in (out_dir / "embed-texts.jsonl").read_text().splitlines()]
    print(f"reference: embedding {len(batches)} requests of {args.texts_per_request} texts in-process",
          file=sys.stderr)
    reference = run_embed_reference(args.embed_model_dir, batches, intra_op_threads=args.threads)
    (level,) = gateway["levels"]
    return {"command": shlex.join(argv), "level": level, "reference": reference.to_dict(),
            "texts_per_request": args.texts_per_request,
            "model_weights_mib": round((args.embed_model_dir / "model.onnx").stat().st_size / 2**20, 1)}


@dataclass(frozen=True)
class ReferenceResult:
    label: str
    rows: int
    runs: list[GreedyRun]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.output_tokens for r in self.runs) / sum(r.total_s for r in self.runs)

    @property
    def ttft_p50_s(self) -> float:
        return statistics.median(r.prefill_s for r in self.runs)

    @property
    def itl_p50_s(self) -> float:
        return statistics.median(s for r in self.runs for s in r.step_s)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "rows": self.rows, "runs": len(self.runs),
                "output_tokens": sum(r.output_tokens for r in self.runs),
                "seconds": round(sum(r.total_s for r in self.runs), 3),
                "output_tokens_per_s": round(self.tokens_per_s, 2), "ttft_p50_ms": round(self.ttft_p50_s * 1e3, 2),
                "itl_p50_ms": round(self.itl_p50_s * 1e3, 2)}


def run_references(model_dir: Path, args: argparse.Namespace, singles: list[list[int]], batch: list[list[int]]
                   ) -> dict[str, ReferenceResult]:
    """One greedy run per prompt in `singles`, alone; --reference-runs runs of `batch` as one batch.
    Where the export shares its KV buffer between past and present (GenAI's
    past_present_share_buffer), the batch runs both ways: in place, and with present fed back."""
    ref = ReferenceSession.load(model_dir, intra_op_threads=args.threads, device=args.device)
    loops = {"batch": ref}
    if ref.share_buffer:
        loops["batch_concat"] = dataclasses.replace(ref, share_buffer=False)
    # Warm the session for every shape (allocator arenas, kernels) outside the timings.
    greedy(ref, singles[:1], 2)
    for loop in loops.values():
        greedy(loop, batch, 2)
    print(f"reference: {len(singles)} single-sequence runs of {args.output_tokens} tokens", file=sys.stderr)
    results = {"single": ReferenceResult("single sequence", 1, [greedy(ref, [p], args.output_tokens)
                                                                for p in singles])}
    for key, loop in loops.items():
        label = (f"batch of {len(batch)}, KV buffer shared in place" if loop.share_buffer else
                 f"left-padded batch of {len(batch)}" + (", present fed back as past" if key != "batch" else ""))
        print(f"reference: {args.reference_runs} runs of a {label}", file=sys.stderr)
        results[key] = ReferenceResult(label, len(batch), [greedy(loop, batch, args.output_tokens)
                                                           for _ in range(args.reference_runs)])
    return results


def run_http_hop(cluster: Cluster, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Issue 17's HTTP hop: c=N over gRPC, then the very same prompts through llmsuite-openai,
    alternated --http-rounds times so that drift in a shared machine's load falls on both sides."""
    url = cluster.wait_http()
    c = args.http_concurrency
    prompts = out_dir / "http-hop-prompts.jsonl"
    runs: dict[str, list[dict[str, Any]]] = {"grpc": [], "http": []}
    commands: dict[str, str] = {}
    for round_ in range(args.http_rounds):
        grpc_result, grpc_argv = llmsuite_bench(cluster, [
            "-c", str(c), "-n", str(args.http_requests), "--prompt-tokens", str(args.prompt_tokens),
            "--output-tokens", str(args.output_tokens), "--warmup", "1", "--seed", str(args.seed + 3),
            "--save-prompts", str(prompts)], out_dir / f"http-hop-grpc-{round_}.json")
        runs["grpc"].append(grpc_result["levels"][0])
        commands["grpc"] = shlex.join(grpc_argv)
        http_argv = [str(BIN / "python"), str(BENCH / "http_bench.py"), "--url", url, "--model", MODEL_NAME,
                     "--prompts", str(prompts), "-c", str(c), "--warmup", "1"]
        print("$ " + shlex.join(http_argv), file=sys.stderr, flush=True)
        done = subprocess.run(http_argv, stdout=subprocess.PIPE, check=False)
        if done.returncode != 0:
            raise SystemExit(f"bench/http_bench.py failed with exit code {done.returncode}")
        (out_dir / f"http-hop-http-{round_}.json").write_bytes(done.stdout)
        runs["http"].append(json.loads(done.stdout))
        commands["http"] = shlex.join(["python", *http_argv[1:]])

    def tokens_per_s(side: str) -> float | None:
        seconds = sum(level["duration_s"] for level in runs[side])
        return sum(level["output_tokens"] for level in runs[side]) / seconds if seconds else None

    return {
        "concurrency": c, "rounds": args.http_rounds, "requests": args.http_requests, "commands": commands,
        "grpc_output_tokens_per_s": tokens_per_s("grpc"), "http_output_tokens_per_s": tokens_per_s("http"),
        "errors": {side: sum(sum(level["errors"].values()) for level in levels) for side, levels in runs.items()},
        "length_mismatches": {side: sum(level["length_mismatches"] for level in levels)
                              for side, levels in runs.items()},
        "ttft_p50_ms": {side: [level["ttft_ms"]["p50"] for level in levels] for side, levels in runs.items()},
        "itl_p50_ms": {side: [level["itl_ms"]["p50"] for level in levels] for side, levels in runs.items()},
    }


def run_ortgenai(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]], out_dir: Path, *,
                 mode: str = "generator", runs: int | None = None, name: str = "ortgenai") -> dict[str, Any] | None:
    """onnxruntime-genai on the same files and prompts, in its own environment: its Generator
    over `prompts` as one static batch, or (mode "engine") its Engine serving them --batch at a time."""
    if not args.ortgenai_python.is_file():
        print(f"onnxruntime-genai: no {args.ortgenai_python} (make bench installs it); skipped", file=sys.stderr)
        return None
    prompts_path = out_dir / f"{name}-prompts.json"
    prompts_path.write_text(json.dumps(prompts))
    argv = [str(args.ortgenai_python), str(BENCH / "ortgenai_reference.py"), "--model-dir", str(model_dir),
            "--prompts", str(prompts_path), "--new-tokens", str(args.output_tokens), "--batch", str(len(prompts)),
            "--runs", str(args.reference_runs if runs is None else runs), "--threads", str(args.threads),
            "--mode", mode, "--engine-concurrency", str(args.batch)]
    print("$ " + shlex.join(argv), file=sys.stderr, flush=True)
    done = subprocess.run(argv, stdout=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/ortgenai_reference.py failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout)
    (out_dir / f"{name}.json").write_bytes(done.stdout)
    return result


PAIRED_SIDES = {  # issue 16's yardsticks for the fused layout's gateway at c=--batch
    "fused_batch": "fused in-process batch (KV buffer shared in place)",
    "optimum_batch": "Optimum in-process batch (left-padded)",
    "ortgenai_engine": "onnxruntime-genai Engine (closed loop, static batching)",
    "ortgenai_generator": "onnxruntime-genai Generator (static batch)",
}


def run_paired_rounds(cluster: Cluster, args: argparse.Namespace, model_dir: Path, out_dir: Path
                      ) -> dict[str, Any]:
    """Issue 16's c=--batch ratios, each side measured right after the gateway, --paired-rounds times.

    This machine's speed drifts by 10-20% over minutes (other tenants of the host), more than the
    margins of the targets, so a ratio of two figures taken minutes apart says little. Here each
    round runs the gateway level (its cluster then idles, which costs nothing) and every
    yardstick in turn, each ratio is taken within its round, and the median over rounds is
    reported with the spread."""
    optimum_dir = args.models_dir / LAYOUTS["optimum"].folder
    ensure_built(LAYOUTS["optimum"], optimum_dir)
    loops = {"fused_batch": ReferenceSession.load(model_dir, intra_op_threads=args.threads, device=args.device),
             "optimum_batch": ReferenceSession.load(optimum_dir, intra_op_threads=args.threads, device=args.device)}
    rounds: list[dict[str, Any]] = []
    prompts: list[list[int]] = []
    for index in range(args.paired_rounds):
        print(f"[paired] round {index + 1} of {args.paired_rounds}", file=sys.stderr, flush=True)
        saved = out_dir / f"paired-{index}-prompts.jsonl"
        level, _ = llmsuite_bench(cluster, [
            "-c", str(args.batch), "-n", str(args.paired_requests), "--prompt-tokens", str(args.prompt_tokens),
            "--output-tokens", str(args.output_tokens), "--warmup", "0", "--seed", str(args.seed + 1000 + index),
            "--save-prompts", str(saved)], out_dir / f"paired-{index}-gateway.json")
        prompts = [json.loads(line)["token_ids"] for line in saved.read_text().splitlines()]
        batch = prompts[:args.batch]
        figures: dict[str, float | None] = {"gateway": level["levels"][0]["output_tokens_per_s"]}
        for key, loop in loops.items():
            if index == 0:
                greedy(loop, batch, 2)  # warm-up outside the timings
            run = greedy(loop, batch, args.output_tokens)
            figures[key] = run.output_tokens / run.total_s
        if args.ortgenai:
            engine = run_ortgenai(args, model_dir, prompts, out_dir, mode="engine", runs=1,
                                  name=f"paired-{index}-ortgenai-engine")
            generator = run_ortgenai(args, model_dir, batch, out_dir, runs=1, name=f"paired-{index}-ortgenai")
            figures["ortgenai_engine"] = engine["output_tokens_per_s"] if engine else None
            figures["ortgenai_generator"] = generator["output_tokens_per_s"] if generator else None
        rounds.append({k: None if v is None else round(v, 2) for k, v in figures.items()})
    return {"rounds": rounds, "ratios": summarise_rounds(rounds), "sides": PAIRED_SIDES, "concurrency": args.batch,
            "requests": args.paired_requests}


def summarise_rounds(rounds: list[dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """Per yardstick: the median, least and greatest of gateway / it over the rounds that ran it."""
    ratios: dict[str, dict[str, float] | None] = {}
    for side in PAIRED_SIDES:
        per_round = [gateway / theirs for r in rounds if (theirs := r.get(side)) and (gateway := r["gateway"])]
        ratios[side] = ({"median": round(statistics.median(per_round), 3), "min": round(min(per_round), 3),
                         "max": round(max(per_round), 3)} if per_round else None)
    return ratios


def token_agreement(outputs: dict[tuple[int, ...], list[int]], rows: list[list[int]], runs: list[GreedyRun]
                    ) -> dict[str, int]:
    """How many of the gateway's greedy outputs equal the reference's for the same
    prompt ids (the same ids in, so all should agree; float differences between
    batched and single kernels can flip a near-tie)."""
    compared = identical = 0
    for run in runs:
        for row, tokens in zip(rows, run.tokens, strict=True):
            served = outputs.get(tuple(row))
            if served is not None:
                compared += 1
                identical += served == tokens
    return {"identical": identical, "compared": compared}


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown") \
        if Path("/proc/cpuinfo").exists() else platform.processor() or "unknown"
    memory_kib = _status_kib_meminfo()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {"cpu": model, "logical_cpus": os.cpu_count(), "usable_cpus": _usable_cores(),
            "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None, "os": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "commit": commit + ("+dirty" if dirty else ""), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _status_kib_meminfo() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", type=parse_layouts, default=list(LAYOUTS.values()),
                        help=f"builds of the bench preset to serve, in turn (default {','.join(LAYOUTS)}); the "
                             "first also runs the constrained, chat and embeddings levels")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models",
                        help="where each layout's build lives (" + ", ".join(
                            f"{layout.name}: {layout.folder}" for layout in LAYOUTS.values()) + "; built if absent)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="levels for llmsuite bench, in every layout")
    # A closed loop starts every level with a burst of `concurrency` simultaneous arrivals, whose
    # prefills queue behind each other; four times as many requests keep that burst from
    # setting the level's medians, which should describe the steady state.
    parser.add_argument("--requests", default="4,16,64,128", help="requests per level (one per level)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="llmsuite bench warm-up requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="rows of the batched references (and the level they "
                                                              "are compared with)")
    parser.add_argument("--reference-runs", type=int, default=2,
                        help="single-sequence prompts, and batched runs, timed for the references")
    parser.add_argument("--threads", type=int, default=_usable_cores(),
                        help="intra-op threads for the inference service and the references alike "
                             "(default: the CPUs this process may use)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=_default_device())
    parser.add_argument("--kv-cache-bytes", default=None,
                        help="the inference service's --kv-cache-bytes (default: its own, sized from memory)")
    http = parser.add_argument_group("the HTTP hop (issue 17)")
    http.add_argument("--http-layout", default="gqa",
                      help="layout whose cluster also measures llmsuite-openai against gRPC (default gqa, or the "
                           "first layout when gqa is not run)")
    http.add_argument("--http-concurrency", type=int, default=16, help="0 skips the HTTP hop")
    http.add_argument("--http-requests", type=int, default=48, help="requests per side per round")
    http.add_argument("--http-rounds", type=int, default=2, help="gRPC-then-HTTP rounds, summed on each side")
    ortgenai = parser.add_argument_group("onnxruntime-genai (issue 16)")
    ortgenai.add_argument("--no-ortgenai", dest="ortgenai", action="store_false",
                          help="skip onnxruntime-genai (its Generator and its Engine) on the fused fp32 files")
    ortgenai.add_argument("--paired-rounds", type=int, default=3,
                          help="rounds of the fused layout's gateway at c=--batch against each yardstick in turn "
                               "(in-process fused and Optimum batches, onnxruntime-genai's Engine and Generator), "
                               "for issue 16's ratios; 0 skips them")
    ortgenai.add_argument("--paired-requests", type=int, default=48,
                          help="requests of each paired round's gateway level (the Engine serves the same prompts)")
    ortgenai.add_argument("--ortgenai-python", type=Path, default=ORTGENAI_PYTHON,
                          help="the interpreter of the environment holding onnxruntime-genai (make bench makes it "
                               "from bench/requirements/ortgenai.txt)")
    chat = parser.add_argument_group("multi-turn chat (issue 11's prefix cache), off unless --chat")
    chat.add_argument("--chat", action="store_true",
                      help="also run conversations re-sent whole each turn, and an uncached prompt as long as "
                           "the last turn's")
    # A turn's text re-tokenizes to about 450 tokens with the chat template (the random model's
    # replies decode to odd bytes that take more tokens as text than they did as ids), so three
    # turns put about 1,000 tokens of history before the last one, as issue 11 asks.
    chat.add_argument("--chat-turns", type=int, default=3)
    chat.add_argument("--chat-prompt-tokens", type=int, default=200, help="tokens per user message")
    chat.add_argument("--chat-output-tokens", type=int, default=50, help="tokens per reply")
    chat.add_argument("--chat-conversations", type=int, default=3)
    constraint = parser.add_argument_group("constrained decoding (issue 17)")
    constraint.add_argument("--constraint-concurrency", type=int, default=16,
                            help="concurrency of the plain and the constrained runs (0 skips them)")
    constraint.add_argument("--constraint-requests", type=int, default=48, help="requests per run")
    constraint.add_argument("--constraint-rounds", type=int, default=2,
                            help="plain-then-constrained rounds, summed on each side")
    emb = parser.add_argument_group("embeddings (issue 18)")
    emb.add_argument("--no-embeddings", dest="embeddings", action="store_false",
                     help="skip the embeddings level")
    emb.add_argument("--embed-model-dir", type=Path, default=REPO / "models" / "bench-embed",
                     help="the encoder bench preset (built here if absent)")
    emb.add_argument("--embed-concurrency", type=int, default=16)
    emb.add_argument("--embed-requests", type=int, default=48, help="Embed requests at that concurrency")
    emb.add_argument("--texts-per-request", type=int, default=32)
    parser.add_argument("--profile", action="store_true",
                        help="record the inference and gateway processes with py-spy during the gateway levels "
                             "(speedscope files in --results-dir, one folder per layout)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/performance.md alone")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="run nothing: write --doc from a results.json an earlier run saved (after editing "
                             "bench/performance_doc.py's text)")
    parser.add_argument("--note", default="", help="a remark printed at the top of the results (e.g. the "
                                                   "machine was busy)")
    return parser


def http_layout(args: argparse.Namespace) -> str | None:
    """The layout whose cluster measures the HTTP hop, or None when it is skipped."""
    if args.http_concurrency <= 0:
        return None
    names = [layout.name for layout in args.layouts]
    return args.http_layout if args.http_layout in names else names[0]


def ensure_built(layout: Layout, model_dir: Path) -> list[str]:
    """The builder's command for this layout; it runs only when the folder holds no model yet."""
    argv = ["llmsuite-build-model", "--preset", "bench", *layout.builder_args, "--out", str(model_dir)]
    if not (model_dir / "model.onnx").is_file():
        print(f"building the bench preset ({layout.title}) into {model_dir} ...", file=sys.stderr, flush=True)
        subprocess.run([str(BIN / argv[0]), *argv[1:]], check=True)
    return argv


def run_layout(layout: Layout, args: argparse.Namespace, *, primary: bool) -> dict[str, Any]:
    """One cluster on this layout's build: the gateway levels (and, where asked, the HTTP hop and
    the first layout's extra levels), then the in-process references with the cluster stopped."""
    model_dir = args.models_dir / layout.folder
    build_argv = ensure_built(layout, model_dir)
    out_dir = args.results_dir / layout.name
    out_dir.mkdir(parents=True, exist_ok=True)
    embed_dir = args.embed_model_dir if primary and args.embeddings else None
    env = {"LLMSUITE_KV_CACHE_BYTES": args.kv_cache_bytes} if args.kv_cache_bytes else {}
    print(f"[{layout.name}] starting the cluster (inference: {args.device}, {args.threads} intra-op threads) ...",
          file=sys.stderr, flush=True)
    extra: dict[str, Any] = {}
    with Cluster(model_dir, args.device, args.threads, out_dir / "cluster.log", env=env,
                 embed_model_dir=embed_dir) as cluster:
        pid = cluster.service_pid("inference")
        services = {name: cluster.service_pid(name) for name in ("inference", "gateway")} if args.profile else {}
        with MemoryWatch(pid, cluster.address("inference")) as memory, profiling(services, out_dir):
            gateway, bench_argv = run_gateway_bench(cluster, args, out_dir)
        steps = engine_steps(cluster)
        if layout.name == "gqa" and args.paired_rounds > 0:
            extra["paired"] = run_paired_rounds(cluster, args, model_dir, out_dir)
        if layout.name == http_layout(args):
            extra["http_hop"] = run_http_hop(cluster, args, out_dir)
        if primary:
            extra["constrained"] = (run_constraint_bench(cluster, args, out_dir)
                                    if args.constraint_concurrency > 0 else None)
            extra["chat"] = run_chat_bench(cluster, args, out_dir) if args.chat else None
            embed = run_embed_bench(cluster, args, out_dir) if embed_dir is not None else None

    prompts: dict[int, list[list[int]]] = {}
    by_request: dict[tuple[int, int], list[int]] = {}
    for line in (out_dir / "prompts.jsonl").read_text().splitlines():
        entry = json.loads(line)
        prompts.setdefault(entry["concurrency"], []).append(entry["token_ids"])
        by_request[entry["concurrency"], entry["index"]] = entry["token_ids"]
    outputs = {}
    for line in (out_dir / "requests.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["code"] == "OK":
            outputs[tuple(by_request[r["concurrency"], r["index"]])] = r["output_token_ids"]
    single_rows = (prompts.get(1) or next(iter(prompts.values())))[:args.reference_runs]
    batch_rows = (prompts.get(args.batch) or [p for level in prompts.values() for p in level])[:args.batch]
    print(f"[{layout.name}] in-process references", file=sys.stderr, flush=True)
    references = run_references(model_dir, args, single_rows, batch_rows)
    agreement = {
        "single": sum_agreement(token_agreement(outputs, [row], [run])
                                for row, run in zip(single_rows, references["single"].runs, strict=True)),
        "batch": token_agreement(outputs, batch_rows, references["batch"].runs[:1]),
    }
    if primary and embed is not None:
        extra["embeddings"] = embeddings_results(args, out_dir, *embed)
    ortgenai = None
    if layout.name == "gqa" and args.ortgenai:
        ortgenai = run_ortgenai(args, model_dir, batch_rows, out_dir)
        if ortgenai is not None:
            served = ortgenai.pop("tokens")
            ortgenai["token_agreement"] = {"identical": sum(a == b for a, b in zip(
                served, references["batch"].runs[0].tokens, strict=True)), "compared": len(served)}
    shown_dir = str(model_dir.relative_to(REPO)) if model_dir.is_relative_to(REPO) else str(model_dir)
    result = {
        "layout": layout.name, "title": layout.title, "model_dir": shown_dir,
        "build": shlex.join([*build_argv[:-1], shown_dir]),
        "llmsuite_bench": shlex.join(bench_argv), "gateway": gateway,
        "references": {k: v.to_dict() for k, v in references.items()},
        "token_agreement": agreement,
        "memory": {"inference_pid": pid, "vm_hwm_mib": _mib(memory.hwm_kib), "peak_rss_sampled_mib":
                   _mib(memory.peak_rss_kib), "peak_kv_cache_mib": round(memory.peak_kv_bytes / 2**20, 1),
                   "peak_running": memory.peak_running, "peak_queued": memory.peak_queued,
                   "model_weights_mib": round(sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))
                                              / 2**20, 1),
                   "reported_kv_budget": memory.budget or None},
        "ortgenai": ortgenai,
        "engine_steps": steps,
    }
    return {**result, **extra}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        args.doc.write_text(performance_doc.render(saved))
        print(performance_doc.summary_text(saved))
        return 0
    arguments = list(sys.argv[1:] if argv is None else argv)
    # A SIGTERM unwinds like Ctrl-C, so the running layout's cluster is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    args.results_dir.mkdir(parents=True, exist_ok=True)

    if args.embeddings and not (args.embed_model_dir / "model.onnx").is_file():
        print(f"building the encoder bench preset into {args.embed_model_dir} ...", file=sys.stderr, flush=True)
        subprocess.run([str(BIN / "llmsuite-build-model"), "--kind", "encoder", "--preset", "bench", "--out",
                        str(args.embed_model_dir)], check=True)

    layouts = {layout.name: run_layout(layout, args, primary=i == 0) for i, layout in enumerate(args.layouts)}
    primary = layouts[args.layouts[0].name]
    results = {
        "arguments": arguments, "machine": machine(),
        "settings": {"device": args.device, "intra_op_threads": args.threads, "inter_op_threads": 0,
                     "graph_optimization": "all", "prompt_tokens": args.prompt_tokens,
                     "output_tokens": args.output_tokens, "batch": args.batch,
                     "kv_cache_bytes": args.kv_cache_bytes},
        "layouts": layouts,
        "primary": args.layouts[0].name,
        "http_hop": next((lay["http_hop"] for lay in layouts.values() if "http_hop" in lay), None),
        "http_layout": http_layout(args),
        "chat": primary.get("chat"),
        "constrained": primary.get("constrained"),
        "embeddings": primary.get("embeddings"),
        "note": args.note,
    }
    for name, layout in layouts.items():
        layout["ratios"] = performance_doc.ratios(
            {**layout, **({"constrained": results["constrained"], "embeddings": results["embeddings"]}
                          if name == results["primary"] else {})}, batch=args.batch)
    results["targets"] = performance_doc.cross_layout_ratios(results, batch=args.batch)
    results["duration_s"] = round(time.monotonic() - started, 1)
    (args.results_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(performance_doc.summary_text(results))
    if not args.no_write:
        args.doc.write_text(performance_doc.render(results))
        print(f"wrote {args.doc} (raw results: {args.results_dir / 'results.json'})", file=sys.stderr)
    return 0


def sum_agreement(parts: Any) -> dict[str, int]:
    parts = list(parts)
    return {k: sum(p[k] for p in parts) for k in ("identical", "compared")}


def _mib(kib: int | None) -> float | None:
    return None if not kib else round(kib / 1024, 1)


if __name__ == "__main__":
    raise SystemExit(main())
