"""What a single stream loses by going through the gateway (issue 7 §2).

Starts a real local cluster (tokenizer, inference, gateway as processes),
then alternates, round after round, one greedy stream of exactly
--max-new-tokens tokens (EOS ignored) straight to the inference service
(token ids in, ids out) and the same prompt through the gateway's
GenerateStream (text in, text out). Reports median tokens/s and time to first
token for both and their ratio. Both paths run in the same session on the
same processes, interleaved, so the ratio holds better than the absolute
numbers on a busy machine. It also reports the CPU time each service process
spent per generated token (Linux /proc): the gateway's and tokenizer's share
is the cost of the gateway path, and unlike wall-clock rates it does not
depend on what else the machine is running.

    .venv/bin/llmsuite-build-model --preset bench --out models/bench
    .venv/bin/python bench/gateway_overhead.py --model-dir models/bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from llmsuite.cluster import wait_serving
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc
from llmsuite.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

BIN = Path(sys.executable).parent
PROMPT_WORDS = "The quick brown fox jumps over the lazy dog while the sun sets behind distant hills. "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cluster(model_dir: Path, intra_op_threads: int) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("tokenizer", "inference", "gateway")}
    model = f"m={model_dir}"
    commands = {
        "tokenizer": ["llmsuite-tokenizer", "--listen", addresses["tokenizer"], "--model", model],
        "inference": ["llmsuite-inference", "--listen", addresses["inference"], "--model", model, "--device", "cpu",
                      *(["--intra-op-threads", str(intra_op_threads)] if intra_op_threads else [])],
        "gateway": ["llmsuite-gateway", "--listen", addresses["gateway"], "--tokenizer", addresses["tokenizer"],
                    "--inference", addresses["inference"]],
    }
    env = {**os.environ, "LLMSUITE_LOG_LEVEL": "WARNING"}
    procs = []
    with tempfile.TemporaryFile() as log:
        try:
            for name, argv in commands.items():
                proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=env, stdout=log, stderr=log)
                procs.append(proc)
                wait_serving(name, addresses[name], proc, timeout_s=300)
            yield addresses, {name: proc.pid for name, proc in zip(commands, procs, strict=True)}
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def direct_stream(stub: inference_pb2_grpc.InferenceServiceStub, ids: list[int], max_new: int
                  ) -> tuple[float, float, int]:
    """(seconds to the final message, seconds to the first token, tokens)."""
    sampling = common_pb2.SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    first = None
    tokens = 0
    for response in stub.Generate(iter([inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model="m", prompt_token_ids=ids, sampling=sampling))])):
        if response.WhichOneof("kind") == "tokens":
            first = first or time.perf_counter()
            tokens += len(response.tokens.token_ids)
    return time.perf_counter() - started, (first or time.perf_counter()) - started, tokens


def gateway_stream(stub: gateway_pb2_grpc.GatewayServiceStub, prompt: str, max_new: int) -> tuple[float, float, int]:
    sampling = common_pb2.SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    first = None
    tokens = 0
    for response in stub.GenerateStream(gateway_pb2.GenerateStreamRequest(model="m", prompt=prompt,
                                                                          sampling=sampling)):
        if response.WhichOneof("kind") == "delta":
            first = first or time.perf_counter()
        else:
            tokens = response.final.usage.completion_tokens
    return time.perf_counter() - started, (first or time.perf_counter()) - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/bench"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--intra-op-threads", type=int, default=0, help="inference --intra-op-threads (0: its default)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()

    with cluster(args.model_dir.resolve(), args.intra_op_threads) as (addresses, pids), \
            grpc.insecure_channel(addresses["tokenizer"]) as tch, \
            grpc.insecure_channel(addresses["inference"]) as ich, \
            grpc.insecure_channel(addresses["gateway"]) as gch:
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(tch)
        inference = inference_pb2_grpc.InferenceServiceStub(ich)
        gateway = gateway_pb2_grpc.GatewayServiceStub(gch)
        # A prompt text of exactly --prompt-tokens tokens, so both paths prefill the same ids.
        long_ids = list(tokenizer.Encode(tokenizer_pb2.EncodeRequest(
            model="m", texts=[PROMPT_WORDS * 64])).encodings[0].token_ids)
        prompt = tokenizer.Decode(tokenizer_pb2.DecodeRequest(model="m", sequences=[
            tokenizer_pb2.TokenIds(token_ids=long_ids[:args.prompt_tokens])], skip_special_tokens=True)).texts[0]
        ids = list(tokenizer.Encode(tokenizer_pb2.EncodeRequest(model="m", texts=[prompt])).encodings[0].token_ids)
        runs: dict[str, list[tuple[float, float, int]]] = {"direct": [], "gateway": []}
        cpu: dict[str, dict[str, float]] = {path: dict.fromkeys(pids, 0.0) for path in runs}
        for round_ in range(args.rounds + 1):  # round 0 warms both paths up
            order = ("direct", "gateway") if round_ % 2 else ("gateway", "direct")
            for path in order:
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                result = (direct_stream(inference, ids, args.max_new_tokens) if path == "direct"
                          else gateway_stream(gateway, prompt, args.max_new_tokens))
                assert result[2] == args.max_new_tokens, result
                if round_:
                    runs[path].append(result)
                    for name, pid in pids.items():
                        cpu[path][name] += cpu_seconds(pid) - before[name]

    def summary(path: str) -> dict[str, float]:
        rates = [tokens / total for total, _, tokens in runs[path]]
        tokens = sum(n for _, _, n in runs[path])
        return {"tokens_per_s_p50": statistics.median(rates),
                "ttft_ms_p50": 1000 * statistics.median(ttft for _, ttft, _ in runs[path]),
                **{f"{name}_cpu_ms_per_token": 1000 * seconds / tokens for name, seconds in cpu[path].items()}}

    direct, through = summary("direct"), summary("gateway")
    result = {"prompt_tokens": len(ids), "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "direct": direct, "gateway": through,
              "gateway_over_direct_tokens_per_s": through["tokens_per_s_p50"] / direct["tokens_per_s_p50"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"prompt {len(ids)} tokens, {args.max_new_tokens} new tokens, {args.rounds} rounds, c=1")
    print(f"{'path':<10}{'tokens/s p50':>14}{'TTFT p50 ms':>14}   CPU ms per token: inference, tokenizer, gateway")
    for name, numbers in (("direct", direct), ("gateway", through)):
        print(f"{name:<10}{numbers['tokens_per_s_p50']:>14.1f}{numbers['ttft_ms_p50']:>14.1f}   "
              f"{numbers['inference_cpu_ms_per_token']:>9.3f} {numbers['tokenizer_cpu_ms_per_token']:>9.3f} "
              f"{numbers['gateway_cpu_ms_per_token']:>9.3f}")
    print(f"gateway / direct tokens/s: {result['gateway_over_direct_tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
