"""Item popularity: the baseline ranking, and the prior a fine-tuned LLM's candidate scores can take.

The prior adds ``weight x log(1 + training interactions of the candidate)`` to each candidate's LLM score.
Its one weight is fitted after stage 2 on validation examples, by the likelihood of their targets (as
temperature scaling is): the LLM ranks by what a title and a history say, the prior by what everyone
consumed, and on ML-100K the two disagree often enough that their sum ranks better than either.
"""

from __future__ import annotations

import numpy as np

from delrec.data import Dataset

MAX_WEIGHT = 20.0
"""the largest prior weight fitted: log counts span about 0-7, LLM scores a few nats"""


def item_counts(dataset: Dataset) -> np.ndarray:
    """Training interactions of every item (index = item id; index 0, padding, is 0)."""
    seen = [seq for seq in dataset.train_sequences if len(seq)]
    items = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    return np.bincount(items, minlength=dataset.num_items + 1)


def log_counts(dataset: Dataset) -> np.ndarray:
    """``log(1 + training interactions)`` of every item id: the prior's feature."""
    return np.log1p(item_counts(dataset).astype(np.float64))


def with_prior(scores: np.ndarray, candidates: np.ndarray, logc: np.ndarray, weight: float) -> np.ndarray:
    """``scores`` (examples, K) of ``candidates`` (item ids, same shape) plus ``weight`` x their log counts."""
    if weight == 0:
        return scores
    return (scores + weight * logc[candidates]).astype(scores.dtype)


def _target_nll(scores: np.ndarray, answers: np.ndarray) -> float:
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_z - shifted[np.arange(len(scores)), answers]))


def fit_prior_weight(
    scores: np.ndarray, candidates: np.ndarray, answers: np.ndarray, logc: np.ndarray
) -> float:
    """The weight in [0, MAX_WEIGHT] that minimises the targets' mean negative log-likelihood under a
    softmax over each example's candidates (``answers``: the target's column). The loss is convex in the
    weight, so a golden-section search finds it; no examples: 0."""
    if not len(scores):
        return 0.0
    feature = logc[candidates]
    scores = scores.astype(np.float64)

    def loss(weight: float) -> float:
        return _target_nll(scores + weight * feature, answers)

    ratio = (np.sqrt(5) - 1) / 2
    lo, hi = 0.0, MAX_WEIGHT
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-4:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    weight = (lo + hi) / 2
    return weight if loss(weight) < loss(0.0) else 0.0
