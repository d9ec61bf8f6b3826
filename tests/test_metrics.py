import numpy as np
import pytest

from delrec.metrics import bootstrap_intervals, metrics_from_ranks, target_ranks


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
