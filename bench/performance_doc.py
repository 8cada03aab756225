"""The ratios from one `make bench` run, and docs/performance.md written from them: issue 7's
per layout, and issue 16's and 17's across layouts (fused and int4 builds against the Optimum
one, onnxruntime-genai's Generator, memory against the budget, the HTTP hop).

The whole document is generated, so what it says about the method always matches the
code that produced the numbers; edit this file, not docs/performance.md.
"""

from __future__ import annotations

import shlex
from typing import Any


def _level(results: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((lv for lv in results["gateway"]["levels"] if lv["concurrency"] == concurrency), None)


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(results: dict[str, Any], *, batch: int) -> list[dict[str, Any]]:
    """The targets of issue 7 §4 as measured in one layout (`results` holds that layout's gateway
    levels and references, and on the first layout the constrained and embeddings levels);
    `met` is None where a side is missing."""
    refs = results["references"]

    def tps(c: int) -> float | None:
        level = _level(results, c)
        return level["output_tokens_per_s"] if level else None

    def p50(c: int, metric: str) -> float | None:
        level = _level(results, c)
        return level[metric]["p50"] if level else None

    top = max(lv["concurrency"] for lv in results["gateway"]["levels"])
    top_level = _level(results, top) or {"errors": {}}
    unexpected = sum(n for code, n in top_level["errors"].items() if code != "RESOURCE_EXHAUSTED")
    rows = [
        (f"gateway c={batch} output tok/s / in-process batch of {batch}",
         _div(tps(batch), refs["batch"]["output_tokens_per_s"]), ">=", 0.8),
        (f"gateway c={batch} / gateway c=1 output tok/s", _div(tps(batch), tps(1)), ">=", 4.0),
        ("gateway c=1 / in-process single sequence output tok/s",
         _div(tps(1), refs["single"]["output_tokens_per_s"]), ">=", 0.95),
        (f"TTFT p50 c={batch} / c=1", _div(p50(batch, "ttft_ms"), p50(1, "ttft_ms")), "<=", 5.0),
        (f"ITL p50 c={batch} / c=1", _div(p50(batch, "itl_ms"), p50(1, "itl_ms")), "<=", 4.0),
        (f"c={top} errors other than RESOURCE_EXHAUSTED", float(unexpected), "<=", 0.0),
    ]
    constrained = results.get("constrained")
    if constrained:
        rows.append((f"c={constrained['concurrency']} under a JSON Schema / unconstrained output tok/s (issue 17)",
                     _constraint_ratio(constrained), ">=", 0.85))
    embeddings = results.get("embeddings")
    if embeddings:
        level = embeddings["level"]
        rows.append((f"gateway embeddings c={level['concurrency']} texts/s / in-process loop",
                     _div(level["texts_per_s"], embeddings["reference"]["texts_per_s"]), ">=", 0.8))
    return _verdicts(rows)


def _verdicts(rows: list[tuple[str, float | None, str, float]]) -> list[dict[str, Any]]:
    out = []
    for name, value, op, target in rows:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"name": name, "value": None if value is None else round(value, 3), "target": f"{op} {target:g}",
                    "met": met})
    return out


WORKING_MARGIN_MIB = 512  # issue 15: peak RSS <= weights + --kv-cache-bytes + 512 MiB


def _layout_tps(results: dict[str, Any], layout: str, concurrency: int) -> float | None:
    found = results["layouts"].get(layout)
    level = _level(found, concurrency) if found else None
    return level["output_tokens_per_s"] if level else None


def _reference_tps(results: dict[str, Any], layout: str, *keys: str) -> float | None:
    """The fastest of these in-process loops of the layout (None where none ran)."""
    found = results["layouts"].get(layout)
    values = [found["references"][k]["output_tokens_per_s"] for k in keys if found and k in found["references"]]
    return max(values) if values else None


def memory_ratio(memory: dict[str, Any]) -> float | None:
    """Peak RSS against what issue 15 allows it: weights + the KV budget + 512 MiB."""
    budget = (memory.get("reported_kv_budget") or {}).get("kv_cache_budget_bytes")
    if memory.get("vm_hwm_mib") is None or budget is None:
        return None
    return float(memory["vm_hwm_mib"]) / (memory["model_weights_mib"] + budget / 2**20 + WORKING_MARGIN_MIB)


def http_ratio(hop: dict[str, Any] | None) -> float | None:
    return _div(hop["http_output_tokens_per_s"], hop["grpc_output_tokens_per_s"]) if hop else None


