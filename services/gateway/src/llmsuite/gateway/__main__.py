"""`llmsuite-gateway`: the public entry point; text in, streamed text out."""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.app import GatewayApp
from llmsuite.gateway.rate_limit import RateLimitSettings, StorageFailureMode, build_rate_limiter
from llmsuite.gateway.tool_calls import FORMATS, parse_format_flags
from llmsuite.gateway.upstreams import Upstreams, parse_inference_targets
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.logs import configure_logging
from llmsuite.runtime.server import serve
from llmsuite.runtime.settings import EnvArgumentParser, add_server_arguments, server_settings_from_args
from llmsuite.runtime.tracing import build_tracer_provider

DEFAULT_LISTEN = "0.0.0.0:50050"
MMAP_THRESHOLD_BYTES = 256 * 1024


def build_parser() -> EnvArgumentParser:
    limits = GatewayLimits()
    rate = RateLimitSettings()
    parser = EnvArgumentParser(prog="llmsuite-gateway", description=__doc__)
    u = parser.add_argument_group("upstreams")
    u.add_argument("--tokenizer", default="localhost:50051", help="tokenizer service address")
    u.add_argument("--inference", default="localhost:50052",
                   help="inference replicas: HOST:PORT[,HOST:PORT...] (round-robin, per-replica circuit "
                        "breakers, spill-over), or one gRPC target URI such as dns:///NAME:PORT or "
                        "ipv4:A:PORT,B:PORT (one channel; gRPC round_robin over its addresses)")
    u.add_argument("--upstream-api-key", default="", help="API key the gateway presents to its upstreams")
    u.add_argument("--upstream-tls-ca", type=Path, default=None,
                   help="PEM CA bundle to verify upstream TLS certificates; enables TLS to upstreams")
    u.add_argument("--upstream-tls-cert", type=Path, default=None,
                   help="PEM client certificate presented to upstreams that require mTLS (with --upstream-tls-key)")
    u.add_argument("--upstream-tls-key", type=Path, default=None, help="PEM private key for --upstream-tls-cert")
    u.add_argument("--breaker-failures", type=int, default=5,
                   help="consecutive failures (requests or probes) after which an upstream counts as down: "
                        "its circuit opens and health stops counting it")
    u.add_argument("--breaker-reset", type=float, default=5.0,
                   help="seconds an open circuit waits before one probe request")
    u.add_argument("--refresh-interval", type=float, default=2.0,
                   help="seconds between asking every upstream for its models (discovery, tokenizer pairing, "
                        "health)")
    u.add_argument("--startup-timeout", type=float, default=0.0,
                   help="seconds to wait at start for a servable model before exiting with status 1; 0 waits "
                        "for ever. Meanwhile the port answers, health is NOT_SERVING and calls get UNAVAILABLE")
    chat = parser.add_argument_group("chat")
    chat.add_argument("--tool-call-parser", action="append", default=[], metavar="NAME=FORMAT",
                      help="how model NAME writes tool calls: " + ", ".join(sorted(FORMATS)) + ". Without it the "
                           "format is read from the chat template's markers (<tool_call>, [TOOL_CALLS], "
                           "<|python_tag|>); a chat with tools on a model whose format is known neither way is "
                           "refused (FAILED_PRECONDITION, TOOL_CALL_FORMAT_UNKNOWN). Repeatable")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens, help="cap on prompt tokens")
    lim.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens, help="cap on max_new_tokens")
    lim.add_argument("--max-request-chars", type=int, default=limits.max_request_chars,
                     help="characters of text one request may carry (a prompt; Tokenize's or CountTokens' texts "
                          "together; a Chat conversation's messages together), refused with INVALID_ARGUMENT "
                          "before anything is forwarded. It also sets the largest message the gateway receives: "
                          "4 bytes a character + 1 MiB, at most --max-message-bytes; gRPC refuses a larger one "
                          "with RESOURCE_EXHAUSTED before buffering it")
    lim.add_argument("--deadline-margin", type=float, default=limits.deadline_margin_s,
                     help="seconds before a request's deadline at which the gateway ends a generation itself "
                          "(final message with finish_reason TIME_LIMIT and the text so far); inference gets a "
                          "deadline twice this much earlier. At most a tenth of the request's time is used")
    lim.add_argument("--prefix-affinity-chars", type=int, default=limits.affinity_key_chars,
                     help="route requests whose first this-many characters (prompt, or the conversation's first "
                          "messages) agree to the same inference replica, so its prefix cache serves them; "
                          "a replica loaded beyond 1.25x its fair share is passed over; 0 = plain round-robin. "
                          "Needs replicas listed one by one (not one dns:/// target)")
    lim.add_argument("--rate-limit-rps", type=float, default=0.0,
                     help="requests per second per API key (0 = unlimited)")
    lim.add_argument("--rate-limit-burst", type=float, default=rate.request_burst,
                     help="request bucket size per API key")
    lim.add_argument("--token-rate-limit", type=float, default=0.0,
                     help="tokens (prompt + max_new_tokens) per second per API key (0 = unlimited)")
    lim.add_argument("--token-burst", type=float, default=rate.token_burst, help="token bucket size per API key")
    lim.add_argument("--rate-limit-storage", default=rate.storage, metavar="URL",
                     help="redis://[:PASSWORD@]HOST:PORT/DB (or rediss:// for TLS): keep the per-key limits in "
                          "this Redis, shared by every gateway using it, so N replicas together admit what one "
                          "would; empty: each gateway keeps its own in memory. Needs the `redis` extra "
                          "(llmsuite-gateway[redis])")
    lim.add_argument("--rate-limit-fail", choices=[m.value for m in StorageFailureMode],
                     default=rate.storage_failure.value,
                     help="when the --rate-limit-storage Redis fails or does not answer in --rate-limit-timeout: "
                          "open admits the request (logged, counted in "
                          "llmsuite_gateway_rate_limit_unchecked_total), closed refuses it with UNAVAILABLE "
                          "(RATE_LIMIT_STORAGE_UNAVAILABLE). Either way Redis is asked again after a second")
    lim.add_argument("--rate-limit-timeout", type=float, default=rate.storage_timeout_s, metavar="SECONDS",
                     help="most a request waits on the --rate-limit-storage Redis, retries included, before "
                          "--rate-limit-fail applies")
    add_server_arguments(parser, default_listen=DEFAULT_LISTEN)
    return parser


