"""How the SDK connects: one settings object builds both the sync and the
asyncio channel, so the two clients cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from llmsuite.client.errors import REQUEST_ID_HEADER

GATEWAY_SERVICE = "llmsuite.gateway.v1.GatewayService"
HEALTH_SERVICE = "grpc.health.v1.Health"
USER_AGENT = "llmsuite-python"
_COMPRESSION = {"gzip": grpc.Compression.Gzip, "none": grpc.Compression.NoCompression}


@dataclass(frozen=True)
class ConnectionSettings:
    """Everything both clients are constructed with (see LlmsuiteClient)."""

    address: str = "localhost:50050"
    api_key: str | None = None
    timeout_s: float | None = 60.0
    compression: str = "gzip"
    tls: bool = False
    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    wait_for_ready: bool = True
    max_attempts: int = 3
    # Sent with every call besides the key and request id, e.g. a caller's W3C trace context.
    metadata: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.compression not in _COMPRESSION:
            raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, not {self.compression!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file (mTLS) must be given together")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials; without ca_file the system's trusted roots apply."""

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        # Retries are gRPC's own: only UNAVAILABLE, and only before any
        # response arrived, so a stream that produced text is never replayed.
        return [
            ("grpc.enable_retries", 1 if self.max_attempts > 1 else 0),
            ("grpc.service_config", service_config([GATEWAY_SERVICE, HEALTH_SERVICE], self.max_attempts)),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.primary_user_agent", USER_AGENT),
        ]

    @property
    def grpc_compression(self) -> grpc.Compression:
        return _COMPRESSION[self.compression]

    def call_options(self, *, request_id: str | None = None, timeout_s: float | None = None,
                     wait_for_ready: bool | None = None, deadline: bool = True) -> dict[str, Any]:
        """Keyword arguments for a stub call. `deadline=False` drops the
        client's default timeout (chat sessions live as long as their user)."""
        metadata = [*auth_metadata(self.api_key), *self.metadata]
        if request_id:
            metadata.append((REQUEST_ID_HEADER, request_id))
        timeout = timeout_s if timeout_s is not None else (self.timeout_s if deadline else None)
        return {
            "metadata": tuple(metadata),
            "timeout": timeout,
            "wait_for_ready": self.wait_for_ready if wait_for_ready is None else wait_for_ready,
        }

    def sync_channel(self) -> grpc.Channel:
        kwargs = {"options": self.channel_options(), "compression": self.grpc_compression}
        if self.uses_tls:
            return grpc.secure_channel(self.address, self.credentials(), **kwargs)
        return grpc.insecure_channel(self.address, **kwargs)

    def aio_channel(self) -> grpc.aio.Channel:
        kwargs = {"options": self.channel_options(), "compression": self.grpc_compression}
        if self.uses_tls:
            return grpc.aio.secure_channel(self.address, self.credentials(), **kwargs)
        return grpc.aio.insecure_channel(self.address, **kwargs)


def service_config(services: Sequence[str], attempts: int) -> str:
    """Round-robin over every resolved address; retry UNAVAILABLE with backoff.

    gRPC only retries a call that has not yet received response headers or
    messages, so a stream that has started producing tokens is never replayed.
    """
    config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": s} for s in services],
            "retryPolicy": {
                "maxAttempts": attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
