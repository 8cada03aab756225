"""`llmsuite bench`: a serving benchmark for the gateway (text) or an inference
service (token ids), in the spirit of `vllm bench serve`, TGI's benchmark and ghz.

Requests are greedy with EOS ignored, so each generates exactly the asked-for length;
prompts have an exact token length. Each concurrency level runs in turn; request
failures are counted by gRPC status code, never fatal. See docs/clients.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any

from llmsuite.client.async_client import AsyncLlmsuiteClient
from llmsuite.client.bench_embed import format_embed_table, run_embed_bench, write_texts
from llmsuite.client.bench_report import format_table, to_json, write_prompts, write_requests
from llmsuite.client.bench_runner import WORKLOADS, BenchConfig, BenchResult, ProgressBar, run
from llmsuite.client.bench_targets import CHAT_MODES, GatewayTarget, InferenceTarget, ModelFacts, Target
from llmsuite.client.bench_workload import LengthSpec
from llmsuite.client.connection import ConnectionSettings
from llmsuite.client.errors import LlmsuiteError

BENCH_TIMEOUT_S = 600.0
TARGETS = ("gateway", "inference")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _length(text: str) -> LengthSpec:
    try:
        return LengthSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=TARGETS, default="gateway",
                        help="gateway: text through GatewayService; inference: token ids straight to an "
                             "InferenceService (point --address at it)")
    parser.add_argument("--model", default="tiny", help="model to benchmark (default tiny)")
    parser.add_argument("--tokenizer-model", metavar="NAME",
                        help="model whose tokenizer (gateway) or vocabulary (inference) builds the prompts "
                             "(default: --model)")
    load = parser.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=_int_list, default=(1,), metavar="N[,N...]",
                      help="requests in flight; a list runs each level in turn (default 1)")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("-n", "--requests", type=_int_list, metavar="N[,N...]",
                        help="requests per level: one count for every level, or one per level "
                             "(default: 2 x concurrency, at least 4; chat: conversations)")
    amount.add_argument("-z", "--duration", type=float, metavar="SECONDS",
                        help="run each level this long instead (requests still running then finish and count)")
    load.add_argument("--warmup", type=int, default=1, metavar="N",
                      help="requests before the first level, not measured (default 1)")
    shape = parser.add_argument_group("request shape (greedy, EOS ignored: lengths are exact)")
    shape.add_argument("--prompt-tokens", type=_length, default=LengthSpec.parse("64"), metavar="SPEC",
                       help="prompt length: N, uniform:LO:HI or normal:MEAN:STDDEV (default 64; chat: each "
                            "user message)")
    shape.add_argument("--output-tokens", type=_length, default=LengthSpec.parse("128"), metavar="SPEC",
                       help="generated tokens per request, same forms (default 128)")
    shape.add_argument("--seed", type=int, default=0, help="seed for lengths and prompts (default 0)")
    shape.add_argument("--json-schema", metavar="FILE", type=argparse.FileType("r", encoding="utf-8"),
                       help="constrain every request to this JSON Schema (sampling.constraint.json_schema); "
                            "to keep lengths exact, pick one whose output cannot be complete within "
                            "--output-tokens")
    chat = parser.add_argument_group("multi-turn chat")
    chat.add_argument("--workload", choices=(*WORKLOADS, "embed"), default="generate",
                      help="generate: independent requests; chat: conversations of --turns turns; embed: Embed "
                           "calls of --texts-per-request texts each (gateway only; texts/s per level)")
    chat.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    chat.add_argument("--chat-mode", choices=CHAT_MODES, default="resend",
                      help="resend: each turn is a new call carrying the whole conversation, as OpenAI-style "
                           "clients do; session: one held-open stream per conversation (default resend)")
    emb = parser.add_argument_group("embeddings (--workload embed)")
    emb.add_argument("--texts-per-request", type=int, default=32, metavar="N",
                     help="texts per Embed request, 4-48 words each (default 32)")
    emb.add_argument("--save-texts", metavar="FILE", help="write each request's texts as one JSON line")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    out.add_argument("--save-requests", metavar="FILE", help="write one JSON line per request")
    out.add_argument("--save-prompts", metavar="FILE", help="write one JSON line per prompt (token ids, text)")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    requests = args.requests
    if args.duration is None:
        if requests is None:
            requests = tuple(max(4, 2 * c) for c in args.concurrency)
        elif len(requests) == 1:
            requests = requests * len(args.concurrency)
    chat = args.workload == "chat"
    return BenchConfig(
        target=args.target, model=args.model, tokenizer_model=args.tokenizer_model or args.model,
        concurrency=args.concurrency, requests=requests if args.duration is None else None,
        duration_s=args.duration, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
        seed=args.seed, warmup=args.warmup, workload=args.workload, turns=args.turns if chat else 1,
        chat_mode=args.chat_mode if chat else None, json_schema=_read_schema(args.json_schema))


def _read_schema(file: Any) -> str | None:
    if file is None:
        return None
    with file:
        text: str = file.read()
    return text


def run_command(settings: ConnectionSettings, args: argparse.Namespace) -> int:
    """The `llmsuite bench` command: 0 when every level ran (request errors are results)."""
    if args.workload == "embed":
        return _run_embed_command(settings, args)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"llmsuite bench: {exc}", file=sys.stderr)
        return 2
    # Every failure should show in the results, so no retries; and one deadline per call.
    settings = dataclasses.replace(settings, max_attempts=1,
                                   timeout_s=args.timeout if args.timeout is not None else BENCH_TIMEOUT_S)
    result = asyncio.run(_run(settings, config, ProgressBar(enabled=args.progress)))
    if args.save_requests:
        with open(args.save_requests, "w", encoding="utf-8") as f:
            write_requests(result, f)
    if args.save_prompts:
        with open(args.save_prompts, "w", encoding="utf-8") as f:
            write_prompts(result, f)
    print(json.dumps(to_json(result), indent=2) if args.json else format_table(result), flush=True)
    return 0


def _run_embed_command(settings: ConnectionSettings, args: argparse.Namespace) -> int:
    if args.target != "gateway" or args.duration is not None or args.texts_per_request < 1:
        print("llmsuite bench: --workload embed runs against the gateway with request counts (-n), and "
              "--texts-per-request >= 1", file=sys.stderr)
        return 2
    requests = args.requests or tuple(max(4, 2 * c) for c in args.concurrency)
    if len(requests) == 1:
        requests = requests * len(args.concurrency)
    if len(requests) != len(args.concurrency):
        print("llmsuite bench: -n: one count, or one per concurrency level", file=sys.stderr)
        return 2
    settings = dataclasses.replace(settings, max_attempts=1,
                                   timeout_s=args.timeout if args.timeout is not None else BENCH_TIMEOUT_S)

    async def run_it() -> tuple[dict[str, Any], list[list[str]]]:
        fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        async with AsyncLlmsuiteClient(**fields) as client:
            return await run_embed_bench(client, model=args.model, concurrency=args.concurrency, requests=requests,
                                         per_request=args.texts_per_request, seed=args.seed, warmup=args.warmup)

    result, texts = asyncio.run(run_it())
    if args.save_texts:
        write_texts(texts, args.save_texts)
    print(json.dumps(result, indent=2) if args.json else format_embed_table(result), flush=True)
    return 0


async def _run(settings: ConnectionSettings, config: BenchConfig, progress: ProgressBar) -> BenchResult:
    channel = settings.aio_channel()

    def call_options() -> dict[str, Any]:
        return settings.call_options()

    try:
        target: Target
        if config.target == "gateway":
            target = GatewayTarget(channel, call_options, config.model, config.tokenizer_model, config.chat_mode,
                                   config.json_schema)
        else:
            target = InferenceTarget(channel, call_options, config.model, config.chat_mode, config.json_schema)
        facts = await _model_facts(target, config)
        return await run(config, target, facts, progress)
    finally:
        await channel.close()


async def _model_facts(target: Target, config: BenchConfig) -> ModelFacts:
    """Facts about the model the prompts are built for. A benchmarked model that the
    server does not know is allowed when another one builds the prompts: its requests
    then fail, and the failures are counted like any others."""
    facts = await target.model_facts(config.tokenizer_model)
    if config.model == config.tokenizer_model:
        return facts
    try:
        benchmarked = await target.model_facts(config.model)
    except LlmsuiteError as exc:
        print(f"llmsuite bench: warning: {config.model!r}: {exc}; its requests will fail", file=sys.stderr)
        return dataclasses.replace(facts, details={"served": False})
    return dataclasses.replace(benchmarked, vocab_size=facts.vocab_size, excluded_ids=facts.excluded_ids)
