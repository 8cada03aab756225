"""`llmsuite`: the command line for the gateway, a serving benchmark (`bench`), and a health probe for every service.

Exit codes: 0 success; 1 a failed call (or, for `health`, anything but
SERVING); 2 bad usage or an invalid argument; 130 interrupted (Ctrl-C).
Errors are one line on stderr. Text goes to stdout; usage summaries and
chat bookkeeping go to stderr, so stdout pipes cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from llmsuite.client import bench
from llmsuite.client.errors import InvalidRequest, LlmsuiteError
from llmsuite.client.results import Completion, Constraint
from llmsuite.client.sync_client import LlmsuiteClient

DEFAULT_ADDRESS = "localhost:50050"
HEALTH_TIMEOUT_S = 2.0  # below the 3 s probe timeout docker-compose gives the healthcheck

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(os.environ)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        client = _client(args)
    except (ValueError, OSError) as exc:
        print(f"llmsuite: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            return cast(int, args.command(client, args))
    except LlmsuiteError as exc:
        print("llmsuite: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        if args.command is _health:  # docker reserves exit code 2 for healthchecks
            return EXIT_FAILED
        return EXIT_USAGE if isinstance(exc, InvalidRequest) else EXIT_FAILED
    except KeyboardInterrupt:  # streams and sessions were cancelled on the way out
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `llmsuite generate ... | head -c 10`
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmsuite", description="Talk to the llmsuite gateway; probe any llmsuite service's health.",
        epilog="Environment: LLMSUITE_ADDRESS, LLMSUITE_API_KEY.",
    )
    _connection_options(parser, environ, suppress=False)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[LlmsuiteClient, argparse.Namespace], int], help: str) -> Any:
        sub = commands.add_parser(name, help=help, description=help)
        _connection_options(sub, environ, suppress=True)
        sub.set_defaults(command=run)
        return sub

    gen = command("generate", _generate, "generate a completion for PROMPT")
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    gen.add_argument("--model", default="tiny")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    _sampling_options(gen)
    gen.add_argument("--request-id", help="sent as x-request-id (default: the server makes one)")
    gen.add_argument("--json", action="store_true",
                     help="print the completion as JSON (with --stream: one JSON line per chunk, then the completion)")

    chat = command("chat", _chat, "multi-turn chat: one stdin line per user turn; /exit or EOF ends")
    chat.add_argument("--model", default="tiny")
    chat.add_argument("--system", help="system prompt")
    _sampling_options(chat)

    tok = command("tokenize", _tokenize, "token ids of each TEXT")
    tok.add_argument("texts", metavar="TEXT", nargs="+")
    tok.add_argument("--model", default="tiny")
    tok.add_argument("--offsets", action="store_true", help="also print each token's character span")
    tok.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false", default=None,
                     help="do not add the tokenizer's special tokens (e.g. BOS)")
    tok.add_argument("--json", action="store_true")

    emb = command("embed", _embed, "one embedding vector per TEXT (one line each: its components, space-separated)")
    emb.add_argument("texts", metavar="TEXT", nargs="+", help="texts to embed; '-' reads one text from stdin")
    emb.add_argument("--model", default="tiny-embed")
    emb.add_argument("--dimensions", type=int, help="keep the first N components and re-normalise")
    emb.add_argument("--truncate", action="store_true",
                     help="cut texts over the model's maximum length instead of failing")
    emb.add_argument("--json", action="store_true", help="print one JSON object (vectors, usage) instead")

    models = command("models", _models, "list the models the gateway serves")
    models.add_argument("--json", action="store_true")

    bench_cmd = command("bench", _bench, "serving benchmark: load the gateway (text) or an inference service "
                        "(token ids) at one or more concurrency levels; table or JSON of throughput and latency")
    bench.add_arguments(bench_cmd)

    health = command("health", _health,
                     "grpc.health.v1 check of any llmsuite service; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    return parser


def _connection_options(parser: argparse.ArgumentParser, environ: Mapping[str, str], *, suppress: bool) -> None:
    # Given again after the command (`llmsuite health --address ...`); SUPPRESS
    # there keeps the sub-parser from resetting values given before it.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection")
    g.add_argument("--address", default=default(environ.get("LLMSUITE_ADDRESS") or DEFAULT_ADDRESS),
                   help=f"HOST:PORT of the service (env LLMSUITE_ADDRESS; default {DEFAULT_ADDRESS})")
    g.add_argument("--api-key", default=default(environ.get("LLMSUITE_API_KEY") or None),
                   help="sent as 'authorization: Bearer KEY' (env LLMSUITE_API_KEY)")
    g.add_argument("--timeout", type=float, default=default(None), metavar="SECONDS",
                   help=f"deadline per call (default 60; {HEALTH_TIMEOUT_S:g} for health; none for chat; "
                        f"{bench.BENCH_TIMEOUT_S:g} for bench)")
    tls = g.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="tls", action="store_true", default=default(False),
                     help="use TLS (system roots unless --ca-file)")
    tls.add_argument("--insecure", dest="tls", action="store_false", default=default(False),
                     help="plaintext (the default)")
    g.add_argument("--ca-file", default=default(None), help="PEM roots to verify the server (implies --tls)")
    g.add_argument("--cert-file", default=default(None), help="PEM client certificate for mTLS (with --key-file)")
    g.add_argument("--key-file", default=default(None), help="PEM client key for mTLS")
    g.add_argument("--wait-for-ready", action="store_true", default=default(False),
                   help="wait (within --timeout) for the server to come up instead of failing at once")


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (unset: the server's defaults)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 is greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", dest="stop_token_ids", type=int, action="append", metavar="ID",
                   help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None)
    shape = parser.add_argument_group("structured output (constrained decoding; at most one)")
    one = shape.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="FILE", type=argparse.FileType("r", encoding="utf-8"),
                     help="the output is one JSON value valid against this JSON Schema")
    one.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    one.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    one.add_argument("--grammar", metavar="FILE", type=argparse.FileType("r", encoding="utf-8"),
                     help="the output follows this Lark or GBNF grammar")
    one.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
             "stop_token_ids", "ignore_eos")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    constraint = _constraint(args)
    if constraint is not None:
        options["constraint"] = constraint
    return options


def _constraint(args: argparse.Namespace) -> Constraint | None:
    if args.json_schema is not None:
        with args.json_schema as f:
            return Constraint.json_schema(f.read())
    if args.grammar is not None:
        with args.grammar as f:
            return Constraint.grammar(f.read())
    if args.json_object:
        return Constraint.json_object()
    if args.regex is not None:
        return Constraint.regex(args.regex)
    if args.choice:
        return Constraint.choice(args.choice)
    return None


def _client(args: argparse.Namespace) -> LlmsuiteClient:
    return LlmsuiteClient(
        args.address, api_key=args.api_key, tls=args.tls, ca_file=args.ca_file, cert_file=args.cert_file,
        key_file=args.key_file, wait_for_ready=args.wait_for_ready,
        timeout_s=args.timeout if args.timeout is not None else 60.0,
    )


def _summary(c: Completion) -> str:
    u = c.usage
    return (f"[{c.finish_reason}] prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens} "
            f"cached_tokens={u.cached_tokens} time={c.timings.total_s:.3f}s request_id={c.request_id}")


def _generate(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    common = dict(model=args.model, request_id=args.request_id, return_token_ids=args.json, **_sampling(args))
    if not args.stream:
        completion = client.generate(prompt, **common)
        print(json.dumps(completion.to_dict()) if args.json else completion.text, flush=True)
        print(_summary(completion), file=sys.stderr)
        return 0
    with client.generate_stream(prompt, **common) as stream:
        for chunk in stream:
            if args.json:
                print(json.dumps({"text": chunk.text, "token_ids": list(chunk.token_ids)}), flush=True)
            else:
                print(chunk.text, end="", flush=True)
    assert stream.completion is not None
    print(json.dumps({"completion": stream.completion.to_dict()}) if args.json else "", flush=True)
    print(_summary(stream.completion), file=sys.stderr)
    return 0


def _chat(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    with client.chat(args.model, system=args.system, timeout_s=args.timeout, **_sampling(args)) as session:
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            reply = session.send(text)
            for chunk in reply:
                print(chunk.text, end="", flush=True)
            print(flush=True)
            assert reply.completion is not None
            print(f"turn {reply.turn}: {_summary(reply.completion)}", file=sys.stderr, flush=True)
    return 0


def _tokenize(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    encodings = client.tokenize(args.texts, model=args.model, offsets=args.offsets,
                                add_special_tokens=args.add_special_tokens)
    for e in encodings:
        if args.json:
            entry: dict[str, Any] = {"token_ids": list(e.token_ids), "truncated": e.truncated}
            if args.offsets:
                entry["offsets"] = [list(o) for o in e.offsets]
            print(json.dumps(entry))
        elif args.offsets:
            print(" ".join(f"{t}@{s}:{end}" for t, (s, end) in zip(e.token_ids, e.offsets, strict=True)))
        else:
            print(" ".join(map(str, e.token_ids)))
    return 0


def _embed(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    texts = [sys.stdin.read() if t == "-" else t for t in args.texts]
    result = client.embed(texts, model=args.model, dimensions=args.dimensions, truncate=args.truncate)
    if args.json:
        print(json.dumps({"model": result.model, "embeddings": [list(v) for v in result.vectors],
                          "usage": {"prompt_tokens": result.usage.prompt_tokens}, "request_id": result.request_id}))
    else:
        for vector in result.vectors:
            print(" ".join(f"{x:.8g}" for x in vector))
    print(f"prompt_tokens={result.usage.prompt_tokens} request_id={result.request_id}", file=sys.stderr)
    return 0


def _models(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    models = client.list_models()
    if args.json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "architecture": m.architecture,
                           "context_length": m.context_length, "has_chat_template": m.has_chat_template,
                           "execution_provider": m.execution_provider, "layout": m.layout, "precision": m.precision,
                           "quantization": m.quantization, "kv_cache_slots": m.kv_cache_slots,
                           "kv_cache_slot_tokens": m.kv_cache_slot_tokens} for m in models]))
        return 0
    # SLOTS is "COUNTxTOKENS" of the KV slot buffer, "-" for a model served without one (padded KV path).
    rows = [("NAME", "KIND", "ARCHITECTURE", "CONTEXT", "CHAT", "PROVIDER", "LAYOUT", "PRECISION", "SLOTS",
             "QUANTIZATION")]
    rows += [(m.name, m.kind, m.architecture, str(m.context_length), "yes" if m.has_chat_template else "no",
              m.execution_provider, m.layout, m.precision,
              f"{m.kv_cache_slots}x{m.kv_cache_slot_tokens}" if m.kv_cache_slots else "-", m.quantization)
             for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _bench(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    return bench.run_command(client.settings, args)


def _health(client: LlmsuiteClient, args: argparse.Namespace) -> int:
    status = client.health(args.service, wait_for_ready=args.wait_for_ready,
                           timeout_s=args.timeout if args.timeout is not None else HEALTH_TIMEOUT_S)
    print(status)
    return 0 if status == "SERVING" else EXIT_FAILED


def _silence_stdout() -> None:
    # Python flushes stdout at exit; with the reader gone that would raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
