"""``delrec distill``, ``delrec finetune``, ``delrec evaluate`` and ``delrec recommend``.

A stage's config is built from, each overriding the one before: the config class's defaults, the
``--preset`` file's section of the stage, the ``--config`` file (the stage's whole config dict, as the
pipeline passes it), the named options (``--steps``, ``--lr``, ...), and ``--set KEY=VALUE``. The
training stages and evaluate run data-parallel under torchrun (see :mod:`delrec.distributed`).
"""

from __future__ import annotations

import argparse
import json
import os

from delrec.config import layers_named, load_config_file, load_preset, parse_assignments

# Common command-line options -> config fields (None falls back to the preset, then the default).
_COMMON = ("backbone", "device", "steps", "batch_size", "lr", "seed")


def _config(cls, section: str, args: argparse.Namespace, fields: tuple[str, ...] | None = None):
    """defaults < --preset's section (only ``fields`` of it, if given) < --config < named options < --set
    (see the module doc)."""
    preset = load_preset(args.preset).get(section, {}) if args.preset else {}
    if fields is not None:
        preset = {k: v for k, v in preset.items() if k in fields}
    from_file = load_config_file(args.config) if args.config else {}
    overrides = {k: getattr(args, k) for k in _COMMON if getattr(args, k, None) is not None}
    if args.no_bf16:
        overrides["bf16"] = False
    assigned = parse_assignments(args.set)
    return cls.from_dict(
        {**preset, **from_file, **overrides, **assigned},
        source=layers_named(args.preset, args.config, bool(overrides or assigned)),
    )


def _checkpoint(args: argparse.Namespace) -> str | None:
    """--checkpoint, else the pipeline's object-store workspace from the environment, else OUT.partial."""
    from delrec.checkpoints import location_from_env

    return args.checkpoint or location_from_env()


def _print(metrics: dict) -> None:
    """The stage's metrics as one JSON line; under torchrun by rank 0 only (every rank has the same)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


def _distill(args: argparse.Namespace) -> None:
    from delrec.distill import DistillConfig, distill

    config = _config(DistillConfig, "distill", args)
    _print(distill(args.data, args.teacher, config, args.out, checkpoint=_checkpoint(args)))


def _finetune(args: argparse.Namespace) -> None:
    from delrec.finetune import FinetuneConfig, finetune

    config = _config(FinetuneConfig, "finetune", args)
    _print(
        finetune(
            args.data,
            config,
            args.out,
            distill_dir=args.distill,
            teacher_dir=args.teacher,
            checkpoint=_checkpoint(args),
        )
    )


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
    # Presets have no recommend section: the model is scored with the settings it was evaluated with.
    config = _config(RecommendConfig, "evaluate", args, fields=RecommendConfig.FROM_EVALUATE)
    _print(recommend(args.data, args.teacher, args.delrec, config, args.out))


def _common(
    p: argparse.ArgumentParser, cls, training: bool, seed: bool = True, preset_section: str | None = None
) -> None:
    """The options every LLM stage takes; the help states each default of the stage's config ``cls``."""
    default = cls.default_help

    p.add_argument("--data", required=True, help="Dataset folder (delrec preprocess)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument(
        "--preset",
        help=f"configs/NAME.yaml (or a YAML path) whose {preset_section or 'stage'} section gives the defaults",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="JSON or YAML file with the stage's whole config dict (as the pipeline passes it); "
        "overrides --preset, overridden by the options below and --set",
    )
    p.add_argument(
        "--backbone",
        help=f"smollm2-135m | tiny-llama | tiny-t5 | saved folder | transformers id/path {default('backbone')}",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help=f"auto: a GPU if there is one {default('device')}"
    )
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast (fp32 throughout)")
    if seed:
        p.add_argument("--seed", type=int, help=f"random seed {default('seed')}")
    batch = "examples per step, shared by torchrun's processes" if training else "examples scored per pass"
    p.add_argument("--batch-size", type=int, help=f"{batch} {default('batch_size')}")
    if training:
        p.add_argument("--steps", type=int, help=f"training steps {default('steps')}")
        p.add_argument("--lr", type=float, help=f"peak learning rate {default('lr')}")
        p.add_argument(
            "--checkpoint",
            metavar="DIR_OR_S3",
            help="where the training state is kept and resumed from: a folder or s3://bucket/prefix "
            "(default: the pipeline's workspace $DELREC_CHECKPOINT_ROOT/$DELREC_RUN_ID/$DELREC_TASK, else "
            "OUT.partial); once the output is in place, only the stage's own files there are removed",
        )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config field (YAML value)"
    )


