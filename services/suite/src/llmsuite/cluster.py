"""`python -m llmsuite.cluster`: the local cluster behind `make run`.

Starts tokenizer, inference and gateway as child processes on localhost,
waits until each reports SERVING on gRPC health, prints how to call it, and
on Ctrl-C (or SIGTERM) stops them gracefully in reverse order.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


def _wait_serving(name: str, address: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode}; see its log above")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{name} at {address} did not become SERVING within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsuite.cluster", description=__doc__)
    parser.add_argument("--model", default="tiny=models/tiny", help="NAME=DIR served by tokenizer and inference")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--gateway-port", type=int, default=50050)
    parser.add_argument("--tokenizer-port", type=int, default=50051)
    parser.add_argument("--inference-port", type=int, default=50052)
    parser.add_argument("--device", default="auto", help="inference device: auto, cpu, cuda[:N]")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    name = args.model.partition("=")[0]
    tok_addr = f"{args.host}:{args.tokenizer_port}"
    inf_addr = f"{args.host}:{args.inference_port}"
    gw_addr = f"{args.host}:{args.gateway_port}"
    env = {**os.environ, "LLMSUITE_LOG_FORMAT": os.environ.get("LLMSUITE_LOG_FORMAT", "text")}
    specs = [
        ("tokenizer", tok_addr, ["llmsuite-tokenizer", "--listen", tok_addr, "--model", args.model]),
        ("inference", inf_addr, ["llmsuite-inference", "--listen", inf_addr, "--model", args.model,
                                 "--device", args.device]),
        ("gateway", gw_addr, ["llmsuite-gateway", "--listen", gw_addr, "--tokenizer", tok_addr,
                              "--inference", inf_addr]),
    ]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nstopping (graceful drain)...", file=sys.stderr)
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        for service, address, argv_ in specs:
            # Children ignore the terminal's Ctrl-C; this process relays a SIGTERM so they drain.
            proc = subprocess.Popen([str(BIN / argv_[0]), *argv_[1:]], env=env, start_new_session=True)
            procs.append((service, proc))
            _wait_serving(service, address, proc, args.startup_timeout)
            print(f"  {service:<9} SERVING on {address}", file=sys.stderr)
        print(f"""
llmsuite is up: gateway {gw_addr} (tokenizer {tok_addr}, inference {inf_addr}), model '{name}'.
The default model has random weights: its text is not meaningful (see README).

Try, in another terminal (after `source .venv/bin/activate`):
  llmsuite generate --stream "Hello"
  llmsuite chat
  llmsuite models
  grpcurl -plaintext {gw_addr} list
  grpcurl -plaintext -d '{{"model": "{name}", "prompt": "Hello"}}' {gw_addr} llmsuite.gateway.v1.GatewayService/Generate

Ctrl-C stops all three.""", flush=True)
        while all(proc.poll() is None for _n, proc in procs):
            time.sleep(0.5)
        dead = [n for n, proc in procs if proc.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
