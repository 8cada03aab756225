"""`llmsuite-openai`: the OpenAI-compatible HTTP API in front of a gateway."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from llmsuite.gateway.openai.app import ApiSettings
from llmsuite.gateway.openai.server import HttpServerSettings, serve
from llmsuite.runtime.logs import configure_logging
from llmsuite.runtime.settings import EnvArgumentParser

DEFAULT_LISTEN = "0.0.0.0:8000"


def build_parser() -> EnvArgumentParser:
    defaults = ApiSettings()
    parser = EnvArgumentParser(prog="llmsuite-openai", description=__doc__)
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT for HTTP (port 0 picks a free one)")
    parser.add_argument("--gateway", default=defaults.gateway, help="gateway gRPC address")
    parser.add_argument("--gateway-tls-ca", type=Path, default=None,
                        help="PEM CA to verify the gateway's TLS certificate (enables TLS to the gateway)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds a request may take; a generation still running then ends with "
                             "finish_reason 'length'")
    parser.add_argument("--default-max-tokens", type=int, default=0,
                        help="max_tokens for requests that set none (0: the gateway's default, 16)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body accepted (larger: 413)")
    parser.add_argument("--grace-period", type=float, default=defaults.shutdown_grace_s,
                        help="seconds in-flight requests (streams included) may take to finish after "
                             "SIGTERM/SIGINT; new connections are refused meanwhile")
    parser.add_argument("--access-log", action="store_true", default=False, help="log one line per request")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-format", choices=["json", "text"], default="json", help="log line format")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.default_max_tokens < 0 or args.grace_period < 0 or args.request_timeout <= 0 or args.max_body_bytes <= 0:
        parser.error("--default-max-tokens and --grace-period must be >= 0; --request-timeout and "
                     "--max-body-bytes > 0")
    configure_logging(args.log_level, args.log_format)
    api = ApiSettings(gateway=args.gateway, gateway_tls_ca=args.gateway_tls_ca,
                      request_timeout_s=args.request_timeout, default_max_tokens=args.default_max_tokens or None,
                      max_body_bytes=args.max_body_bytes, shutdown_grace_s=args.grace_period)
    server = HttpServerSettings(listen=args.listen, grace_period_s=args.grace_period, access_log=args.access_log)
    try:
        asyncio.run(serve(server, api))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