_TORCHRUN = (
    "\n\ndata-parallel (N processes per node, M nodes; each takes a share of every batch, only rank 0 "
    "writes):\n  torchrun --nnodes M --nproc-per-node N -m delrec.cli {command} --config cfg.json"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from delrec.distill import DistillConfig
    from delrec.evaluate import EvaluateConfig
    from delrec.finetune import FinetuneConfig
    from delrec.recommend import RecommendConfig

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "distill",
        help="stage 1: train the soft prompt on TA + RPS with the LLM frozen",
        description=(
            "Pattern distillation: the LLM is frozen and a soft prompt learns the teacher's pattern from "
            "two tasks (Temporal Analysis, Recommendation Pattern Simulating) built from the teacher's "
            "top-10. Lion, linear warm-up, GradNorm-like task weights. Resumes from OUT.partial/."
        ),
        epilog=(
            "example:\n  delrec distill --data data/ml-100k --teacher runs/sasrec --out runs/distill --preset ml-100k"
            + _TORCHRUN.format(command="distill --data D --teacher T --out O")
        ),
        formatter_class=fmt,
    )
    _common(p, DistillConfig, training=True)
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
            "examples (the ml-100k preset distils the teacher's scores, teacher_kd 1.0: --teacher):\n"
            "  delrec finetune --data data/ml-100k --distill runs/distill --teacher runs/sasrec --out runs/delrec "
            "--preset ml-100k\n"
            "  delrec finetune --data data/ml-100k --teacher runs/sasrec --out runs/ablation --preset ml-100k"
            + _TORCHRUN.format(command="finetune --data D [--distill S] [--teacher T] --out O")
        ),
        formatter_class=fmt,
    )
    _common(p, FinetuneConfig, training=True)
    p.add_argument("--distill", help="distill folder (omit for the no-soft-prompt ablation)")
    p.add_argument("--teacher", help="teacher folder (read only with teacher_kd > 0: its candidate scores)")
    p.set_defaults(handler=_finetune)

    p = subparsers.add_parser(
        "evaluate",
        help="DELRec vs teacher, popularity, ablation and untuned LLM on the same candidates, with a report",
        description=(
            "Rank the stored candidates of every test example with DELRec, the teacher, popularity, the "
            "ablation (if given) and the untuned LLM; HR@1/5/10, NDCG@5/10, MRR with 95% bootstrap "
            "intervals, and DELRec minus each other model with a paired bootstrap interval "
            "(--set prompt_only=true adds the untuned LLM with the soft prompt, paired against the untuned "
            "LLM: what stage 1 alone carries). Writes "
            "metrics.json, report.md (with learning curves), metrics.png, curves.png and ranks.parquet."
        ),
        epilog=(
            "example:\n  delrec evaluate --data data/ml-100k --teacher runs/sasrec --delrec runs/delrec "
            "--ablation runs/ablation --out runs/eval --preset ml-100k"
            + _TORCHRUN.format(command="evaluate --data D --teacher T --delrec F --out O")
        ),
        formatter_class=fmt,
    )
    _common(p, EvaluateConfig, training=False)
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
            "\n\ndata-parallel (each of the N processes writes every N-th shard, rank 0 assembles the output):"
            "\n  torchrun --nproc-per-node N -m delrec.cli recommend --data D --teacher T --delrec F --out O"
        ),
        formatter_class=fmt,
    )
    _common(p, RecommendConfig, training=False, seed=False, preset_section="evaluate")
    p.add_argument("--teacher", required=True, help="teacher folder (delrec train-teacher)")
    p.add_argument("--delrec", required=True, help="finetune folder of DELRec (with soft prompt)")
    p.add_argument("--users", help="comma-separated raw user ids (default: every user)")
    p.add_argument("--top-n", type=int, help="recommendations per user (default 10)")
    p.add_argument("--retrieve-k", type=int, help="items the teacher retrieves per user (default 20)")
    p.set_defaults(handler=_recommend)
