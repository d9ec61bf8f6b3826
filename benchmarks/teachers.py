"""Teacher quality and speed on MovieLens-100K against RecBole 1.2.1 (../shared/docs/anchors.md).

    .venv/bin/python benchmarks/teachers.py [--source PATH] [--models sasrec,gru4rec,caser] [--threads 2]
                                            [--set model.key=value ...] [--work DIR]

Preprocesses ../shared/datasets/ml-100k (leave-one-out), trains each teacher in its own process (so
peak memory is that model's alone) with the ml-100k preset's teacher section plus the per-model
settings below, and prints test HR@10 / NDCG@10 / MRR@10 (full ranking, history excluded), the epoch
of the best checkpoint, wall time to it, time per epoch (training + validation), peak RSS, and the
ratios to RecBole's figures. Targets: NDCG@10 >= RecBole's; time to best <= 1/5 of RecBole's.
RecBole's figures were measured on this machine with 2 torch threads and both cores mostly free;
timings here are noisy when other work shares the cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "datasets" / "ml-100k"

# RecBole 1.2.1, same protocol, this machine (anchors.md): test NDCG@10, HR@10, MRR@10, seconds to
# the best checkpoint, seconds per epoch, peak RSS in GB.
RECBOLE = {
    "sasrec": {
        "NDCG@10": 0.0609,
        "HR@10": 0.1251,
        "MRR@10": 0.0417,
        "to_best_s": 2084,
        "epoch_s": 112,
        "rss_gb": 3.8,
    },
    "gru4rec": {
        "NDCG@10": 0.0481,
        "HR@10": 0.1039,
        "MRR@10": 0.0312,
        "to_best_s": 576,
        "epoch_s": 30,
        "rss_gb": 1.4,
    },
    "caser": {
        "NDCG@10": 0.0674,
        "HR@10": 0.1410,
        "MRR@10": 0.0453,
        "to_best_s": 200,
        "epoch_s": 5.8,
        "rss_gb": 0.6,
    },
}

# Per-model settings on top of the preset's teacher section (chosen on validation NDCG@10 only).
MODEL_SETTINGS = {
    "sasrec": {},
    "gru4rec": {"lr": 0.003},
    "caser": {"caser_window": 5, "batch_size": 1024, "lr": 0.002, "dropout": 0.4, "bf16": True},
}


def teacher_config(model: str, overrides: dict) -> dict:
    section = yaml.safe_load((REPO / "configs" / "ml-100k.yaml").read_text()).get("teacher", {})
    return {**section, "model": model, **MODEL_SETTINGS[model], **overrides}


def child(args: argparse.Namespace) -> None:
    """Train one model in this process; print one JSON line."""
    import torch

    from delrec.teachers import TeacherConfig, train_teacher

    torch.set_num_threads(args.threads)
    config = TeacherConfig.from_dict(json.loads(args.child_config), source="benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_teacher(args.data, config, Path(tmp) / "teacher")
        detail = json.loads((Path(tmp) / "teacher" / "metrics.json").read_text())
    print(
        "RESULT "
        + json.dumps(
            {
                "metrics": metrics,
                "config": config.model_dump(mode="json"),
                "threads": torch.get_num_threads(),
                "parameters": detail["parameters"],
                "stopped": detail["stopped"],
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            }
        ),
        flush=True,
    )


def parse_sets(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        model, _, field = key.partition(".")
        if model not in RECBOLE or not field:
            raise SystemExit(f"--set expects MODEL.KEY=VALUE with MODEL in {sorted(RECBOLE)}, got {item!r}")
        out.setdefault(model, {})[field] = yaml.safe_load(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="raw MovieLens-100K folder")
    parser.add_argument("--models", default="sasrec,gru4rec,caser")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (RecBole's figures: 2)")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE")
    parser.add_argument("--work", help="folder for the preprocessed dataset (default: a temporary one)")
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_config:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        child(args)
        return

    from delrec.data import PreprocessConfig, preprocess

    overrides = parse_sets(args.set)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.work or tmp) / "ml-100k-loo"
        if not (data / "manifest.json").is_file():
            preprocess(PreprocessConfig(dataset="ml-100k", source=args.source, split="loo"), data)
        print(
            f"dataset {data}; torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}", flush=True
        )
        results = {}
        for model in models:
            config = teacher_config(model, overrides.get(model, {}))
            print(f"== {model}: {json.dumps(config)}", flush=True)
            started = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--data",
                    str(data),
                    "--threads",
                    str(args.threads),
                    "--child-config",
                    json.dumps(config),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            results[model] = json.loads(line[len("RESULT ") :])
            results[model]["process_s"] = time.perf_counter() - started
            results[model]["load_avg"] = os.getloadavg()[0]

    print()
    header = (
        f"{'model':8} {'HR@10':>6} {'NDCG@10':>7} {'MRR@10':>6} {'RB NDCG':>7} {'ratio':>5} | {'best ep':>7} "
        f"{'epochs':>6} {'to best s':>9} {'RB s':>5} {'RB/ours':>7} {'s/epoch':>7} {'total s':>7} "
        f"{'RSS GB':>6} {'thr':>3} {'load':>4}"
    )
    print(header)
    print("-" * len(header))
    for model, r in results.items():
        m, rb = r["metrics"], RECBOLE[model]
        per_epoch = m["seconds_train"] / max(m["epochs"], 1)
        print(
            f"{model:8} {m['test_HR@10']:6.4f} {m['test_NDCG@10']:7.4f} {m['test_MRR@10']:6.4f} "
            f"{rb['NDCG@10']:7.4f} {m['test_NDCG@10'] / rb['NDCG@10']:5.2f} | {int(m['best_epoch']):7d} "
            f"{int(m['epochs']):6d} {m['seconds_to_best']:9.1f} {rb['to_best_s']:5d} "
            f"{rb['to_best_s'] / m['seconds_to_best']:7.1f} {per_epoch:7.2f} {m['seconds_total']:7.1f} "
            f"{r['peak_rss_gb']:6.2f} {r['threads']:3d} {r['load_avg']:4.1f}"
        )
    print()
    print(
        "HR/NDCG/MRR: test, full ranking over all items, the user's earlier items excluded (RecBole's protocol)."
    )
    print("to best s: training + validation wall time until the best checkpoint; total s: the whole stage")
    print("(data loading, training, final evaluation, top-k export for every train/valid/test example).")
    print("Targets: NDCG ratio >= 1 and RB/ours >= 5. load: 1-minute load average after the run (2 cores).")
    for model, r in results.items():
        m = r["metrics"]
        print(
            f"{model}: valid NDCG@10 {m['valid_NDCG@10']:.4f}; test on the 20 candidates HR@1 {m['test_cand_HR@1']:.4f} "
            f"HR@5 {m['test_cand_HR@5']:.4f} NDCG@5 {m['test_cand_NDCG@5']:.4f}; {r['parameters']} parameters; "
            f"stopped by {r['stopped']}; config {json.dumps(r['config'], sort_keys=True)}"
        )


if __name__ == "__main__":
    main()