def _paired(results: dict[str, Any], side: str) -> float | None:
    """The median over paired rounds of gateway / `side` (see bench/run.py's run_paired_rounds)."""
    paired = (results["layouts"].get("gqa") or {}).get("paired")
    found = paired["ratios"].get(side) if paired else None
    return found["median"] if found else None


def cross_layout_ratios(results: dict[str, Any], *, batch: int) -> list[dict[str, Any]]:
    """Issue 16 §5's and issue 17's HTTP-hop targets as measured; `met` is None where a side was not run.

    The fused layout's c=--batch ratios are the paired rounds' medians where the run has them
    (each ratio taken within a round, against onnxruntime-genai's Engine as the issue asks);
    otherwise they divide figures measured minutes apart (and onnxruntime-genai's side is its
    Generator, the only one run outside the rounds)."""
    ortgenai = (results["layouts"].get("gqa") or {}).get("ortgenai")
    hop = results.get("http_hop")
    paired = (results["layouts"].get("gqa") or {}).get("paired")
    fused_c = _layout_tps(results, "gqa", batch)
    fused_rows: list[tuple[str, float | None, str, float]]
    if paired:
        how = f"median of {len(paired['rounds'])} paired rounds"
        fused_rows = [
            (f"fused fp32: gateway c={batch} / Optimum in-process batch of {batch}, {how}",
             _paired(results, "optimum_batch"), ">=", 1.3),
            (f"fused fp32: gateway c={batch} / fused in-process batch of {batch} (KV shared in place), {how}",
             _paired(results, "fused_batch"), ">=", 0.85),
            (f"fused fp32: gateway c={batch} / onnxruntime-genai Engine, same requests {batch} at a time, {how}",
             _paired(results, "ortgenai_engine"), ">=", 2.0),
        ]
    else:
        fused_rows = [
            (f"fused fp32: gateway c={batch} / Optimum in-process batch of {batch}",
             _div(fused_c, _reference_tps(results, "optimum", "batch")), ">=", 1.3),
            (f"fused fp32: gateway c={batch} / fused in-process batch of {batch} (the faster loop)",
             _div(fused_c, _reference_tps(results, "gqa", "batch", "batch_concat")), ">=", 0.85),
            (f"fused fp32: gateway c={batch} / onnxruntime-genai static batch of {batch}",
             _div(fused_c, ortgenai["output_tokens_per_s"] if ortgenai else None), ">=", 2.0),
        ]
    rows: list[tuple[str, float | None, str, float]] = [
        *fused_rows,
        ("int4: gateway c=1 / Optimum fp32 in-process single sequence",
         _div(_layout_tps(results, "int4", 1), _reference_tps(results, "optimum", "single")), ">=", 2.5),
        ("int4: gateway c=1 / int4 in-process single sequence",
         _div(_layout_tps(results, "int4", 1), _reference_tps(results, "int4", "single")), ">=", 0.9),
        *((f"{name}: peak RSS / (weights + KV budget + {WORKING_MARGIN_MIB} MiB)", memory_ratio(layout["memory"]),
           "<=", 1.0) for name, layout in results["layouts"].items()),
        (f"HTTP c={hop['concurrency'] if hop else 16} / gRPC output tok/s, same prompts (issue 17)",
         http_ratio(hop), ">=", 0.9),
    ]
    return _verdicts(rows)


def paired_lines(paired: dict[str, Any] | None) -> list[str]:
    """The paired rounds as a table: each side's tokens/s per round and the gateway's ratio to it."""
    if not paired:
        return []
    rounds = paired["rounds"]
    rows = [["gateway (llmsuite, fused fp32)", *(_fmt(r["gateway"]) for r in rounds), "", ""]]
    for side, label in paired["sides"].items():
        ratio = paired["ratios"].get(side)
        rows.append([label, *(_fmt(r.get(side)) for r in rounds),
                     _fmt(ratio["median"], 3) if ratio else "-",
                     f"{_fmt(ratio['min'], 3)} to {_fmt(ratio['max'], 3)}" if ratio else "-"])
    return _table(["output tokens/s", *(f"round {i + 1}" for i in range(len(rounds))), "gateway / this, median",
                   "range"], rows)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _make_command(arguments: list[str]) -> str:
    if not arguments:
        return "`make bench`"
    return f"`make bench BENCH_ARGS={shlex.quote(shlex.join(arguments))}`"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "n/a"}[met]


