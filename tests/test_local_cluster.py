"""`make run`'s launcher and docker-compose's services, run as local processes."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from compose_local import compose_services_as_local_processes
from support import REPO, ServiceProcess, free_ports, processes

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc


def assert_nothing_listens_on(port: int) -> None:
    with socket.socket() as s:
        # SO_REUSEADDR: connections the gateway closed (the HTTP API's, in TIME_WAIT) do not
        # count; a socket still listening on the port does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def streamed_text(address: str) -> tuple[str, int]:
    with grpc.insecure_channel(address) as ch:
        responses = list(gateway_pb2_grpc.GatewayServiceStub(ch).GenerateStream(pb.GenerateStreamRequest(
            model="tiny", prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=0)),
            timeout=60))
    text = "".join(r.delta.text for r in responses if r.WhichOneof("kind") == "delta")
    return text, responses[-1].final.usage.completion_tokens


def openai_completion_tokens(address: str) -> int:
    """Completion tokens of one request to the OpenAI-compatible API, once it is ready."""
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://{address}/health", timeout=5).status_code == 200:
                break
        assert time.monotonic() < deadline, "the OpenAI-compatible API never became ready"
        time.sleep(0.1)
    response = httpx.post(f"http://{address}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["completion_tokens"]


def test_compose_services_run_as_local_processes_and_stream(tiny_model_dir, tiny_embed_dir):
    gw, tok, inf, http = free_ports(4)
    specs = compose_services_as_local_processes(REPO / "docker-compose.yml",
                                                {50050: gw, 50051: tok, 50052: inf, 8000: http},
                                                {"tiny": tiny_model_dir, "tiny-embed": tiny_embed_dir})
    assert [s.name for s in specs][-2:] == ["gateway", "openai"]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSUITE_")}
    # The HTTP API has no gRPC health to wait on; openai_completion_tokens waits on its /health.
    started = [ServiceProcess(s.argv, env={**clean_env, **s.env}, wait=s.name != "openai") for s in specs]
    with processes(*started):
        _, completion = streamed_text(f"127.0.0.1:{gw}")
        assert completion == 8
        assert openai_completion_tokens(f"127.0.0.1:{http}") == 8
        # The embedding model the images carry beside it, as `make run` serves it.
        embedded = httpx.post(f"http://127.0.0.1:{http}/v1/embeddings", timeout=60,
                              json={"model": "tiny-embed", "input": ["Hello", "World"]})
        assert embedded.status_code == 200, embedded.text
        vectors = [item["embedding"] for item in embedded.json()["data"]]
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0 and vectors[0] != vectors[1]


class Launcher:
    """`python -m llmsuite.cluster` with its output drained by a thread for its
    whole life: the children write their logs to the same pipe, and a
    pipe nobody reads would block them (and their graceful exit) once full."""

    def __init__(self, model_dir, ports: list[int]) -> None:
        gw, tok, inf, http = ports
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmsuite.cluster", "--model", f"tiny={model_dir}", "--device", "cpu",
             "--gateway-port", str(gw), "--tokenizer-port", str(tok), "--inference-port", str(inf),
             "--openai-port", str(http)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 180) -> str:
        """The output up to the first line containing `text`; fails as soon as the
        launcher's output ends (it exited) without one."""
        with self._changed:
            found = self._changed.wait_for(lambda: self._eof or any(text in line for line in self.lines), timeout)
            out = "".join(self.lines)
        assert found and text in out, out
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._reader.join(30)


def test_make_run_launcher_serves_and_stops_gracefully_on_ctrl_c(tiny_model_dir):
    ports = free_ports(4)
    gw, http = ports[0], ports[3]
    launcher = Launcher(tiny_model_dir, ports)
    try:
        out = launcher.wait_for_line("Ctrl-C stops them all")
        assert "llmsuite is up" in out, out
        # Not the default ports: every example command names where the gateway is.
        assert f'llmsuite --address 127.0.0.1:{gw} generate --stream "Hello"' in out, out
        _, completion = streamed_text(f"127.0.0.1:{gw}")
        assert completion == 8
        assert f"http://127.0.0.1:{http}/v1" in out
        assert openai_completion_tokens(f"127.0.0.1:{http}") == 8
        os.killpg(launcher.proc.pid, signal.SIGINT)
        assert launcher.proc.wait(60) == 0, launcher.output()
        assert_nothing_listens_on(gw)  # every child is gone
    finally:
        launcher.kill()


