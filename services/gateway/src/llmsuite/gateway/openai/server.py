"""Runs the HTTP API on uvicorn: bind, report the bound port, serve until
SIGTERM/SIGINT, then drain in-flight requests."""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass

import uvicorn

from llmsuite.gateway.openai.app import ApiSettings, build_app

log = logging.getLogger("llmsuite.openai")


@dataclass(frozen=True)
class HttpServerSettings:
    listen: str = "0.0.0.0:8000"
    grace_period_s: float = 10.0
    access_log: bool = False


def bind(listen: str) -> socket.socket:
    """A listening socket for HOST:PORT ([::]:PORT for IPv6; port 0 picks a free one)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(server_settings: HttpServerSettings, api_settings: ApiSettings) -> None:
    """Serve until a signal asks to stop; in-flight requests get the grace period."""
    sock = bind(server_settings.listen)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(api_settings),
        log_config=None,  # keep the JSON/text log format set up in main
        access_log=server_settings.access_log,
        # A second longer than the streams' own grace (ApiSettings.shutdown_grace_s), so they end first.
        timeout_graceful_shutdown=math.ceil(server_settings.grace_period_s) + 1,
        server_header=False,
    )
    log.info("listening", extra={"listen": server_settings.listen, "port": port, "gateway": api_settings.gateway})
    # After a graceful shutdown uvicorn re-raises the signal that started it, so the process
    # ends with that signal's status (as an unhandled SIGTERM would).
    with sock:
        await uvicorn.Server(config).serve(sockets=[sock])
