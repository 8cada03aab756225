"""Runs the HTTP API on uvicorn: bind, report the bound port, serve until
SIGTERM/SIGINT, then drain in-flight requests."""

from __future__ import annotations

import json
import logging
import math
import socket
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmsuite.gateway.openai.app import ApiSettings, build_app
from llmsuite.gateway.openai.errors import ApiError

log = logging.getLogger("llmsuite.openai")


@dataclass(frozen=True)
class HttpServerSettings:
    listen: str = "0.0.0.0:8000"
    grace_period_s: float = 10.0
    access_log: bool = False


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, whose own 400 (a request h11 cannot parse: bytes outside ASCII
    in the path, a malformed header, a bad Content-Length) is OpenAI-shaped JSON like every
    other error of this API, not uvicorn's plain text. Those requests never reach the app."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(ApiError(400, f"{msg} (malformed HTTP request)", code="invalid_http_request").body())
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=body.encode())))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


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
        http=JsonErrorH11Protocol,  # also where httptools is installed: the same parser everywhere
    )
    log.info("listening", extra={"listen": server_settings.listen, "port": port, "gateway": api_settings.gateway})
    # After a graceful shutdown uvicorn re-raises the signal that started it, so the process
    # ends with that signal's status (as an unhandled SIGTERM would).
    with sock:
        await uvicorn.Server(config).serve(sockets=[sock])