def keep_large_buffers_out_of_the_heap() -> None:
    """glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB),
    after which multi-MiB request buffers come from the heap, which keeps them once freed: the
    gateway held 1 GB more than at idle after 72 requests of 4 MB (docs/reliability.md). A fixed
    threshold keeps every block over 256 KiB in a mapping of its own, returned to the system when
    freed. Without glibc (musl, macOS) this does nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    keep_large_buffers_out_of_the_heap()
    if args.max_request_chars < 1:
        raise SystemExit("--max-request-chars must be at least 1")
    try:
        tool_call_parsers = parse_format_flags(args.tool_call_parser)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    limits = GatewayLimits(args.max_prompt_tokens, args.max_new_tokens, deadline_margin_s=args.deadline_margin,
                           affinity_key_chars=args.prefix_affinity_chars, max_request_chars=args.max_request_chars,
                           tool_call_parsers=tool_call_parsers)
    settings = server_settings_from_args(args, service_name="llmsuite-gateway")
    settings = replace(settings, max_receive_message_bytes=limits.max_receive_bytes(settings.max_message_bytes))
    configure_logging(settings.log_level, settings.log_format)
    tracer_provider = build_tracer_provider(settings.telemetry)
    if (args.upstream_tls_cert is None) != (args.upstream_tls_key is None):
        raise SystemExit("--upstream-tls-cert and --upstream-tls-key must be given together")
    channel = ChannelSettings(compression=settings.compression, max_message_bytes=settings.max_message_bytes,
                              tls_ca_file=args.upstream_tls_ca, tls_cert_file=args.upstream_tls_cert,
                              tls_key_file=args.upstream_tls_key, api_key=args.upstream_api_key or None)
    factory = partial(Upstreams.connect, args.tokenizer, parse_inference_targets(args.inference), channel,
                      tracer_provider=tracer_provider, breaker_threshold=args.breaker_failures,
                      breaker_reset_s=args.breaker_reset)
    rate = RateLimitSettings(args.rate_limit_rps, args.rate_limit_burst, args.token_rate_limit, args.token_burst,
                             storage=args.rate_limit_storage,
                             storage_failure=StorageFailureMode(args.rate_limit_fail),
                             storage_timeout_s=args.rate_limit_timeout)
    try:
        limiter = build_rate_limiter(rate)
    except ValueError as exc:
        raise SystemExit(f"llmsuite-gateway: {exc}") from None
    app = GatewayApp(factory, limits, limiter, startup_timeout_s=args.startup_timeout,
                     refresh_interval_s=args.refresh_interval)
    try:
        asyncio.run(serve(settings, app, tracer_provider=tracer_provider))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
