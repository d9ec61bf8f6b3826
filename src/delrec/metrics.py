"""Ranking metrics shared by the teacher and evaluate stages: HR@k, NDCG@k, MRR, bootstrap intervals.

Every metric is computed from the 0-based rank of the target among the scored items (0 = top).
Ties are broken pessimistically (the target ranks after every item with an equal score), so a model
that gives all candidates the same score gets no credit.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def target_ranks(scores: np.ndarray | torch.Tensor, target_index: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of ``scores[i, target_index[i]]`` within row i (ties count against the target)."""
    scores = torch.as_tensor(scores)
    target_index = torch.as_tensor(target_index, device=scores.device).long()
    target_score = scores.gather(1, target_index[:, None])
    ranks = (scores >= target_score).sum(dim=1) - 1
    return ranks.cpu().numpy()


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """HR@k and NDCG@k for each k (NDCG@1 equals HR@1, so it is left out), MRR, and MRR@max(k)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    ks = sorted(set(ks))
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        if k > 1:
            out[f"NDCG@{k}"] = float((hit / np.log2(ranks + 2)).mean())
    out["MRR"] = float((1.0 / (ranks + 1)).mean())
    kmax = ks[-1]
    out[f"MRR@{kmax}"] = float(np.where(ranks < kmax, 1.0 / (ranks + 1), 0.0).mean())
    return out


def bootstrap_intervals(
    ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10), samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric of ``metrics_from_ranks`` (resampling examples)."""
    ranks = np.asarray(ranks)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ranks), size=(samples, len(ranks)))
    per_sample = [metrics_from_ranks(ranks[idx], ks) for idx in draws]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        name: (
            float(np.percentile([m[name] for m in per_sample], lo)),
            float(np.percentile([m[name] for m in per_sample], hi)),
        )
        for name in per_sample[0]
    }
