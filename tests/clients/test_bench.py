"""`llmsuite bench` against a real tiny cluster (tokenizer, inference, gateway as
processes on loopback): the table, the JSON and the per-request files agree, and
every request generated exactly what it asked for. Timings are never asserted."""

from __future__ import annotations

import json
import re

import pytest
from support import ServiceProcess, processes

from llmsuite.client import cli


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    model = f"tiny={tiny_model_dir}"
    tok = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", model])
    inf = ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", model, "--device", "cpu",
                          "--intra-op-threads", "1"])
    with processes(tok, inf):
        gw = ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tok.address,
                             "--inference", inf.address])
        with processes(gw):
            yield {"gateway": gw.address, "inference": inf.address}


def bench(capsys, address: str, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--address", address, "bench", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table_row(table: str, label: str) -> list[str]:
    row = next(line for line in table.splitlines() if re.match(rf"{re.escape(label)}\s{{2,}}", line))
    return row[len(label):].split()


def test_gateway_levels_are_consistent_and_lengths_exact(cluster, capsys, tmp_path):
    common = ["-c", "1,3", "-n", "2,5", "--prompt-tokens", "12", "--output-tokens", "7", "--seed", "3"]
    code, out, _ = bench(capsys, cluster["gateway"], *common, "--json", "--save-requests", str(tmp_path / "r.jsonl"),
                         "--save-prompts", str(tmp_path / "p.jsonl"))
    assert code == 0
    report = json.loads(out)
    assert report["config"]["concurrency"] == [1, 3] and report["model"]["context_length"] == 512
    levels = report["levels"]
    assert [(lv["concurrency"], lv["requests"], lv["succeeded"], lv["errors"]) for lv in levels] == \
        [(1, 2, 2, {}), (3, 5, 5, {})]
    for lv in levels:
        assert lv["output_tokens"] == 7 * lv["requests"] and lv["length_mismatches"] == 0
        assert lv["prompt_tokens"] == 12 * lv["requests"]
        assert lv["ttft_ms"]["count"] == lv["requests"] and lv["e2e_ms"]["count"] == lv["requests"]
        assert lv["itl_ms"]["count"] == 6 * lv["requests"]
        assert lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p95"] <= lv["ttft_ms"]["p99"]
    requests = lines(tmp_path / "r.jsonl")
    assert len(requests) == 7
    assert all(r["code"] == "OK" and r["prompt_tokens"] == 12 and r["output_tokens"] == 7 ==
               r["reported_output_tokens"] == len(r["output_token_ids"]) for r in requests)
    prompts = lines(tmp_path / "p.jsonl")
    assert [(p["concurrency"], p["index"]) for p in prompts] == [(r["concurrency"], r["index"]) for r in requests]
    assert all(len(p["token_ids"]) == 12 and p["text"] for p in prompts)
    assert len({tuple(p["token_ids"]) for p in prompts}) == 7  # every request has its own prompt

    # Greedy: the same prompt gives the same tokens whatever else is running.
    again = {(r["concurrency"], r["index"]): r["output_token_ids"] for r in requests}
    code, table, _ = bench(capsys, cluster["gateway"], *common, "--save-requests", str(tmp_path / "r2.jsonl"))
    assert code == 0
    assert {(r["concurrency"], r["index"]): r["output_token_ids"] for r in lines(tmp_path / "r2.jsonl")} == again
    assert table_row(table, "requests") == ["2", "5"]
    assert table_row(table, "succeeded") == ["2", "5"]
    assert table_row(table, "errors") == ["0", "0"]
    assert table_row(table, "output tokens") == ["14", "35"]
    assert table_row(table, "wrong output length") == ["0", "0"]


def test_inference_target_with_length_distributions(cluster, capsys, tmp_path):
    code, out, _ = bench(capsys, cluster["inference"], "--target", "inference", "-c", "4", "-n", "9",
                         "--prompt-tokens", "uniform:3:40", "--output-tokens", "uniform:1:12", "--json",
                         "--save-requests", str(tmp_path / "r.jsonl"), "--save-prompts", str(tmp_path / "p.jsonl"))
    assert code == 0
    (level,) = json.loads(out)["levels"]
    assert (level["requests"], level["succeeded"], level["length_mismatches"]) == (9, 9, 0)
    requests, prompts = lines(tmp_path / "r.jsonl"), lines(tmp_path / "p.jsonl")
    assert len({r["expected_output_tokens"] for r in requests}) > 1  # lengths really vary
    for r, p in zip(requests, prompts, strict=True):
        assert r["output_tokens"] == r["expected_output_tokens"] == p["output_tokens"] == len(r["output_token_ids"])
        assert r["prompt_tokens"] == len(p["token_ids"])
        assert all(0 <= i < 1024 for i in p["token_ids"])
    assert level["output_tokens"] == sum(r["output_tokens"] for r in requests)


@pytest.mark.parametrize("target", ["gateway", "inference"])
def test_unknown_model_failures_are_counted_by_code(cluster, capsys, target):
    code, out, err = bench(capsys, cluster[target], "--target", target, "--model", "no-such-model",
                           "--tokenizer-model", "tiny", "-c", "2", "-n", "3", "--output-tokens", "4", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["warmup_errors"] == {"NOT_FOUND": 1}
    (level,) = report["levels"]
    assert (level["requests"], level["succeeded"], level["errors"]) == (3, 0, {"NOT_FOUND": 3})
    assert "no-such-model" in level["error_examples"]["NOT_FOUND"]
    assert level["output_tokens"] == 0 and level["ttft_ms"]["count"] == 0 and level["ttft_ms"]["p50"] is None
    assert "its requests will fail" in err


def test_a_prompt_model_that_does_not_exist_is_a_usage_failure(cluster, capsys):
    code, out, err = bench(capsys, cluster["gateway"], "--model", "no-such-model", "-n", "1")
    assert code == 1 and out == "" and "NOT_FOUND" in err


@pytest.mark.parametrize("target", ["gateway", "inference"])
def test_chat_workload_reports_turns_and_cached_tokens(cluster, capsys, tmp_path, target):
    args = ["--target", target, "--workload", "chat", "--turns", "3", "-c", "2", "-n", "2", "--prompt-tokens", "9",
            "--output-tokens", "5", "--warmup", "0", "--json"]
    code, out, _ = bench(capsys, cluster[target], *args, "--chat-mode", "resend",
                         "--save-requests", str(tmp_path / "resend.jsonl"))
    assert code == 0
    (level,) = json.loads(out)["levels"]
    assert (level["requests"], level["succeeded"], level["output_tokens"]) == (6, 6, 30)
    assert [t["turn"] for t in level["turns"]] == [0, 1, 2]
    resend = lines(tmp_path / "resend.jsonl")
    for conversation in (0, 1):
        turns = [r for r in resend if r["index"] == conversation]
        assert [r["turn"] for r in turns] == [0, 1, 2]
        # Each turn re-sends everything before it: what the server sees (computed or cached) grows.
        seen = [r["prompt_tokens"] + r["cached_tokens"] for r in turns]
        assert seen[0] < seen[1] < seen[2]
        assert all(r["output_tokens"] == 5 for r in turns)

    code, out, _ = bench(capsys, cluster[target], *args, "--chat-mode", "session",
                         "--save-requests", str(tmp_path / "session.jsonl"))
    assert code == 0
    (level,) = json.loads(out)["levels"]
    session = lines(tmp_path / "session.jsonl")
    later = [r for r in session if r["turn"] > 0]
    assert later and all(r["cached_tokens"] > 0 for r in later)  # the held-open stream keeps its KV
    cached = sum(r["cached_tokens"] for r in session)
    assert level["cached_tokens"] == cached
    assert level["cache_hit_rate"] == pytest.approx(cached / (cached + sum(r["prompt_tokens"] for r in session)),
                                                    abs=1e-4)


def test_duration_mode_runs_until_time_is_up(cluster, capsys):
    code, out, _ = bench(capsys, cluster["gateway"], "-c", "2", "-z", "0.5", "--output-tokens", "3",
                         "--warmup", "0", "--json")
    assert code == 0
    (level,) = json.loads(out)["levels"]
    assert level["requests"] >= 1 and level["errors"] == {} and level["output_tokens"] == 3 * level["succeeded"]


def test_api_key_is_sent_like_every_other_command(gateway, capsys):
    # The stand-in gateway from conftest.py requires an API key; it echoes prompt words.
    code, out, _ = bench(capsys, gateway.address, "--api-key", gateway.api_key, "-n", "2", "--prompt-tokens", "6",
                         "--output-tokens", "3", "--json")
    assert code == 0
    assert json.loads(out)["levels"][0]["succeeded"] == 2
    assert all(c.metadata.get("authorization") == f"Bearer {gateway.api_key}" for c in gateway.app.calls)
    code, out, err = bench(capsys, gateway.address, "-n", "1")
    assert code == 1 and "UNAUTHENTICATED" in err


def test_bad_arguments_are_usage_errors(capsys):
    assert cli.main(["bench", "--prompt-tokens", "uniform:9:3"]) == 2
    assert cli.main(["bench", "-c", "1,0"]) == 2
    assert cli.main(["bench", "-n", "3", "-z", "2"]) == 2
    assert cli.main(["bench", "-c", "1,2,3", "-n", "1,2"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("target", ["gateway", "inference"])
def test_json_schema_constrains_every_request(cluster, capsys, tmp_path, target):
    endless = tmp_path / "endless.json"
    endless.write_text(json.dumps({"type": "string", "minLength": 500}))
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"enum": ["yes"]}))
    common = ["--target", target, "-c", "2", "-n", "4", "--prompt-tokens", "8", "--output-tokens", "12", "--json"]
    code, out, _ = bench(capsys, cluster[target], *common, "--json-schema", str(endless))
    assert code == 0
    report = json.loads(out)
    assert report["config"]["constraint"] == "json_schema"
    (level,) = report["levels"]
    assert (level["succeeded"], level["length_mismatches"], level["output_tokens"]) == (4, 0, 48)
    # A schema whose only value is `"yes"` ends every request early: the constraint reached the engine.
    code, out, _ = bench(capsys, cluster[target], *common, "--json-schema", str(short))
    assert code == 0
    (level,) = json.loads(out)["levels"]
    assert level["succeeded"] == 4 and level["length_mismatches"] == 4 and level["output_tokens"] < 48
