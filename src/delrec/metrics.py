"""Ranking metrics shared by the teacher and evaluate stages: HR@k, NDCG@k, MRR, bootstrap intervals.

Every metric is computed from the 0-based rank of the target among the scored items (0 = top).
Ties are broken pessimistically (the target ranks after every item with an equal score), so a model
that gives all candidates the same score gets no credit. A NaN or -inf target score ranks last, and
a NaN score of another item counts as beating the target: a broken score can never make a hit.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def target_ranks(scores: np.ndarray | torch.Tensor, target_index: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of ``scores[i, target_index[i]]`` within row i (ties and NaNs count against the target)."""
    scores = torch.as_tensor(scores)
    if not scores.is_floating_point():
        scores = scores.double()
    target_index = torch.as_tensor(target_index, device=scores.device).long()
    target_score = scores.gather(1, target_index[:, None])
    ranks = ((scores >= target_score) | scores.isnan()).sum(dim=1) - 1
    broken = (target_score.isnan() | (target_score == -torch.inf)).squeeze(1)
    ranks = torch.where(broken, scores.shape[1] - 1, ranks)
    return ranks.cpu().numpy()


def _per_example(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, np.ndarray]:
    """Each example's contribution to every metric of ``metrics_from_ranks`` (the metric is its mean)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    ks = sorted(set(ks))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = hit.astype(np.float64)
        if k > 1:
            out[f"NDCG@{k}"] = hit / np.log2(ranks + 2)
    out["MRR"] = 1.0 / (ranks + 1)
    kmax = ks[-1]
    out[f"MRR@{kmax}"] = np.where(ranks < kmax, 1.0 / (ranks + 1), 0.0)
    return out


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """HR@k and NDCG@k for each k (NDCG@1 equals HR@1, so it is left out), MRR, and MRR@max(k)."""
    return {name: float(values.mean()) for name, values in _per_example(ranks, ks).items()}


def _resampled_means(values: np.ndarray, samples: int, seed: int | list[int]) -> np.ndarray:
    """Means of the columns of ``values`` (examples x metrics) over ``samples`` bootstrap resamples.

    Each resample is a row of multiplicity counts, so all resamples are one matrix product.
    """
    n = len(values)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // max(n, 1))  # bounds memory at ~64 MB of draws however many users
    out = []
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        draws = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]
        counts = np.bincount(draws.ravel(), minlength=m * n).reshape(m, n)
        out.append(counts.astype(np.float64) @ values / n)
    return np.concatenate(out)


def _percentiles(means: np.ndarray, names: list[str], level: float) -> dict[str, tuple[float, float]]:
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=0)
    return {name: (float(lo[j]), float(hi[j])) for j, name in enumerate(names)}


def bootstrap_intervals(
    ranks: np.ndarray, ks: Iterable[int] = (1, 5, 10), samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric of ``metrics_from_ranks`` (resampling examples)."""
    per_example = _per_example(ranks, ks)
    names = list(per_example)
    means = _resampled_means(np.stack([per_example[m] for m in names], axis=1), samples, seed)
    return _percentiles(means, names, level)


def paired_bootstrap(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    ks: Iterable[int] = (1, 5, 10),
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Metric of A minus metric of B with a paired percentile bootstrap interval.

    ``ranks_a[i]`` and ``ranks_b[i]`` are the two models' ranks on the same example; each resample
    draws examples (users) once for both models, so the interval reflects the difference between
    the models, not the spread of the examples. Returns ``{metric: {"diff", "lo", "hi"}}``.
    """
    ranks_a, ranks_b = np.asarray(ranks_a), np.asarray(ranks_b)
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"paired ranks need the same examples, got {ranks_a.shape} and {ranks_b.shape}")
    return seed_paired_bootstrap(ranks_a[None], ranks_b[None], ks, samples, seed, level)


def seed_paired_bootstrap(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    ks: Iterable[int] = (1, 5, 10),
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Metric of A minus metric of B averaged over training seeds, with a two-level bootstrap interval.

    ``ranks_a[s, i]`` is the rank of model A trained with seed s on example i (likewise B; the same
    examples in every row). Each resample draws examples (the same ones for every seed and both models)
    and, independently, seeds with replacement, so the interval covers the spread of the examples and
    the seed-to-seed spread of training. With one seed it is :func:`paired_bootstrap`'s interval. With
    few seeds the seed part is narrowed (the bootstrap's variance of a mean of S draws is (S-1)/S of the
    true one), so read it beside the per-seed figures. Returns ``{metric: {"diff", "lo", "hi"}}``.
    """
    ranks_a, ranks_b = np.atleast_2d(ranks_a), np.atleast_2d(ranks_b)
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(
            f"paired ranks need the same seeds and examples, got {ranks_a.shape} and {ranks_b.shape}"
        )
    n_seeds, n_examples = ranks_a.shape
    a, b = _per_example(ranks_a.ravel(), ks), _per_example(ranks_b.ravel(), ks)
    names = list(a)
    # examples x (seeds x metrics): one resample of examples gives every seed's mean difference
    diffs = np.stack([(a[m] - b[m]).reshape(n_seeds, n_examples) for m in names], axis=2)
    diffs = diffs.transpose(1, 0, 2).reshape(n_examples, n_seeds * len(names))
    by_seed = _resampled_means(diffs, samples, seed).reshape(samples, n_seeds, len(names))
    # each resample's seed multiplicities / n_seeds: the resampled means of the identity's rows
    weights = _resampled_means(np.eye(n_seeds), samples, [seed, 1])
    intervals = _percentiles(np.einsum("bs,bsm->bm", weights, by_seed), names, level)
    means = diffs.mean(axis=0).reshape(n_seeds, len(names)).mean(axis=0)
    return {
        name: {"diff": float(means[j]), "lo": intervals[name][0], "hi": intervals[name][1]}
        for j, name in enumerate(names)
    }
