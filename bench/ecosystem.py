"""`make bench-http`: the serving benchmarks people already run against vLLM, pointed at `llmsuite-openai`.

    python bench/ecosystem.py                          # guidellm on tiny, then aiperf on the fused bench preset
    python bench/ecosystem.py --tools aiperf --aiperf-model optimum

For each tool, starts the local cluster (bench/run.py's Cluster: tokenizer, inference, gateway
and the OpenAI-compatible adapter on free ports) on a model, then runs the tool with its
documented defaults, from its own virtual environment under --tools-dir (`make bench-http`
installs them from bench/requirements/), so neither touches the services' packages:

* guidellm: its README's first benchmark, a sweep (synchronous, throughput, then rates between)
  of 30 s per strategy over synthetic 256-token prompts and 128-token outputs, streamed chat
  completions. On the tiny preset (what `make run` serves) by default: on 2 CPU cores a bench
  preset request outlasts a 30 s window, and guidellm 0.8.1 then stops with "Cannot compile
  GenerativeMetrics" on a strategy that completed no request;
* aiperf: `aiperf profile` with nothing but the model, the URL and the tokenizer: 10 chat
  completions at concurrency 1 over synthetic prompts of about 550 tokens. On the fused bench
  preset by default: 550 tokens do not fit the tiny preset's 512-token context.

Both are handed the model's own tokenizer folder (they would otherwise fetch one from a hub).
guidellm's throughput strategy opens 512 streams at once; the inference service queues 64
requests per model by default and refuses the rest with 429 `engine_overloaded`, as a
bounded server should, so the cluster runs with --max-queued (default 1024) to take them
the way vLLM, which queues without bound, does.
The tools' exit codes do not say whether requests failed (guidellm exits 0 with every request
errored), so this reads their result files: every errored request is counted and its message
kept. It prints a summary per tool, writes it to --results-dir/summary.json, and exits 1 when a
tool failed or any request errored.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from run import BIN, LAYOUTS, REPO, Cluster, _default_device, _usable_cores, ensure_built

TOOLS = ("guidellm", "aiperf")
MODELS = ("tiny", *LAYOUTS)  # the tiny preset, or a build of the bench preset


def guidellm_argv(tool_bin: Path, url: str, tokenizer: Path, out_dir: Path, model: str) -> list[str]:
    """Its README's first run (it finds the model in /v1/models); its default outputs (benchmarks.json
    and .csv) go to the working directory."""
    return [str(tool_bin / "guidellm"), "run",
            "--backend", f"kind=openai_http,target={url}",
            "--profile", "kind=sweep",
            "--constraint", "kind=max_duration,seconds=30",
            "--data", "kind=synthetic_text,prompt_tokens=256,output_tokens=128",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--disable-progress"]


def aiperf_argv(tool_bin: Path, url: str, tokenizer: Path, out_dir: Path, model: str) -> list[str]:
    return [str(tool_bin / "aiperf"), "profile", "--model", model, "--url", url, "--tokenizer", str(tokenizer),
            "--artifact-dir", str(out_dir), "--ui", "none"]


def guidellm_errors(out_dir: Path) -> tuple[int, list[str]]:
    """Successful requests and one message per errored request, from guidellm's benchmarks.json."""
    report = json.loads((out_dir / "benchmarks.json").read_text())
    succeeded, errors = 0, []
    for benchmark in report["benchmarks"]:
        requests = benchmark["requests"]
        succeeded += len(requests.get("successful") or [])
        errors += [str(r.get("error")) for r in requests.get("errored") or []]
        # The report keeps a sample of requests; the totals count every one.
        totals = benchmark["metrics"]["request_totals"]
        errors += ["(not sampled)"] * max(0, int(totals["errored"]) - len(requests.get("errored") or []))
        succeeded += max(0, int(totals["successful"]) - len(requests.get("successful") or []))
    return succeeded, errors


def aiperf_errors(out_dir: Path) -> tuple[int, list[str]]:
    """Successful requests and one message per errored request, from aiperf's per-request export."""
    succeeded, errors = 0, []
    for export in out_dir.rglob("profile_export.jsonl"):
        for line in export.read_text().splitlines():
            record = json.loads(line)
            if record.get("error"):
                errors.append(f"{record['error'].get('code')} {record['error'].get('message')}")
            else:
                succeeded += 1
    return succeeded, errors


