"""Client channels for calls between services (and from the SDK).

gzip by default, keepalive pings so dead peers are noticed, generous message
sizes, a service config with `round_robin` across resolved addresses and a
retry policy for UNAVAILABLE (the SDK's own, from `llmsuite.client.connection`),
and W3C trace-context injection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from llmsuite.client.connection import service_config
from llmsuite.runtime.tracing import client_interceptors


@dataclass(frozen=True)
class ChannelSettings:
    compression: str = "gzip"
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    max_message_bytes: int = 64 * 1024 * 1024
    retry_unavailable_attempts: int = 3  # 1 disables retries
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None  # client certificate for mTLS
    tls_key_file: Path | None = None
    api_key: str | None = None


def create_channel(
    target: str,
    settings: ChannelSettings,
    *,
    services: Sequence[str] = (),
    tracer_provider: object | None = None,
) -> grpc.aio.Channel:
    options = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.enable_retries", 1 if settings.retry_unavailable_attempts > 1 else 0),
        ("grpc.service_config", service_config(services, settings.retry_unavailable_attempts)),
    ]
    compression = grpc.Compression.Gzip if settings.compression == "gzip" else grpc.Compression.NoCompression
    interceptors = client_interceptors(tracer_provider)  # type: ignore[arg-type]
    if settings.tls_ca_file or settings.tls_cert_file:
        creds = grpc.ssl_channel_credentials(
            root_certificates=settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None,
            private_key=settings.tls_key_file.read_bytes() if settings.tls_key_file else None,
            certificate_chain=settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None,
        )
        return grpc.aio.secure_channel(target, creds, options=options, compression=compression,
                                       interceptors=interceptors or None)
    return grpc.aio.insecure_channel(target, options=options, compression=compression,
                                     interceptors=interceptors or None)
