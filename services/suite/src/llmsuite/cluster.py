"""`python -m llmsuite.cluster`: the local cluster behind `make run`.

Starts tokenizer, inference, gateway and the OpenAI-compatible HTTP API as
child processes on localhost, waits until each is ready (SERVING on gRPC
health; 200 on /health for the HTTP API), prints how to call it, and
on Ctrl-C (or SIGTERM, SIGHUP) stops them gracefully in reverse order. It
also stops them when one of them exits or when its own output pipe is closed
(`make run | tee log` after tee went away). Should the launcher die without
a chance to clean up (SIGKILL), each child gets SIGTERM from the kernel
(Linux's parent-death signal), so none outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent

# Runs in the child before it becomes the service: ask the kernel for SIGTERM
# when the launcher dies (prctl PR_SET_PDEATHSIG = 1, kept across exec), give
# up if it died already, then exec the service in place. A separate `-c`
# program rather than Popen's preexec_fn, which is unsafe once grpc has
# started threads in this process.
_TIED_TO_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) != 0:\n"
    "    sys.exit('cannot set the parent-death signal')\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _child_argv(argv: Sequence[str]) -> list[str]:
    if sys.platform.startswith("linux"):
        return [sys.executable, "-I", "-c", _TIED_TO_PARENT, str(os.getpid()), *argv]
    return list(argv)  # elsewhere only a launcher that can clean up stops its children


def _say(message: str) -> None:
    """Best-effort status line: the terminal or pipe may already be gone."""
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def _output_pipes() -> list[int]:
    fds = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            fd = stream.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                fds.append(fd)
    return fds


def _wait_for_trouble(procs: Sequence[subprocess.Popen[bytes]]) -> str:
    """Blocks until a child exits or an output pipe loses its reader; says which."""
    pipes = _output_pipes()
    pidfds: dict[int, subprocess.Popen[bytes]] = {}
    try:
        if hasattr(os, "pidfd_open"):
            for proc in procs:
                with contextlib.suppress(OSError):
                    pidfds[os.pidfd_open(proc.pid)] = proc
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        for fd in pipes:
            poller.register(fd, 0)  # POLLERR (reader gone) is always reported
        # Without pidfds (not Linux), look at the children every half second.
        timeout_ms = None if len(pidfds) == len(procs) else 500
        while True:
            events = poller.poll(timeout_ms)
            if any(fd in pipes and mask & (select.POLLERR | select.POLLHUP) for fd, mask in events):
                return "the output pipe was closed"
            dead = [proc for proc in procs if proc.poll() is not None]
            if dead:
                return "a service exited"
    finally:
        for fd in pidfds:
            os.close(fd)


def wait_serving(name: str, address: str, proc: subprocess.Popen[bytes], timeout_s: float,
                 log_hint: str = "see its log above") -> None:
    """Polls gRPC health at `address` until SERVING; gives up at once if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode}; {log_hint}")
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise SystemExit(f"{name} at {address} did not become SERVING within {timeout_s:.0f}s; {log_hint}")


def _wait_http_ready(name: str, address: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with code {proc.returncode}; see its log above")
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} at {address} did not answer /health within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsuite.cluster", description=__doc__)
    parser.add_argument("--model", default="tiny=models/tiny", help="NAME=DIR served by tokenizer and inference")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--gateway-port", type=int, default=50050)
    parser.add_argument("--tokenizer-port", type=int, default=50051)
    parser.add_argument("--inference-port", type=int, default=50052)
    parser.add_argument("--openai-port", type=int, default=8000, help="OpenAI-compatible HTTP API port")
    parser.add_argument("--device", default="auto", help="inference device: auto, cpu, cuda[:N]")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    name = args.model.partition("=")[0]
    tok_addr = f"{args.host}:{args.tokenizer_port}"
    inf_addr = f"{args.host}:{args.inference_port}"
    gw_addr = f"{args.host}:{args.gateway_port}"
    http_addr = f"{args.host}:{args.openai_port}"
    env = {**os.environ, "LLMSUITE_LOG_FORMAT": os.environ.get("LLMSUITE_LOG_FORMAT", "text")}
    specs = [
        ("tokenizer", tok_addr, ["llmsuite-tokenizer", "--listen", tok_addr, "--model", args.model]),
        ("inference", inf_addr, ["llmsuite-inference", "--listen", inf_addr, "--model", args.model,
                                 "--device", args.device]),
        ("gateway", gw_addr, ["llmsuite-gateway", "--listen", gw_addr, "--tokenizer", tok_addr,
                              "--inference", inf_addr]),
        ("openai", http_addr, ["llmsuite-openai", "--listen", http_addr, "--gateway", gw_addr]),
    ]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        _say("\nstopping (graceful drain)...")
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stop_and_exit(*_: object) -> None:
        stop()
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_and_exit)
    try:
        for service, address, argv_ in specs:
            # Children ignore the terminal's Ctrl-C; this process relays a SIGTERM so they drain.
            proc = subprocess.Popen(_child_argv([str(BIN / argv_[0]), *argv_[1:]]), env=env,
                                    start_new_session=True)
            procs.append((service, proc))
            wait = _wait_http_ready if service == "openai" else wait_serving
            wait(service, address, proc, args.startup_timeout)
            print(f"  {service:<9} SERVING on {address}", file=sys.stderr, flush=True)
        print(f"""
llmsuite is up: gateway {gw_addr} (tokenizer {tok_addr}, inference {inf_addr}), model '{name}',
OpenAI-compatible API on http://{http_addr}/v1.
The default model has random weights: its text is not meaningful (see README).

Try, in another terminal (after `source .venv/bin/activate`):
  llmsuite generate --stream "Hello"
  llmsuite chat
  llmsuite models
  grpcurl -plaintext {gw_addr} list
  grpcurl -plaintext -d '{{"model": "{name}", "prompt": "Hello"}}' {gw_addr} llmsuite.gateway.v1.GatewayService/Generate
  curl http://{http_addr}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}'

Ctrl-C stops them all.""", flush=True)
        trouble = _wait_for_trouble([proc for _n, proc in procs])
        dead = [n for n, proc in procs if proc.poll() is not None]
        _say(f"{', '.join(dead)} exited; stopping the rest" if dead else f"{trouble}; stopping")
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # our output went away while starting: nobody is watching
        with contextlib.suppress(OSError):  # and Python's exit-time flush must not fail on it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
