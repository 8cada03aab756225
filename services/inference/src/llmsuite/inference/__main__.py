"""`llmsuite-inference`: serve ONNX decoder models (Optimum layout) over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import InferenceApp
from llmsuite.runtime.logs import configure_logging
from llmsuite.runtime.server import serve
from llmsuite.runtime.settings import (
    EnvArgumentParser,
    add_server_arguments,
    model_specs,
    server_settings_from_args,
)
from llmsuite.runtime.tracing import build_tracer_provider

DEFAULT_LISTEN = "0.0.0.0:50052"


def build_parser() -> EnvArgumentParser:
    defaults = EngineSettings()
    parser = EnvArgumentParser(prog="llmsuite-inference", description=__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="an Optimum ONNX export directory to serve as NAME (repeatable; "
                             "the env var takes a comma-separated list)")
    e = parser.add_argument_group("engine")
    e.add_argument("--device", default=defaults.device,
                   help="auto (CUDA if really active, else CPU with a warning), cpu, cuda or cuda:N "
                        "(cuda fails at start unless the CUDA execution provider is active)")
    e.add_argument("--intra-op-threads", type=int, default=defaults.intra_op_threads,
                   help="ONNX Runtime threads per operator (0 = its default)")
    e.add_argument("--inter-op-threads", type=int, default=defaults.inter_op_threads,
                   help="ONNX Runtime threads across operators (0 = its default)")
    e.add_argument("--graph-optimization", choices=["none", "basic", "extended", "all"],
                   default=defaults.graph_optimization, help="ONNX Runtime graph optimization level")
    e.add_argument("--max-running", type=int, default=defaults.max_running,
                   help="sequences generating at once per model; more wait in the queue")
    e.add_argument("--max-queued", type=int, default=defaults.max_queued,
                   help="requests waiting per model before new ones get RESOURCE_EXHAUSTED")
    e.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                   help="open sessions (KV retained between turns) per model")
    e.add_argument("--max-cached-tokens", type=int, default=defaults.max_cached_tokens,
                   help="KV-cache tokens held per model; idle sessions are evicted beyond it")
    e.add_argument("--session-idle-timeout", type=float, default=defaults.session_idle_timeout_s,
                   help="seconds before an idle session's KV cache is evicted (it is recomputed if used again)")
    e.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=defaults.warmup,
                   help="run a warm-up generation at load (health turns SERVING after it)")
    add_server_arguments(parser, default_listen=DEFAULT_LISTEN)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = server_settings_from_args(args, service_name="llmsuite-inference")
    configure_logging(settings.log_level, settings.log_format)
    engine_settings = EngineSettings(
        device=args.device, intra_op_threads=args.intra_op_threads, inter_op_threads=args.inter_op_threads,
        graph_optimization=args.graph_optimization, max_running=args.max_running, max_queued=args.max_queued,
        max_sessions=args.max_sessions, max_cached_tokens=args.max_cached_tokens,
        session_idle_timeout_s=args.session_idle_timeout, warmup=args.warmup)
    app = InferenceApp(model_specs(args.model), engine_settings)
    try:
        asyncio.run(serve(settings, app, tracer_provider=build_tracer_provider(settings.telemetry)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
