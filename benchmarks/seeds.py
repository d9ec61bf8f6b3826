"""DELRec against its ablation, popularity and teacher over several stage-2 training seeds.

    PYTHONPATH=src .venv/bin/python benchmarks/seeds.py W W7 W1 [--json OUT]

Each W is a ``benchmarks/delrec_ml100k.py --work`` folder, the runs differing only in ``finetune.seed``
(``--set finetune.seed=7 --set evaluate.zero_shot=false``, with W's data, teacher and distill folders
copied in so that they are reused). One run's paired interval covers the spread of the users, not of
training: on ML-100K two seeds gave DELRec - ablation +0.051 and +0.006 on HR@1 with the same soft prompt.

Prints each seed's HR@1 and paired differences, then their mean over the seeds with two intervals: a
two-level bootstrap (users and seeds resampled: :func:`delrec.metrics.seed_paired_bootstrap`), and
Student's t over the per-seed differences (each seed one draw of training, the users held fixed). With few
seeds the bootstrap narrows the seeds' part and the t interval is wide: a lead is shown only where both
clear 0. Refuses runs that differ in anything but the seed: the data, teacher and soft prompt (the
evaluation's inputs), the two finetunes' configs, the evaluation's config (``zero_shot`` and
``prompt_only`` aside: each only adds a model) and the test rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from delrec import layout
from delrec.artifacts import read_manifest, write_json_atomic
from delrec.errors import DelrecError
from delrec.metrics import metrics_from_ranks, paired_bootstrap, seed_paired_bootstrap

COMPARED = ("ablation", "popularity", "teacher")
REPORTED = ("HR@1", "HR@5", "NDCG@10", "MRR")
FINETUNES = ("delrec", "ablation")  # the benchmark's folders of the two finetunes
SAME_INPUTS = ("dataset", "teacher", "distill")


def load_run(work: Path) -> dict:
    """One run's seed, ranks and what must match across runs (with the manifest each part came from)."""
    eval_dir = work / "eval"
    evaluation = read_manifest(eval_dir, producer=layout.EVALUATE)
    must_match = {f"inputs.{name}": (eval_dir, evaluation[layout.M_INPUTS].get(name)) for name in SAME_INPUTS}
    for name, value in evaluation[layout.M_CONFIG].items():
        if name not in ("zero_shot", "prompt_only"):  # each only adds a model
            must_match[f"config.{name}"] = (eval_dir, value)
    seeds = set()
    for folder in FINETUNES:
        config = read_manifest(work / folder, producer=layout.FINETUNE)[layout.M_CONFIG]
        seeds.add(config["seed"])
        for name, value in config.items():
            if name != "seed":
                must_match[f"config.{name}"] = (work / folder, value)
    if len(seeds) != 1:
        raise DelrecError(
            f"the two finetunes were trained with different seeds {sorted(seeds)}", path=work, field="seed"
        )
    ranks = pq.read_table(eval_dir / layout.RANKS).to_pydict()
    return {"work": work, "seed": seeds.pop(), "must_match": must_match, "ranks": ranks}


def check_same_but_seed(runs: list[dict]) -> None:
    """Refuse runs that differ in anything the seed comparison holds fixed, naming file and field."""
    first = runs[0]
    seen = {first["seed"]: first["work"]}
    for run in runs[1:]:
        for field in first["must_match"].keys() | run["must_match"].keys():
            path, value = run["must_match"].get(field, (run["work"], None))
            expected = first["must_match"].get(field, (None, None))[1]
            if value != expected:
                raise DelrecError(
                    f"{value!r} here, {expected!r} in {first['work']}: the runs may differ only in the seed",
                    path=path,
                    field=field,
                )
        if run["ranks"]["row"] != first["ranks"]["row"]:
            raise DelrecError(
                f"other test rows than {first['work']}'s", path=run["work"] / "eval", field="row"
            )
        if run["seed"] in seen:
            raise DelrecError(f"the same seed as {seen[run['seed']]}", path=run["work"], field="seed")
        seen[run["seed"]] = run["work"]


def summarise(runs: list[dict], samples: int) -> dict:
    """Per seed: HR@1 of each model and DELRec's paired differences; over seeds: the mean differences."""
    ranks = {
        model: np.stack([np.asarray(run["ranks"][model]) for run in runs]) for model in ("delrec", *COMPARED)
    }
    per_seed = []
    for s, run in enumerate(runs):
        per_seed.append(
            {
                "seed": run["seed"],
                "work": str(run["work"]),
                "HR@1": {model: metrics_from_ranks(r[s])["HR@1"] for model, r in ranks.items()},
                "paired": {
                    model: paired_bootstrap(ranks["delrec"][s], ranks[model][s], samples=samples, seed=42)
                    for model in COMPARED
                },
            }
        )
    over_seeds = {
        model: seed_paired_bootstrap(ranks["delrec"], ranks[model], samples=samples, seed=42)
        for model in COMPARED
    }
    between_seeds = {
        model: {
            metric: t_interval([row["paired"][model][metric]["diff"] for row in per_seed])
            for metric in over_seeds[model]
        }
        for model in COMPARED
    }
    return {
        "examples": len(runs[0]["ranks"]["row"]),
        "per_seed": per_seed,
        "over_seeds": over_seeds,
        "between_seeds": between_seeds,
    }


# Student's t, 97.5% quantile, 1 to 30 degrees of freedom (beyond: a Cornish-Fisher expansion, error < 1e-4)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145)
T_975 += (2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048)
T_975 += (2.045, 2.042)


def t_interval(values: list[float]) -> dict[str, float]:
    """The mean of per-seed differences with a 95% Student t interval over the seeds, and their spread.

    It counts each seed as one draw of training and holds the users fixed, where the two-level bootstrap
    resamples both but narrows the seeds' part when they are few: read the two side by side.
    """
    df = len(values) - 1
    z = 1.959964
    t = (
        T_975[df - 1]
        if df <= len(T_975)
        else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    )
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = t * sd / np.sqrt(len(values))
    return {"diff": mean, "lo": mean - half, "hi": mean + half, "sd": sd}


def cell(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def print_summary(summary: dict) -> None:
    print(f"{summary['examples']} test examples; HR@1 per seed:")
    for row in summary["per_seed"]:
        hr1 = "  ".join(f"{model} {value:.3f}" for model, value in row["HR@1"].items())
        print(f"  seed {row['seed']:>5}: {hr1}")
    n = len(summary["per_seed"])
    means = [
        (f"mean of {n} seeds (users, seeds resampled)", "over_seeds"),
        (f"mean of {n} seeds (t over seeds)", "between_seeds"),
    ]
    for model in COMPARED:
        print(
            f"\n{'DELRec - ' + model + ', paired 95% interval':<46}" + "".join(f"{m:>24}" for m in REPORTED)
        )
        rows = [(f"seed {row['seed']}", row["paired"][model]) for row in summary["per_seed"]]
        rows += [(label, summary[key][model]) for label, key in means]
        for label, cells in rows:
            print(f"  {label:<44}" + "".join(f"{cell(cells[m]):>24}" for m in REPORTED))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("works", nargs="+", type=Path, help="benchmark --work folders, one per seed")
    parser.add_argument("--samples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if len(args.works) < 2:
        parser.error("give at least two run folders (one per seed)")
    runs = [load_run(work) for work in args.works]
    check_same_but_seed(runs)
    summary = summarise(runs, args.samples)
    print_summary(summary)
    if args.json:
        write_json_atomic(args.json, summary)
    return summary


if __name__ == "__main__":
    try:
        main()
    except DelrecError as exc:
        sys.exit(f"error: {exc}")
