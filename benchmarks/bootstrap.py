"""How long evaluate's paired bootstrap takes for all 943 ML-100K test users, against the textbook loop
(resample users, compute both models' metrics, take percentiles) timed in the same run.

    PYTHONPATH=src .venv/bin/python benchmarks/bootstrap.py [--users 943] [--samples 10000] [--repeats 3]

Random ranks among 20 candidates stand in for two models' (the time does not depend on the values).
Prints each side's best wall time and the ratio. The aim: well under a second for 10,000 resamples.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from delrec.metrics import metrics_from_ranks, paired_bootstrap


def textbook(ranks_a: np.ndarray, ranks_b: np.ndarray, samples: int, seed: int) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {}
    for _ in range(samples):
        idx = rng.integers(0, len(ranks_a), size=len(ranks_a))
        a, b = metrics_from_ranks(ranks_a[idx]), metrics_from_ranks(ranks_b[idx])
        for name in a:
            diffs.setdefault(name, []).append(a[name] - b[name])
    return {name: tuple(np.percentile(v, [2.5, 97.5])) for name, v in diffs.items()}


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=943)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 20, size=args.users), rng.integers(0, 20, size=args.users)
    ours = best_seconds(lambda: paired_bootstrap(a, b, samples=args.samples), args.repeats)
    loop = best_seconds(lambda: textbook(a, b, args.samples, seed=0), args.repeats)
    print(f"paired bootstrap, {args.users} users, {args.samples} resamples, best of {args.repeats} each:")
    print(f"ours {ours:.3f} s; textbook loop {loop:.2f} s; ratio {loop / ours:.1f}x")


if __name__ == "__main__":
    main()