def wait_until_exited(pids: list[int], timeout: float = 60) -> list[int]:
    """Waits on pidfds (readable once a process has exited) for processes that
    are not our children; returns those still running after `timeout`."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    try:
        pending = set(fds)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pending), [], [], deadline - time.monotonic())
            pending -= set(ready)
        return [fds[fd] for fd in pending]
    finally:
        for fd in fds:
            os.close(fd)


def launcher_children(pid: int) -> list[int]:
    """Pids of a process's children (Linux /proc)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children follow a killed launcher on Linux only")
def test_launcher_children_exit_when_the_launcher_is_killed(tiny_model_dir):
    ports = free_ports(4)
    gw = ports[0]
    launcher = Launcher(tiny_model_dir, ports)
    children: list[int] = []
    try:
        launcher.wait_for_line("Ctrl-C stops them all")
        children = launcher_children(launcher.proc.pid)
        assert len(children) == 4
        os.kill(launcher.proc.pid, signal.SIGKILL)  # the launcher alone: its children have sessions of their own
        launcher.proc.wait(30)
        assert wait_until_exited(children) == [], launcher.output()
        assert_nothing_listens_on(gw)
    finally:
        launcher.kill()
        kill_all(children)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe hang-up detection uses Linux poll semantics")
def test_launcher_stops_its_children_when_its_output_pipe_closes(tiny_model_dir):
    gw, tok, inf, http = free_ports(4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsuite.cluster", "--model", f"tiny={tiny_model_dir}", "--device", "cpu",
         "--gateway-port", str(gw), "--tokenizer-port", str(tok), "--inference-port", str(inf),
         "--openai-port", str(http)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    children: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the children log here too: keep reading until the banner
            if "Ctrl-C stops them all" in line:
                break
        children = launcher_children(proc.pid)
        assert len(children) == 4
        proc.stdout.close()  # e.g. `make run | tee log` and tee went away
        assert proc.wait(60) != 0
        assert wait_until_exited(children) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_all(children)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_launcher(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmsuite.cluster", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("taken", ["tokenizer", "gateway metrics", "openai"])
def test_a_taken_port_fails_the_launch_with_one_clear_line(tiny_model_dir, taken):
    gw, tok, inf, http = free_ports(4)
    port = {"tokenizer": tok, "gateway metrics": gw + 1000, "openai": http}[taken]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = run_launcher("--model", f"tiny={tiny_model_dir}", "--device", "cpu", "--gateway-port", str(gw),
                              "--tokenizer-port", str(tok), "--inference-port", str(inf), "--openai-port", str(http))
    assert result.returncode == 1, result
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"port {port} ({taken}) on 127.0.0.1 is already in use" in lines[0], lines
    assert_nothing_listens_on(gw)  # nothing was started


def test_health_from_another_process_on_the_port_is_not_taken_for_the_childs():
    """The launcher's check after SERVING: the port must be held by the child it started."""
    from llmsuite.cluster import _check_own_child

    (port,) = free_ports(1)
    listener = [sys.executable, "-c", "import socket, sys; s = socket.socket(); "
                f"s.bind(('127.0.0.1', {port})); s.listen(); print('bound', flush=True); sys.stdin.read()"]
    bystander = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    with subprocess.Popen(listener, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as owner, \
            subprocess.Popen(bystander, stdin=subprocess.PIPE) as other:
        try:
            assert owner.stdout is not None and owner.stdout.readline() == "bound\n"
            _check_own_child("tokenizer", f"127.0.0.1:{port}", owner)  # it holds the port: fine
            with pytest.raises(SystemExit, match="not from the tokenizer this launcher started"):
                _check_own_child("tokenizer", f"127.0.0.1:{port}", other)
        finally:
            for proc in (owner, other):
                proc.kill()


def test_port_options_help_and_make_run_pass_through():
    from llmsuite.cluster import _ports, build_parser

    parse = build_parser().parse_args
    assert _ports(parse([])) == {"gateway": 50050, "tokenizer": 50051, "inference": 50052, "openai": 8000}
    assert _ports(parse(["--port-base", "60050", "--openai-port", "9000"])) == {
        "gateway": 60050, "tokenizer": 60051, "inference": 60052, "openai": 9000}
    help_text = run_launcher("--help").stdout
    assert "/metrics on their gRPC port + 1000" in help_text and "--port-base" in help_text, help_text
    dry_run = subprocess.run(["make", "-n", "run", "PORT_BASE=60050", "RUN_ARGS=--device cpu"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert ("-m llmsuite.cluster --model tiny=models/tiny --embedding-model tiny-embed=models/tiny-embed "
            "--port-base 60050 --device cpu") in dry_run, dry_run
