"""``delrec preprocess``."""

from __future__ import annotations

import argparse
import json

from delrec.config import layers_named, load_preset

# Command-line option -> PreprocessConfig field (None values fall back to the preset, then the default).
_OPTIONS = (
    "dataset",
    "source",
    "format",
    "domain",
    "split",
    "seed",
    "num_candidates",
    "max_history",
    "kcore",
    "min_user_interactions",
    "synthetic_users",
    "synthetic_items",
    "synthetic_themes",
)


def _preprocess(args: argparse.Namespace) -> None:
    from delrec.data.preprocess import PreprocessConfig, preprocess

    section = load_preset(args.preset).get("preprocess", {}) if args.preset else {}
    overrides = {key: getattr(args, key) for key in _OPTIONS if getattr(args, key) is not None}
    config = PreprocessConfig.from_dict(
        {**section, **overrides}, source=layers_named(args.preset, None, bool(overrides))
    )
    stats = preprocess(config, args.out, cache=args.cache_dir)
    keys = ("users", "items", "interactions", "dropped", "examples", "seconds_total")
    print(json.dumps({k: stats[k] for k in keys}))


def register(subparsers: argparse._SubParsersAction) -> None:
    from delrec.data.formats import FORMATS
    from delrec.data.sources import DATASETS

    p = subparsers.add_parser(
        "preprocess",
        help="raw dataset -> cleaned, split Dataset folder with fixed candidate sets",
        description=(
            "Parse a raw dataset, clean titles, order interactions by time, optionally k-core filter, "
            "split (leave-one-out or by user) and sample the fixed candidate sets every model is "
            "scored on. Writes OUT atomically: on any error nothing is left there."
        ),
        epilog=(
            "examples:\n"
            "  delrec preprocess --dataset ml-100k --out data/ml-100k           "
            "# GroupLens download, cached\n"
            "  delrec preprocess --dataset ml-100k --source ~/ml-100k.zip --out data/ml-100k\n"
            "  delrec preprocess --dataset beauty --source Amazon_Beauty/ --out data/beauty\n"
            "  delrec preprocess --dataset beauty --format amazon-json --source amazon/ --out data/beauty\n"
            "  delrec preprocess --dataset steam-llara --source llara-steam/ --out data/steam\n"
            "  delrec preprocess --dataset synthetic --synthetic-users 500 --out data/demo"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", help=f"{' | '.join(DATASETS)} (default synthetic)")
    p.add_argument(
        "--source",
        help="local folder or file (a zip for MovieLens), http(s):// or file:// URL (downloaded once into "
        "the cache) or s3:// URI; default: the dataset's download (ml-100k, ml-1m)",
    )
    p.add_argument(
        "--format",
        help=f"{' | '.join([*FORMATS, 'synthetic'])}; default: the dataset's "
        "(movielens, recbole for beauty/home-kitchen, steam, llara for steam-llara, generic)",
    )
    p.add_argument("--domain", choices=("movies", "games", "products"), help="default: the dataset's")
    p.add_argument("--out", required=True, help="output Dataset folder")
    p.add_argument(
        "--split",
        choices=("loo", "user", "given"),
        help="loo: leave-one-out; user: users 80/10/10; given: the source's own split by user (llara); "
        "default: given for a source split by user, else loo",
    )
    p.add_argument("--seed", type=int, help="seed of the split and the candidate sampling (default 42)")
    p.add_argument("--num-candidates", type=int, help="candidates per evaluation example (default 20)")
    p.add_argument("--max-history", type=int, help="most recent items kept in an example (default 50)")
    p.add_argument("--kcore", type=int, help="k-core filter (default 5 for Amazon and Steam, off otherwise)")
    p.add_argument("--min-user-interactions", type=int, help="drop users with fewer (default 3, the least)")
    p.add_argument("--synthetic-users", type=int, help="synthetic dataset: users (default 200)")
    p.add_argument("--synthetic-items", type=int, help="synthetic dataset: items (default 120)")
    p.add_argument("--synthetic-themes", type=int, help="synthetic dataset: themes, 1-8 (default 6)")
    p.add_argument("--cache-dir", help="download cache (default $DELREC_CACHE or ~/.cache/delrec)")
    p.add_argument("--preset", help="take defaults from configs/PRESET.yaml's preprocess section")
    p.set_defaults(handler=_preprocess)
