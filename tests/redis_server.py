"""A real `redis-server` (Debian's package) on a free loopback port, for the shared
rate-limit tests. No persistence; ready once it answers PING; always stopped."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import redis
from support import free_ports

REDIS_SERVER = "redis-server"


def require_redis_server() -> str:
    found = shutil.which(REDIS_SERVER)
    if found is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    return found


class RedisServer:
    """`with RedisServer() as r:` starts one and waits for PONG; `url` is what
    --rate-limit-storage takes. `stop` ends it (the port stays this object's,
    nothing listens there); `pause`/`resume` freeze it (SIGSTOP/SIGCONT): a Redis
    that accepts connections and never answers."""

    def __init__(self) -> None:
        self.executable = require_redis_server()
        (self.port,) = free_ports(1)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # redis-server logs to stdout: a file never blocks it

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--protected-mode", "no"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_for_pong(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_pong(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"redis-server exited before answering PING:\n{self.log()}")
                with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        raise TimeoutError(f"redis-server did not answer PING within {timeout}s:\n{self.log()}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must be able to die
            self.proc.kill()
            self.proc.wait(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