def _memory_line(memory: dict[str, Any]) -> str:
    budget = memory["reported_kv_budget"]
    budget_text = ", ".join(f"{k} = {v:,}" for k, v in budget.items()) if budget else \
        "no KV budget seen (no GetModelInfo sample was taken during the run)"
    return (f"inference process peak RSS (VmHWM) {_fmt(memory['vm_hwm_mib'])} MiB; model weights "
            f"{_fmt(memory['model_weights_mib'])} MiB; peak KV cache seen in GetModelInfo "
            f"{_fmt(memory['peak_kv_cache_mib'])} MiB (peak running {memory['peak_running']}, queued "
            f"{memory['peak_queued']}); {budget_text}")


def _ratio_lines(ratios: list[dict[str, Any]]) -> list[str]:
    return [f"  {r['name']:<72} {_fmt(r['value'], 3):>9}  target {r['target']:<7} {_verdict(r['met'])}"
            for r in ratios]


def summary_text(results: dict[str, Any]) -> str:
    lines = ["", "issue 16 and 17 targets (bench preset, across layouts):", *_ratio_lines(results["targets"])]
    for name, layout in results["layouts"].items():
        lines += ["", f"[{name}] {layout['title']}: issue 7 targets", *_ratio_lines(layout["ratios"])]
        refs = layout["references"]
        lines.append("  in-process " + ", ".join(f"{r['label']} {r['output_tokens_per_s']:.1f} tok/s"
                                                 for r in refs.values()))
        lines.append("  greedy tokens identical to the references: " + ", ".join(
            f"{k} {v['identical']}/{v['compared']}" for k, v in layout["token_agreement"].items()))
        lines.append("  " + _memory_line(layout["memory"]))
        if layout.get("ortgenai"):
            og = layout["ortgenai"]
            lines.append(f"  {og['label']} (onnxruntime-genai {og['onnxruntime_genai']}) "
                         f"{og['output_tokens_per_s']:.1f} tok/s")
        if layout.get("paired"):
            lines.append("  paired rounds (issue 16): " + "; ".join(
                f"{side} {r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
                for side, r in layout["paired"]["ratios"].items() if r))
    hop = results.get("http_hop")
    if hop:
        lines.append(f"\nHTTP hop c={hop['concurrency']}: gRPC {_fmt(hop['grpc_output_tokens_per_s'])} tok/s, HTTP "
                     f"{_fmt(hop['http_output_tokens_per_s'])} tok/s, errors {hop['errors']}")
    chat = results.get("chat")
    if chat and chat.get("last_turn_ttft_p50_ms") is not None:
        lines.append(f"  chat: last turn TTFT p50 / uncached TTFT p50 of a {chat['last_turn_prompt_tokens']}-token "
                     f"prompt = {_fmt(_chat_ratio(chat), 3)} (issue 11 target <= 0.2), cached prompt tokens "
                     f"{chat['cache_hit_rate']:.1%}")
    embeddings = results.get("embeddings")
    if embeddings:
        lines.append(f"  embeddings: gateway {embeddings['level']['texts_per_s']} texts/s at c="
                     f"{embeddings['level']['concurrency']}, in-process {embeddings['reference']['texts_per_s']} "
                     "texts/s")
    lines.append(f"  the whole run took {_fmt(results.get('duration_s'), 0)} s")
    if results["note"]:
        lines.append(f"  note: {results['note']}")
    return "\n".join(lines)


def _constraint_ratio(constrained: dict[str, Any]) -> float | None:
    return _div(constrained["constrained_output_tokens_per_s"], constrained["plain_output_tokens_per_s"])


def _constraint_section(constrained: dict[str, Any] | None) -> list[str]:
    heading = ["### Constrained decoding (issue 17)", ""]
    if not constrained:
        return [*heading, "Not part of this run (`--constraint-concurrency 0`).", ""]
    c = constrained["concurrency"]
    return [
        *heading,
        f"{constrained['rounds']} rounds of `{constrained['commands']['plain']}` then "
        f"`{constrained['commands']['constrained']}` on the same cluster: every request of the second under "
        f"the JSON Schema in `{constrained['schema']}` (records of five typed fields, at least 100 of them, so "
        "no output is complete within the output length and both sides generate the same number of tokens; "
        "greedy, so the constrained rows leave the batch's shared argmax for the per-row sampler).",
        "",
        *_table(["", "output tokens/s", "ITL p50 per round (ms)", "errors", "wrong output length"],
                [[f"c={c} {side}", _fmt(constrained[f"{side}_output_tokens_per_s"]),
                  ", ".join(_fmt(v) for v in constrained["itl_p50_ms"][side]), constrained["errors"][side],
                  constrained["length_mismatches"][side]] for side in ("plain", "constrained")]),
        "",
        f"Ratio {_fmt(_constraint_ratio(constrained), 3)} (target >= 0.85).",
        "",
    ]


