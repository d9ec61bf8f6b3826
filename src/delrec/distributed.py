"""Data-parallel training and scoring under torchrun: one process per device, one global batch.

The stages set this up themselves (:func:`init_from_env`), so every entry point works under torchrun:
the ``delrec`` command, a KFP component, another wrapper. Without torchrun's environment (WORLD_SIZE
unset or 1) every helper here is a no-op and a stage behaves exactly as in one process.

The command line (the contract a Kubeflow component or a Kubernetes TrainJob launches)::

    torchrun --nnodes M --nproc-per-node N [--node-rank R --rdzv-endpoint HOST:PORT] \\
        -m delrec.cli distill  --data D --teacher T --out O --config cfg.json
    torchrun ... -m delrec.cli finetune --data D --distill S --out O --config cfg.json
    torchrun ... -m delrec.cli finetune --data D --out O --config cfg.json       # the ablation
    torchrun ... -m delrec.cli evaluate --data D --teacher T --delrec F [--ablation A] [--distill S] \\
        --out O --config cfg.json

``cfg.json`` (JSON or YAML) is the stage's whole config dict, as the pipeline passes it to the stage's
component. Only rank 0 writes ``O`` (atomically) and the checkpoints, so ``O`` must be on a disk rank 0
sees: on several nodes, a volume every node mounts or the node of rank 0; checkpoints go to
``O.partial`` or, with ``DELREC_CHECKPOINT_ROOT`` / ``DELREC_RUN_ID`` / ``DELREC_TASK`` set (or
``--checkpoint s3://...``), to the object store, where a retried job finds them whatever its size:
checkpoints hold no trace of the number of processes, so a run resumes with any world size. Rank 0
prints the stage's metrics line (every rank's stage function returns the same dict); processes of rank
> 0 log warnings only.

How a training step is shared. Every rank draws the same global batch from the loop's per-step seeded
generator, takes its contiguous share (:func:`shard_indices`), and computes its share of the global
batch's mean loss (the sum of its examples' losses divided by the GLOBAL batch size); after backward
the trainable gradients are summed across ranks (:func:`sum_gradients`), so every rank holds the
gradient of the global mean and takes the identical optimiser step (gradient clipping, Lion, AdaLoRA's
rank allocation, which reads the gradients, all see the same numbers). The result equals one
process's up to floating-point noise (a sum split in other places). Validation examples are sharded
too and the ranks gathered on every rank (:func:`gather_rows`), so the best-state choice is the same
everywhere.

Why an explicit all-reduce and not DistributedDataParallel. DDP reduces from hooks that fire when
``.backward()`` accumulates into ``.grad`` after a forward through the DDP wrapper. Neither holds here:
distill takes each task's gradient with ``torch.autograd.grad`` (GradNorm needs each task's global
gradient before it combines them, and the soft prompt is not a parameter of the model), and the
candidate scorer calls the decoder stack and the output head directly, with a shared-prefix KV cache,
never the wrapped model's forward. One flat all-reduce of the trainable tensors after backward is
correct whatever the forward does: peft adapters, a soft prompt, gradient checkpointing (no "marked
ready twice" or unused-parameter bookkeeping). It gives up DDP's overlap of communication with the
backward pass; the tensors reduced are the adapters or the soft prompt (well under 1% of a backbone's
weights), one message a step, small next to the forward and backward of 20 prompts x 20 candidates.

Where the backbone lives. With ``sharding: replicate`` (the default) every rank holds the whole
backbone. With ``sharding: fsdp`` (distill and finetune; for backbones that do not fit one device) the
decoder layers' frozen weights are sharded across the ranks with FSDP2 (:mod:`delrec.llm.sharding`);
the trainable tensors stay whole on every rank, outside FSDP, so everything above holds unchanged:
FSDP reduces no gradient, the explicit sum does. The evaluate stage always holds the whole backbone.

Randomness. Batches and candidate sets come from numpy generators seeded per step, identical on every
rank. Torch's generator (dropout: the adapters' ``lora_dropout``) is seeded per step and per rank
(:func:`rank_seed`): rank 0 keeps one process's seed, other ranks draw independent masks. With
dropout > 0 an N-process run is therefore statistically, not numerically, the same as one process
(other masks); with dropout 0 (the distill stage, whose LLM is frozen in eval mode, or
``lora_dropout: 0``) it matches within floating-point noise.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from delrec.errors import DelrecError
from delrec.llm.backbone import resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")

# A rank waits this long for the others (rank 0 writing an output, loading a checkpoint from the store).
TIMEOUT = timedelta(minutes=60)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> str:
    """Join torchrun's process group once if the environment says so; the device this rank runs on.

    ``device`` is a stage's device setting (auto, cpu, cuda). Under torchrun (WORLD_SIZE > 1) the group
    uses gloo on CPU and nccl on CUDA, where each process takes the GPU ``LOCAL_RANK`` of its node.
    Without torchrun nothing happens and ``device`` is returned unchanged.
    """
    if launched_world_size() <= 1:
        return device
    cuda = resolve_device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise DelrecError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc-per-node)",
                field="device",
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
        log.info("rank %d of %d (%s)", rank(), world_size(), "nccl" if cuda else "gloo")
    return f"cuda:{local_rank}" if cuda else "cpu"


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs and checkpoints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable; tensors should be on the CPU)."""
    if world_size() == 1:
        return obj
    holder = [obj if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_indices(n: int) -> np.ndarray:
    """This rank's contiguous share of ``range(n)``: sizes differ by at most one, earlier ranks larger.

    Concatenating every rank's share in rank order gives ``range(n)``, which :func:`gather_rows` relies on.
    """
    return np.array_split(np.arange(n), world_size())[rank()]


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every rank's rows for its :func:`shard_indices` share, concatenated in rank order (on every rank).

    A rank with an empty share may hold an array of another width (nothing to score): it is left out.
    """
    if world_size() == 1:
        return local
    parts = gather_objects(np.asarray(local))
    filled = [part for part in parts if len(part)]
    return np.concatenate(filled) if filled else parts[0]


def sum_across_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over the ranks (one all-reduce of one flat buffer)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(part.view_as(tensor))


def sum_gradients(params: Iterable[torch.nn.Parameter], *extra: torch.Tensor) -> None:
    """Sum the gradients of ``params`` (a missing one counts as zeros) and ``extra`` across ranks.

    Each rank's loss is its share of the global batch's mean, so the sum is the global mean's gradient.
    """
    if world_size() == 1:
        return
    params = list(params)
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    sum_across_ranks([*(p.grad for p in params), *extra])


def rank_seed(seed: int) -> int:
    """The torch seed of this rank for a step whose one-process seed is ``seed``: the same on rank 0,
    independent streams on the others (so two ranks never draw the same dropout masks)."""
    if rank() == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1, np.uint64)[0] >> 1)
