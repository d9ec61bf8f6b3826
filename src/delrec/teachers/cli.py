"""``delrec train-teacher``."""

from __future__ import annotations

import argparse
import json

from delrec.config import layers_named, load_preset, parse_assignments


def _train_teacher(args: argparse.Namespace) -> None:
    from delrec.teachers.train import TeacherConfig, train_teacher

    section = load_preset(args.preset).get("teacher", {}) if args.preset else {}
    overrides = {
        key: value
        for key, value in {
            "model": args.model,
            "max_len": args.max_len,
            "max_epochs": args.max_epochs,
            "patience": args.patience,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "dropout": args.dropout,
            "loss": args.loss,
            "seed": args.seed,
            "device": args.device,
            "time_budget_s": args.time_budget,
            "bf16": args.bf16,
        }.items()
        if value is not None
    }
    assigned = parse_assignments(args.set)
    config = TeacherConfig.from_dict(
        {**section, **overrides, **assigned},
        source=layers_named(args.preset, None, bool(overrides or assigned)),
    )
    metrics = train_teacher(args.data, config, args.out)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-teacher",
        help="train SASRec / GRU4Rec / Caser on a Dataset folder; export its top-k for distillation",
        description=(
            "Train a conventional sequential recommender on the dataset's training sequences, with early "
            "stopping on validation NDCG@10 (full ranking). Writes OUT atomically: model.safetensors, "
            "config.json, metrics.json (full-ranking and 20-candidate metrics), topk.parquet (the teacher's "
            "top-10 for every train/valid/test example) and manifest.json. A killed run resumes from "
            "OUT.partial/ when started again with the same options."
        ),
    )
    p.add_argument("--data", required=True, help="Dataset folder written by `delrec preprocess`")
    p.add_argument("--out", required=True, help="output teacher folder")
    from delrec.teachers.train import TeacherConfig

    default = TeacherConfig.default_help

    p.add_argument("--model", choices=("sasrec", "gru4rec", "caser"), help=default("model"))
    p.add_argument("--preset", help="take defaults from configs/PRESET.yaml's teacher section")
    p.add_argument("--max-len", type=int, help=f"history items the model reads {default('max_len')}")
    p.add_argument("--max-epochs", type=int, help=default("max_epochs"))
    p.add_argument(
        "--patience",
        type=int,
        help=f"evaluations without a better validation NDCG@10 before stopping {default('patience')}",
    )
    p.add_argument("--batch-size", type=int, help=default("batch_size"))
    p.add_argument("--lr", type=float, help=f"Adam's learning rate {default('lr')}")
    p.add_argument("--dropout", type=float, help=default("dropout"))
    p.add_argument(
        "--loss", choices=("ce", "bce"), help=f"full cross-entropy or sampled binary CE {default('loss')}"
    )
    p.add_argument("--seed", type=int, help=f"random seed {default('seed')}")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help=f"auto: a GPU if there is one {default('device')}"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        help="stop training after this many seconds (the best epoch is kept; default none)",
    )
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other TeacherConfig field"
    )
    p.set_defaults(handler=_train_teacher)
