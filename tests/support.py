"""Test support: real servers on loopback ephemeral ports, always cleaned up.

`ServerThread` runs a service's real bootstrap (`start_server`) on its own
event loop in a background thread, so tests use ordinary sync stubs over a
real channel. `ServiceProcess` starts a console script as a subprocess, reads
the bound port from its structured log, waits for gRPC health SERVING and
kills the whole process group at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmsuite.runtime.server import RunningServer, ServiceApp, start_server
from llmsuite.runtime.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
SHARED_EXPORTS = REPO.parent / "shared" / "optimum-exports"
BIN = Path(sys.executable).parent


class ServerThread:
    """A real grpc.aio server for `app` on 127.0.0.1:0, in a background loop."""

    def __init__(self, app: ServiceApp, settings: ServerSettings | None = None, *,
                 tracer_provider: Any = None, start: bool = True) -> None:
        self.app = app
        self._start = start
        self.settings = settings or ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text")
        self.settings = replace(self.settings, listen="127.0.0.1:0")
        self._tracer_provider = tracer_provider
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self.running: RunningServer | None = None

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._start:  # the test drives start_server itself
            return self
        self.running = self.call(start_server(self.settings, self.app, tracer_provider=self._tracer_provider))
        return self

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.port}"

    def channel(self, **kwargs: Any) -> grpc.Channel:
        return grpc.insecure_channel(self.address, **kwargs)

    def stop(self, grace_s: float = 0.5) -> None:
        if self.running is not None:
            self.call(self.running.stop(grace_s))
            self.running = None

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class ProcessDied(RuntimeError):
    """The process a test was waiting on exited first: waiting longer cannot help."""


def wait_for_serving(address: str, service: str = "", timeout: float = 60.0,
                     credentials: grpc.ChannelCredentials | None = None,
                     alive: Callable[[], bool] | None = None) -> None:
    """Polls health Check until SERVING. `alive` (e.g. "the server process is
    still running") is asked before every poll: once it says no, this raises
    ProcessDied at once instead of waiting out `timeout`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ProcessDied(f"{address} exited while waiting for SERVING")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING within {timeout}s (last error: {last})")


class ServiceProcess:
    """A console script in its own process group; port read from its log."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, *,
                 health_timeout: float = 90.0, wait: bool = True,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.argv = [str(BIN / argv[0]), *map(str, argv[1:])] if not os.path.isabs(argv[0]) else list(argv)
        self.env = {**os.environ, "LLMSUITE_LOG_FORMAT": "json", **(env or {})}
        self.health_timeout = health_timeout
        self.wait = wait
        self.credentials = credentials  # for health checks on a TLS listener
        self.lines: list[str] = []
        self.port: int | None = None
        self._port_seen = threading.Event()
        self.proc: subprocess.Popen[str] | None = None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.port is None and '"port"' in line:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if "port" in entry:
                        self.port = int(entry["port"])
                        self._port_seen.set()
        self._port_seen.set()

    def __enter__(self) -> ServiceProcess:
        self.launch()
        return self.ready()

    def launch(self) -> ServiceProcess:
        """Starts the process without waiting for it (see `ready`)."""
        self._stdout = tempfile.TemporaryFile(mode="w+")  # e.g. console span exporter output
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._stdout, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def ready(self) -> ServiceProcess:
        """Waits for the bound port and (with `wait`) for health SERVING."""
        assert self.proc is not None
        if not self._port_seen.wait(self.health_timeout) or self.port is None:
            self.kill()
            raise RuntimeError(f"{self.argv[0]} did not report a port:\n{self.log()}")
        if self.wait:
            try:
                wait_for_serving(self.address, timeout=self.health_timeout, alive=self.alive,
                                 credentials=self.credentials)
            except ProcessDied:
                self.kill()
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode} before SERVING:\n"
                                   f"{self.log()}") from None
            except TimeoutError:
                self.kill()
                raise RuntimeError(f"{self.argv[0]} never became SERVING:\n{self.log()}") from None
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stdout_text(self) -> str:
        self._stdout.seek(0)
        return self._stdout.read()

    def log(self) -> str:
        return "".join(self.lines[-60:])

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def processes(*procs: ServiceProcess) -> Iterator[list[ServiceProcess]]:
    """Starts them all at once, then waits until each is ready; kills them all at the end."""
    try:
        for p in procs:
            p.launch()
        for p in procs:
            p.ready()
        yield list(procs)
    except BaseException:
        for p in procs:  # pytest shows this with the failure: what each process logged
            print(f"--- {' '.join(p.argv[:1])} ({'running' if p.alive() else 'exited'}) ---\n{p.log()}")
        raise
    finally:
        for p in reversed(procs):
            p.kill()


METRICS_PORT_OFFSET = 1000  # --metrics-listen auto: the gRPC port + 1000


def free_ports(n: int) -> list[int]:
    """gRPC ports free right now (for a process that must listen on a known port), each
    with its metrics port (port + 1000, where `--metrics-listen auto` puts it) free too:
    on a busy machine an ephemeral port's +1000 neighbour is often some client's."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            grpc_port = socket.socket()
            grpc_port.bind(("127.0.0.1", 0))
            held.append(grpc_port)
            port = grpc_port.getsockname()[1]
            if port + METRICS_PORT_OFFSET > 65535:
                continue
            metrics_port = socket.socket()
            try:
                metrics_port.bind(("127.0.0.1", port + METRICS_PORT_OFFSET))
            except OSError:
                metrics_port.close()
                continue
            held.append(metrics_port)
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def watch_health(address: str, want: int, service: str = "", timeout: float = 60.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Follows health Watch until `service` reports `want` (a HealthCheckResponse
    status): the server pushes each change, so this waits for the event itself."""
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=service),
                                                       timeout=timeout)
        seen = []
        try:
            for response in stream:
                seen.append(response.status)
                if response.status == want:
                    return
        except grpc.RpcError as exc:
            raise TimeoutError(f"{address} {service!r} never reported {want} (saw {seen}): {exc.code()}") from None
        finally:
            stream.cancel()
    raise TimeoutError(f"{address} {service!r} stream ended before reporting {want} (saw {seen})")


def wait_http_ready(proc: ServiceProcess, timeout_s: float = 60.0, *, ready: tuple[int, ...] = (200, 503)) -> str:
    """Its base URL once /health answers with a status in `ready` (by default 200, or 503 for
    a down gateway); fails as soon as the process dies."""
    base = f"http://{proc.address}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise RuntimeError(f"llmsuite-openai exited:\n{proc.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health", timeout=5).status_code in ready:
                return base
        time.sleep(0.05)
    raise TimeoutError(f"llmsuite-openai never answered /health:\n{proc.log()}")
