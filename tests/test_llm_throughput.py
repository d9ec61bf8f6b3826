"""benchmarks/llm_throughput.py: its pairing of timed rounds, and a whole run with a tiny model."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_rates_are_each_sides_best_round_and_the_ratio_the_median_of_paired_rounds(monkeypatch):
    script = load_benchmark("llm_throughput")
    # ours, plain, ours, plain, ...: the machine is twice as slow in round 2, for both sides alike
    clock = iter([1.0, 10.0, 2.0, 20.0, 1.0, 40.0])
    monkeypatch.setattr(script, "seconds", lambda fn: next(clock))
    ours, plain, ratio = script.paired_rates(lambda: None, 4, lambda: None, 1, rounds=3)
    assert (ours, plain) == (4.0, 0.1)
    # rounds' ratios 40, 40, 160: a slow round moves neither the median nor a side's best
    assert ratio == 40.0


def test_a_tiny_run_writes_the_issues_figures_with_scores_equal_to_plain(synthetic_dir, tmp_path):
    out = tmp_path / "tp.json"
    summary = load_benchmark("llm_throughput").main(
        ["--data", str(synthetic_dir), "--backbone", "tiny-llama", "--score-examples", "4", "--score-batch-size", "2", "--rounds", "1",
         "--json", str(out)]
    )  # fmt: skip
    asked = ("scoring_examples_per_s", "training_examples_per_s", "scoring_ratio_vs_plain")
    asked += ("training_ratio_vs_plain", "achieved_tflops")
    assert all(summary[key] > 0 for key in asked)
    assert json.loads(out.read_text()) == summary
    assert summary["max_abs_diff"] < 1e-4  # fp32: ours and the plain loop give the same scores
    # one round: the ratio is that round's rates' quotient
    quotient = summary["training_examples_per_s"] / summary["plain_training_examples_per_s"]
    assert abs(summary["training_ratio_vs_plain"] - quotient) < 1e-3 * quotient
