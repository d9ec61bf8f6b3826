"""Stage 2, LLM fine-tuning: AdaLoRA (option: LoRA) on the attention projections, soft prompt frozen.

The stage-2 prompt holds the frozen soft prompt from distill; no teacher output is in it. Without a
distill folder the same LLM is fine-tuned on the prompt without the soft prompt (the ablation). The
objective is cross-entropy over the candidates' scores (default) or the target title's likelihood;
with AdaLoRA the loss includes its orthogonality regulariser and ``update_and_allocate`` runs every
step, as AdaLoRA intends. A killed run resumes from ``<out>.partial/``.
"""

from __future__ import annotations

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
from delrec.distill import read_prompt_config
from delrec.errors import DelrecError
from delrec.llm.backbone import TINY, Backbone, stage_backbone
from delrec.llm.optim import linear_warmup
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import stage2_instance
from delrec.llm.templates import PromptBuilder
from delrec.llm.training import (
    Objective,
    instance_ranks,
    task_loss,
)

log = logging.getLogger(__name__)

PRODUCER = layout.FINETUNE
ADAPTER = layout.ADAPTER
PROMPT_JSON = layout.PROMPT_JSON
# Attention query/value projections by model family (transformers module names).
TARGETS = {"t5": ["q", "v"], "gpt2": ["c_attn"]}
DEFAULT_TARGETS = ["q_proj", "v_proj"]


class FinetuneConfig(StageConfig):
    """Config of the finetune stage (defaults: the paper's)."""

    backbone: str = "smollm2-135m"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    seed: int = 42
    adapter: Literal["adalora", "lora"] = "adalora"
    target_modules: list[str] | None = None
    """None: the attention query and value projections of the model family"""
    init_r: int = Field(320, ge=1)
    """AdaLoRA's initial rank"""
    target_r: int = Field(8, ge=1)
    """AdaLoRA's target average rank, and plain LoRA's rank"""
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    tinit: int | None = Field(None, ge=0)
    """AdaLoRA steps before rank pruning starts; None: 10% of steps"""
    tfinal: int | None = Field(None, ge=0)
    """AdaLoRA final steps with the rank budget fixed; None: 20% of steps"""
    delta_t: int = Field(1, ge=1)
    """AdaLoRA steps between rank re-allocations"""
    orth_reg_weight: float = Field(0.5, ge=0)
    objective: Objective = "candidates"
    scoring: Literal["mean", "sum", "first"] = "mean"
    history_items: int = Field(10, ge=1)
    max_prompt_tokens: int = Field(768, ge=32)
    max_title_chars: int = Field(80, ge=8)
    num_candidates: int = Field(20, ge=2)
    steps: int = Field(1400, ge=1)
    batch_size: int = Field(20, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(800, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(200, ge=1)
    eval_examples: int = Field(200, ge=1)
    """validation examples (with their stored candidates) for HR@1 during training"""
    eval_batch_size: int = Field(8, ge=1)
    checkpoint_every: int = Field(50, ge=1)


def adapter_config(config: FinetuneConfig, backbone: Backbone):
    """The peft config: AdaLoRA (default) or LoRA on the query/value projections."""
    from peft import AdaLoraConfig, LoraConfig

    targets = config.target_modules or TARGETS.get(backbone.base_model().config.model_type, DEFAULT_TARGETS)
    common = {"target_modules": targets, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}
    if config.adapter == "lora":
        return LoraConfig(r=config.target_r, **common)
    if config.target_r >= config.init_r:
        raise DelrecError(
            f"AdaLoRA prunes ranks from init_r down to target_r: needs target_r < init_r, got "
            f"{config.target_r} >= {config.init_r}",
            field="target_r",
        )
    tinit = config.tinit if config.tinit is not None else config.steps // 10
    tfinal = config.tfinal if config.tfinal is not None else config.steps // 5
    if tinit >= config.steps - tfinal:
        raise DelrecError(
            f"AdaLoRA needs tinit < steps - tfinal, got tinit={tinit}, tfinal={tfinal}, steps={config.steps}",
            field="tinit",
        )
    return AdaLoraConfig(
        init_r=config.init_r,
        target_r=config.target_r,
        total_step=config.steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=config.delta_t,
        orth_reg_weight=config.orth_reg_weight,
        **common,
    )


def orthogonal_regulariser(model: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """AdaLoRA's regulariser: mean ||P P^T - I||_F over the lora_A / lora_B matrices.

    peft adds it only to a loss computed by the model's own forward with labels; our losses come from
    candidate scoring, so it is added here (same formula as peft's AdaLoraModel.forward).
    """
    terms = []
    for name, param in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = param @ param.T if "lora_A" in name else param.T @ param
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device), "fro"))
    return torch.stack(terms).mean()


