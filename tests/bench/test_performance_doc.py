"""docs/performance.md's ratios and text come from one results dict (bench/run.py): issue 7's
ratios per layout, issue 16's and 17's across layouts."""

from __future__ import annotations

import copy


def _level(c, tps, ttft, itl, errors=None):
    return {"concurrency": c, "requests": 4, "succeeded": 4, "errors": errors or {}, "length_mismatches": 0,
            "duration_s": 1.0, "output_tokens_per_s": tps, "requests_per_s": 1.0,
            "ttft_ms": {"p50": ttft, "p95": ttft, "p99": ttft}, "itl_ms": {"p50": itl, "p95": itl, "p99": itl},
            "e2e_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0}}


LAYOUT = {
    "layout": "optimum", "title": "Optimum layout, fp32", "model_dir": "models/bench",
    "build": "llmsuite-build-model --preset bench --out models/bench",
    "llmsuite_bench": "llmsuite bench -c 1,16,64",
    "ortgenai": None,
    "gateway": {"levels": [_level(1, 10.0, 100.0, 50.0), _level(16, 45.0, 600.0, 150.0),
                           _level(64, 50.0, 900.0, 300.0, {"RESOURCE_EXHAUSTED": 3, "INTERNAL": 1})]},
    "references": {
        "single": {"label": "single sequence", "rows": 1, "runs": 2, "output_tokens": 256, "seconds": 25.0,
                   "output_tokens_per_s": 11.0, "ttft_p50_ms": 50.0, "itl_p50_ms": 20.0},
        "batch": {"label": "left-padded batch of 16", "rows": 16, "runs": 2, "output_tokens": 4096,
                  "seconds": 80.0, "output_tokens_per_s": 51.2, "ttft_p50_ms": 500.0, "itl_p50_ms": 60.0}},
    "token_agreement": {"single": {"identical": 2, "compared": 2}, "batch": {"identical": 15, "compared": 16}},
    "memory": {"vm_hwm_mib": 900.0, "model_weights_mib": 384.0, "peak_kv_cache_mib": 50.0, "peak_running": 16,
               "peak_queued": 48, "reported_kv_budget": None},
}
RESULTS = {
    "arguments": [],
    "machine": {"cpu": "Test CPU", "usable_cpus": 2, "logical_cpus": 4, "memory_gib": 24.0, "os": "Linux",
                "python": "3.11", "onnxruntime": "1.2.3", "load_average": [0.1, 0.1, 0.1], "commit": "abc123",
                "date": "today"},
    "settings": {"device": "cpu", "intra_op_threads": 2, "inter_op_threads": 0, "graph_optimization": "all",
                 "prompt_tokens": 64, "output_tokens": 128, "batch": 16, "kv_cache_bytes": None},
    "layouts": {"optimum": LAYOUT},
    "primary": "optimum",
    "http_hop": None,
    "http_layout": None,
    "duration_s": 1234.5,
    "note": "",
}


def finished(results, performance_doc):
    """The ratios bench/run.py adds before rendering."""
    for layout in results["layouts"].values():
        layout["ratios"] = performance_doc.ratios(
            {**layout, "constrained": results.get("constrained"), "embeddings": results.get("embeddings")}, batch=16)
    results["targets"] = performance_doc.cross_layout_ratios(results, batch=16)
    return results


def test_ratios_against_the_issue_targets(performance_doc):
    ratios = {r["name"]: r for r in performance_doc.ratios(LAYOUT, batch=16)}
    assert ratios["gateway c=16 output tok/s / in-process batch of 16"]["value"] == round(45 / 51.2, 3)
    assert ratios["gateway c=16 output tok/s / in-process batch of 16"]["met"] is True  # 0.879 >= 0.8
    assert ratios["gateway c=16 / gateway c=1 output tok/s"]["met"] is True  # 4.5 >= 4
    single = ratios["gateway c=1 / in-process single sequence output tok/s"]
    assert single["value"] == round(10 / 11, 3) and single["met"] is False  # 0.909 < 0.95
    assert ratios["TTFT p50 c=16 / c=1"] == {"name": "TTFT p50 c=16 / c=1", "value": 6.0, "target": "<= 5",
                                             "met": False}
    assert ratios["ITL p50 c=16 / c=1"]["value"] == 3.0 and ratios["ITL p50 c=16 / c=1"]["met"] is True
    unexpected = ratios["c=64 errors other than RESOURCE_EXHAUSTED"]
    assert unexpected["value"] == 1.0 and unexpected["met"] is False


def test_missing_levels_give_no_verdict(performance_doc):
    layout = copy.deepcopy(LAYOUT)
    layout["gateway"]["levels"] = layout["gateway"]["levels"][1:]  # no c=1
    ratios = {r["name"]: r for r in performance_doc.ratios(layout, batch=16)}
    assert ratios["gateway c=16 / gateway c=1 output tok/s"]["met"] is None
    assert ratios["TTFT p50 c=16 / c=1"]["value"] is None


def test_document_names_the_machine_the_command_and_every_level(performance_doc):
    results = finished(copy.deepcopy(RESULTS), performance_doc)
    text = performance_doc.render(results)
    assert "Test CPU, 2 usable of 4 logical CPUs" in text and "onnxruntime 1.2.3" in text
    assert "- Command: `make bench`; it took 1,234 s" in text and "llmsuite bench -c 1,16,64" in text
    assert "### Optimum layout, fp32 (`models/bench`)" in text
    assert "| | c=1 | c=16 | c=64 |".replace("| |", "|  |") in text
    assert "INTERNAL 1" in text and "batch 15/16" in text and "no KV budget" in text
    results["arguments"] = ["--requests", "2,4,8,16", "--note", "busy machine"]
    results["note"] = "busy machine"
    text = performance_doc.render(results)
    assert "`make bench BENCH_ARGS='--requests 2,4,8,16 --note '\"'\"'busy machine'\"'\"''`" in text
    assert "> **Note:** busy machine" in text


def test_chat_section_reports_turns_and_the_uncached_ratio(performance_doc):
    results = finished(copy.deepcopy(RESULTS), performance_doc)
    assert "`make bench BENCH_ARGS=--chat` adds it" in performance_doc.render(results)
    results["chat"] = {
        "command": "llmsuite bench --workload chat", "uncached_command": "llmsuite bench --prompt-tokens 1040",
        "turns": [{"turn": 0, "succeeded": 3, "prompt_tokens": 200, "cached_tokens": 0, "cache_hit_rate": 0.0,
                   "ttft_ms": {"p50": 300.0}},
                  {"turn": 1, "succeeded": 3, "prompt_tokens": 250, "cached_tokens": 750, "cache_hit_rate": 0.75,
                   "ttft_ms": {"p50": 150.0}}],
        "errors": {}, "cache_hit_rate": 0.6, "last_turn_prompt_tokens": 1040, "last_turn_ttft_p50_ms": 150.0,
        "uncached_ttft_p50_ms": 1000.0,
    }
    text = performance_doc.render(results)
    assert "| 2 | 3 | 250 | 750 | 75.0% | 150.0 |" in text
    assert "ratio 0.150 (target <= 0.2: met)" in text
    assert "= 0.150 (issue 11 target <= 0.2)" in performance_doc.summary_text(results)


def test_embeddings_level_is_a_ratio_against_the_in_process_loop(performance_doc):
    results = copy.deepcopy(RESULTS)
    assert not any("embeddings" in r["name"] for r in performance_doc.ratios(LAYOUT, batch=16))
    results["embeddings"] = {
        "command": "llmsuite bench --workload embed -c 16", "texts_per_request": 32, "model_weights_mib": 47.4,
        "level": {"concurrency": 16, "requests": 64, "succeeded": 64, "errors": {}, "texts": 2048, "tokens": 40000,
                  "duration_s": 10.0, "texts_per_s": 204.8, "tokens_per_s": 4000.0,
                  "latency_ms": {"p50": 2400.0, "p95": 2600.0, "p99": 2700.0}},
        "reference": {"label": "in-process loop, one forward per request", "requests": 64, "texts": 2048,
                      "tokens": 40000, "seconds": 8.0, "texts_per_s": 256.0}}
    finished(results, performance_doc)
    ratios = {r["name"]: r for r in results["layouts"]["optimum"]["ratios"]}
    ratio = ratios["gateway embeddings c=16 texts/s / in-process loop"]
    assert ratio["value"] == 0.8 and ratio["met"] is True
    text = performance_doc.render(results)
    assert "### Embeddings (issue 18)" in text and "| gateway c=16 | 2048 | 10.00 | 204.8 |" in text
    assert "embeddings: gateway 204.8 texts/s" in performance_doc.summary_text(results)


def test_targets_table_each_layout_onnxruntime_genai_and_the_http_hop_are_written(performance_doc):
    results = copy.deepcopy(RESULTS)
    fused = copy.deepcopy(LAYOUT)
    fused.update(layout="gqa", title="fused layout, fp32", model_dir="models/bench-gqa", ortgenai={
        "label": "onnxruntime-genai Generator, static batch of 16", "rows": 16, "runs": 2, "output_tokens": 4096,
        "seconds": 20.0, "output_tokens_per_s": 204.8, "ttft_p50_ms": 900.0, "itl_p50_ms": 60.0,
        "onnxruntime_genai": "0.18.0", "token_agreement": {"identical": 16, "compared": 16}},
        engine_steps={"decode_steps": 1200, "mean_rows_per_decode_step": 4.5, "steps": 1300, "mean_step_ms": 41.0})
    results["layouts"]["gqa"] = fused
    results["http_layout"] = "gqa"
    results["http_hop"] = {
        "concurrency": 16, "rounds": 2, "requests": 48,
        "commands": {"grpc": "llmsuite bench -c 16", "http": "python bench/http_bench.py -c 16"},
        "grpc_output_tokens_per_s": 400.0, "http_output_tokens_per_s": 380.0,
        "errors": {"grpc": 0, "http": 0}, "length_mismatches": {"grpc": 0, "http": 0},
        "ttft_p50_ms": {"grpc": [100.0, 110.0], "http": [120.0, 130.0]},
        "itl_p50_ms": {"grpc": [30.0, 31.0], "http": [32.0, 33.0]}}
    text = performance_doc.render(finished(results, performance_doc))
    assert "### Targets (issues 16 and 17)" in text
    assert "| fused fp32: gateway c=16 / onnxruntime-genai static batch of 16 | 0.220 | >= 2 | MISSED |" in text
    assert "### fused layout, fp32 (`models/bench-gqa`)" in text and "**204.8 output tokens/s**" in text
    assert "| grpc c=16 | 400.0 | 100.0, 110.0 | 30.0, 31.0 | 0 | 0 |" in text
    assert "Ratio HTTP / gRPC 0.950 (target >= 0.9)." in text
    assert "1,200 decode steps, 4.5 rows per decode step on average, 41.0 ms per step" in text
    assert "HTTP hop c=16: gRPC 400.0 tok/s, HTTP 380.0 tok/s" in performance_doc.summary_text(results)
