"""A raw HTTP/2 gRPC call, for tests that must see what is on the wire
(grpc-encoding, the compressed-flag byte) which gRPC client libraries hide."""

from __future__ import annotations

import gzip
import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class WireResponse:
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    compressed_flag: int | None = None
    message: bytes = b""


def unary_call(host: str, port: int, path: str, request: bytes, *, compress_request: bool,
               extra_headers: tuple[tuple[str, str], ...] = ()) -> WireResponse:
    payload = gzip.compress(request) if compress_request else request
    frame = struct.pack(">BI", 1 if compress_request else 0, len(payload)) + payload
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    out = WireResponse()
    body = bytearray()
    with socket.create_connection((host, port), timeout=10) as sock:
        conn.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"{host}:{port}"),
                   ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-accept-encoding", "gzip"),
                   *extra_headers]
        if compress_request:
            headers.append(("grpc-encoding", "gzip"))
        conn.send_headers(1, headers)
        conn.send_data(1, frame, end_stream=True)
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    out.headers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    out.trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            sock.sendall(conn.data_to_send())
    if len(body) >= 5:
        flag, length = struct.unpack(">BI", body[:5])
        out.compressed_flag = flag
        raw = bytes(body[5:5 + length])
        out.message = gzip.decompress(raw) if flag == 1 else raw
    return out
