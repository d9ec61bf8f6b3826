"""Stage 1, pattern distillation: train a soft prompt on TA and RPS with the LLM frozen.

Each step takes one Temporal Analysis batch and one Recommendation Pattern Simulating batch (built
from training examples and the teacher's top-10), computes each task's loss, and combines the two
gradients with GradNorm-like weights: w_i proportional to (1 / ||dL_i/d soft prompt||)^alpha, summing
to 1. Lion, linear warm-up, gradient clipping. TA and RPS accuracy on validation examples is logged
every ``eval_every`` steps and the best soft prompt is kept. A killed run resumes from ``<out>.partial/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from delrec import layout
from delrec.artifacts import (
    atomic_dir,
    load_checkpoint,
    partial_dir,
    read_manifest,
    save_checkpoint,
    write_json_atomic,
    write_manifest,
)
from delrec.config import StageConfig
from delrec.data import load_dataset
from delrec.errors import DelrecError
from delrec.llm.backbone import save_if_built, stage_backbone
from delrec.llm.optim import Lion, linear_warmup
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import TA_MIN_HISTORY, rps_instance, ta_instance, ta_rows, teacher_name
from delrec.llm.templates import PromptBuilder
from delrec.llm.training import (
    Objective,
    instance_ranks,
    task_loss,
)
from delrec.teachers import load_topk

log = logging.getLogger(__name__)

PRODUCER = layout.DISTILL
PROMPT_JSON = layout.PROMPT_JSON


class DistillConfig(StageConfig):
    """Config of the distill stage (defaults: the paper's)."""

    backbone: str = "smollm2-135m"
    """built-in name (smollm2-135m, tiny-llama, tiny-t5), saved folder, or transformers id/path"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    """bf16 autocast where the hardware supports it"""
    seed: int = 42
    soft_tokens: int = Field(100, ge=1)
    soft_init: Literal["normal", "vocab"] = "normal"
    """normal: N(0, 1) (the paper's); vocab: copies of random vocabulary embeddings"""
    history_items: int = Field(10, ge=1)
    """history cut to the most recent N items in prompts"""
    max_prompt_tokens: int = Field(768, ge=32)
    max_title_chars: int = Field(80, ge=8)
    num_candidates: int = Field(20, ge=2)
    ta_next: Literal["teacher", "real"] = "teacher"
    """TA's "next item they plan to consume": the teacher's top-1 (default) or the real next item"""
    objective: Objective = "candidates"
    """candidates: cross-entropy over the candidates' scores; likelihood: the answer title's NLL"""
    scoring: Literal["mean", "sum", "first"] = "mean"
    steps: int = Field(800, ge=1)
    batch_size: int = Field(20, ge=1)
    """instances per task per step (one TA and one RPS batch each step)"""
    lr: float = Field(5e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(400, ge=0)
    grad_clip: float = Field(2.0, gt=0)
    gradnorm_alpha: float = Field(0.5, ge=0)
    eval_every: int = Field(100, ge=1)
    eval_examples: int = Field(200, ge=1)
    """validation examples for TA/RPS accuracy (the first ones with a long enough history)"""
    eval_batch_size: int = Field(8, ge=1)
    checkpoint_every: int = Field(50, ge=1)


def gradnorm_weights(grads: list[torch.Tensor], alpha: float) -> list[float]:
    """w_i proportional to (1 / ||g_i||)^alpha, normalised to sum to 1."""
    inv = [(1.0 / max(float(g.norm()), 1e-12)) ** alpha for g in grads]
    return [w / sum(inv) for w in inv]


def distill(
    dataset_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    config: DistillConfig,
    out: str | os.PathLike,
) -> dict:
    """Train the soft prompt; write it (best by validation accuracy) with its prompt config to ``out``."""
    started = time.time()
    dataset = load_dataset(dataset_dir)
    topk = load_topk(teacher_dir, dataset_dir)
    teacher = teacher_name(teacher_dir)
    torch.manual_seed(config.seed)
    backbone = stage_backbone(
        config.backbone, None, titles=dataset.titles, device=config.device, autocast=config.bf16
    )
    builder = PromptBuilder(
        backbone,
        dataset.titles,
        domain=dataset.domain,
        teacher=teacher,
        n_soft=config.soft_tokens,
        history_items=config.history_items,
        max_prompt_tokens=config.max_prompt_tokens,
        max_title_chars=config.max_title_chars,
    )
    train, valid = dataset.examples["train"], dataset.examples["valid"]
    ta_train, ta_valid = ta_rows(dataset, "train"), ta_rows(dataset, "valid")
    if not len(ta_train) or not len(train):
        raise DelrecError(
            f"no training example has the {TA_MIN_HISTORY} history items TA needs", path=dataset_dir
        )
    if dataset.num_items < config.num_candidates + config.history_items + 10:
        raise DelrecError(
            f"{dataset.num_items} items are too few for {config.num_candidates} candidates", path=dataset_dir
        )

    def ta_next(split: str, row: int) -> int:
        return int(
            topk[split][row][0] if config.ta_next == "teacher" else dataset.examples[split].targets[row]
        )

    def ta_batch(rng: np.random.Generator, split: str, rows: np.ndarray):
        hists = dataset.examples[split].histories
        return [
            ta_instance(builder, rng, hists[r], ta_next(split, r), dataset.num_items, config.num_candidates)
            for r in rows
        ]

    def rps_batch(rng: np.random.Generator, split: str, rows: np.ndarray):
        hists = dataset.examples[split].histories
        return [
            rps_instance(builder, rng, hists[r], topk[split][r], dataset.num_items, config.num_candidates)
            for r in rows
        ]

    # Fixed validation instances (their own seed), scored after every eval_every steps.
    eval_rng = np.random.default_rng([config.seed, 1])
    valid_ta = ta_batch(eval_rng, "valid", ta_valid[: config.eval_examples])
    valid_rps = rps_batch(eval_rng, "valid", np.arange(min(config.eval_examples, len(valid))))

    soft = SoftPrompt.initialised(
        config.soft_tokens, backbone.input_embeddings, config.soft_init, config.seed
    )
    optimizer = Lion([soft.weight], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_warmup(optimizer, config.warmup_steps, config.steps)
    run_key = {
        "config": config.hash(),
        "dataset": read_manifest(dataset_dir)["id"],
        "teacher": read_manifest(teacher_dir)["id"],
        "backbone": backbone.fingerprint(),
    }
    partial = partial_dir(out)
    state = load_checkpoint(partial, run_key)
    step, best, history = 0, {"score": -1.0, "step": 0, "weight": soft.weight.detach().clone()}, []
    if state is not None:
        with torch.no_grad():
            soft.weight.copy_(state["soft"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, history = state["step"], state["best"], state["history"]

    def evaluate_now() -> dict:
        kw = {"reduction": config.scoring, "batch_size": config.eval_batch_size}
        ta_acc = (
            float((instance_ranks(backbone, soft, builder, valid_ta, desc="valid TA", **kw) == 0).mean())
            if valid_ta
            else 0.0
        )
        rps_acc = float(
            (instance_ranks(backbone, soft, builder, valid_rps, desc="valid RPS", **kw) == 0).mean()
        )
        return {"valid_ta_acc": ta_acc, "valid_rps_acc": rps_acc}

    if step == 0:
        initial = evaluate_now()
        history.append({"step": 0, **initial})
        log.info("step 0: %s", initial)
        best = {
            "score": (initial["valid_ta_acc"] + initial["valid_rps_acc"]) / 2,
            "step": 0,
            "weight": soft.weight.detach().clone(),
        }
    backbone.model.eval()  # frozen: dropout off
    progress = tqdm(
        range(step, config.steps), desc="distill", initial=step, total=config.steps, mininterval=5
    )
    for step in progress:
        rng = np.random.default_rng(
            [config.seed, 0, step]
        )  # per-step seed: a resumed run draws the same batches
        ta = ta_batch(rng, "train", rng.choice(ta_train, size=config.batch_size))
        rps = rps_batch(rng, "train", rng.choice(len(train), size=config.batch_size))
        loss_ta = task_loss(backbone, soft, builder, ta, config.objective, config.scoring)
        (grad_ta,) = torch.autograd.grad(loss_ta, soft.weight)
        loss_rps = task_loss(backbone, soft, builder, rps, config.objective, config.scoring)
        (grad_rps,) = torch.autograd.grad(loss_rps, soft.weight)
        w_ta, w_rps = gradnorm_weights([grad_ta, grad_rps], config.gradnorm_alpha)
        soft.weight.grad = w_ta * grad_ta + w_rps * grad_rps
        grad_norm = float(torch.nn.utils.clip_grad_norm_([soft.weight], config.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss_ta": loss_ta.item(),
            "loss_rps": loss_rps.item(),
            "w_ta": w_ta,
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0],
        }
        progress.set_postfix(ta=f"{record['loss_ta']:.3f}", rps=f"{record['loss_rps']:.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record.update(evaluate_now())
            score = (record["valid_ta_acc"] + record["valid_rps_acc"]) / 2
            if score > best["score"]:
                best = {"score": score, "step": step + 1, "weight": soft.weight.detach().clone()}
            log.info("step %d: %s", step + 1, {k: round(v, 4) for k, v in record.items() if k != "step"})
        history.append(record)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(
                partial,
                {
                    "run_key": run_key,
                    "step": step + 1,
                    "soft": soft.weight.detach().cpu(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best": best,
                    "history": history,
                },
            )

    last = history[-1]
    metrics = {
        "valid_ta_acc": float(last.get("valid_ta_acc", 0.0)),
        "valid_rps_acc": float(last.get("valid_rps_acc", 0.0)),
        "best_valid_acc": float(best["score"]),
        "best_step": float(best["step"]),
        "final_loss_ta": float(last.get("loss_ta", float("nan"))),
        "final_loss_rps": float(last.get("loss_rps", float("nan"))),
        "seconds": time.time() - started,
    }
    with atomic_dir(out) as tmp:
        with torch.no_grad():
            soft.weight.copy_(best["weight"])
        soft.save(tmp, init=config.soft_init, backbone=backbone.name, step=best["step"])
        save_if_built(backbone, tmp)
        prompt_config = {
            "teacher": teacher,
            "domain": dataset.domain,
            "soft_tokens": config.soft_tokens,
            "backbone": backbone.name,
            "backbone_fingerprint": backbone.fingerprint(),
        }
        write_json_atomic(tmp / PROMPT_JSON, prompt_config)
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "history.json", history)
        write_manifest(
            tmp,
            producer=PRODUCER,
            config=config.model_dump(mode="json"),
            inputs={"dataset": dataset_dir, "teacher": teacher_dir},
            rows={"steps": config.steps},
            extra={"backbone": backbone.name, "backbone_fingerprint": prompt_config["backbone_fingerprint"]},
        )
    shutil.rmtree(partial, ignore_errors=True)
    log.info(
        "distill done in %.0f s: best valid accuracy %.4f at step %d",
        metrics["seconds"],
        best["score"],
        best["step"],
    )
    return metrics


def read_prompt_config(distill_dir: str | os.PathLike) -> dict:
    """The prompt config a distill output carries (teacher name, domain, soft tokens, backbone)."""
    read_manifest(distill_dir, producer=PRODUCER)
    path = Path(distill_dir) / PROMPT_JSON
    if not path.is_file():
        raise DelrecError(f"no {PROMPT_JSON}", path=distill_dir)
    return json.loads(path.read_text())
