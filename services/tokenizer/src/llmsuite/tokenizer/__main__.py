"""`llmsuite-tokenizer`: serve Hugging Face tokenizers over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from llmsuite.runtime.logs import configure_logging
from llmsuite.runtime.server import serve
from llmsuite.runtime.settings import (
    EnvArgumentParser,
    add_server_arguments,
    model_specs,
    server_settings_from_args,
)
from llmsuite.runtime.tracing import build_tracer_provider
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp, WorkSettings
from llmsuite.tokenizer.template_pool import TemplateLimits

DEFAULT_LISTEN = "0.0.0.0:50051"


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(prog="llmsuite-tokenizer", description=__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a Hugging Face tokenizer directory to serve as NAME, or the ONNX file the inference "
                             "service serves as NAME (its tokenizer is beside it or one level up) (repeatable; "
                             "the env var takes a comma-separated list)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch-size", type=int, default=TokenizerLimits.max_batch_size,
                        help="most texts or sequences in one request")
    limits.add_argument("--max-input-chars", type=int, default=TokenizerLimits.max_input_chars,
                        help="longest text accepted, in characters")
    limits.add_argument("--max-tokens-per-sequence", type=int, default=TokenizerLimits.max_tokens_per_sequence,
                        help="longest token sequence accepted by Decode and DecodeStream")
    limits.add_argument("--max-request-chars", type=int, default=TokenizerLimits.max_request_chars,
                        help="most characters one request may carry in all its texts or messages together")
    limits.add_argument("--max-request-tokens", type=int, default=TokenizerLimits.max_request_tokens,
                        help="most token ids one request may produce (Encode) or decode (Decode), all texts "
                             "together; responses are also kept under --max-message-bytes")
    work = parser.add_argument_group("work")
    work.add_argument("--worker-threads", type=int, default=WorkSettings.worker_threads,
                      help="threads for tokenizer work")
    work.add_argument("--max-queued-requests", type=int, default=WorkSettings.max_queued,
                      help="requests that may wait for a worker thread; beyond that RESOURCE_EXHAUSTED with a "
                           "retry delay")
    work.add_argument("--stall-after", type=float, default=WorkSettings.stall_after_s,
                      help="seconds a request may wait for a worker before health reports NOT_SERVING (every "
                           "worker busy and none finishing); SERVING again once waits fall under half of it")
    chat = parser.add_argument_group("chat templates")
    chat.add_argument("--allow-request-templates", action=argparse.BooleanOptionalAction, default=False,
                      help="accept a Jinja chat template sent with ApplyChatTemplate. Off by default: every "
                           "render runs in a worker process under the limits below, but a template is code, and "
                           "the Jinja sandbox has had escapes; turn it on only for callers you trust")
    chat.add_argument("--template-timeout", type=float, default=TemplateLimits.timeout_s,
                      help="seconds one chat template render may take (the worker is killed past it)")
    chat.add_argument("--template-memory-mb", type=int, default=TemplateLimits.memory_bytes // (1024 * 1024),
                      help="memory one template worker process may allocate beyond its start-up size")
    chat.add_argument("--template-workers", type=int, default=TemplateLimits.workers,
                      help="template worker processes (renders at once); up to --max-queued-requests more wait")
    parser.add_argument("--reload-root", action="append", type=Path, default=None, metavar="DIR",
                        help="a directory Reload may load tokenizers from, itself or below it (repeatable; the env "
                             "var takes a comma-separated list); default: the --model directories. Reload needs an "
                             "API key with the 'admin' scope when keys are configured")
    add_server_arguments(parser, default_listen=DEFAULT_LISTEN)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = server_settings_from_args(args, service_name="llmsuite-tokenizer")
    configure_logging(settings.log_level, settings.log_format)
    limits = TokenizerLimits(max_batch_size=args.max_batch_size, max_input_chars=args.max_input_chars,
                             max_tokens_per_sequence=args.max_tokens_per_sequence,
                             max_request_chars=args.max_request_chars, max_request_tokens=args.max_request_tokens,
                             max_response_bytes=settings.max_message_bytes)
    work = WorkSettings(worker_threads=args.worker_threads, max_queued=args.max_queued_requests,
                        stall_after_s=args.stall_after)
    templates = TemplateLimits(timeout_s=args.template_timeout, memory_bytes=args.template_memory_mb * 1024 * 1024,
                               workers=args.template_workers, max_queued=args.max_queued_requests)
    app = TokenizerApp(model_specs(args.model), limits, work=work, reload_roots=args.reload_root,
                       templates=templates, allow_request_templates=args.allow_request_templates)
    try:
        asyncio.run(serve(settings, app, tracer_provider=build_tracer_provider(settings.telemetry)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
