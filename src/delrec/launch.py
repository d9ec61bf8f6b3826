"""How a training stage's ranks are started: in this process, under torchrun in this pod, or as a TrainJob.

The pipeline decides per task, through the environment (not component inputs: KFP's cache key holds
every input value, and where a stage runs does not change what it computes):

- nothing set, or :data:`ENV_NPROC_PER_NODE` ``<= 1``: the component calls the library in-process;
- :data:`ENV_NPROC_PER_NODE` ``N > 1``: ``python -m torch.distributed.run --standalone --nproc-per-node N
  -m delrec.cli <stage> ... --config cfg.json`` in this pod, one rank per GPU (:func:`run_torchrun`);
- :data:`ENV_TRAINER` ``trainjob``: this pod is a launcher that submits a Kubeflow Trainer ``TrainJob``
  and waits for it (:mod:`delrec.trainjob`; the settings are the JSON in :data:`ENV_TRAINJOB`).

Each rank of a torchrun launch sets up ``torch.distributed`` itself (the stage functions do, when
``WORLD_SIZE > 1``) and only rank 0 writes the output folder. The stage's metrics are read back from
that folder's ``metrics.json``: the same dict the in-process call returns.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from delrec import layout
from delrec.errors import DelrecError

log = logging.getLogger(__name__)

ENV_TRAINER = "DELREC_TRAINER"
"""``pod`` (default) or ``trainjob``"""
ENV_NPROC_PER_NODE = "DELREC_NPROC_PER_NODE"
"""ranks (GPUs) per pod; above 1 the stage runs under torchrun"""
ENV_TRAINJOB = "DELREC_TRAINJOB"
"""the JSON of :class:`delrec.trainjob.TrainJobSettings` (with ``trainjob``)"""

Stage = Literal["distill", "finetune"]
# The stage's input folders, by the ``delrec <stage>`` option that takes each; the optional ones may be
# absent (finetune without --distill trains the ablation; it reads --teacher only with teacher_kd > 0).
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "distill": (("data", "teacher"), ()),
    "finetune": (("data",), ("distill", "teacher")),
}


def stage_arguments(
    stage: str, inputs: Mapping[str, str | os.PathLike | None], out: str | os.PathLike, config_file: str
) -> list[str]:
    """``delrec <stage> --data D ... --out O --config FILE``: the command line every rank runs."""
    if stage not in STAGE_INPUTS:
        raise DelrecError(
            f"no distributed launch for stage {stage!r}; expected one of {sorted(STAGE_INPUTS)}"
        )
    required, optional = STAGE_INPUTS[stage]
    unknown = set(inputs) - {*required, *optional}
    missing = [name for name in required if not inputs.get(name)]
    if unknown or missing:
        raise DelrecError(
            f"{stage} takes inputs {[*required, *optional]}; got unknown {sorted(unknown)}, missing {missing}",
            field="inputs",
        )
    args = [stage]
    for name in (*required, *optional):
        if inputs.get(name):
            args += [f"--{name}", str(inputs[name])]
    return [*args, "--out", str(out), "--config", config_file]


def torchrun_command(arguments: Sequence[str], *, nproc_per_node: int | None = None) -> list[str]:
    """torchrun running ``python -m delrec.cli <arguments>``.

    With ``nproc_per_node``: a single-node launch (``--standalone``: a local rendezvous, no master to
    name). Without: torchrun takes nodes, ranks and the master from Kubeflow Trainer's ``PET_*``
    environment (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT).
    """
    command = [sys.executable, "-m", "torch.distributed.run"]
    if nproc_per_node is not None:
        command += ["--standalone", "--nproc-per-node", str(nproc_per_node)]
    return [*command, "-m", "delrec.cli", *arguments]


def run_streaming(command: Sequence[str], *, what: str) -> None:
    """Run ``command``, copying its output (stdout and stderr, line by line) to ours; a non-zero exit
    status is a DelrecError that names ``what`` and the status."""
    log.info("running %s", " ".join(command))
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    if process.returncode:
        raise DelrecError(f"{what} exited with status {process.returncode}")


def write_config(config: Mapping, folder: str | os.PathLike) -> str:
    """The stage config as ``<folder>/config.json`` (what ``delrec <stage> --config`` reads)."""
    path = Path(folder) / layout.CONFIG_JSON
    path.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return str(path)


def read_metrics(out: str | os.PathLike) -> dict:
    """The metrics a stage wrote into its output folder (what the in-process call returns)."""
    path = Path(out) / layout.METRICS_JSON
    if not path.is_file():
        raise DelrecError(f"the stage finished but wrote no {layout.METRICS_JSON}", path=out)
    return json.loads(path.read_text())


def run_torchrun(
    stage: Stage,
    config: Mapping,
    inputs: Mapping[str, str | os.PathLike | None],
    out: str | os.PathLike,
    *,
    nproc_per_node: int | None = None,
) -> dict:
    """Run ``stage`` as torchrun ranks (see :func:`torchrun_command`) and return its metrics."""
    with tempfile.TemporaryDirectory(prefix="delrec-config-") as folder:
        arguments = stage_arguments(stage, inputs, out, write_config(config, folder))
        where = f"{nproc_per_node} ranks" if nproc_per_node else "this node's ranks"
        run_streaming(torchrun_command(arguments, nproc_per_node=nproc_per_node), what=f"{stage} ({where})")
    return read_metrics(out)


@dataclass(frozen=True)
class Artifact:
    """A stage input or output as a KFP artifact gives it: a local path and its object-store URI."""

    path: str
    uri: str = ""


@dataclass(frozen=True)
class Launch:
    """Where the ranks of a training stage run (see the module doc); :meth:`from_env` reads it."""

    trainer: Literal["pod", "trainjob"] = "pod"
    nproc_per_node: int = 1

    @classmethod
    def from_env(cls) -> Launch:
        trainer = os.environ.get(ENV_TRAINER, "pod") or "pod"
        if trainer not in ("pod", "trainjob"):
            raise DelrecError(f"expected pod or trainjob, got {trainer!r}", field=ENV_TRAINER)
        nproc = os.environ.get(ENV_NPROC_PER_NODE, "1") or "1"
        if not nproc.isdigit():
            raise DelrecError(f"expected a whole number of ranks, got {nproc!r}", field=ENV_NPROC_PER_NODE)
        return cls(trainer, int(nproc))

    @property
    def in_process(self) -> bool:
        """One rank in this pod: the component calls the library directly, as a local run does."""
        return self.trainer == "pod" and self.nproc_per_node <= 1

    def run(
        self, stage: Stage, config: Mapping, inputs: Mapping[str, Artifact | None], out: Artifact
    ) -> dict:
        """Run ``stage`` on more than one rank (not :attr:`in_process`) and return its metrics."""
        if self.trainer == "trainjob":
            from delrec import trainjob

            return trainjob.run_stage(stage, config, inputs, out)
        paths = {name: artifact.path for name, artifact in inputs.items() if artifact is not None}
        return run_torchrun(stage, config, paths, out.path, nproc_per_node=self.nproc_per_node)
