"""`llmsuite-inference`: serve ONNX decoder models (Optimum or ONNX Runtime GenAI layout) over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence

from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.engine.encoder import PoolingOverride
from llmsuite.inference.engine.fault_injection import BreakOnToken
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

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}


def byte_size(text: str) -> int:
    """'auto' or '0' -> 0 (size it from the device); '512MiB', '2GB', '1073741824' -> bytes."""
    if text.strip().lower() == "auto":
        return 0
    match = _SIZE.match(text)
    if match is None or (match.group(2) and match.group(2).upper() not in _UNITS):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: auto, 512MiB, 4GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def pooling_overrides(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Repeated `--pooling NAME=MODE[:normalize|:no-normalize]`, checked at start."""
    overrides: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--pooling {value!r}: expected NAME=MODE[:normalize|:no-normalize]")
        try:
            PoolingOverride.parse(spec)
        except ValueError as exc:
            raise SystemExit(f"--pooling {value!r}: {exc}") from None
        overrides[name.strip()] = spec.strip()
    return tuple(overrides.items())


def memory_limit(text: str) -> int | None:
    """'auto' -> None (derived from the process's limits); 'off' or '0' -> 0; a size -> bytes."""
    if text.strip().lower() == "auto":
        return None
    if text.strip().lower() == "off":
        return 0
    return byte_size(text)


