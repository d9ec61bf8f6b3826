"""Pieces shared by the two LLM training stages: their config base, data-parallel setup, their prompt
builder and training loop, the task loss (or a rank's share of it) and accuracy."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from delrec import distributed, layout
from delrec.checkpoints import Checkpoints
from delrec.config import StageConfig
from delrec.errors import DelrecError
from delrec.llm.backbone import TINY, Backbone
from delrec.llm.scoring import Reduction, score_all, score_candidates
from delrec.llm.sharding import shard_backbone
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import Instance, answers_of
from delrec.llm.templates import PromptBuilder, PromptSettings
from delrec.loop import TrainLoop
from delrec.metrics import target_ranks

log = logging.getLogger(__name__)

Objective = Literal["candidates", "likelihood"]


class LLMStageConfig(StageConfig):
    """Fields every LLM training stage shares; a stage sets its own defaults (the paper's values)."""

    backbone: str = "smollm2-135m"
    """built-in name (smollm2-135m, tiny-llama, tiny-t5), saved folder, or transformers id/path"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    """bf16 autocast where the hardware supports it"""
    seed: int = Field(42, ge=0)
    history_items: int = Field(10, ge=1)
    """history cut to the most recent N items in prompts"""
    max_prompt_tokens: int = Field(768, ge=32)
    max_title_chars: int = Field(80, ge=8)
    title_years: bool = True
    """keep a trailing "(YYYY)" in titles (MovieLens's). SmolLM2's tokenizer spells a number digit by
    digit, so the year is 6 of an ML-100K title's 10.3 tokens on average: false drops it, and prompts and
    answers get about 40% shorter (a few remakes then share a title)"""
    num_candidates: int = Field(20, ge=2)
    objective: Objective = "candidates"
    """candidates: cross-entropy over the candidates' scores; likelihood: the answer title's NLL"""
    scoring: Literal["mean", "sum", "first"] = "mean"
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(20, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_examples: int = Field(200, ge=1)
    """validation examples scored at every evaluation point"""
    eval_batch_size: int = Field(8, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    train_tail: int | None = Field(None, ge=1)
    """draw training rows only from each user's last N training targets, as the test rows sit at the
    end of a sequence; None: every training prefix (the paper's)"""
    sharding: Literal["replicate", "fsdp"] = "replicate"
    """under torchrun, every rank takes a share of each batch (see :mod:`delrec.distributed`) and holds
    replicate: the whole backbone; fsdp: 1/world of the decoder layers' frozen weights (FSDP2; the
    embeddings, output head and adapters whole; decoder-only backbones; see :mod:`delrec.llm.sharding`).
    The results are the same; in one process fsdp is replicate"""

    def prompt_settings(self) -> PromptSettings:
        """The prompt sizes and title spelling this stage trains with; answers are cut as the prompt
        lists titles."""
        return PromptSettings(
            history_items=self.history_items,
            max_prompt_tokens=self.max_prompt_tokens,
            max_title_chars=self.max_title_chars,
            max_answer_chars=self.max_title_chars,
            title_years=self.title_years,
        )

    def run_hash(self) -> str:
        """The config's hash in a checkpoint's run key: ``sharding`` left out (counted as replicate, so
        a replicate run's key is its :meth:`hash`), since it places the weights and changes no result:
        a run checkpointed with one sharding resumes with the other, as with another world size."""
        return self.model_copy(update={"sharding": "replicate"}).hash()


def setup_data_parallel(config: LLMStageConfig) -> str:
    """Join torchrun's process group if launched by it (:mod:`delrec.distributed`); this rank's device.

    Refuses a batch with fewer examples than ranks. With ``sharding: fsdp`` the stage then calls
    :func:`apply_sharding` once its model is final.
    """
    device = distributed.init_from_env(config.device)
    if config.batch_size < distributed.world_size():
        raise DelrecError(
            f"batch_size {config.batch_size} is smaller than the {distributed.world_size()} processes: "
            "every rank needs at least one example of the global batch",
            field="batch_size",
        )
    return device


def apply_sharding(config: LLMStageConfig, backbone: Backbone) -> None:
    """Shard the backbone's decoder layers across the ranks if ``sharding: fsdp`` (see
    :mod:`delrec.llm.sharding`); with ``replicate`` every rank keeps the whole backbone."""
    if config.sharding == "fsdp":
        shard_backbone(backbone)


def stage_prompt_builder(
    config: LLMStageConfig, backbone: Backbone, dataset, teacher: str, n_soft: int
) -> PromptBuilder:
    """The prompts a stage trains on, sized by its config."""
    return PromptBuilder.for_dataset(
        backbone, dataset, teacher=teacher, n_soft=n_soft, settings=config.prompt_settings()
    )


def keep_tiny_backbone(backbone: Backbone, checkpoints: Checkpoints) -> None:
    """A tiny test backbone is built, not downloaded, so its weights go into the output: saved beside
    the checkpoint now, before sharding or peft make the base weights harder to get back."""
    if backbone.name in TINY and distributed.is_main():
        backbone.save(checkpoints.folder / layout.BACKBONE_DIR)


def copy_tiny_backbone(backbone: Backbone, scratch: Path, out: Path) -> None:
    """Put the tiny backbone that :func:`keep_tiny_backbone` saved in ``scratch`` into the stage's output
    folder ``out``, so later stages use its weights; a real backbone is not copied."""
    if backbone.name in TINY:
        shutil.copytree(scratch / layout.BACKBONE_DIR, out / layout.BACKBONE_DIR)


def stage_loop(
    config: LLMStageConfig,
    name: str,
    stream: int,
    run_key: Mapping[str, str],
    checkpoints: Checkpoints,
    training,
    **options,
) -> TrainLoop:
    """The :class:`TrainLoop` of an LLM stage: ``training`` has ``step``, ``state`` and ``restore``; the
    config gives the steps, seed and cadence, and its :meth:`~LLMStageConfig.run_hash` joins the run key."""
    return TrainLoop(
        name=name,
        steps=config.steps,
        seed=config.seed,
        stream=stream,
        run_key={"config": config.run_hash(), **run_key},
        checkpoints=checkpoints,
        step=training.step,
        state=training.state,
        restore=training.restore,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        **options,
    )


def write_on_main(write: Callable[[Path], None], checkpoints: Checkpoints, metrics: dict) -> dict:
    """Rank 0 runs ``write(scratch)`` (scratch: the checkpoint folder) and clears the checkpoint; every
    rank waits for it and returns rank 0's metrics."""
    if distributed.is_main():
        write(checkpoints.folder)
        checkpoints.clear()
    return distributed.broadcast_object(metrics)


def task_loss(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    builder: PromptBuilder,
    instances: Sequence[Instance],
    objective: Objective,
    reduction: Reduction,
    targets: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``candidates``: cross-entropy over the candidates' scores, plus ``offsets`` ((B, C), e.g. a
    popularity prior) if given, against each instance's answer or, given ``targets`` ((B, C)
    probabilities over the candidates), against those; ``likelihood``: the answer's NLL."""
    prompts = [inst.prompt for inst in instances]
    if objective == "likelihood":
        answers = [[builder.answer(int(inst.candidates[inst.answer]))] for inst in instances]
        scores = score_candidates(
            backbone, soft_prompt, prompts, answers, reduction=reduction, skip=builder.answer_skip
        )
        return -scores[:, 0].mean()
    scores = score_candidates(
        backbone,
        soft_prompt,
        prompts,
        answers_of(builder, instances),
        reduction=reduction,
        skip=builder.answer_skip,
    )
    if offsets is not None:
        scores = scores + offsets.to(scores.device, scores.dtype)
    if targets is None:
        targets = torch.tensor([inst.answer for inst in instances], device=scores.device)
    return F.cross_entropy(scores, targets.to(scores.device))


def rank_share_loss(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    builder: PromptBuilder,
    batch: Sequence[Instance],
    objective: Objective,
    reduction: Reduction,
    targets: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's share of the global ``batch``'s mean :func:`task_loss`: the sum of its examples'
    losses over the global batch size; summed over the ranks it is the global mean (one process: the
    whole batch's mean). Every rank must pass the same ``batch`` (and ``targets`` and ``offsets``, one
    row each)."""
    indices = distributed.shard_indices(len(batch))
    share = [batch[i] for i in indices]
    rows = torch.as_tensor(indices, dtype=torch.long)
    loss = task_loss(
        backbone,
        soft_prompt,
        builder,
        share,
        objective,
        reduction,
        targets[rows] if targets is not None else None,
        offsets[rows] if offsets is not None else None,
    )
    return loss * (len(share) / len(batch))


def instance_ranks(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    builder: PromptBuilder,
    instances: Sequence[Instance],
    *,
    reduction: Reduction,
    batch_size: int,
    desc: str,
) -> np.ndarray:
    """0-based rank of each instance's answer among its candidates (ties count against it); under
    torchrun see :func:`instance_scores`."""
    scores = instance_scores(
        backbone, soft_prompt, builder, instances, reduction=reduction, batch_size=batch_size, desc=desc
    )
    return target_ranks(scores, np.array([inst.answer for inst in instances], dtype=np.int64))


def instance_scores(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    builder: PromptBuilder,
    instances: Sequence[Instance],
    *,
    reduction: Reduction,
    batch_size: int,
    desc: str,
) -> np.ndarray:
    """The LLM's scores (instances, candidates) of each instance's candidates.

    Under torchrun each rank scores its share of ``instances`` and every rank gets all the scores. On a
    sharded (FSDP) backbone every decoder call is a collective, so every rank must make as many calls as
    the others: a share is padded (with repeats) to the largest share's size, and the padding dropped.
    """
    share = distributed.shard_indices(len(instances))
    mine = len(share)
    if backbone.sharded and len(instances):
        largest = -(-len(instances) // distributed.world_size())
        share = np.resize(share if mine else np.zeros(1, dtype=share.dtype), largest)
    instances = [instances[i] for i in share]
    scores = score_all(
        backbone,
        soft_prompt,
        [inst.prompt for inst in instances],
        answers_of(builder, instances),
        batch_size=batch_size,
        reduction=reduction,
        skip=builder.answer_skip,
        desc=desc,
    )
    return distributed.gather_rows(scores[:mine])