def _allocator_state(peft_model) -> dict | None:
    allocator = getattr(peft_model.base_model, "rankallocator", None)
    if allocator is None:
        return None
    return {
        "ipt": allocator.ipt,
        "exp_avg_ipt": allocator.exp_avg_ipt,
        "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": peft_model.peft_config["default"].rank_pattern,
    }


def _restore_allocator(peft_model, state: dict | None) -> None:
    if state is None:
        return
    allocator = peft_model.base_model.rankallocator
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
        state["ipt"],
        state["exp_avg_ipt"],
        state["exp_avg_unc"],
    )
    peft_model.peft_config["default"].rank_pattern = state["rank_pattern"]


def finetune(
    dataset_dir: str | os.PathLike,
    config: FinetuneConfig,
    out: str | os.PathLike,
    distill_dir: str | os.PathLike | None = None,
) -> dict:
    """Fine-tune the LLM with the frozen soft prompt from ``distill_dir`` (None: the ablation)."""
    from peft import get_peft_model

    started = time.time()
    dataset = load_dataset(dataset_dir)
    soft: SoftPrompt | None = None
    teacher = ""
    if distill_dir is not None:
        read_manifest(distill_dir, producer="distill")
        prompt_config = read_prompt_config(distill_dir)
        teacher = prompt_config["teacher"]
    torch.manual_seed(config.seed)
    backbone = stage_backbone(
        config.backbone, distill_dir, titles=dataset.titles, device=config.device, autocast=config.bf16
    )
    if distill_dir is not None:
        if backbone.fingerprint() != prompt_config["backbone_fingerprint"]:
            raise DelrecError(
                "the backbone's weights differ from those the soft prompt was distilled on",
                path=Path(distill_dir) / PROMPT_JSON,
                field="backbone_fingerprint",
            )
        soft = SoftPrompt.load(distill_dir, backbone.device)
        soft.weight.requires_grad_(False)
    fingerprint = backbone.fingerprint()
    builder = PromptBuilder(
        backbone,
        dataset.titles,
        domain=dataset.domain,
        teacher=teacher,
        n_soft=soft.n_tokens if soft is not None else 0,
        history_items=config.history_items,
        max_prompt_tokens=config.max_prompt_tokens,
        max_title_chars=config.max_title_chars,
    )
    use_soft = soft is not None
    train, valid = dataset.examples["train"], dataset.examples["valid"]
    if not len(train):
        raise DelrecError("no training examples", path=dataset_dir)
    n_valid = min(config.eval_examples, len(valid))
    valid_instances = [
        stage2_instance(
            builder,
            valid.histories[i],
            int(valid.targets[i]),
            candidates=dataset.candidates["valid"][i],
            soft=use_soft,
        )
        for i in range(n_valid)
    ]

    partial = partial_dir(out)
    if backbone.name in TINY:  # saved now: the base weights are harder to get back once peft wraps them
        backbone.save(partial / "backbone")
    peft_model = get_peft_model(backbone.model, adapter_config(config, backbone))
    backbone.model = peft_model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    log.info("%s: %.2fM trainable parameters", config.adapter, sum(p.numel() for p in trainable) / 1e6)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_warmup(optimizer, config.warmup_steps, config.steps)
    run_key = {
        "config": config.hash(),
        "dataset": read_manifest(dataset_dir)["id"],
        "distill": read_manifest(distill_dir)["id"] if distill_dir is not None else "",
        "backbone": fingerprint,
    }
    state = load_checkpoint(partial, run_key)
    step, history = 0, []
    if state is not None:
        names = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, value in state["trainable"].items():
                names[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_allocator(peft_model, state["allocator"])
        step, history = state["step"], state["history"]

    def valid_hr1() -> float:
        ranks = instance_ranks(
            backbone,
            soft,
            builder,
            valid_instances,
            reduction=config.scoring,
            batch_size=config.eval_batch_size,
            desc="valid",
        )
        return float((ranks == 0).mean()) if len(ranks) else 0.0

    if step == 0 and valid_instances:
        history.append({"step": 0, "valid_hr1": valid_hr1()})
        log.info("step 0: valid HR@1 %.4f", history[-1]["valid_hr1"])
    adalora = config.adapter == "adalora"
    peft_model.train()
    progress = tqdm(
        range(step, config.steps), desc="finetune", initial=step, total=config.steps, mininterval=5
    )
    for step in progress:
        rng = np.random.default_rng([config.seed, 2, step])
        torch.manual_seed(
            config.seed * 1_000_003 + step
        )  # per-step dropout seed: resuming gives the same run
        rows = rng.choice(len(train), size=config.batch_size)
        batch = [
            stage2_instance(
                builder,
                train.histories[r],
                int(train.targets[r]),
                rng=rng,
                num_items=dataset.num_items,
                num_candidates=config.num_candidates,
                soft=use_soft,
            )
            for r in rows
        ]
        task = task_loss(backbone, soft, builder, batch, config.objective, config.scoring)
        loss = task + config.orth_reg_weight * orthogonal_regulariser(peft_model) if adalora else task
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip))
        optimizer.step()
        scheduler.step()
        if adalora:
            peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss": task.item(),
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0],
        }
        progress.set_postfix(loss=f"{record['loss']:.3f}")
        if valid_instances and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            record["valid_hr1"] = valid_hr1()
            log.info("step %d: loss %.4f valid HR@1 %.4f", step + 1, record["loss"], record["valid_hr1"])
        history.append(record)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(
                partial,
                {
                    "run_key": run_key,
                    "step": step + 1,
                    "trainable": {
                        n: p.detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad
                    },
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "allocator": _allocator_state(peft_model) if adalora else None,
                    "history": history,
                },
            )

    peft_model.eval()
    last = history[-1]
    metrics = {
        "valid_hr1": float(last.get("valid_hr1", 0.0)),
        "final_loss": float(last.get("loss", float("nan"))),
        "seconds": time.time() - started,
    }
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(tmp / ADAPTER)
        if soft is not None:
            soft.save(tmp, **{k: v for k, v in read_prompt_config(distill_dir).items() if k == "teacher"})
        if backbone.name in TINY:
            shutil.copytree(partial / "backbone", tmp / "backbone")
        prompt_config = {
            "teacher": teacher,
            "domain": dataset.domain,
            "soft_tokens": soft.n_tokens if soft is not None else 0,
            "history_items": config.history_items,
            "max_prompt_tokens": config.max_prompt_tokens,
            "max_title_chars": config.max_title_chars,
            "scoring": config.scoring,
            "backbone": backbone.name,
            "backbone_fingerprint": fingerprint,
        }
        write_json_atomic(tmp / PROMPT_JSON, prompt_config)
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "history.json", history)
        inputs = {"dataset": dataset_dir} | ({"distill": distill_dir} if distill_dir is not None else {})
        write_manifest(
            tmp,
            producer=PRODUCER,
            config=config.model_dump(mode="json"),
            inputs=inputs,
            rows={"steps": config.steps},
            extra={
                "backbone": backbone.name,
                "backbone_fingerprint": fingerprint,
                "soft_prompt": soft is not None,
            },
        )
    shutil.rmtree(partial, ignore_errors=True)
    log.info("finetune done in %.0f s: valid HR@1 %.4f", metrics["seconds"], metrics["valid_hr1"])
    return metrics
