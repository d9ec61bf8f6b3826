"""``delrec distill``, ``delrec finetune``, ``delrec evaluate`` and ``delrec recommend``."""

from __future__ import annotations

import argparse
import json

from delrec.config import load_preset, parse_assignments

# Common command-line options -> config fields (None falls back to the preset, then the default).
_COMMON = ("backbone", "device", "steps", "batch_size", "lr", "seed")


def _config(cls, section: str, args: argparse.Namespace):
    preset = load_preset(args.preset).get(section, {}) if args.preset else {}
    overrides = {k: getattr(args, k) for k in _COMMON if getattr(args, k, None) is not None}
    if args.no_bf16:
        overrides["bf16"] = False
    return cls.from_dict(
        {**preset, **overrides, **parse_assignments(args.set)}, source=args.preset or "command line"
    )


def _print(metrics: dict) -> None:
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


def _distill(args: argparse.Namespace) -> None:
    from delrec.distill import DistillConfig, distill

    _print(distill(args.data, args.teacher, _config(DistillConfig, "distill", args), args.out))


def _finetune(args: argparse.Namespace) -> None:
    from delrec.finetune import FinetuneConfig, finetune

    _print(finetune(args.data, _config(FinetuneConfig, "finetune", args), args.out, distill_dir=args.distill))


def _evaluate(args: argparse.Namespace) -> None:
    from delrec.evaluate import EvaluateConfig, evaluate

    config = _config(EvaluateConfig, "evaluate", args)
    _print(
        evaluate(
            args.data,
            args.teacher,
            config,
            args.out,
            args.delrec,
            ablation_dir=args.ablation,
            distill_dir=args.distill,
        )
    )


def _recommend(args: argparse.Namespace) -> None:
    from delrec.recommend import RecommendConfig, recommend

    extra = {"top_n": args.top_n, "retrieve_k": args.retrieve_k}
    extra = {k: v for k, v in extra.items() if v is not None}
    if args.users:
        extra["users"] = [u.strip() for u in args.users.split(",") if u.strip()]
    args.set = [*args.set, *(f"{k}={json.dumps(v)}" for k, v in extra.items())]
    _print(
        recommend(args.data, args.teacher, args.delrec, _config(RecommendConfig, "recommend", args), args.out)
    )


def _common(p: argparse.ArgumentParser, training: bool, seed: bool = True) -> None:
    p.add_argument("--data", required=True, help="Dataset folder (delrec preprocess)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--preset", help="configs/NAME.yaml (or a YAML path) whose section gives the defaults")
    p.add_argument(
        "--backbone", help="smollm2-135m | tiny-llama | tiny-t5 | saved folder | transformers id/path"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (fp32 throughout)")
    if seed:
        p.add_argument("--seed", type=int)
    if training:
        p.add_argument("--steps", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config field (YAML value)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "distill",
        help="stage 1: train the soft prompt on TA + RPS with the LLM frozen",
        description=(
            "Pattern distillation: the LLM is frozen and a soft prompt learns the teacher's pattern from "
            "two tasks (Temporal Analysis, Recommendation Pattern Simulating) built from the teacher's "
            "top-10. Lion, linear warm-up, GradNorm-like task weights. Resumes from OUT.partial/."
        ),
        epilog="example:\n  delrec distill --data data/ml-100k --teacher runs/sasrec --out runs/distill --preset ml-100k",
        formatter_class=fmt,
    )
    _common(p, training=True)
    p.add_argument("--teacher", required=True, help="teacher folder (delrec train-teacher)")
    p.set_defaults(handler=_distill)

    p = subparsers.add_parser(
        "finetune",
        help="stage 2: AdaLoRA fine-tuning with the frozen soft prompt (without --distill: the ablation)",
        description=(
            "Fine-tune the LLM with AdaLoRA (or LoRA) on the attention query/value projections, the soft "
            "prompt from --distill frozen in the prompt. Without --distill the same LLM is fine-tuned on the "
            "prompt without soft prompt (the ablation). Resumes from OUT.partial/."
        ),
        epilog=(
            "examples:\n  delrec finetune --data data/ml-100k --distill runs/distill --out runs/delrec --preset ml-100k\n"
            "  delrec finetune --data data/ml-100k --out runs/ablation --preset ml-100k"
        ),
        formatter_class=fmt,
    )
    _common(p, training=True)
    p.add_argument("--distill", help="distill folder (omit for the no-soft-prompt ablation)")
    p.set_defaults(handler=_finetune)

    p = subparsers.add_parser(
        "evaluate",
        help="DELRec vs teacher, popularity, ablation and untuned LLM on the same candidates, with a report",
        description=(
            "Rank the stored candidates of every test example with DELRec, the teacher, popularity, the "
            "ablation (if given) and the untuned LLM; HR@1/5/10, NDCG@5/10, MRR with 95% bootstrap "
            "intervals, and DELRec minus each other model with a paired bootstrap interval. Writes "
            "metrics.json, report.md (with learning curves), metrics.png, curves.png and ranks.parquet."
        ),
        epilog=(
            "example:\n  delrec evaluate --data data/ml-100k --teacher runs/sasrec --delrec runs/delrec "
            "--ablation runs/ablation --out runs/eval --preset ml-100k"
        ),
        formatter_class=fmt,
    )
    _common(p, training=False)
    p.add_argument("--teacher", required=True, help="teacher folder")
    p.add_argument("--delrec", required=True, help="finetune folder of DELRec (with soft prompt)")
    p.add_argument("--ablation", help="finetune folder of the no-soft-prompt ablation")
    p.add_argument("--distill", help="distill folder (only for its learning curves in the report)")
    p.set_defaults(handler=_evaluate)

    p = subparsers.add_parser(
        "recommend",
        help="the next items for every user: the teacher retrieves its top K, DELRec reranks them",
        description=(
            "For every user (or --users), the teacher scores every item after the user's whole known "
            "sequence, excluding items the user has; DELRec (the fine-tuned LLM with its soft prompt) scores "
            "the teacher's top K (default 20, the number of candidates it learnt to rank); the best N "
            "(default 10) are written to OUT/recommendations/part-*.parquet: user, rank, item_id, title, "
            "llm_score, teacher_rank. Users go in shards; a killed run resumes from OUT.partial/."
        ),
        epilog=(
            "example:\n  delrec recommend --data data/ml-100k --teacher runs/sasrec --delrec runs/delrec "
            "--out runs/recs --users 1,2,3"
        ),
        formatter_class=fmt,
    )
    _common(p, training=False, seed=False)
    p.add_argument("--teacher", required=True, help="teacher folder (delrec train-teacher)")
    p.add_argument("--delrec", required=True, help="finetune folder of DELRec (with soft prompt)")
    p.add_argument("--users", help="comma-separated raw user ids (default: every user)")
    p.add_argument("--top-n", type=int, help="recommendations per user (default 10)")
    p.add_argument("--retrieve-k", type=int, help="items the teacher retrieves per user (default 20)")
    p.set_defaults(handler=_recommend)
