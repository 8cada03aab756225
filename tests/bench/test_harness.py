"""`make bench`'s pieces that need no cluster: which layouts it runs, how the HTTP hop's client
reads its prompts and sums a level, and issue 16's and 17's ratios across layouts."""

from __future__ import annotations

import argparse
import copy
import json

import pytest


def test_layouts_default_to_all_three_in_order_and_a_knob_picks_some(bench_run):
    args = bench_run.build_parser().parse_args([])
    assert [layout.name for layout in args.layouts] == ["optimum", "gqa", "int4"]
    assert bench_run.http_layout(args) == "gqa"
    args = bench_run.build_parser().parse_args(["--layouts", "int4,optimum", "--kv-cache-bytes", "1GiB"])
    assert [layout.folder for layout in args.layouts] == ["bench-gqa-int4", "bench"]
    assert bench_run.http_layout(args) == "int4"  # gqa not run: the first layout measures the hop
    assert args.kv_cache_bytes == "1GiB"
    assert bench_run.http_layout(bench_run.build_parser().parse_args(["--http-concurrency", "0"])) is None


@pytest.mark.parametrize("text", ["", "gqa,gqa", "optimum,fp16"])
def test_layouts_refuse_unknown_or_repeated_names(bench_run, text):
    with pytest.raises(argparse.ArgumentTypeError, match="--layouts takes one or more of optimum, gqa, int4"):
        bench_run.parse_layouts(text)


def test_each_layout_is_built_with_its_builder_flags(bench_run):
    assert bench_run.LAYOUTS["gqa"].builder_args == ("--layout", "gqa")
    assert bench_run.LAYOUTS["int4"].builder_args == ("--layout", "gqa", "--precision", "int4")


def test_http_client_sends_the_grpc_levels_texts_greedy_and_sums_its_level(tmp_path, http_bench):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"concurrency": c, "index": i, "turn": 0, "output_tokens": 8,
                                           "token_ids": [1, 2], "text": f"c{c} p{i}"}) + "\n"
                               for c in (1, 16) for i in range(2)))
    level_16 = http_bench.read_prompts(prompts, 16)
    assert [p.text for p in level_16] == ["c16 p0", "c16 p1"]
    assert len(http_bench.read_prompts(prompts)) == 4
    body = http_bench.request_body("bench", level_16[0])
    assert body == {"model": "bench", "prompt": "c16 p0", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}

    level = http_bench.Level(concurrency=2, duration_s=2.0, records=[
        http_bench.Record(output_tokens=8, expected_tokens=8, ttft_s=0.1, e2e_s=0.8),
        http_bench.Record(output_tokens=7, expected_tokens=8, ttft_s=0.3, e2e_s=0.9),
        http_bench.Record(status="HTTP 400", expected_tokens=8)])
    summary = level.summary()
    assert summary["output_tokens"] == 15 and summary["output_tokens_per_s"] == 7.5
    assert summary["succeeded"] == 2 and summary["errors"] == {"HTTP 400": 1}
    assert summary["length_mismatches"] == 1
    assert summary["ttft_ms"]["p50"] == 200.0
    assert summary["itl_ms"]["p50"] == pytest.approx((0.7 / 7 + 0.6 / 6) / 2 * 1e3)


def _layout(name, c1, c16, single, batch, *, batch_concat=None, hwm=900.0, weights=384.0, ortgenai=None):
    refs = {"single": {"label": "single", "output_tokens_per_s": single},
            "batch": {"label": "batch", "output_tokens_per_s": batch}}
    if batch_concat is not None:
        refs["batch_concat"] = {"label": "concat", "output_tokens_per_s": batch_concat}
    return {"layout": name, "references": refs, "ortgenai": ortgenai,
            "gateway": {"levels": [{"concurrency": 1, "output_tokens_per_s": c1},
                                   {"concurrency": 16, "output_tokens_per_s": c16}]},
            "memory": {"vm_hwm_mib": hwm, "model_weights_mib": weights,
                       "reported_kv_budget": {"kv_cache_budget_bytes": 1024 * 2**20}}}


RESULTS = {
    "layouts": {
        "optimum": _layout("optimum", 60.0, 360.0, single=62.0, batch=400.0),
        "gqa": _layout("gqa", 80.0, 540.0, single=85.0, batch=500.0, batch_concat=600.0,
                       ortgenai={"output_tokens_per_s": 300.0}),
        "int4": _layout("int4", 160.0, 700.0, single=170.0, batch=800.0, hwm=2000.0, weights=100.0),
    },
    "http_hop": {"concurrency": 16, "grpc_output_tokens_per_s": 500.0, "http_output_tokens_per_s": 425.0},
}


def test_issue_16_and_17_ratios_across_layouts(performance_doc):
    ratios = {r["name"]: r for r in performance_doc.cross_layout_ratios(RESULTS, batch=16)}
    assert ratios["fused fp32: gateway c=16 / Optimum in-process batch of 16"] == {
        "name": "fused fp32: gateway c=16 / Optimum in-process batch of 16", "value": 1.35, "target": ">= 1.3",
        "met": True}
    faster = ratios["fused fp32: gateway c=16 / fused in-process batch of 16 (the faster loop)"]
    assert faster["value"] == 0.9 and faster["met"] is True  # against 600 (present fed back), not 500
    assert ratios["int4: gateway c=1 / Optimum fp32 in-process single sequence"]["value"] == round(160 / 62, 3)
    assert ratios["int4: gateway c=1 / int4 in-process single sequence"]["value"] == round(160 / 170, 3)
    assert ratios["fused fp32: gateway c=16 / onnxruntime-genai static batch of 16"]["value"] == 1.8
    assert ratios["fused fp32: gateway c=16 / onnxruntime-genai static batch of 16"]["met"] is False
    assert ratios["optimum: peak RSS / (weights + KV budget + 512 MiB)"]["value"] == round(900 / 1920, 3)
    assert ratios["int4: peak RSS / (weights + KV budget + 512 MiB)"]["met"] is False  # 2000 > 100+1024+512
    http = ratios["HTTP c=16 / gRPC output tok/s, same prompts (issue 17)"]
    assert http["value"] == 0.85 and http["met"] is False


