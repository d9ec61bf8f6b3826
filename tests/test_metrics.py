import numpy as np
import pytest

from delrec.metrics import (
    bootstrap_intervals,
    metrics_from_ranks,
    paired_bootstrap,
    seed_paired_bootstrap,
    target_ranks,
)


def test_ranks_break_ties_against_the_target():
    scores = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    assert target_ranks(scores, np.array([1, 0, 2])).tolist() == [0, 2, 2]


def test_metrics_by_hand():
    m = metrics_from_ranks(np.array([0, 1, 4, 12]), ks=(1, 5, 10))
    assert m["HR@1"] == 0.25
    assert m["HR@5"] == 0.75
    assert m["NDCG@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4)


def test_bootstrap_interval_contains_the_estimate():
    ranks = np.random.default_rng(0).integers(0, 20, size=500)
    point = metrics_from_ranks(ranks)
    for name, (lo, hi) in bootstrap_intervals(ranks, samples=200).items():
        assert lo <= point[name] <= hi
        assert hi - lo < 0.2


def test_a_nan_or_minus_inf_target_score_ranks_last():
    scores = np.array(
        [[np.nan, 0.1, 0.2], [-np.inf, -np.inf, -np.inf], [np.nan, np.nan, np.nan], [-np.inf, 1.0, 2.0]]
    )
    assert target_ranks(scores, np.zeros(4, dtype=int)).tolist() == [2, 2, 2, 2]


def test_nan_scores_of_other_candidates_count_against_the_target():
    scores = np.array([[1.0, np.nan, np.nan], [5.0, 1.0, np.nan], [5.0, 1.0, 2.0]])
    assert target_ranks(scores, np.zeros(3, dtype=int)).tolist() == [2, 1, 0]
    assert metrics_from_ranks(target_ranks(scores[:2], np.zeros(2, dtype=int)))["HR@1"] == 0.0


def test_integer_scores_rank_like_floats():
    counts = np.array([[3, 7, 7, 1]])
    assert target_ranks(counts, np.array([1])).tolist() == [1]
    assert target_ranks(counts.astype(float), np.array([1])).tolist() == [1]


def test_paired_bootstrap_of_identical_rankers_is_exactly_zero():
    ranks = np.random.default_rng(1).integers(0, 20, size=300)
    for name, cell in paired_bootstrap(ranks, ranks.copy(), samples=500).items():
        assert cell == {"diff": 0.0, "lo": 0.0, "hi": 0.0}, name


def test_paired_bootstrap_finds_a_clearly_better_ranker():
    rng = np.random.default_rng(2)
    worse = rng.integers(0, 20, size=400)
    better = np.maximum(worse - rng.integers(0, 6, size=400), 0)  # never worse, often better
    paired = paired_bootstrap(better, worse, samples=1000)
    for name in ("HR@1", "HR@5", "NDCG@10", "MRR"):
        assert 0 < paired[name]["lo"] <= paired[name]["diff"] <= paired[name]["hi"], name


def test_pairing_tells_a_small_gain_the_separate_intervals_miss():
    worse = np.random.default_rng(5).integers(0, 20, size=400)
    better = worse.copy()
    better[np.flatnonzero(worse > 0)[:12]] = 0  # 12 of 400 users gain a hit, nobody loses one
    assert bootstrap_intervals(better)["HR@1"][0] < bootstrap_intervals(worse)["HR@1"][1]  # overlap
    assert paired_bootstrap(better, worse)["HR@1"]["lo"] > 0


def _slow_paired(ranks_a, ranks_b, samples, seed, level=0.95):
    """The textbook loop: resample users, compute both models' metrics on them, take percentiles."""
    n = len(ranks_a)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    draws = np.concatenate(
        [rng.integers(0, n, size=(min(chunk, samples - s), n)) for s in range(0, samples, chunk)]
    )
    diffs = {}
    for idx in draws:
        a, b = metrics_from_ranks(ranks_a[idx]), metrics_from_ranks(ranks_b[idx])
        for name in a:
            diffs.setdefault(name, []).append(a[name] - b[name])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {name: tuple(np.percentile(v, q)) for name, v in diffs.items()}


def test_paired_bootstrap_matches_a_slow_reference():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 20, size=150), rng.integers(0, 20, size=150)
    fast = paired_bootstrap(a, b, samples=300, seed=7)
    point_a, point_b = metrics_from_ranks(a), metrics_from_ranks(b)
    for name, (lo, hi) in _slow_paired(a, b, 300, 7).items():
        assert fast[name]["lo"] == pytest.approx(lo, abs=1e-12)
        assert fast[name]["hi"] == pytest.approx(hi, abs=1e-12)
        assert fast[name]["diff"] == pytest.approx(point_a[name] - point_b[name], abs=1e-12)


def test_paired_bootstrap_refuses_different_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def test_a_run_repeated_as_seeds_adds_no_seed_spread():
    # One seed is paired_bootstrap itself (checked against the textbook loop above); the same run repeated
    # as two seeds has no spread between seeds to add, so it must give the textbook interval too.
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 20, size=150), rng.integers(0, 20, size=150)
    repeated = seed_paired_bootstrap(np.stack([a, a]), np.stack([b, b]), samples=300, seed=7)
    point_a, point_b = metrics_from_ranks(a), metrics_from_ranks(b)
    for name, (lo, hi) in _slow_paired(a, b, 300, 7).items():
        assert repeated[name]["lo"] == pytest.approx(lo, abs=1e-12)
        assert repeated[name]["hi"] == pytest.approx(hi, abs=1e-12)
        assert repeated[name]["diff"] == pytest.approx(point_a[name] - point_b[name], abs=1e-12)


def test_the_seed_bootstrap_widens_the_interval_by_the_seeds_disagreement():
    # Seed 1: A beats B on every user; seed 2: A and B tie. Users agree perfectly within a seed, so the
    # user-only interval of the mean would be the point +0.5; resampling the two seeds gives 0, 0.5 or 1.
    a = np.array([[0] * 50, [3] * 50])
    b = np.array([[3] * 50, [3] * 50])
    hr1 = seed_paired_bootstrap(a, b, samples=2000)["HR@1"]
    assert hr1["diff"] == pytest.approx(0.5)
    assert (hr1["lo"], hr1["hi"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="same seeds and examples"):
        seed_paired_bootstrap(a, b[:1])
