"""The benchmark's yardstick (bench/reference.py) must itself be right: its greedy
loop reproduces transformers' greedy tokens on a real Optimum export, and the
left-padded batch gives every row exactly what that row gives alone."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def llama(shared_exports, reference):
    cases = json.loads((shared_exports / "llama" / "reference.json").read_text())["cases"]
    return reference.ReferenceSession.load(shared_exports / "llama", intra_op_threads=1), cases


@pytest.mark.optimum
def test_single_sequence_loop_matches_transformers_greedy(llama, reference):
    session, cases = llama
    for case in cases:
        run = reference.greedy(session, [case["prompt_ids"]], len(case["greedy_ids"]))
        assert run.tokens == [case["greedy_ids"]], case["name"]
        assert len(run.step_s) == len(case["greedy_ids"]) - 1


@pytest.mark.optimum
def test_left_padded_batch_matches_each_row_alone(llama, reference):
    session, cases = llama
    # 4 to 186 prompt tokens in one batch: most rows are mostly padding.
    run = reference.greedy(session, [c["prompt_ids"] for c in cases], 24)
    assert run.tokens == [c["greedy_ids"] for c in cases]
    assert run.output_tokens == 24 * len(cases)


def test_builder_model_batch_equals_single_rows(tiny_model_dir, reference):
    session = reference.ReferenceSession.load(tiny_model_dir, intra_op_threads=1)
    prompts = [[5, 9, 200, 31], [7] * 11, [100, 3]]
    batch = reference.greedy(session, prompts, 6)
    assert batch.tokens == [reference.greedy(session, [p], 6).tokens[0] for p in prompts]


def test_ragged_batch_needs_position_ids(tmp_path, reference):
    from llmsuite.builder.model import build_model

    build_model(tmp_path, preset="tiny", arch="gpt2")
    session = reference.ReferenceSession.load(tmp_path, intra_op_threads=1)
    assert "position_ids" not in session.input_dtypes  # the builder's gpt2 has learned positions, no input
    assert len(reference.greedy(session, [[5, 6], [7, 8]], 2).tokens) == 2  # equal lengths need no padding
    with pytest.raises(ValueError, match="position_ids"):
        reference.greedy(session, [[5, 6, 7], [8]], 2)


def test_fused_layout_loops_give_the_optimum_layouts_tokens(tmp_path, reference):
    """The GenAI folder is read from genai_config.json; its KV buffer shared in place (as
    onnxruntime-genai runs it) and present fed back as past give the Optimum export's tokens."""
    import dataclasses

    from llmsuite.builder.variants import build_variant

    build_variant(tmp_path / "optimum")
    build_variant(tmp_path / "gqa", layout="gqa")
    optimum = reference.ReferenceSession.load(tmp_path / "optimum", intra_op_threads=1)
    fused = reference.ReferenceSession.load(tmp_path / "gqa", intra_op_threads=1)
    assert fused.share_buffer and not optimum.share_buffer
    assert "position_ids" not in fused.input_dtypes  # GroupQueryAttention derives positions from the mask
    prompts = [[5, 9, 200, 31, 8], [7, 7, 7, 7, 7], [100, 3, 64, 1, 2]]  # equal lengths: no padding
    expected = reference.greedy(optimum, prompts, 8).tokens
    assert reference.greedy(fused, prompts, 8).tokens == expected
    assert reference.greedy(dataclasses.replace(fused, share_buffer=False), prompts, 8).tokens == expected
    assert reference.greedy(fused, prompts[:1], 8).tokens == expected[:1]
