"""``delrec preprocess``."""

from __future__ import annotations

import argparse
import json

from delrec.config import load_preset


def _preprocess(args: argparse.Namespace) -> None:
    from delrec.data.preprocess import PreprocessConfig, preprocess

    section = load_preset(args.preset).get("preprocess", {}) if args.preset else {}
    overrides = {
        key: value
        for key, value in {
            "dataset": args.dataset,
            "source": args.source,
            "format": args.format,
            "split": args.split,
            "seed": args.seed,
            "num_candidates": args.num_candidates,
            "kcore": args.kcore,
        }.items()
        if value is not None
    }
    config = PreprocessConfig.from_dict({**section, **overrides}, source=args.preset or "command line")
    stats = preprocess(config, args.out)
    print(json.dumps({k: stats[k] for k in ("users", "items", "interactions", "examples", "seconds")}))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="raw dataset -> cleaned, split Dataset folder with fixed candidate sets",
        description=(
            "Parse a raw dataset, clean titles, order interactions by time, optionally k-core filter, "
            "split (leave-one-out or by user) and sample the fixed 20-candidate sets every model is "
            "scored on. Writes OUT atomically: on any error nothing is left there."
        ),
    )
    p.add_argument("--dataset", help="ml-100k | ml-1m | beauty | home-kitchen | steam | generic | synthetic")
    p.add_argument("--source", help="local folder/file, URL or s3:// URI (default: the dataset's download)")
    p.add_argument("--format", help="override the format inferred from --dataset")
    p.add_argument("--out", required=True, help="output Dataset folder")
    p.add_argument("--split", choices=("loo", "user"), help="leave-one-out (default) or users 80/10/10")
    p.add_argument("--seed", type=int, help="seed of the split and the candidate sampling (default 42)")
    p.add_argument("--num-candidates", type=int, help="candidates per evaluation example (default 20)")
    p.add_argument("--kcore", type=int, help="k-core filter (default 5 for Amazon, off otherwise)")
    p.add_argument("--preset", help="take defaults from configs/PRESET.yaml's preprocess section")
    p.set_defaults(handler=_preprocess)