def _chat_ratio(chat: dict[str, Any]) -> float | None:
    return _div(chat.get("last_turn_ttft_p50_ms"), chat.get("uncached_ttft_p50_ms"))


def _chat_section(chat: dict[str, Any] | None) -> list[str]:
    heading = ["### Multi-turn chat (issue 11)", ""]
    if not chat:
        return [
            *heading,
            "Not part of this run (`make bench BENCH_ARGS=--chat` adds it): conversations re-sent whole each "
            "turn through the gateway's Chat, as OpenAI-style clients do (5 turns of 200-token user messages "
            "and 50-token replies: 1,000 tokens of history before the last turn), and the time to first token "
            "of the last turn against an unrelated prompt of the same length, which no cache can serve. "
            "Issue 11's target: <= 0.2x.", ""]
    if chat.get("last_turn_ttft_p50_ms") is None:
        return [*heading, f"`{chat['command']}` failed: {chat.get('error', 'no result')}.", ""]
    ratio = _chat_ratio(chat)
    return [
        *heading,
        f"`{chat['command']}`, then `{chat['uncached_command']}` as the uncached baseline.",
        "",
        *_table(["turn", "succeeded", "prompt tokens computed", "cached", "cached share", "TTFT p50 (ms)"],
                [[t["turn"] + 1, t["succeeded"], t["prompt_tokens"], t["cached_tokens"],
                  f"{t['cache_hit_rate']:.1%}", _fmt(t["ttft_ms"]["p50"])] for t in chat["turns"]]),
        "",
        f"Last turn ({chat['last_turn_prompt_tokens']} prompt tokens): TTFT p50 "
        f"{_fmt(chat['last_turn_ttft_p50_ms'])} ms against {_fmt(chat['uncached_ttft_p50_ms'])} ms uncached, "
        f"ratio {_fmt(ratio, 3)} (target <= 0.2: {_verdict(None if ratio is None else ratio <= 0.2)}).",
        "",
    ]


_GATEWAY_ROWS = (
    ("requests", lambda lv: lv["requests"]),
    ("succeeded", lambda lv: lv["succeeded"]),
    ("errors", lambda lv: ", ".join(f"{k} {v}" for k, v in lv["errors"].items()) or "0"),
    ("wrong output length", lambda lv: lv["length_mismatches"]),
    ("duration (s)", lambda lv: _fmt(lv["duration_s"], 2)),
    ("output tokens/s", lambda lv: _fmt(lv["output_tokens_per_s"])),
    ("requests/s", lambda lv: _fmt(lv["requests_per_s"], 3)),
    *((f"{name} {p} (ms)", lambda lv, m=metric, q=p: _fmt(lv[m][q]))
      for name, metric in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
      for p in ("p50", "p95", "p99")),
)


