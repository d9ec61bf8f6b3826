"""The popularity prior's weight, fitted by the likelihood of validation targets."""

from __future__ import annotations

import numpy as np
import pytest

from delrec.popularity import fit_prior_weight, with_prior


def _drawn(weight: float, examples: int = 4000, seed: int = 0):
    """LLM scores, candidates and targets drawn from softmax(scores + weight x log count)."""
    rng = np.random.default_rng(seed)
    logc = np.log1p(rng.integers(0, 300, size=101).astype(float))
    logc[0] = 0.0
    candidates = np.stack([rng.choice(np.arange(1, 101), size=20, replace=False) for _ in range(examples)])
    scores = rng.normal(size=(examples, 20)).astype(np.float32)
    logits = scores + weight * logc[candidates]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    answers = np.array([rng.choice(20, p=p) for p in probs])
    return scores, candidates, answers, logc


def test_the_fitted_weight_recovers_the_one_the_targets_were_drawn_with():
    assert fit_prior_weight(*_drawn(0.8)) == pytest.approx(0.8, abs=0.08)
    assert fit_prior_weight(*_drawn(2.5)) == pytest.approx(2.5, abs=0.2)


def test_a_prior_that_only_hurts_gets_weight_zero_and_leaves_the_scores():
    scores, candidates, answers, logc = _drawn(-1.0)
    assert fit_prior_weight(scores, candidates, answers, logc) == 0.0
    assert with_prior(scores, candidates, logc, 0.0) is scores
    assert fit_prior_weight(scores[:0], candidates[:0], answers[:0], logc) == 0.0


def test_the_prior_adds_the_weighted_log_count_of_each_candidate():
    scores = np.array([[0.5, -1.0]], dtype=np.float32)
    logc = np.log1p(np.array([0, 9, 99], dtype=float))
    moved = with_prior(scores, np.array([[2, 1]]), logc, 0.5)
    assert moved.dtype == np.float32
    np.testing.assert_allclose(moved, [[0.5 + 0.5 * np.log(100), -1.0 + 0.5 * np.log(10)]], rtol=1e-6)