def build_parser() -> EnvArgumentParser:
    defaults = EngineSettings()
    parser = EnvArgumentParser(prog="llmsuite-inference", description=__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a model to serve as NAME: an Optimum export or ONNX Runtime GenAI directory, or one "
                             "ONNX file (REPO/onnx/model_q4.onnx, config and tokenizer beside it or one level up) "
                             "(repeatable; the env var takes a comma-separated list)")
    e = parser.add_argument_group("engine")
    e.add_argument("--device", default=defaults.device,
                   help="auto (CUDA if really active, else CPU with a warning), cpu, cuda or cuda:N "
                        "(cuda fails at start unless the CUDA execution provider is active)")
    e.add_argument("--intra-op-threads", type=int, default=defaults.intra_op_threads,
                   help="ONNX Runtime threads per operator (0 = the CPUs this process may use: its "
                        "affinity mask and cgroup quota)")
    e.add_argument("--intra-op-spinning", action=argparse.BooleanOptionalAction, default=defaults.intra_op_spinning,
                   help="let ONNX Runtime threads busy-wait briefly between operators instead of sleeping at once "
                        "(lower per-token latency; --no-intra-op-spinning gives the CPU back to neighbours sooner)")
    e.add_argument("--inter-op-threads", type=int, default=defaults.inter_op_threads,
                   help="ONNX Runtime threads across operators (0 = its default)")
    e.add_argument("--graph-optimization", choices=["none", "basic", "extended", "all"],
                   default=defaults.graph_optimization, help="ONNX Runtime graph optimization level")
    e.add_argument("--kv-cache-bytes", type=byte_size, default="auto", metavar="SIZE",
                   help="KV-cache budget per model (e.g. 4GiB), counted as the bytes of the KV tensors really "
                        "held: running requests reserve the KV they can grow to (and the copy a step writes of it), "
                        "the prefix cache keeps the rest "
                        "until room is needed; requests wait for room in the queue. auto = half of what the "
                        "process's own limit (cgroup memory.max, RLIMIT_AS or --max-memory) leaves after the "
                        "weights and a 512 MiB working reserve, or a quarter of what the host's memory leaves "
                        "when there is no such limit, or half the GPU's free memory; split between the models "
                        "and logged at start")
    e.add_argument("--max-memory", type=memory_limit, default="auto", metavar="SIZE",
                   help="resident memory the whole process keeps to (e.g. 8GiB): new requests are refused with "
                        "RESOURCE_EXHAUSTED (reason MEMORY_PRESSURE, with RetryInfo) while the resident size plus "
                        "what running requests may still grow by would pass it. auto = 90%% of the cgroup memory "
                        "limit or RLIMIT_AS, off when there is neither; off (or 0) disables it")
    e.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=defaults.prefix_cache,
                   help="keep every finished request's KV and reuse it for later requests that start with the "
                        "same token ids (evicted least recently used within --kv-cache-bytes)")
    e.add_argument("--max-running", type=int, default=defaults.max_running,
                   help="most requests decoding together in one batched forward per model (bounds latency; "
                        "memory is bounded by --kv-cache-bytes)")
    e.add_argument("--max-queued", type=int, default=defaults.max_queued,
                   help="requests waiting per model for room in the batch before new ones get RESOURCE_EXHAUSTED")
    e.add_argument("--max-model-len", type=int, default=defaults.max_model_len, metavar="TOKENS",
                   help="most tokens (prompt + output) a generation model serves, below its own context to "
                        "reserve less KV per request: a slot of the fused layout's KV buffer holds this many "
                        "(0 = the model's context)")
    e.add_argument("--slot-kv", action=argparse.BooleanOptionalAction, default=defaults.slot_kv,
                   help="serve fused (GroupQueryAttention) exports whose genai_config.json shares past and present "
                        "from one preallocated KV buffer, a slot of --max-model-len tokens per running request, "
                        "so requests of any lengths decode in one forward; --no-slot-kv batches them through the "
                        "padded path (equal lengths only)")
    e.add_argument("--prefill-chunk-tokens", type=int, default=defaults.prefill_chunk_tokens,
                   help="prompt tokens fed per scheduler step, so running streams keep getting tokens while a "
                        "long prompt is processed")
    e.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                   help="open sessions (KV retained between turns) per model")
    e.add_argument("--session-idle-timeout", type=float, default=defaults.session_idle_timeout_s,
                   help="seconds before cached KV nobody used is dropped from the prefix cache (a later request "
                        "or session turn then recomputes it)")
    e.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=defaults.warmup,
                   help="at load, run warm-up forwards through the path each model is served by (a slot "
                        "model's buffer: a prefill into a slot and a decode step, the slot freed after) and time "
                        "prefills for deadline refusals; health turns SERVING after it. --no-warmup runs none")
    e.add_argument("--max-step-failures", type=int, default=defaults.max_step_failures,
                   help="a failed step (a forward raising, an allocation failing) ends only the requests it was "
                        "computing; the engine then checks its model still runs with up to this many one-token "
                        "forwards (or tolerates this many scheduler steps failing in a row) before it gives up: "
                        "every request fails with UNAVAILABLE ENGINE_FAILED, health turns NOT_SERVING and the "
                        "process exits with status 70 for its orchestrator to restart it")
    # TEST ONLY, hidden from --help (docs/reliability.md): breaks the decoder for good once a
    # forward reads this token id, so tests can watch a real process give up and exit.
    e.add_argument("--test-only-break-on-token-id", type=int, default=None, help=argparse.SUPPRESS)
    m = parser.add_argument_group("embedding models (Optimum feature-extraction exports, served by Embed)")
    m.add_argument("--pooling", action="append", default=[], metavar="NAME=MODE[:normalize|:no-normalize]",
                   help="pool model NAME's token states with MODE (cls, mean or last) instead of what its "
                        "modules.json / 1_Pooling say; normalisation stays as the files say unless given "
                        "(repeatable; the env var takes a comma-separated list)")
    m.add_argument("--embed-batch-tokens", type=int, default=defaults.embed_batch_tokens,
                   help="most padded tokens (rows x longest row) in one embedding forward: inputs of concurrent "
                        "requests share forwards up to this size")
    m.add_argument("--embed-max-queued-inputs", type=int, default=defaults.embed_max_queued_inputs,
                   help="inputs waiting per embedding model before new requests get RESOURCE_EXHAUSTED")
    add_server_arguments(parser, default_listen=DEFAULT_LISTEN)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = server_settings_from_args(args, service_name="llmsuite-inference")
    configure_logging(settings.log_level, settings.log_format)
    engine_settings = EngineSettings(
        device=args.device, intra_op_threads=args.intra_op_threads, inter_op_threads=args.inter_op_threads,
        intra_op_spinning=args.intra_op_spinning, graph_optimization=args.graph_optimization,
        max_running=args.max_running, max_queued=args.max_queued, max_sessions=args.max_sessions,
        kv_cache_bytes=args.kv_cache_bytes, max_memory_bytes=args.max_memory, prefix_cache=args.prefix_cache,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        session_idle_timeout_s=args.session_idle_timeout, warmup=args.warmup,
        embed_batch_tokens=args.embed_batch_tokens, embed_max_queued_inputs=args.embed_max_queued_inputs,
        pooling=pooling_overrides(args.pooling), max_step_failures=args.max_step_failures,
        max_model_len=args.max_model_len, slot_kv=args.slot_kv)
    fault = None if args.test_only_break_on_token_id is None else BreakOnToken(args.test_only_break_on_token_id)
    app = InferenceApp(model_specs(args.model), engine_settings, prepare_decoder=fault)
    try:
        asyncio.run(serve(settings, app, tracer_provider=build_tracer_provider(settings.telemetry)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
