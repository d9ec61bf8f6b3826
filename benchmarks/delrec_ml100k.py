"""The whole DELRec flow on MovieLens-100K with SmolLM2-135M on this CPU, within a stated time budget.

preprocess -> SASRec teacher -> distill (stage 1) -> finetune with soft prompt (DELRec) and without
(ablation) -> evaluate, using the ``ml-100k`` preset's sections with step counts scaled to the budget.
Prints per-stage wall times and the DELRec vs teacher vs ablation vs zero-shot table (test split,
20 candidates, 95% bootstrap intervals). Outputs of finished stages in ``--work`` are reused, so a
second run only redoes what is missing (delete the folder for a fresh run).

    .venv/bin/python benchmarks/delrec_ml100k.py --budget-minutes 45
    .venv/bin/python benchmarks/delrec_ml100k.py --distill-steps 60 --finetune-steps 60 --eval-examples 300

The budget is split as: teacher 10%, distill 25%, each finetune 20%, evaluate 25%; the step counts
and evaluated examples come from the per-item costs measured on this machine (2 threads, bf16
autocast, on a busy machine), unless given explicitly.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from delrec.config import load_preset
from delrec.data import PreprocessConfig, preprocess
from delrec.distill import DistillConfig, distill
from delrec.evaluate import LABELS, REPORTED, EvaluateConfig, evaluate
from delrec.finetune import FinetuneConfig, finetune
from delrec.teachers import TeacherConfig, train_teacher

# Seconds per unit measured in this project's session on the shared 2-core machine (load ~7; SmolLM2-135M,
# bf16 autocast, 2 threads, 100 soft tokens, 10 history items): one TA+RPS instance pair of a distill
# step, one finetune instance, one evaluated example per LLM. An idle machine is roughly 10x faster:
# pass explicit step counts there.
COST_DISTILL_PAIR = 60.0
COST_FINETUNE_INSTANCE = 24.0
COST_EVAL_EXAMPLE = 8.0


def run_stage(name: str, out: Path, fn) -> float:
    if (out / "manifest.json").is_file():
        print(f"[{name}] reusing {out}")
        return 0.0
    start = time.time()
    fn()
    seconds = time.time() - start
    print(f"[{name}] {seconds:.0f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/ml-100k")
    )
    parser.add_argument("--work", default="/tmp/delrec-ml100k", help="folder for the stages' outputs")
    parser.add_argument("--budget-minutes", type=float, default=45.0)
    parser.add_argument("--distill-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    parser.add_argument("--eval-examples", type=int)
    parser.add_argument("--batch-size", type=int, help="distill/finetune batch size (default: the preset's)")
    parser.add_argument(
        "--valid-examples", type=int, help="validation examples of distill/finetune (default: preset's)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    preset = load_preset("ml-100k")
    budget = args.budget_minutes * 60
    work = Path(args.work)
    batch = {"batch_size": args.batch_size} if args.batch_size else {}
    if args.valid_examples:
        batch["eval_examples"] = args.valid_examples
    d_cfg = DistillConfig.from_dict({**preset["distill"], **batch})
    f_cfg = FinetuneConfig.from_dict({**preset["finetune"], **batch})
    e_cfg = EvaluateConfig.from_dict(preset["evaluate"])
    d_steps = args.distill_steps or max(4, int(0.25 * budget / (COST_DISTILL_PAIR * d_cfg.batch_size)))
    f_steps = args.finetune_steps or max(8, int(0.20 * budget / (COST_FINETUNE_INSTANCE * f_cfg.batch_size)))
    n_eval = args.eval_examples or max(50, int(0.25 * budget / (3 * COST_EVAL_EXAMPLE)))
    d_cfg = d_cfg.model_copy(
        update={"steps": d_steps, "warmup_steps": max(1, d_steps // 5), "eval_every": d_steps}
    )
    f_cfg = f_cfg.model_copy(
        update={"steps": f_steps, "warmup_steps": max(1, f_steps // 5), "eval_every": f_steps}
    )
    e_cfg = e_cfg.model_copy(update={"max_examples": n_eval})
    t_cfg = TeacherConfig.from_dict({**preset["teacher"], "time_budget_s": 0.10 * budget})
    plan = {
        "budget_s": budget,
        "distill_steps": d_steps,
        "finetune_steps": f_steps,
        "eval_examples": n_eval,
        "threads": args.threads,
    }
    print(json.dumps(plan))

    started = time.time()
    times = {}
    data, teacher = work / "data", work / "teacher"
    times["preprocess"] = run_stage(
        "preprocess",
        data,
        lambda: preprocess(PreprocessConfig.from_dict({**preset["preprocess"], "source": args.source}), data),
    )
    times["teacher"] = run_stage("teacher", teacher, lambda: train_teacher(data, t_cfg, teacher))
    times["distill"] = run_stage(
        "distill", work / "distill", lambda: distill(data, teacher, d_cfg, work / "distill")
    )
    times["finetune"] = run_stage(
        "finetune",
        work / "delrec",
        lambda: finetune(data, f_cfg, work / "delrec", distill_dir=work / "distill"),
    )
    times["ablation"] = run_stage(
        "ablation", work / "ablation", lambda: finetune(data, f_cfg, work / "ablation")
    )
    eval_dir = work / "eval"
    times["evaluate"] = run_stage(
        "evaluate",
        eval_dir,
        lambda: evaluate(data, teacher, e_cfg, eval_dir, work / "delrec", work / "ablation"),
    )
    total = time.time() - started
    results = json.loads((eval_dir / "metrics.json").read_text())
    print(f"\nML-100K, test split, {results['meta']['examples']} examples, 20 candidates, SmolLM2-135M")
    print(f"{'model':<22}" + "".join(f"{m:>20}" for m in REPORTED))
    for model in [m for m in LABELS if m in results["models"]]:
        res = results["models"][model]
        cells = "".join(
            f"{res['metrics'][m]:>8.4f} [{res['ci95'][m][0]:.2f},{res['ci95'][m][1]:.2f}]" for m in REPORTED
        )
        print(f"{LABELS[model]:<22}{cells}")
    print(
        json.dumps(
            {
                "stage_seconds": {k: round(v) for k, v in times.items()},
                "total_s": round(total),
                "budget_s": budget,
            }
        )
    )
    for name in ("distill", "delrec", "ablation"):
        print(name, json.dumps(json.loads((work / name / "metrics.json").read_text())))


if __name__ == "__main__":
    main()
