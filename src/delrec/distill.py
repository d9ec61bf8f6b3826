"""Stage 1, pattern distillation: train a soft prompt on TA and RPS with the LLM frozen.

Each step takes one Temporal Analysis batch and one Recommendation Pattern Simulating batch (built
from training examples and the teacher's top-10), computes each task's loss, and combines the two
gradients with GradNorm-like weights: w_i proportional to (1 / ||dL_i/d soft prompt||)^alpha, summing
to 1. Lion, linear warm-up, gradient clipping. TA and RPS accuracy on validation examples is logged
every ``eval_every`` steps and the best soft prompt is kept. A killed run resumes from its checkpoints
(``<out>.partial/`` by default; see :mod:`delrec.checkpoints`). Under torchrun each rank takes a share
of both batches and the task gradients are summed across ranks before GradNorm weighs them (see
:mod:`delrec.distributed`); with ``sharding: fsdp`` the frozen LLM's layers are sharded across the
ranks (:mod:`delrec.llm.sharding`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from delrec import distributed, layout
from delrec.artifacts import atomic_dir, read_manifest, write_json_atomic, write_manifest
from delrec.checkpoints import Checkpoints
from delrec.data import load_dataset
from delrec.errors import DelrecError
from delrec.llm.backbone import stage_backbone
from delrec.llm.optim import Lion, linear_warmup
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import TA_MIN_HISTORY, rps_instance, ta_instance, ta_rows, tail_rows, teacher_name
from delrec.llm.templates import PromptBuilder
from delrec.llm.training import (
    LLMStageConfig,
    apply_sharding,
    copy_tiny_backbone,
    instance_ranks,
    keep_tiny_backbone,
    rank_share_loss,
    setup_data_parallel,
    stage_loop,
    stage_prompt_builder,
    write_on_main,
)
from delrec.loop import LoopResult, optimiser_state, restore_optimiser_state
from delrec.teachers import load_topk

log = logging.getLogger(__name__)


class DistillConfig(LLMStageConfig):
    """Config of the distill stage (defaults: the paper's)."""

    soft_tokens: int = Field(100, ge=1)
    soft_init: Literal["normal", "vocab"] = "normal"
    """normal: N(0, 1) (the paper's); vocab: copies of random vocabulary embeddings"""
    ta_next: Literal["teacher", "real"] = "teacher"
    """TA's "next item they plan to consume": the teacher's top-1 (default) or the real next item"""
    steps: int = Field(800, ge=1)
    batch_size: int = Field(20, ge=1)
    """instances per task per step (one TA and one RPS batch each step)"""
    lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(400, ge=0)
    grad_clip: float = Field(2.0, gt=0)
    gradnorm_alpha: float = Field(0.5, ge=0)


def gradnorm_weights(grads: list[torch.Tensor], alpha: float) -> list[float]:
    """w_i proportional to (1 / ||g_i||)^alpha, normalised to sum to 1."""
    inv = [(1.0 / max(float(g.norm()), 1e-12)) ** alpha for g in grads]
    return [w / sum(inv) for w in inv]


def distill(
    dataset_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    config: DistillConfig,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
) -> dict:
    """Train the soft prompt; write it (best by validation accuracy) with its prompt config to ``out``.

    ``checkpoint``: where the training state is kept and resumed from, a folder or an ``s3://`` prefix
    (default ``<out>.partial``; see :class:`delrec.checkpoints.Checkpoints`).
    """
    started = time.time()
    device = setup_data_parallel(config)
    checkpoints = Checkpoints.for_output(out, checkpoint)
    dataset = load_dataset(dataset_dir)
    topk = load_topk(teacher_dir, dataset_dir)
    teacher = teacher_name(teacher_dir)
    torch.manual_seed(config.seed)
    backbone = stage_backbone(
        config.backbone, None, titles=dataset.titles, device=device, autocast=config.bf16
    )
    keep_tiny_backbone(backbone, checkpoints)
    apply_sharding(config, backbone)
    builder = stage_prompt_builder(config, backbone, dataset, teacher, config.soft_tokens)
    soft = SoftPrompt.initialised(
        config.soft_tokens, backbone.input_embeddings, config.soft_init, config.seed
    )
    training = _PromptTraining(_Tasks(dataset, topk, builder, config), backbone, soft)
    backbone.model.eval()  # frozen: dropout off
    run_key = {
        "dataset": read_manifest(dataset_dir)["id"],
        "teacher": read_manifest(teacher_dir)["id"],
        "backbone": backbone.fingerprint(),
    }
    result = stage_loop(
        config,
        "distill",
        0,
        run_key,
        checkpoints,
        training,
        evaluate=training.evaluate,
        score=_mean_accuracy,
        snapshot=lambda: {"soft": soft.weight.detach().cpu().clone()},
        postfix=("loss_ta", "loss_rps"),
    ).run()
    _keep_best(result, soft)
    metrics = _metrics(result, time.time() - started)
    metrics = write_on_main(
        lambda scratch: _write_output(
            out,
            config,
            dataset,
            backbone,
            soft,
            teacher,
            metrics,
            result.history,
            dataset_dir,
            teacher_dir,
            scratch,
        ),
        checkpoints,
        metrics,
    )
    log.info(
        "distill done in %.0f s: best valid accuracy %.4f at step %d",
        metrics["seconds"],
        result.best_score,
        result.best_step,
    )
    return metrics


def _keep_best(result, soft: SoftPrompt) -> None:
    """Put the best soft prompt of the run into ``soft``, warning loudly if it is the untrained one."""
    if result.best_step == 0:
        log.warning(
            "NO LEARNING: the untrained soft prompt (step 0) scored best on validation (%.4f); it is the one "
            "kept. Train longer, raise lr, or use more validation examples (eval_examples).",
            result.best_score,
        )
    with torch.no_grad():
        soft.weight.copy_(result.best_state["soft"])


def _mean_accuracy(record: dict) -> float:
    """The figure that picks the best soft prompt: the mean of the two tasks' validation accuracies."""
    return (record["valid_ta_acc"] + record["valid_rps_acc"]) / 2


def _metrics(result: LoopResult, seconds: float) -> dict:
    last = result.history[-1]
    return {
        "valid_ta_acc": float(last.get("valid_ta_acc", 0.0)),
        "valid_rps_acc": float(last.get("valid_rps_acc", 0.0)),
        "valid_acc_step0": float(_mean_accuracy(result.history[0])),
        "best_valid_acc": result.best_score,
        "best_step": result.best_step,
        "final_loss_ta": float(last.get("loss_ta", float("nan"))),
        "final_loss_rps": float(last.get("loss_rps", float("nan"))),
        "seconds": seconds,
    }


class _PromptTraining:
    """Stage 1's optimisation step (TA + RPS, GradNorm-weighted), validation and checkpoint state."""

    def __init__(self, tasks: _Tasks, backbone, soft: SoftPrompt):
        self.tasks, self.backbone, self.soft, self.config = tasks, backbone, soft, tasks.config
        self.valid_ta, self.valid_rps = tasks.validation()
        self.optimizer = Lion([soft.weight], lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.scheduler = linear_warmup(self.optimizer, self.config.warmup_steps, self.config.steps)
        self.params = {"soft": soft.weight}

    def step(self, index: int, rng: np.random.Generator) -> dict:
        config, soft, builder = self.config, self.soft, self.tasks.builder
        losses, grads = [], []
        # Every rank draws both global batches (the same generator state) and scores its share of each.
        for batch in (self.tasks.ta_batch(rng, "train"), self.tasks.rps_batch(rng, "train")):
            loss = rank_share_loss(self.backbone, soft, builder, batch, config.objective, config.scoring)
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, soft.weight)[0])
        distributed.sum_across_ranks(grads + losses)  # each task's global-batch gradient and mean loss
        w_ta, w_rps = gradnorm_weights(grads, config.gradnorm_alpha)
        soft.weight.grad = w_ta * grads[0] + w_rps * grads[1]
        grad_norm = float(torch.nn.utils.clip_grad_norm_([soft.weight], config.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss_ta": losses[0].item(),
            "loss_rps": losses[1].item(),
            "w_ta": w_ta,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
        }

    def evaluate(self) -> dict:
        kw = {"reduction": self.config.scoring, "batch_size": self.config.eval_batch_size}
        acc = {}
        for name, instances in (("valid_ta_acc", self.valid_ta), ("valid_rps_acc", self.valid_rps)):
            ranks = instance_ranks(self.backbone, self.soft, self.tasks.builder, instances, desc=name, **kw)
            acc[name] = float((ranks == 0).mean()) if len(ranks) else 0.0
        return acc

    def state(self) -> dict:
        return optimiser_state(self.params, self.optimizer, self.scheduler)

    def restore(self, saved: dict) -> None:
        restore_optimiser_state(saved, self.params, self.optimizer, self.scheduler)


class _Tasks:
    """Builds TA and RPS instances from a split's examples and the teacher's top-k."""

    def __init__(self, dataset, topk, builder: PromptBuilder, config: DistillConfig):
        self.dataset, self.topk, self.builder, self.config = dataset, topk, builder, config
        recent = tail_rows(dataset.examples["train"], config.train_tail)
        self.train_rows = {"train": recent, "valid": np.arange(len(dataset.examples["valid"]))}
        self.ta_rows = {
            "train": np.intersect1d(ta_rows(dataset, "train"), recent),
            "valid": ta_rows(dataset, "valid"),
        }
        if not len(self.ta_rows["train"]) or not len(dataset.examples["train"]):
            raise DelrecError(f"no training example has the {TA_MIN_HISTORY} history items TA needs")
        if dataset.num_items < config.num_candidates + config.history_items + 10:
            raise DelrecError(f"{dataset.num_items} items are too few for {config.num_candidates} candidates")

    def _next(self, split: str, row: int) -> int:
        if self.config.ta_next == "teacher":
            return int(self.topk[split][row][0])
        return int(self.dataset.examples[split].targets[row])

    def ta_batch(self, rng: np.random.Generator, split: str, rows: np.ndarray | None = None) -> list:
        rows = rng.choice(self.ta_rows[split], size=self.config.batch_size) if rows is None else rows
        hists, cfg = self.dataset.examples[split].histories, self.config
        return [
            ta_instance(
                self.builder, rng, hists[r], self._next(split, r), self.dataset.num_items, cfg.num_candidates
            )
            for r in rows
        ]

    def rps_batch(self, rng: np.random.Generator, split: str, rows: np.ndarray | None = None) -> list:
        examples = self.dataset.examples[split]
        rows = rng.choice(self.train_rows[split], size=self.config.batch_size) if rows is None else rows
        return [
            rps_instance(
                self.builder,
                rng,
                examples.histories[r],
                self.topk[split][r],
                self.dataset.num_items,
                self.config.num_candidates,
            )
            for r in rows
        ]

    def validation(self) -> tuple[list, list]:
        """Fixed validation instances (their own seed): the first ones long enough for each task."""
        rng = np.random.default_rng([self.config.seed, 1])
        count = self.config.eval_examples
        n_valid = len(self.dataset.examples["valid"])
        return (
            self.ta_batch(rng, "valid", self.ta_rows["valid"][:count]),
            self.rps_batch(rng, "valid", np.arange(min(count, n_valid))),
        )


def _write_output(
    out, config, dataset, backbone, soft, teacher, metrics, history, dataset_dir, teacher_dir, scratch: Path
) -> None:
    """``scratch`` (the checkpoint folder) holds the tiny test backbone's weights, saved before sharding."""
    with atomic_dir(out) as tmp:
        soft.save(tmp, init=config.soft_init, backbone=backbone.name, step=metrics["best_step"])
        copy_tiny_backbone(backbone, scratch, tmp)
        prompt_config = {
            "teacher": teacher,
            "domain": dataset.domain,
            "soft_tokens": config.soft_tokens,
            **config.prompt_settings().as_json(),
            "backbone": backbone.name,
            "backbone_fingerprint": backbone.fingerprint(),
        }
        write_json_atomic(tmp / layout.PROMPT_JSON, prompt_config)
        write_json_atomic(tmp / layout.METRICS_JSON, metrics)
        write_json_atomic(tmp / layout.HISTORY_JSON, history)
        write_manifest(
            tmp,
            producer=layout.DISTILL,
            config=config.model_dump(mode="json"),
            inputs={"dataset": dataset_dir, "teacher": teacher_dir},
            rows={"steps": config.steps},
            extra={"backbone": backbone.name, "backbone_fingerprint": prompt_config["backbone_fingerprint"]},
        )


def read_prompt_config(distill_dir: str | os.PathLike) -> dict:
    """The prompt config a distill output carries (teacher name, domain, soft tokens, backbone)."""
    read_manifest(distill_dir, producer=layout.DISTILL)
    path = Path(distill_dir) / layout.PROMPT_JSON
    if not path.is_file():
        raise DelrecError(f"no {layout.PROMPT_JSON}", path=distill_dir)
    return json.loads(path.read_text())
