"""The whole DELRec flow on MovieLens-100K with SmolLM2-135M on this CPU: does the LLM learn?

preprocess -> SASRec teacher -> distill (stage 1) -> finetune with the soft prompt (DELRec) and without
(ablation) -> evaluate on every test user (943): DELRec, ablation, untuned LLM, teacher and popularity
on the same 20 candidates, HR@1/5/10, NDCG@5/10, MRR with 95% bootstrap intervals, and DELRec minus
each other model with a paired bootstrap interval. The report (``WORK/eval/report.md``) draws the
learning curves of distill's two tasks and both finetunes (``curves.png``).

    .venv/bin/python benchmarks/delrec_ml100k.py --work /tmp/b --json /tmp/b/figures.json

Stage configs are the ``ml-100k`` preset's (with its popularity prior, fitted after training and added in
the training loss), with the step counts below (AdaLoRA's pruning keeps the preset's absolute steps, tinit
26 and tfinal 7: at 100 steps it runs from step 26 to 93), two evaluation points per training stage past
step 0, no whole-catalogue rerank (``--set evaluate.rerank_k=20`` adds it), and titles that keep their year
(the preset drops it to fit ``make run`` in 20 minutes at some cost in quality). On a 2-core AMD EPYC with
AVX-512 bf16 these defaults took about 85 minutes and gave DELRec HR@1 0.316, its ablation 0.265 and
popularity 0.235; over four stage-2 seeds (``--set finetune.seed=N``, compared by ``benchmarks/seeds.py``)
DELRec 0.309-0.326 and the ablation 0.265-0.312. A CPU with AVX2 only runs the LLM in fp32 and takes about
twice as long. See docs/results.md.

``--set evaluate.prompt_only=true`` also scores the untuned LLM with the soft prompt, paired against the
untuned LLM: what stage 1 alone carries into the LLM (one more model to score, about 12 minutes).

Outputs of finished stages in ``--work`` are reused, so a second run only redoes what is missing (delete
the folder for a fresh run). A stage's output is reused only if it was made with the config and from the
inputs this run asks for: one made otherwise (say, another ``--set finetune.seed``) stops the run with an
error naming the field, and nothing is replaced. To vary stage 2 only, copy ``data``, ``teacher`` and
``distill`` into a new ``--work``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from delrec import layout
from delrec.artifacts import check_reusable
from delrec.config import load_preset, parse_assignments
from delrec.data import PreprocessConfig, preprocess
from delrec.distill import DistillConfig, distill
from delrec.errors import DelrecError
from delrec.evaluate import LABELS, REPORTED, EvaluateConfig, comparison_label, evaluate
from delrec.finetune import FinetuneConfig, finetune, recorded_inputs
from delrec.teachers import TeacherConfig, train_teacher

SHARED_ML100K = Path(__file__).resolve().parents[2] / "shared/datasets/ml-100k"


def run_stage(name: str, out: Path, fn, *, producer: str, config: dict, inputs: dict) -> float | None:
    """Run a stage unless its output is in place; its seconds, or None for a reused (untimed) one.

    An output is reused only if it was made with this config from these inputs; one made otherwise
    stops the run with an error that names the differing field, and is left as it is.
    """
    if (out / "manifest.json").is_file():
        check_reusable(out, producer=producer, config=config, inputs=inputs)
        print(f"[{name}] reusing {out}")
        return None
    start = time.time()
    fn()
    seconds = time.time() - start
    print(f"[{name}] {seconds:.0f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(SHARED_ML100K), help="raw ML-100K folder (u.data, u.item)")
    parser.add_argument("--work", default="/tmp/delrec-ml100k", help="folder for the stages' outputs")
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=None, help="test users scored (default: all)")
    parser.add_argument("--valid-examples", type=int, default=100, help="validation examples per evaluation")
    parser.add_argument("--evals", type=int, default=2, help="evaluation points per training stage")
    parser.add_argument("--set", action="append", default=[], help="SECTION.FIELD=VALUE preset override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures (metrics, intervals, times) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    preset = load_preset("ml-100k")
    for section in ("distill", "finetune"):
        preset[section]["title_years"] = True
    preset["evaluate"]["rerank_k"] = 0  # the whole-catalogue rerank: --set evaluate.rerank_k=20
    for key, value in parse_assignments(args.set).items():
        section, _, field = key.partition(".")
        preset.setdefault(section, {})[field] = value
    work = Path(args.work)

    def plan(section: str, steps: int) -> dict:
        return {
            **preset[section],
            "steps": steps,
            "eval_every": max(1, steps // args.evals),
            "eval_examples": args.valid_examples,
        }

    d_cfg = DistillConfig.from_dict(plan("distill", args.distill_steps))
    f_cfg = FinetuneConfig.from_dict(plan("finetune", args.finetune_steps))
    e_cfg = EvaluateConfig.from_dict({**preset["evaluate"], "max_examples": args.eval_examples})
    t_cfg = TeacherConfig.from_dict(preset["teacher"])
    print(
        json.dumps(
            {"distill": d_cfg.model_dump(), "finetune": f_cfg.model_dump(), "evaluate": e_cfg.model_dump()}
        )
    )

    started = time.time()
    times = {}
    data, teacher, soft = work / "data", work / "teacher", work / "distill"
    delrec_dir, ablation_dir, eval_dir = work / "delrec", work / "ablation", work / "eval"
    source = Path(args.source)  # absolute, so that reuse compares the folder, not how it was spelt
    source = str(source.resolve()) if source.exists() else args.source
    p_cfg = PreprocessConfig.from_dict({**preset["preprocess"], "source": source})
    times["preprocess"] = run_stage(
        "preprocess",
        data,
        lambda: preprocess(p_cfg, data),
        producer=layout.PREPROCESS,
        config=p_cfg.model_dump(mode="json"),
        inputs={},
    )
    times["teacher"] = run_stage(
        "teacher",
        teacher,
        lambda: train_teacher(data, t_cfg, teacher),
        producer=layout.TRAIN_TEACHER,
        config=t_cfg.model_dump(mode="json"),
        inputs={"dataset": data},
    )
    times["distill"] = run_stage(
        "distill",
        soft,
        lambda: distill(data, teacher, d_cfg, soft),
        producer=layout.DISTILL,
        config=d_cfg.model_dump(mode="json"),
        inputs={"dataset": data, "teacher": teacher},
    )
    times["finetune"] = run_stage(
        "finetune",
        delrec_dir,
        lambda: finetune(data, f_cfg, delrec_dir, distill_dir=soft, teacher_dir=teacher),
        producer=layout.FINETUNE,
        config=f_cfg.model_dump(mode="json"),
        inputs=recorded_inputs(f_cfg, data, soft, teacher),
    )
    times["ablation"] = run_stage(
        "ablation",
        ablation_dir,
        lambda: finetune(data, f_cfg, ablation_dir, teacher_dir=teacher),
        producer=layout.FINETUNE,
        config=f_cfg.model_dump(mode="json"),
        inputs=recorded_inputs(f_cfg, data, teacher_dir=teacher),
    )
    times["evaluate"] = run_stage(
        "evaluate",
        eval_dir,
        lambda: evaluate(data, teacher, e_cfg, eval_dir, delrec_dir, ablation_dir, distill_dir=soft),
        producer=layout.EVALUATE,
        config=e_cfg.model_dump(mode="json"),
        inputs={
            "dataset": data,
            "teacher": teacher,
            "delrec": delrec_dir,
            "ablation": ablation_dir,
            "distill": soft,
        },
    )
    total = time.time() - started
    results = json.loads((eval_dir / "metrics.json").read_text())
    print(f"\nML-100K, test split, {results['meta']['examples']} examples, 20 candidates, SmolLM2-135M")
    print(f"{'model':<26}" + "".join(f"{m:>22}" for m in REPORTED))
    for model, res in results["models"].items():
        cells = "".join(
            f"{res['metrics'][m]:>9.4f} [{res['ci95'][m][0]:.3f},{res['ci95'][m][1]:.3f}]" for m in REPORTED
        )
        print(f"{LABELS.get(model, model):<26}{cells}")
    print("\nPaired differences, bootstrap 95% interval")
    for comparison, cells in results["paired"].items():
        row = "".join(
            f"{c['diff']:>+9.4f} [{c['lo']:+.3f},{c['hi']:+.3f}]" for c in (cells[m] for m in REPORTED)
        )
        print(f"{comparison_label(comparison):<38}{row}")
    stage_metrics = {
        name: json.loads((work / name / "metrics.json").read_text())
        for name in ("distill", "delrec", "ablation")
    }
    figures = {
        "examples": results["meta"]["examples"],
        "models": results["models"],
        "paired": results["paired"],
        # None: the stage's output was reused from an earlier run, so this run did not time it.
        "stage_seconds": {k: None if v is None else round(v) for k, v in times.items()},
        "total_s": round(total),
        "reused_stages": [k for k, v in times.items() if v is None],
        "stage_metrics": stage_metrics,
        "report": str(eval_dir / "report.md"),
        "curves_png": str(eval_dir / "curves.png"),
    }
    print(json.dumps({k: figures[k] for k in ("stage_seconds", "total_s", "stage_metrics")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    try:
        main()
    except DelrecError as exc:
        sys.exit(f"error: {exc}")
