"""`llmsuite-gateway`: the public entry point; text in, streamed text out."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.service import GatewayApp, GatewayLimits
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.logs import configure_logging
from llmsuite.runtime.server import serve
from llmsuite.runtime.settings import EnvArgumentParser, add_server_arguments, server_settings_from_args
from llmsuite.runtime.tracing import build_tracer_provider

DEFAULT_LISTEN = "0.0.0.0:50050"


def build_parser() -> EnvArgumentParser:
    limits = GatewayLimits()
    parser = EnvArgumentParser(prog="llmsuite-gateway", description=__doc__)
    u = parser.add_argument_group("upstreams")
    u.add_argument("--tokenizer", default="localhost:50051", help="tokenizer service address")
    u.add_argument("--inference", default="localhost:50052",
                   help="inference replicas: ADDR[,ADDR...] (round-robin, per-replica circuit breakers, "
                        "spill-over) or one dns:///NAME:PORT (gRPC round_robin over its addresses)")
    u.add_argument("--upstream-api-key", default="", help="API key the gateway presents to its upstreams")
    u.add_argument("--upstream-tls-ca", default=None, help="PEM CA to verify upstream TLS certificates")
    u.add_argument("--breaker-failures", type=int, default=5,
                   help="consecutive upstream failures that open a replica's circuit")
    u.add_argument("--breaker-reset", type=float, default=5.0,
                   help="seconds an open circuit waits before one probe request")
    u.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds to wait for upstreams at start (health stays NOT_SERVING meanwhile)")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens, help="cap on prompt tokens")
    lim.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens, help="cap on max_new_tokens")
    lim.add_argument("--rate-limit-rps", type=float, default=0.0,
                     help="requests per second per API key (0 = unlimited)")
    lim.add_argument("--rate-limit-burst", type=float, default=20.0, help="request bucket size per API key")
    lim.add_argument("--token-rate-limit", type=float, default=0.0,
                     help="tokens (prompt + max_new_tokens) per second per API key (0 = unlimited)")
    lim.add_argument("--token-burst", type=float, default=65536.0, help="token bucket size per API key")
    add_server_arguments(parser, default_listen=DEFAULT_LISTEN)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = server_settings_from_args(args, service_name="llmsuite-gateway")
    configure_logging(settings.log_level, settings.log_format)
    tracer_provider = build_tracer_provider(settings.telemetry)
    channel = ChannelSettings(compression=settings.compression, max_message_bytes=settings.max_message_bytes,
                              tls_ca_file=Path(args.upstream_tls_ca) if args.upstream_tls_ca else None,
                              api_key=args.upstream_api_key or None)
    inference = [t.strip() for t in args.inference.split(",") if t.strip()]
    factory = partial(Upstreams.connect, args.tokenizer, inference, channel, tracer_provider=tracer_provider,
                      breaker_threshold=args.breaker_failures, breaker_reset_s=args.breaker_reset)
    limiter = KeyedRateLimiter(args.rate_limit_rps, args.rate_limit_burst, args.token_rate_limit, args.token_burst)
    app = GatewayApp(factory, GatewayLimits(args.max_prompt_tokens, args.max_new_tokens), limiter,
                     startup_timeout_s=args.startup_timeout)
    try:
        asyncio.run(serve(settings, app, tracer_provider=tracer_provider))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
