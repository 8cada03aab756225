"""Does the gateway hold its own memory under large prompts? (issue 15 §3)

Starts a real local cluster (tokenizer, inference, gateway as processes, default
flags), measures the gateway's resident memory (VmRSS, sampled every 20 ms) at idle,
then sends, in waves of --concurrency at once:

1. prompts of --huge-mb MB (60 by default), far over the gateway's receive cap: gRPC
   must refuse them (RESOURCE_EXHAUSTED) from the length prefix, before buffering;
2. prompts that fit the receive cap but not --max-request-chars (4 MiB of ASCII):
   the gateway's own INVALID_ARGUMENT, before anything is forwarded;
3. the largest prompt the gateway forwards: --max-request-chars characters of 4-byte
   UTF-8 (4 MB on the wire), which the tokenizer encodes and the gateway then refuses
   as too many tokens (INVALID_ARGUMENT).

It also times gRPC health checks against the gateway during each wave, and reports
each wave's codes, the gateway's peak RSS and its RSS once the wave is over. It exits 1
when issue 15's target is missed: the --huge-mb prompts all get RESOURCE_EXHAUSTED, the
gateway's peak RSS stays under --peak-cap-mb (1024) and its RSS is back within
--settle-mb (100) of idle after them; or when a smaller wave gets anything but its
INVALID_ARGUMENT and, for the forwarded wave, the tokenizer's overload refusals
(UNAVAILABLE, RESOURCE_EXHAUSTED: 24 million-character encodes at once on a small
machine). The figures belong in docs/reliability.md.

    .venv/bin/python bench/gateway_large_prompts.py              # builds models/tiny if needed
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmsuite.cluster import wait_serving
from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2, gateway_pb2_grpc

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
MAX_REQUEST_CHARS = 1_000_000  # the gateway's default --max-request-chars
GENERATE = "/llmsuite.gateway.v1.GatewayService/Generate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class RssSampler:
    """The peak of a process's RSS, sampled every 20 ms while a wave runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


class HealthTimer:
    """The slowest gateway health Check answered while a wave runs."""

    def __init__(self, address: str) -> None:
        self.slowest_s = 0.0
        self.failures = 0
        self._address = address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                except grpc.RpcError:
                    self.failures += 1
                self.slowest_s = max(self.slowest_s, time.monotonic() - began)
                self._stop.wait(0.1)

    def __enter__(self) -> HealthTimer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def cluster(model_dir: Path, logs: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    tok, inf, gw = (f"127.0.0.1:{free_port()}" for _ in range(3))
    specs = [
        ("tokenizer", tok, ["llmsuite-tokenizer", "--listen", tok, "--model", f"tiny={model_dir}"]),
        ("inference", inf, ["llmsuite-inference", "--listen", inf, "--model", f"tiny={model_dir}", "--device", "cpu"]),
        ("gateway", gw, ["llmsuite-gateway", "--listen", gw, "--tokenizer", tok, "--inference", inf]),
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, address, argv in specs:
            log = (logs / f"{name}.log").open("wb")
            proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:], "--metrics-listen", "off"],
                                    stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            wait_serving(name, address, proc, 120, log_hint=f"see {logs / (name + '.log')}")
        yield gw, procs[-1]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def settled_rss(pid: int, target_mb: float) -> float:
    """RSS once freed memory went back to the system (on the allocator's schedule): at most 5 s."""
    rss = rss_mb(pid)
    for _ in range(50):
        if rss <= target_mb:
            break
        time.sleep(0.1)
        rss = rss_mb(pid)
    return rss


def wave(channel: grpc.Channel, body: bytes, concurrency: int, examples: dict[str, str]) -> collections.Counter[str]:
    """`concurrency` Generate calls at once, each sending the pre-serialized `body`;
    `examples` keeps one message per code seen."""
    call: Callable[..., bytes] = channel.unary_unary(GENERATE)  # bytes in, bytes out: no copies per call

    def one() -> str:
        try:
            call(body, timeout=300)
        except grpc.RpcError as error:
            examples.setdefault(error.code().name, error.details())
            return str(error.code().name)
        return "OK"

    with ThreadPoolExecutor(concurrency) as pool:
        return collections.Counter(pool.map(lambda _: one(), range(concurrency)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "tiny")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--huge-mb", type=int, default=60)
    parser.add_argument("--waves", type=int, default=3, help="times each kind of wave runs")
    parser.add_argument("--peak-cap-mb", type=float, default=1024)
    parser.add_argument("--settle-mb", type=float, default=100)
    args = parser.parse_args()
    if not (args.model_dir / "model.onnx").exists():
        subprocess.run([str(BIN / "llmsuite-build-model"), "--preset", "tiny", "--out", str(args.model_dir)],
                       check=True)

    def request(prompt: str) -> bytes:
        return gateway_pb2.GenerateRequest(model="tiny", prompt=prompt, sampling=common_pb2.SamplingParams(
            max_new_tokens=4)).SerializeToString()

    huge = f"{args.huge_mb} MB prompt (over the receive cap)"
    kinds = {  # name -> (request, the codes it may get)
        huge: (request("a" * (args.huge_mb * 1_000_000)), {"RESOURCE_EXHAUSTED"}),
        "4 MiB ASCII prompt (over --max-request-chars)": (request("a" * (4 * 1024 * 1024)), {"INVALID_ARGUMENT"}),
        "1M 4-byte characters (forwarded, too many tokens)": (
            request("🙂" * MAX_REQUEST_CHARS), {"INVALID_ARGUMENT", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}),
    }
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="llmsuite-large-prompts-") as logs, \
            cluster(args.model_dir, Path(logs)) as (address, gateway):
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for _ in range(3):  # warm up: the paths every request takes, so idle includes their imports
                stub.Generate(gateway_pb2.GenerateRequest(
                    model="tiny", prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=4)), timeout=60)
            idle = rss_mb(gateway.pid)
            print(f"gateway idle RSS: {idle:.0f} MB; {args.concurrency} concurrent requests per wave, "
                  f"{args.waves} waves of each kind")
            for name, (body, allowed) in kinds.items():
                codes: collections.Counter[str] = collections.Counter()
                examples: dict[str, str] = {}
                with RssSampler(gateway.pid) as rss, HealthTimer(address) as health:
                    for _ in range(args.waves):
                        codes += wave(channel, body, args.concurrency, examples)
                after = settled_rss(gateway.pid, idle + args.settle_mb)
                print(f"  {name}: codes {dict(codes)}; gateway peak RSS {rss.peak:.0f} MB, then {after:.0f} MB "
                      f"({after - idle:+.0f} MB against idle); slowest health check {health.slowest_s:.2f} s "
                      f"({health.failures} failed)")
                if not set(codes) <= allowed or ("INVALID_ARGUMENT" in allowed and not codes["INVALID_ARGUMENT"]):
                    failed.append(f"{name}: expected {sorted(allowed)}, got {dict(codes)}: {examples}")
                if name == huge:  # issue 15's target
                    if rss.peak >= args.peak_cap_mb:
                        failed.append(f"{name}: peak RSS {rss.peak:.0f} MB >= {args.peak_cap_mb:.0f} MB")
                    if after - idle > args.settle_mb:
                        failed.append(f"{name}: RSS after {after - idle:+.0f} MB against idle > {args.settle_mb:.0f}")
            if gateway.poll() is not None:
                failed.append(f"the gateway exited with {gateway.returncode}")
    for line in failed:
        print(f"MISSED: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