def test_ratios_of_layouts_not_run_give_no_verdict(performance_doc):
    results = copy.deepcopy(RESULTS)
    del results["layouts"]["optimum"]
    results["http_hop"] = None
    ratios = {r["name"]: r for r in performance_doc.cross_layout_ratios(results, batch=16)}
    assert ratios["fused fp32: gateway c=16 / Optimum in-process batch of 16"]["met"] is None
    assert ratios["int4: gateway c=1 / Optimum fp32 in-process single sequence"]["value"] is None
    assert ratios["HTTP c=16 / gRPC output tok/s, same prompts (issue 17)"]["met"] is None
    assert ratios["int4: gateway c=1 / int4 in-process single sequence"]["met"] is True


def test_bench_http_counts_every_errored_request_of_both_tools(tmp_path, ecosystem):
    """guidellm exits 0 with every request errored: its report is what says so."""
    guidellm = tmp_path / "guidellm"
    guidellm.mkdir()
    (guidellm / "benchmarks.json").write_text(json.dumps({"benchmarks": [
        {"requests": {"successful": [{}], "errored": [{"error": "HTTPStatusError 400"}]},
         "metrics": {"request_totals": {"successful": 3, "errored": 2}}},
        {"requests": {"successful": [], "errored": []}, "metrics": {"request_totals": {"successful": 4,
                                                                                          "errored": 0}}}]}))
    assert ecosystem.guidellm_errors(guidellm) == (7, ["HTTPStatusError 400", "(not sampled)"])

    aiperf = tmp_path / "aiperf" / "run"
    aiperf.mkdir(parents=True)
    (aiperf / "profile_export.jsonl").write_text(
        json.dumps({"metrics": {}}) + "\n" +
        json.dumps({"error": {"code": 400, "message": "context_length_exceeded"}}) + "\n")
    assert ecosystem.aiperf_errors(tmp_path / "aiperf") == (1, ["400 context_length_exceeded"])


def test_bench_http_hands_each_tool_the_local_tokenizer(tmp_path, ecosystem):
    guidellm = ecosystem.guidellm_argv(tmp_path, "http://127.0.0.1:1", tmp_path / "model", tmp_path, "tiny")
    assert f"kind=huggingface_auto,model={tmp_path / 'model'}" in guidellm
    assert "kind=openai_http,target=http://127.0.0.1:1" in guidellm
    aiperf = ecosystem.aiperf_argv(tmp_path, "http://127.0.0.1:1", tmp_path / "model", tmp_path, "gqa")
    assert aiperf[aiperf.index("--tokenizer") + 1] == str(tmp_path / "model")
    assert aiperf[aiperf.index("--model") + 1] == "gqa"


def test_paired_rounds_give_the_fused_ratios_as_medians_within_rounds(performance_doc, bench_run):
    """With paired rounds the fused layout's ratios are each round's own, medianed: a round where
    the machine ran slow for both sides (round 2) gives the same ratio as a fast one."""
    results = copy.deepcopy(RESULTS)
    rounds = [{"gateway": 400.0, "fused_batch": 400.0, "optimum_batch": 320.0, "ortgenai_engine": 200.0,
               "ortgenai_generator": 440.0},
              {"gateway": 200.0, "fused_batch": 200.0, "optimum_batch": 160.0, "ortgenai_engine": 100.0,
               "ortgenai_generator": 220.0},
              {"gateway": 360.0, "fused_batch": 450.0, "optimum_batch": 300.0, "ortgenai_engine": 240.0,
               "ortgenai_generator": None}]
    results["layouts"]["gqa"]["paired"] = {"rounds": rounds, "ratios": bench_run.summarise_rounds(rounds),
                                           "concurrency": 16, "requests": 48, "sides": bench_run.PAIRED_SIDES}
    ratios = {r["name"]: r for r in performance_doc.cross_layout_ratios(results, batch=16)}
    versus_fused = ratios["fused fp32: gateway c=16 / fused in-process batch of 16 (KV shared in place), "
                          "median of 3 paired rounds"]
    assert versus_fused["value"] == 1.0 and versus_fused["met"] is True  # not 540 / 600 across the run
    versus_optimum = ratios["fused fp32: gateway c=16 / Optimum in-process batch of 16, median of 3 paired rounds"]
    assert versus_optimum["value"] == 1.25 and versus_optimum["met"] is False
    engine = ratios["fused fp32: gateway c=16 / onnxruntime-genai Engine, same requests 16 at a time, "
                    "median of 3 paired rounds"]
    assert engine["value"] == 2.0 and engine["met"] is True
    assert not any("static batch" in name for name in ratios)  # the Generator is context, not the target


def test_paired_rounds_summarise_each_side_by_its_median_and_range(bench_run):
    rounds = [{"gateway": 400.0, "fused_batch": 500.0}, {"gateway": 300.0, "fused_batch": 300.0},
              {"gateway": 330.0, "fused_batch": 400.0}]
    summary = bench_run.summarise_rounds(rounds)
    assert summary["fused_batch"] == {"median": 0.825, "min": 0.8, "max": 1.0}
    assert summary["ortgenai_engine"] is None  # not run (--no-ortgenai)
