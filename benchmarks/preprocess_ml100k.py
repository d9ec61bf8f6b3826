"""How long preprocessing MovieLens-100K takes (the issue's target: under 5 s on the 2-core machine).

    .venv/bin/python benchmarks/preprocess_ml100k.py [--source PATH] [--split loo|user] [--repeats 3]

Reads ../shared/datasets/ml-100k by default (or any local copy / URL given with --source), runs the
whole preprocess stage a few times into a temporary folder and prints each wall time, the median, and
its ratio to the 5 s target. Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from delrec.data import PreprocessConfig, preprocess

TARGET_S = 5.0
DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--split", choices=("loo", "user"), default="loo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = PreprocessConfig(dataset="ml-100k", source=args.source, split=args.split)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeats):
            started = time.perf_counter()
            stats = preprocess(config, Path(tmp) / f"run{run}")
            times.append(time.perf_counter() - started)
            print(f"run {run + 1}: {times[-1]:.2f} s")
    median = statistics.median(times)
    print(
        f"ML-100K ({args.split}): {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions, examples {stats['examples']}"
    )
    print(
        f"preprocess ML-100K: median {median:.2f} s over {len(times)} runs; target {TARGET_S:.0f} s; "
        f"ratio to target {median / TARGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
