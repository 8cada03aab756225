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
import socket
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
DEFAULT_PORTS = {"gateway": 50050, "tokenizer": 50051, "inference": 50052, "openai": 8000}
METRICS_PORT_OFFSET = 1000  # each service's --metrics-listen auto: its gRPC port + 1000
_TCP_LISTEN = "0A"  # the socket state column of /proc/net/tcp

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


def _port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails, the way a service's own bind would. SO_REUSEADDR as
    gRPC and uvicorn set it: connections in TIME_WAIT from an earlier run do not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _listening_socket_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port` in this network namespace (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the socket listening on `port`; None where /proc cannot say."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    owned = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                owned.add(int(target[len("socket:["):-1]))
    return bool(owned & _listening_socket_inodes(port))


def _check_own_child(service: str, address: str, proc: subprocess.Popen[bytes]) -> None:
    """What answered on `address` must be `proc`, not another process that held the port
    (a second cluster started on busy ports would otherwise report the first one's health)."""
    port = int(address.rpartition(":")[2])
    if proc.poll() is not None:
        raise SystemExit(f"{service} exited with code {proc.returncode}; see its log above")
    if _listens_on(proc.pid, port) is False:
        raise SystemExit(f"{service}: port {port} answered, but not from the {service} this launcher started "
                         "(another process holds it); stop it or choose other ports")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmsuite.cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Ports: gateway, tokenizer and inference each also serve Prometheus /metrics on their gRPC port "
               f"+ {METRICS_PORT_OFFSET} (51050, 51051, 51052 by default). Every port is checked before anything "
               f"starts. `make run PORT_BASE=N` passes --port-base N; `make run RUN_ARGS='...'` passes any option.")
    parser.add_argument("--model", default="tiny=models/tiny", help="NAME=DIR served by tokenizer and inference")
    parser.add_argument("--embedding-model", metavar="NAME=DIR",
                        help="an embedding model served beside it (make run: tiny-embed=models/tiny-embed)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port-base", type=int, default=None, metavar="N",
                        help="gateway on N, tokenizer N+1, inference N+2, OpenAI-compatible API N+3 (their metrics "
                             f"on each gRPC port + {METRICS_PORT_OFFSET}); the per-service port options win over it")
    parser.add_argument("--gateway-port", type=int, default=None,
                        help=f"gateway gRPC port (default {DEFAULT_PORTS['gateway']}; metrics on it + "
                             f"{METRICS_PORT_OFFSET})")
    parser.add_argument("--tokenizer-port", type=int, default=None,
                        help=f"tokenizer gRPC port (default {DEFAULT_PORTS['tokenizer']}; metrics on it + "
                             f"{METRICS_PORT_OFFSET})")
    parser.add_argument("--inference-port", type=int, default=None,
                        help=f"inference gRPC port (default {DEFAULT_PORTS['inference']}; metrics on it + "
                             f"{METRICS_PORT_OFFSET})")
    parser.add_argument("--openai-port", type=int, default=None,
                        help=f"OpenAI-compatible HTTP API port (default {DEFAULT_PORTS['openai']})")
    parser.add_argument("--device", default="auto", help="inference device: auto, cpu, cuda[:N]")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    return parser


def _ports(args: argparse.Namespace) -> dict[str, int]:
    """Each service's port: its own option, else --port-base + its offset, else the default."""
    ports = {}
    for offset, service in enumerate(DEFAULT_PORTS):
        given = getattr(args, f"{service}_port")
        base = DEFAULT_PORTS[service] if args.port_base is None else args.port_base + offset
        ports[service] = given if given is not None else base
    return ports


def _busy_port(host: str, ports: dict[str, int]) -> str | None:
    """The first taken port, described, among the services' ports and their metrics ports."""
    wanted = [(port, f"{service}") for service, port in ports.items()]
    wanted += [(port + METRICS_PORT_OFFSET, f"{service} metrics") for service, port in ports.items()
               if service != "openai"]
    for port, what in wanted:
        if not 0 < port < 65536:
            return f"port {port} ({what}) is out of range"
        if _port_in_use(host, port):
            return f"port {port} ({what}) on {host} is already in use"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ports = _ports(args)
    busy = _busy_port(args.host, ports)
    if busy is not None:
        _say(f"llmsuite.cluster: {busy}; stop what holds it, or choose other ports (--port-base N, "
             "make run PORT_BASE=N)")
        return 1
    args.gateway_port, args.tokenizer_port = ports["gateway"], ports["tokenizer"]
    args.inference_port, args.openai_port = ports["inference"], ports["openai"]

    name = args.model.partition("=")[0]
    tok_addr = f"{args.host}:{args.tokenizer_port}"
    inf_addr = f"{args.host}:{args.inference_port}"
    gw_addr = f"{args.host}:{args.gateway_port}"
    http_addr = f"{args.host}:{args.openai_port}"
    env = {**os.environ, "LLMSUITE_LOG_FORMAT": os.environ.get("LLMSUITE_LOG_FORMAT", "text")}
    models = ["--model", args.model]
    if args.embedding_model:
        models += ["--model", args.embedding_model]
    specs = [
        ("tokenizer", tok_addr, ["llmsuite-tokenizer", "--listen", tok_addr, *models]),
        ("inference", inf_addr, ["llmsuite-inference", "--listen", inf_addr, *models, "--device", args.device]),
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
            _check_own_child(service, address, proc)
            print(f"  {service:<9} SERVING on {address}", file=sys.stderr, flush=True)
        # The CLI's default address is the default gateway port: name it when that is not where it is.
        cli = "llmsuite" if gw_addr == f"127.0.0.1:{DEFAULT_PORTS['gateway']}" else f"llmsuite --address {gw_addr}"
        embedding = args.embedding_model.partition("=")[0] if args.embedding_model else ""
        served = f"model '{name}'" + (f", embedding model '{embedding}'" if embedding else "")
        embedding_hint = "" if not embedding else f"""
  {cli} embed --model {embedding} "Hello" "World"
  curl http://{http_addr}/v1/embeddings -H 'Content-Type: application/json' \\
    -d '{{"model": "{embedding}", "input": ["Hello", "World"]}}'"""
        print(f"""
llmsuite is up: gateway {gw_addr} (tokenizer {tok_addr}, inference {inf_addr}), {served},
OpenAI-compatible API on http://{http_addr}/v1.
The default model has random weights: its text is not meaningful (see README).

Try, in another terminal (after `source .venv/bin/activate`):
  {cli} generate --stream "Hello"
  {cli} chat
  {cli} models
  grpcurl -plaintext {gw_addr} list
  grpcurl -plaintext -d '{{"model": "{name}", "prompt": "Hello"}}' {gw_addr} llmsuite.gateway.v1.GatewayService/Generate
  curl http://{http_addr}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}'{embedding_hint}

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
