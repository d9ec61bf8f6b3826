"""What each node of a stage's TrainJob runs: ``python -m delrec.remote_stage <stage> ...``.

    python -m delrec.remote_stage distill --data s3://... --teacher s3://... --out s3://... --config-json '{...}'
    python -m delrec.remote_stage finetune --data s3://... [--distill s3://...] [--teacher s3://...] --out s3://... --config-json '{...}'

On every node: download the input folders from the object store into a local work folder, then run
torchrun over ``delrec.cli <stage> ... --config cfg.json``; torchrun takes the node count, ranks per node,
this node's rank and the master from Kubeflow Trainer's ``PET_*`` environment. Only rank 0 writes the
output folder, so node 0 (``PET_NODE_RANK`` 0) uploads it to ``--out``, replacing whatever an earlier
attempt left there. The object store's endpoint and credentials come from the ``DELREC_S3_*``
environment, as in every task (:mod:`delrec.store`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from delrec.errors import DelrecError
from delrec.launch import STAGE_INPUTS, run_streaming, stage_arguments, torchrun_command, write_config
from delrec.store import S3Store, download_prefix

log = logging.getLogger(__name__)

ENV_NODE_RANK = "PET_NODE_RANK"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m delrec.remote_stage", description=__doc__.split("\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    for stage, (required, optional) in STAGE_INPUTS.items():
        p = stages.add_parser(stage)
        for name in required:
            p.add_argument(f"--{name}", required=True, help="s3:// URI of the input folder")
        for name in optional:
            p.add_argument(f"--{name}", help="s3:// URI of the input folder (optional)")
        p.add_argument("--out", required=True, help="s3:// prefix node 0 uploads the output folder to")
        p.add_argument("--config-json", required=True, help="the stage config, as JSON")
    return parser


def run(
    stage: str,
    inputs: dict[str, str | None],
    out_uri: str,
    config: dict,
    *,
    node_rank: int,
    workdir: str | os.PathLike,
    store: S3Store | None = None,
) -> None:
    """Stage the inputs into ``workdir``, run this node's ranks, and (node 0) upload the output."""
    store = store or S3Store.from_env()
    local: dict[str, str | None] = {}
    for name, uri in inputs.items():
        if uri:
            folder = Path(workdir) / name
            folder.mkdir(parents=True)
            local[name] = str(download_prefix(uri, folder, store))
    out = Path(workdir) / "out"
    arguments = stage_arguments(stage, local, out, write_config(config, workdir))
    run_streaming(torchrun_command(arguments), what=f"{stage} (node {node_rank})")
    if node_rank == 0:  # only rank 0 writes the output folder
        if not out.is_dir():
            raise DelrecError("the stage finished but rank 0 wrote no output folder", path=out)
        store.remove_prefix(out_uri)  # an earlier attempt's partial upload must not mix in
        store.put_dir(out, out_uri)
        log.info("uploaded the output to %s", out_uri)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    required, optional = STAGE_INPUTS[args.stage]
    inputs = {name: getattr(args, name) for name in (*required, *optional)}
    try:
        config = json.loads(args.config_json)
        rank = os.environ.get(ENV_NODE_RANK, "0")
        if not rank.isdigit():
            raise DelrecError(f"expected a node index, got {rank!r}", field=ENV_NODE_RANK)
        with tempfile.TemporaryDirectory(prefix="delrec-stage-") as workdir:
            run(args.stage, inputs, args.out, config, node_rank=int(rank), workdir=workdir)
    except json.JSONDecodeError as exc:
        print(f"remote_stage: error: --config-json is not JSON: {exc}", file=sys.stderr)
        return 2
    except DelrecError as exc:
        print(f"remote_stage {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
