"""benchmarks/llm_throughput.py: its pairing of timed rounds, and a whole run with a tiny model."""

from __future__ import annotations

import functools
import json

from conftest import REPO, load_benchmark

# "An older scoring module" as the docstring's recipe gets one: here the current one, by path.
OLD_SCORING = REPO / "src" / "delrec" / "llm" / "scoring.py"


def test_rates_are_each_sides_best_round_and_the_ratio_the_median_of_paired_rounds(monkeypatch):
    script = load_benchmark("llm_throughput")
    # ours, plain, ours, plain, ...: the machine is twice as slow in round 2, for both sides alike
    clock = iter([1.0, 10.0, 2.0, 20.0, 1.0, 40.0])
    monkeypatch.setattr(script, "seconds", lambda fn: next(clock))
    ours, plain, ratio = script.paired_rates(lambda: None, 4, lambda: None, 1, rounds=3)
    assert (ours, plain) == (4.0, 0.1)
    # rounds' ratios 40, 40, 160: a slow round moves neither the median nor a side's best
    assert ratio == 40.0


def test_a_tiny_run_writes_the_issues_figures_with_scores_equal_to_plain(
    synthetic_dir, tmp_path, monkeypatch
):
    script = load_benchmark("llm_throughput")
    # The peak is measured as the script does, on a smaller product (4096-square took ~15 s of the test).
    monkeypatch.setattr(script, "matmul_peak_tflops", functools.partial(script.matmul_peak_tflops, size=256))
    out = tmp_path / "tp.json"
    summary = script.main(
        ["--data", str(synthetic_dir), "--backbone", "tiny-llama", "--no-bf16", "--score-examples", "4",
         "--score-batch-size", "2", "--rounds", "1", "--json", str(out), "--old-scoring", str(OLD_SCORING)]
    )  # fmt: skip
    asked = ("scoring_examples_per_s", "training_examples_per_s", "scoring_ratio_vs_plain")
    asked += ("training_ratio_vs_plain", "achieved_tflops", "scoring_ratio_vs_old", "training_ratio_vs_old")
    assert all(summary[key] > 0 for key in asked)
    assert json.loads(out.read_text()) == summary
    # fp32 on any CPU (with bf16 autocast the two sides round differently, ~1e-2): the same scores
    assert summary["bf16"] is False and summary["matmul_peak_dtype"] == "float32"
    assert summary["max_abs_diff"] < 1e-4