READERS = {"guidellm": guidellm_errors, "aiperf": aiperf_errors}
ARGVS = {"guidellm": guidellm_argv, "aiperf": aiperf_argv}


def model_dir(args: argparse.Namespace, model: str) -> Path:
    """The folder serving `model` (built here if absent)."""
    if model == "tiny":
        folder = args.models_dir / "tiny"
        if not (folder / "model.onnx").is_file():
            subprocess.run([str(BIN / "llmsuite-build-model"), "--preset", "tiny", "--out", str(folder)], check=True)
        return folder
    folder = args.models_dir / LAYOUTS[model].folder
    ensure_built(LAYOUTS[model], folder)
    return folder


def run_tool(tool: str, args: argparse.Namespace) -> dict[str, Any]:
    """One cluster on the tool's model, the tool with its defaults against its adapter, the errors counted."""
    model = getattr(args, f"{tool}_model")
    folder = model_dir(args, model)
    out_dir = args.results_dir / tool
    out_dir.mkdir(parents=True, exist_ok=True)
    with Cluster(folder, args.device, args.threads, out_dir / "cluster.log", model_name=model,
                 env={"LLMSUITE_MAX_QUEUED": str(args.max_queued)}) as cluster:
        url = cluster.wait_http()
        argv = ARGVS[tool](args.tools_dir / tool / "bin", url, folder, out_dir, model)
        print("$ " + shlex.join(argv), file=sys.stderr, flush=True)
        with (out_dir / "output.log").open("wb") as log:
            # Both write their result files into out_dir (guidellm's defaults go to the working directory).
            done = subprocess.run(argv, cwd=out_dir, stdout=log, stderr=subprocess.STDOUT, check=False)
    try:
        succeeded, errors = READERS[tool](out_dir)
    except (OSError, KeyError, ValueError) as exc:
        succeeded, errors = 0, [f"no readable results ({exc}); see {out_dir / 'output.log'}"]
    return {"tool": tool, "model": model, "command": shlex.join(argv), "exit_code": done.returncode,
            "succeeded": succeeded, "errored": len(errors), "error_messages": dict(Counter(errors).most_common(5))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {', '.join(TOOLS)}")
    parser.add_argument("--guidellm-model", choices=MODELS, default="tiny",
                        help="what guidellm's cluster serves: tiny, or a build of the bench preset")
    parser.add_argument("--aiperf-model", choices=MODELS, default="gqa",
                        help="what aiperf's cluster serves (its default prompts need more than tiny's 512 tokens)")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--tools-dir", type=Path, default=REPO / "build" / "bench-tools",
                        help="one virtualenv per tool (make bench-http makes them)")
    parser.add_argument("--threads", type=int, default=_usable_cores(), help="inference intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=_default_device())
    parser.add_argument("--max-queued", type=int, default=1024,
                        help="the inference service's --max-queued: room for guidellm's 512 simultaneous streams")
    parser.add_argument("--results-dir", type=Path, default=REPO / "build" / "bench-http")
    args = parser.parse_args(argv)
    args.results_dir = args.results_dir.resolve()  # the tools run in folders of their own
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or any(t not in TOOLS for t in tools):
        parser.error(f"--tools takes one or more of {', '.join(TOOLS)}")
    missing = [t for t in tools if not (args.tools_dir / t / "bin" / t).is_file()]
    if missing:
        parser.error(f"not installed under {args.tools_dir}: {', '.join(missing)} (make bench-http installs them)")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    summaries = [run_tool(tool, args) for tool in tools]
    (args.results_dir / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    failed = False
    for s in summaries:
        verdict = "ok" if s["exit_code"] == 0 and s["errored"] == 0 and s["succeeded"] > 0 else "FAILED"
        failed |= verdict != "ok"
        print(f"{s['tool']} ({s['model']}): {s['succeeded']} requests succeeded, {s['errored']} errored, exit code "
              f"{s['exit_code']}: {verdict}")
        for message, count in s["error_messages"].items():
            print(f"  {count} x {message[:400]}")
    print(f"results in {args.results_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