def _embeddings_section(embeddings: dict[str, Any] | None) -> list[str]:
    if not embeddings:
        return []
    level, ref = embeddings["level"], embeddings["reference"]
    latency = level["latency_ms"]
    return [
        "### Embeddings (issue 18)",
        "",
        f"The encoder bench preset (`llmsuite-build-model --kind encoder --preset bench`: BERT-style, 6 layers, "
        f"384 dimensions, mean pooling, {_fmt(embeddings['model_weights_mib'])} MiB) served beside the decoder. "
        f"`{embeddings['command']}`: {level['requests']} Embed requests of {embeddings['texts_per_request']} "
        "texts (4-48 words each) through the gateway; the reference embeds the same texts straight on "
        "onnxruntime with the same thread count, tokenizing each request's texts in-process and running them as "
        "one right-padded forward (bench/embed_reference.py).",
        "",
        *_table(["", "texts", "seconds", "texts/s", "tokens/s", "latency p50 / p99 (ms)", "errors"],
                [[f"gateway c={level['concurrency']}", level["texts"], _fmt(level["duration_s"], 2),
                  _fmt(level["texts_per_s"]), _fmt(level["tokens_per_s"]),
                  f"{_fmt(latency.get('p50'))} / {_fmt(latency.get('p99'))}",
                  ", ".join(f"{k}={v}" for k, v in level["errors"].items()) or "none"],
                 [ref["label"], ref["texts"], _fmt(ref["seconds"], 2), _fmt(ref["texts_per_s"]),
                  _fmt(ref["tokens"] / ref["seconds"]), "", ""]]),
        "",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _layout_section(layout: dict[str, Any]) -> list[str]:
    levels = layout["gateway"]["levels"]
    refs = layout["references"]
    lines = [
        f"### {layout['title']} (`{layout['model_dir']}`)",
        "",
        f"Built by `{layout['build']}`; served and measured by `{layout['llmsuite_bench']}`.",
        "",
        "Issue 7's targets in this layout:",
        "",
        *_table(["ratio", "measured", "target", ""],
                [[r["name"], _fmt(r["value"], 3), r["target"], _verdict(r["met"])] for r in layout["ratios"]]),
        "",
        *_table(["", *(f"c={lv['concurrency']}" for lv in levels)],
                [[label, *(str(fmt(lv)) for lv in levels)] for label, fmt in _GATEWAY_ROWS]),
        "",
        "In-process references:",
        "",
        *_table(["", "runs", "output tokens", "seconds", "output tokens/s", "prefill p50 (ms)",
                 "decode step p50 (ms)"],
                [[r["label"], r["runs"], r["output_tokens"], _fmt(r["seconds"], 2), _fmt(r["output_tokens_per_s"]),
                  _fmt(r["ttft_p50_ms"]), _fmt(r["itl_p50_ms"])] for r in refs.values()]),
        "",
        "Greedy tokens through the gateway identical to the reference's for the same prompt: " + ", ".join(
            f"{k} {v['identical']}/{v['compared']}" for k, v in layout["token_agreement"].items()) + ".",
        "",
        "Memory (peak over this layout's run): " + _memory_line(layout["memory"]) + ".",
        "",
    ]
    steps = layout.get("engine_steps")
    if steps:
        lines += [f"Engine, from its /metrics after the gateway levels: {steps['decode_steps']:,} decode steps, "
                  f"{_fmt(steps['mean_rows_per_decode_step'])} rows per decode step on average, "
                  f"{_fmt(steps['mean_step_ms'])} ms per step on average.", ""]
    ortgenai = layout.get("ortgenai")
    if ortgenai:
        agreement = ortgenai["token_agreement"]
        lines += [
            f"onnxruntime-genai {ortgenai['onnxruntime_genai']} on the same files and the c={ortgenai['rows']} "
            f"level's prompts ({ortgenai['label']}): {ortgenai['runs']} runs, {ortgenai['output_tokens']} tokens "
            f"in {_fmt(ortgenai['seconds'], 2)} s, **{_fmt(ortgenai['output_tokens_per_s'])} output tokens/s**, "
            f"prefill p50 {_fmt(ortgenai['ttft_p50_ms'])} ms, decode step p50 {_fmt(ortgenai['itl_p50_ms'])} ms; "
            f"greedy tokens identical to the in-process batch's in {agreement['identical']}/"
            f"{agreement['compared']} rows.",
            "",
        ]
    paired = layout.get("paired")
    if paired:
        lines += [
            f"Paired rounds (issue 16): {len(paired['rounds'])} rounds, each of the gateway at c="
            f"{paired['concurrency']} ({paired['requests']} requests) followed by each yardstick in turn on that "
            "level's prompts; every ratio is taken within its round:",
            "",
            *paired_lines(paired),
            "",
        ]
    return lines


def _http_section(hop: dict[str, Any] | None, layout: str | None) -> list[str]:
    heading = ["### The HTTP hop (issue 17)", ""]
    if not hop:
        return [*heading, "Not part of this run (`--http-concurrency 0`).", ""]
    return [
        *heading,
        f"On the `{layout}` cluster, {hop['rounds']} rounds of `{hop['commands']['grpc']}` (gRPC, the gateway) "
        f"then `{hop['commands']['http']}` (bench/http_bench.py: the same prompt texts, streamed "
        "`/v1/completions` through `llmsuite-openai`, greedy, `ignore_eos`, usage in the last event).",
        "",
        *_table(["", "output tokens/s", "TTFT p50 per round (ms)", "ITL p50 per round (ms)", "errors",
                 "wrong output length"],
                [[f"{side} c={hop['concurrency']}", _fmt(hop[f"{side}_output_tokens_per_s"]),
                  ", ".join(_fmt(v) for v in hop["ttft_p50_ms"][side]),
                  ", ".join(_fmt(v) for v in hop["itl_p50_ms"][side]), hop["errors"][side],
                  hop["length_mismatches"][side]] for side in ("grpc", "http")]),
        "",
        f"Ratio HTTP / gRPC {_fmt(http_ratio(hop), 3)} (target >= 0.9).",
        "",
    ]


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    m = results["machine"]
    batch = s["batch"]
    lines = [
        "# Performance",
        "",
        "<!-- Generated by `make bench` (bench/run.py, bench/performance_doc.py). Edit those, not this file. -->",
        "",
        "How fast llmsuite serves the `bench` preset (`llmsuite-build-model --preset bench`: a Llama-style",
        "decoder of about 100M parameters with random weights, vocabulary 16384) compared with what ONNX",
        "Runtime does in-process on the same model, the same session settings and the same prompt tokens,",
        "in each layout the inference service loads: the Optimum export, ONNX Runtime GenAI's fused",
        "layout of the same weights (`--layout gqa`), and that layout quantized to int4.",
        "",
        "## Method",
        "",
        f"- **Workload**: {s['prompt_tokens']}-token prompts, {s['output_tokens']} new tokens, greedy with EOS "
        "ignored, so every request does the same work. Each concurrency level sends its own prompts "
        "(random English words cut to an exact token length).",
        "- **Layouts**: `make bench` serves each build in turn on its own cluster (`--layouts`, default "
        "`optimum,gqa,int4`: `llmsuite-build-model --preset bench`, the same with `--layout gqa`, and with "
        "`--layout gqa --precision int4`), with the same levels, prompts and references in each.",
        "- **Through the gateway**: `make bench` starts the local cluster (`python -m llmsuite.cluster`, "
        "tokenizer + inference + gateway + `llmsuite-openai` on one machine) and runs `llmsuite bench` against "
        "the gateway at each level in turn (closed loop: a finished request starts the next). The client runs "
        "on the same machine and takes its share of the CPU. See [clients.md](clients.md#llmsuite-bench-the-"
        "serving-benchmark) for what each column means.",
        "- **In-process references** (bench/reference.py, written straight against onnxruntime, never "
        "through llmsuite's engine), run after the cluster has stopped: (a) one sequence, a greedy loop "
        "with the KV cache kept where the provider put it (IOBinding, present fed back as past), over the "
        f"c=1 level's prompts; (b) the same loop over a left-padded batch of the c={batch} level's "
        f"{batch} prompts (attention_mask 0 on pads, position_ids per row): the ceiling for the Optimum "
        "layout. In the fused layout, whose `genai_config.json` says `past_present_share_buffer`, the batch "
        "also runs as onnxruntime-genai runs it: one max-length KV buffer per layer bound as both past and "
        "present and written in place by GroupQueryAttention; issue 16's ratio takes the faster of the two "
        "loops. Output tokens/s counts prefill, like the gateway's.",
        "- **onnxruntime-genai** (issue 16): its own Generator, static batch of "
        f"{batch} (`batch_size` {batch}, greedy, `min_length` = `max_length` so every row makes "
        f"{s['output_tokens']} tokens) on the fused fp32 files and the c={batch} prompts, with the same "
        "intra-op threads (bench/ortgenai_reference.py). It runs in its own virtual environment "
        "(build/bench-tools/ortgenai, from bench/requirements/ortgenai.txt), with the onnxruntime build that "
        "package brings; the services never import it. Issue 16's target is against its **Engine** "
        "(`og.Engine`, its serving loop): the same requests as the gateway's c="
        f"{batch} level, {batch} in flight, a finished one replaced by the next. On the CPU the Engine batches "
        "statically (its paged `dynamic_batching` needs a paged-attention model and provider): onnxruntime-genai "
        "0.18 takes at most 4 waiting requests into a batch that runs until all its rows end, whatever "
        "`engine.static_batching.max_batch_size` says.",
        "- **Paired rounds** (issue 16's fused-layout ratios): this machine's speed drifts by 10-20% over "
        "minutes, more than the targets' margins, so with the fused cluster up and idle between them, "
        "`--paired-rounds` rounds each run the gateway's c="
        f"{batch} level and then every yardstick (the in-process fused and Optimum batches, the Engine, the "
        "Generator) on its prompts. Each ratio is taken within a round; the targets use the median.",
        "- **The HTTP hop** (issue 17): on one layout's cluster, the same prompts over gRPC and through "
        "`llmsuite-openai`, alternated; see its section.",
        f"- **Same settings**: the inference service and the references both run {s['intra_op_threads']} "
        f"intra-op threads (`--intra-op-threads`, default: the CPUs the benchmark may use), default "
        f"inter-op threads and graph optimization `{s['graph_optimization']}`, on `{s['device']}`; "
        "`--kv-cache-bytes` " + (f"`{s['kv_cache_bytes']}`" if s.get("kv_cache_bytes") else
                                 "at the service's default (sized from memory)") + ".",
        "- **Memory**: the inference process's peak resident set (VmHWM from /proc) over each layout's run, "
        "and the KV-cache bytes the service reports in GetModelInfo, sampled every 0.5 s. Issue 15's bound: "
        f"peak RSS <= weights + the KV budget + {WORKING_MARGIN_MIB} MiB.",
        "- Nothing here is asserted in tests: speed is measured here, on a quiet machine, not in CI.",
        "- Engine-level microbenchmarks (prefill and decode tokens/s, what the KV cache buys): "
        "`python bench/bench_engine.py` (`make bench-engine`).",
        "",
        "## Latest run",
        "",
    ]
    if results["note"]:
        lines += [f"> **Note:** {results['note']}", ""]
    lines += [
        f"- Command: {_make_command(results['arguments'])}; it took {_fmt(results.get('duration_s'), 0)} s",
        f"- Machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
        f"{_fmt(m['memory_gib'])} GiB; {m['os']}; Python {m['python']}; onnxruntime {m['onnxruntime']}; "
        f"load average at the end {m['load_average']}",
        f"- Commit {m['commit']}, {m['date']}",
        "",
        "### Targets (issues 16 and 17)",
        "",
        *_table(["ratio", "measured", "target", ""],
                [[r["name"], _fmt(r["value"], 3), r["target"], _verdict(r["met"])] for r in results["targets"]]),
        "",
    ]
    for layout in results["layouts"].values():
        lines += _layout_section(layout)
    lines += [
        *_http_section(results.get("http_hop"), results.get("http_layout")),
        *_chat_section(results.get("chat")),
        *_constraint_section(results.get("constrained")),
        *_embeddings_section(results.get("embeddings")),
        *_READING,
    ]
    return "\n".join(lines)


# What bounds the targets this machine misses, found by profiling and the experiments named
# here (2-core CPU, bench preset, 2026-11-22). Static text: rerun the experiments when the
# engine or the machine changes.
_READING = [
    "## Reading the results",
    "",
    "What bounds issue 16's and 17's targets, from the run of 2026-12-06 18:38 UTC on a quiet machine (static "
    "text: rerun and rewrite it when the engine or the machine changes):",
    "",
    "- **Fused fp32 at c=16 against its own in-process batch: 0.815 (target 0.85), bound by the CPU the rest "
    "of the cluster needs.** The in-process loop has both cores to itself; through the cluster, the gateway, "
    "the client and the inference servicer's event loop run on the same 2 cores as ONNX Runtime's 2 intra-op "
    "threads. Over one 48-request c=16 level (`/proc` CPU times, py-spy on the inference process): the "
    "inference process used 35 CPU-seconds (its scheduler thread 93% inside onnxruntime), the gateway about "
    "2, the client about 1.2, the servicer's event loop about 2: some 12% of the machine outside the forwards, "
    "in line with the ratio. The engine's own cost between forwards is about 7% of the scheduler thread, most "
    "of it waiting for the GIL while the event loop sends that step's 16 messages (one wake-up per step since "
    "engine/delivery.py; it was one per token, 16 GIL hand-overs a step). Same greedy tokens as the references "
    "(16/16).",
    "- **Against the Optimum in-process batch: 0.854 (target 1.3), bound by the layouts' own difference here.** "
    "On this CPU the fused in-process batch is only 1.03-1.10x the Optimum one in the same rounds (478 against "
    "432, 395 against 383, 446 against 414 tok/s); issue 16 measured 1.29x on its machine. A server can at "
    "best match its own layout's in-process loop, so 1.3x needs a layout gain this machine does not show.",
    "- **Against onnxruntime-genai's Engine: 1.48x (target 2x), bound by compute.** On the CPU the Engine "
    "batches statically, and 0.18 takes at most 4 requests into a batch (a constant in its "
    "StaticBatchScheduler, whatever `engine.static_batching.max_batch_size` says), so it made 220-250 tok/s "
    "where its own Generator, a static batch of 16 on the same files, made 390-520. Twice the Engine would be "
    "1.0-1.1x the batch-of-16 ceiling itself. The Engine closes no request until the loop ends here: closing "
    "each as it finished halved its speed. On a GPU, where 16 rows cost little more than 4, both ratios would "
    "look different; no GPU was lent for this run.",
    "- **int4 at c=1 against the in-process loop on the same file: 0.715 (target 0.9), bound by per-token "
    "work outside the forward.** A forward takes 3.6 ms and a token through the cluster 5.1 ms. At c=1 "
    "(py-spy) the scheduler thread spends about 2 ms a token outside onnxruntime, about half of it waiting "
    "for the GIL while the event loop handles the token it was just woken for, and the gateway (relay, "
    "detokenization, stop strings) takes about 0.9 ms of CPU a token on the same 2 cores. The faster the "
    "model, the larger that share: the fp32 layouts reach 0.88-1.01 at c=1. The earlier run's 1.16 came "
    "from a load spike during its reference.",
    "- **Intra-op spinning** (`--intra-op-spinning`, on by default): four complete alternated pairs of c=16 levels on "
    "separate clusters gave no clear winner; spinning was ahead in the two quiet pairs (434 against 409, 408 "
    "against 368 tok/s) and behind when other work loaded the machine, as its help text says.",
    "- **Memory (met in every layout)** and **the HTTP hop (met, 1.02)**: see the targets table.",
    "",
    "From the issue-7 runs (2026-11-22, Optimum layout, quiet machine):",
    "",
    "- **Run-to-run spread.** Four runs of the c=16 level with the same settings on the same quiet machine "
    "gave 0.75, 0.80, 0.82 and 0.84 of the batched reference: about ±5%. A ratio within that of its target is "
    "neither a clear miss nor a clear pass.",
    "- **Where c=16 loses to the batched reference.** In-process, the engine's 16-row decode step takes "
    "33 ms against 31 ms for the bare forward (scheduling, sampling, delivery: 8%). Through the cluster the "
    "step median grows to about 41 ms: the gateway, the tokenizer, the inference servicer's event loop and "
    "the client all run on the same 2 cores that ONNX Runtime's 2 threads fill during a forward, and every "
    "streamed token costs them CPU (gateway + tokenizer about 0.25 ms per token). With the services on "
    "separate machines, or ONNX Runtime on a GPU, this overlap disappears.",
    "- **Time to first token at c=16.** A closed loop of equal-length requests keeps its clients in step: "
    "all 16 finish together and all 16 send their next request together, so every first token waits "
    "behind a burst of 16 prefills. The median request waits for about 8 of them; at 1,160-1,430 prompt "
    "tokens/s (one prompt, or four prefilled together) that is 360-440 ms of prefill alone against "
    "63 ms at c=1, whatever the scheduling order. With output lengths drawn from uniform(64, 192) instead "
    "(same mean, clients out of step, as real traffic is), the same cluster measured a TTFT p50 of 103 ms at "
    "c=16 against 61 ms at c=1 (1.7x), ITL p50 2.8x. "
    "(`llmsuite bench -c 1,16 -n 4,96 --prompt-tokens 64 --output-tokens uniform:64:192`.)",
    "- **Chat.** The cached share is lower than the history's share of the prompt because each turn is "
    "defined by the re-rendered conversation (issue 11): the random model's replies decode to odd bytes that "
    "re-tokenize to other, more, ids, so the cache matches up to the start of the previous reply and that "
    "reply's text is prefilled again. A real model's replies mostly re-tokenize to the ids it generated.",
    "- **Memory at c=64.** The peak resident set is the model, ONNX Runtime's working memory and the KV "
    "cache, which by default may grow to `--kv-cache-bytes` (sized from the process's memory limits, or a "
    "quarter of what the machine's memory leaves after the weights; docs/design.md, Memory): after the run the "
    "prefix cache keeps finished requests' KV until that budget is needed. Lower the budget to bound it "
    "further; admission and the prefix cache both stay within it.",
]
