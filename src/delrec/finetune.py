"""Stage 2, LLM fine-tuning: AdaLoRA (option: LoRA) on the attention projections, soft prompt frozen.

The stage-2 prompt holds the frozen soft prompt from distill; no teacher output is in it. Without a
distill folder the same LLM is fine-tuned on the prompt without the soft prompt (the ablation). The
objective is cross-entropy over the candidates' scores (default) or the target title's likelihood;
with AdaLoRA the loss includes its orthogonality regulariser and ``update_and_allocate`` runs every
step, as AdaLoRA intends. A killed run resumes from its checkpoints (``<out>.partial/`` by default; see
:mod:`delrec.checkpoints`). Under torchrun each rank takes a share of every batch and the adapter
gradients are summed across ranks before the step (see :mod:`delrec.distributed`); with
``sharding: fsdp`` the backbone's frozen layers are sharded too and the adapters kept whole on every
rank (:mod:`delrec.llm.sharding`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from delrec import distributed, layout
from delrec.adapter_io import quiet_wrap, save_adapter
from delrec.artifacts import atomic_dir, read_manifest, require_same_input, write_json_atomic, write_manifest
from delrec.checkpoints import Checkpoints
from delrec.data import load_dataset
from delrec.distill import read_prompt_config
from delrec.errors import DelrecError
from delrec.llm.backbone import Backbone, stage_backbone
from delrec.llm.optim import linear_warmup, make_optimizer
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import stage2_instance, tail_rows
from delrec.llm.templates import PromptBuilder
from delrec.llm.training import (
    LLMStageConfig,
    apply_sharding,
    copy_tiny_backbone,
    instance_scores,
    keep_tiny_backbone,
    rank_share_loss,
    setup_data_parallel,
    stage_loop,
    stage_prompt_builder,
    write_on_main,
)
from delrec.loop import optimiser_state, restore_optimiser_state
from delrec.metrics import target_ranks
from delrec.popularity import fit_prior_weight, log_counts, with_prior
from delrec.teachers import CandidateTeacher

log = logging.getLogger(__name__)

# Attention query/value projections by model family (transformers module names).
TARGETS = {"t5": ["q", "v"], "gpt2": ["c_attn"]}
DEFAULT_TARGETS = ["q_proj", "v_proj"]


class FinetuneConfig(LLMStageConfig):
    """Config of the finetune stage (defaults: the paper's)."""

    adapter: Literal["adalora", "lora"] = "adalora"
    target_modules: list[str] | None = None
    """None: the attention query and value projections of the model family"""
    adapter_layers: int | None = Field(None, ge=1)
    """adapt only the top N transformer layers (peft ``layers_to_transform``): backward stops below
    them, so a step costs less; None: every layer (the paper's)"""
    init_r: int = Field(320, ge=1)
    """AdaLoRA's initial rank (the paper: 320)"""
    target_r: int = Field(8, ge=1)
    """AdaLoRA's target average rank, and plain LoRA's rank (the paper: 8)"""
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    tinit: int | None = Field(None, ge=0)
    """AdaLoRA steps before rank pruning starts; None: 10% of steps"""
    tfinal: int | None = Field(None, ge=0)
    """AdaLoRA final steps with the rank budget fixed; None: 20% of steps"""
    delta_t: int = Field(1, ge=1)
    """AdaLoRA steps between rank re-allocations"""
    orth_reg_weight: float = Field(0.5, ge=0)
    adalora_init: Literal["peft", "orthogonal", "lora"] = "peft"
    """peft: P and Q ~ N(0, 0.02) (the authors'); orthogonal: P's rows and Q's columns orthonormal, the
    shape AdaLoRA's regulariser pulls them to. E starts at 0 either way (the base model is unchanged at
    step 0), so at first only E (init_r numbers a layer) gets a gradient; with N(0, 0.02) factors a
    change of E moves a layer's output ~4x less. lora: P orthonormal, E = 1 and Q = 0, as LoRA starts
    (B = 0): the model is unchanged at step 0 and Q's out x init_r entries learn from the first step"""
    teacher_kd: float = Field(0.0, ge=0, le=1)
    """weight of the teacher's view in each training example's target over its candidates: (1 - w) x the
    right answer + w x the softmax of the teacher's scores of the candidates (knowledge distillation; needs
    the teacher folder). The teacher shapes training only: the prompt and serving stay teacher-free.
    The paper: 0 (the right answer only)"""
    teacher_kd_temperature: float = Field(1.0, gt=0)
    """temperature of the teacher's softmax over the candidates (higher: softer targets)"""
    popularity_prior: bool = False
    """after training, fit the weight of a popularity prior on the last evaluation's validation examples:
    evaluation and serving add weight x log(1 + the candidate's training interactions) to its LLM score
    (:mod:`delrec.popularity`; needs validation examples). The paper: none"""
    popularity_prior_train: float = Field(0.0, ge=0)
    """weight of the same prior added to the candidates' scores in the training loss (logit adjustment):
    the adapter then learns what popularity does not explain. Validation during training scores with
    it; the weight used after training is still fitted (needs ``popularity_prior``). The paper: none (0)"""
    optimizer: Literal["lion", "adamw"] = "lion"
    """the authors' code: Lion (8-bit), lr 1e-4, weight decay 1e-6"""
    steps: int = Field(1400, ge=1)
    batch_size: int = Field(20, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(800, ge=0)
    eval_every: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _teacher_kd_needs_candidates(self) -> FinetuneConfig:
        if self.teacher_kd > 0 and self.objective != "candidates":
            raise ValueError(
                "teacher_kd > 0 distils scores over the candidates: it needs objective candidates"
            )
        if self.popularity_prior_train > 0 and not (self.popularity_prior and self.objective == "candidates"):
            raise ValueError(
                "popularity_prior_train > 0 trains scores that need the prior: it needs popularity_prior: "
                "true (the weight used after training) and objective candidates"
            )
        return self


def adapter_config(config: FinetuneConfig, backbone: Backbone):
    """The peft config: AdaLoRA (default) or LoRA on the query/value projections."""
    from peft import AdaLoraConfig, LoraConfig

    targets = config.target_modules or TARGETS.get(backbone.base_model().config.model_type, DEFAULT_TARGETS)
    common = {"target_modules": targets, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout}
    if config.adapter_layers is not None:
        model_config = backbone.base_model().config
        n_layers = getattr(model_config, "num_hidden_layers", None) or model_config.num_layers
        if config.adapter_layers > n_layers:
            raise DelrecError(
                f"adapter_layers={config.adapter_layers} exceeds the backbone's {n_layers} layers",
                field="adapter_layers",
            )
        common["layers_to_transform"] = list(range(n_layers - config.adapter_layers, n_layers))
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


def init_adalora(model: torch.nn.Module, init: str) -> None:
    """Re-initialise AdaLoRA's P (``lora_A``), E (``lora_E``) and Q (``lora_B``) as ``adalora_init`` says:
    orthogonal: P's rows and Q's columns orthonormal (E stays 0); lora: P's rows orthonormal, E = 1, Q = 0."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                torch.nn.init.orthogonal_(param)
            elif "lora_B" in name and init == "orthogonal":
                torch.nn.init.orthogonal_(param)
            elif "lora_B" in name:
                param.zero_()
            elif "lora_E" in name and init == "lora":
                param.fill_(1.0)


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
    # Checkpoints load onto the CPU; the scores must sit where their parameters are (a GPU's).
    device = {name: p.device for name, p in peft_model.base_model.model.named_parameters()}

    def placed(scores: dict) -> dict:
        return {name: value.to(device.get(name, value.device)) for name, value in scores.items()}

    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
        placed(state["ipt"]),
        placed(state["exp_avg_ipt"]),
        placed(state["exp_avg_unc"]),
    )
    peft_model.peft_config["default"].rank_pattern = state["rank_pattern"]


def finetune(
    dataset_dir: str | os.PathLike,
    config: FinetuneConfig,
    out: str | os.PathLike,
    distill_dir: str | os.PathLike | None = None,
    *,
    teacher_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict:
    """Fine-tune the LLM with the frozen soft prompt from ``distill_dir`` (None: the ablation).

    ``teacher_dir``: the trained teacher, needed (and only read) when ``config.teacher_kd`` > 0.
    ``checkpoint``: where the training state is kept and resumed from, a folder or an ``s3://`` prefix
    (default ``<out>.partial``; see :class:`delrec.checkpoints.Checkpoints`).
    """
    started = time.time()
    teacher_dir, teacher_id = _checked_teacher(config, teacher_dir, dataset_dir)
    device = setup_data_parallel(config)
    dataset = load_dataset(dataset_dir)
    prompt_config = read_prompt_config(distill_dir) if distill_dir is not None else {"teacher": ""}
    torch.manual_seed(config.seed)
    backbone = stage_backbone(
        config.backbone, distill_dir, titles=dataset.titles, device=device, autocast=config.bf16
    )
    backbone.fingerprint()  # computed (and kept) now: peft renames the base weights it wraps
    soft = _frozen_soft_prompt(distill_dir, prompt_config, backbone, config.title_years)
    n_soft = soft.n_tokens if soft is not None else 0
    builder = stage_prompt_builder(config, backbone, dataset, prompt_config["teacher"], n_soft)
    checkpoints = Checkpoints.for_output(out, checkpoint)
    keep_tiny_backbone(backbone, checkpoints)
    _add_adapter(config, backbone)
    teacher = CandidateTeacher(teacher_dir) if teacher_dir is not None else None
    training = _AdapterTraining(config, dataset, backbone, soft, builder, teacher)
    if not len(training.train_rows):
        raise DelrecError("no training examples", path=dataset_dir)
    if config.popularity_prior and not training.valid:
        raise DelrecError(
            "popularity_prior is fitted on validation examples and this dataset has none",
            path=dataset_dir,
            field="popularity_prior",
        )
    backbone.model.train()
    run_key = {
        "dataset": read_manifest(dataset_dir)["id"],
        "distill": read_manifest(distill_dir)["id"] if distill_dir is not None else "",
        "backbone": backbone.fingerprint(),
        "teacher": teacher_id,
    }
    evaluate = training.evaluate if training.valid else None
    result = stage_loop(config, "finetune", 2, run_key, checkpoints, training, evaluate=evaluate).run()
    backbone.model.eval()
    metrics = _metrics(result.history, time.time() - started)
    if config.popularity_prior:
        metrics |= training.fit_prior()
    inputs = recorded_inputs(config, dataset_dir, distill_dir, teacher_dir)
    metrics = write_on_main(
        lambda scratch: _write_output(
            out, config, dataset, backbone, soft, prompt_config, metrics, result.history, inputs, scratch
        ),
        checkpoints,
        metrics,
    )
    log.info("finetune done in %.0f s: valid HR@1 %.4f", metrics["seconds"], metrics["valid_hr1"])
    return metrics


def recorded_inputs(
    config: FinetuneConfig,
    dataset_dir: str | os.PathLike,
    distill_dir: str | os.PathLike | None = None,
    teacher_dir: str | os.PathLike | None = None,
) -> dict[str, str | os.PathLike]:
    """The input folders by role that :func:`finetune` records in its manifest for these arguments: the
    soft prompt where one is given, the teacher only where ``teacher_kd`` reads it. A caller deciding
    whether an earlier output may be reused compares these (:func:`delrec.artifacts.check_reusable`)."""
    inputs = {
        "dataset": dataset_dir,
        "distill": distill_dir,
        "teacher": teacher_dir if config.teacher_kd else None,
    }
    return {role: folder for role, folder in inputs.items() if folder is not None}


def _checked_teacher(
    config: FinetuneConfig, teacher_dir: str | os.PathLike | None, dataset_dir: str | os.PathLike
) -> tuple[str | os.PathLike | None, str]:
    """The teacher folder if ``teacher_kd`` uses it (else None) and its run id ("" without), checked to be
    trained on ``dataset_dir``."""
    if config.teacher_kd == 0:
        return None, ""
    if teacher_dir is None:
        raise DelrecError(
            f"teacher_kd {config.teacher_kd} needs the teacher folder (delrec finetune --teacher, or "
            "teacher_dir=); set teacher_kd: 0 to train without a teacher",
            field="teacher_kd",
        )
    manifest = require_same_input(teacher_dir, "dataset", dataset_dir, producer=layout.TRAIN_TEACHER)
    return teacher_dir, manifest["id"]


def _add_adapter(config: FinetuneConfig, backbone: Backbone) -> None:
    """Wrap the backbone's model in the configured peft adapter, initialised as ``adalora_init`` says."""
    from peft import get_peft_model

    with quiet_wrap():
        backbone.model = get_peft_model(backbone.model, adapter_config(config, backbone))
    if config.adapter == "adalora" and config.adalora_init != "peft":
        init_adalora(backbone.model, config.adalora_init)
    apply_sharding(config, backbone)  # fsdp: the adapters stay whole, outside the shards


def _metrics(history: list[dict], seconds: float) -> dict:
    evaluated = [r for r in history if "valid_hr1" in r]
    return {
        "valid_hr1": evaluated[-1]["valid_hr1"] if evaluated else 0.0,
        "valid_hr1_step0": evaluated[0]["valid_hr1"] if evaluated else 0.0,
        "final_loss": float(history[-1].get("loss", float("nan"))),
        "seconds": seconds,
    }


class _AdapterTraining:
    """Stage 2's optimisation step, validation and checkpoint state, for :class:`TrainLoop`."""

    def __init__(
        self,
        config: FinetuneConfig,
        dataset,
        backbone: Backbone,
        soft,
        builder: PromptBuilder,
        teacher: CandidateTeacher | None,
    ):
        self.config, self.dataset, self.backbone = config, dataset, backbone
        self.soft, self.builder, self.teacher = soft, builder, teacher
        self.peft_model = backbone.model
        self.train_rows = tail_rows(dataset.examples["train"], config.train_tail)
        self.valid = _valid_instances(dataset, builder, config.eval_examples, soft is not None)
        self.valid_answers = np.array([inst.answer for inst in self.valid], dtype=np.int64)
        self.valid_scores = np.zeros((0, config.num_candidates), dtype=np.float32)
        self.valid_candidates = np.stack([inst.candidates for inst in self.valid]) if self.valid else None
        self.logc = log_counts(dataset)
        self.params = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        log.info(
            "%s: %.2fM trainable parameters",
            config.adapter,
            sum(p.numel() for p in self.params.values()) / 1e6,
        )
        self.optimizer = make_optimizer(
            config.optimizer, list(self.params.values()), config.lr, config.weight_decay
        )
        self.scheduler = linear_warmup(self.optimizer, config.warmup_steps, config.steps)
        self.adalora = config.adapter == "adalora"

    def step(self, index: int, rng: np.random.Generator) -> dict:
        config, train = self.config, self.dataset.examples["train"]
        # The global batch, the same on every rank (same generator state); each rank scores its share.
        rows = rng.choice(self.train_rows, size=config.batch_size)
        batch = [
            stage2_instance(
                self.builder,
                train.histories[r],
                int(train.targets[r]),
                rng=rng,
                num_items=self.dataset.num_items,
                num_candidates=config.num_candidates,
                soft=self.soft is not None,
            )
            for r in rows
        ]
        task = rank_share_loss(
            self.backbone,
            self.soft,
            self.builder,
            batch,
            config.objective,
            config.scoring,
            self._targets([train.histories[r] for r in rows], batch),
            self._prior_offsets(batch),
        )
        loss = task
        if self.adalora:  # a term of the weights, not of the examples: once over all ranks
            regulariser = orthogonal_regulariser(self.peft_model) / distributed.world_size()
            loss = task + config.orth_reg_weight * regulariser
        loss.backward()
        task = task.detach()
        distributed.sum_gradients(self.params.values(), task)  # the global batch's gradient and mean loss
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        if self.adalora:
            self.peft_model.base_model.update_and_allocate(index)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": task.item(), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def _targets(self, histories: list[np.ndarray], batch: list) -> torch.Tensor | None:
        """Each example's target over its candidates: None (the right answer alone) without
        ``teacher_kd``, else the answer mixed with the teacher's softmax over the candidates."""
        if self.teacher is None:
            return None
        candidates = np.stack([inst.candidates for inst in batch])
        answers = np.eye(candidates.shape[1], dtype=np.float32)[[inst.answer for inst in batch]]
        teacher = self.teacher.probabilities(histories, candidates, self.config.teacher_kd_temperature)
        weight = self.config.teacher_kd
        return torch.from_numpy((1 - weight) * answers + weight * teacher)

    def _prior_offsets(self, batch: list) -> torch.Tensor | None:
        """``popularity_prior_train`` x the candidates' log counts, added to their scores in the loss."""
        if self.config.popularity_prior_train == 0:
            return None
        candidates = np.stack([inst.candidates for inst in batch])
        return torch.from_numpy(self.config.popularity_prior_train * self.logc[candidates]).float()

    def evaluate(self) -> dict:
        self.valid_scores = instance_scores(
            self.backbone,
            self.soft,
            self.builder,
            self.valid,
            reduction=self.config.scoring,
            batch_size=self.config.eval_batch_size,
            desc="valid",
        )
        # The scores as trained: with the training prior, if any (the saved scores stay the LLM's own).
        trained = with_prior(
            self.valid_scores, self.valid_candidates, self.logc, self.config.popularity_prior_train
        )
        return {"valid_hr1": float((target_ranks(trained, self.valid_answers) == 0).mean())}

    def fit_prior(self) -> dict:
        """The popularity prior's weight fitted on the validation scores of the final model (the loop
        always evaluates its last step), with validation HR@1 under it."""
        candidates, logc = self.valid_candidates, self.logc
        weight = fit_prior_weight(self.valid_scores, candidates, self.valid_answers, logc)
        ranks = target_ranks(with_prior(self.valid_scores, candidates, logc, weight), self.valid_answers)
        log.info("popularity prior: weight %.3f on %d validation examples", weight, len(self.valid))
        return {"popularity_weight": weight, "valid_hr1_with_prior": float((ranks == 0).mean())}

    def state(self) -> dict:
        return optimiser_state(self.params, self.optimizer, self.scheduler) | {
            "allocator": _allocator_state(self.peft_model)
        }

    def restore(self, saved: dict) -> None:
        restore_optimiser_state(saved, self.params, self.optimizer, self.scheduler)
        _restore_allocator(self.peft_model, saved["allocator"])


def _frozen_soft_prompt(
    distill_dir, prompt_config: dict, backbone: Backbone, title_years: bool
) -> SoftPrompt | None:
    """The distilled soft prompt, checked against the backbone's weights (and warned about if it was
    distilled on titles spelled otherwise); None for the ablation."""
    if distill_dir is None:
        return None
    distilled_title_years = prompt_config.get("title_years", True)
    if distilled_title_years != title_years:
        log.warning(
            "title_years is %s here but %s in the soft prompt's distillation: its prompts spelled titles "
            "differently",
            title_years,
            distilled_title_years,
        )
    if backbone.fingerprint() != prompt_config["backbone_fingerprint"]:
        raise DelrecError(
            "the backbone's weights differ from those the soft prompt was distilled on",
            path=Path(distill_dir) / layout.PROMPT_JSON,
            field="backbone_fingerprint",
        )
    soft = SoftPrompt.load(distill_dir, backbone.device)
    soft.weight.requires_grad_(False)
    return soft


def _valid_instances(dataset, builder: PromptBuilder, count: int, soft: bool) -> list:
    """The first ``count`` validation examples with their stored candidate sets."""
    valid = dataset.examples["valid"]
    return [
        stage2_instance(
            builder,
            valid.histories[i],
            int(valid.targets[i]),
            candidates=dataset.candidates["valid"][i],
            soft=soft,
        )
        for i in range(min(count, len(valid)))
    ]


def _write_output(
    out,
    config: FinetuneConfig,
    dataset,
    backbone: Backbone,
    soft,
    prompt_config: dict,
    metrics: dict,
    history,
    inputs: dict,
    scratch: Path,
) -> None:
    """The adapter, the soft prompt (DELRec), the prompt config, metrics, history and the manifest;
    ``inputs``: the input folders by role (:func:`recorded_inputs`); ``scratch`` (the checkpoint folder) holds
    the tiny test backbone's base weights."""
    with atomic_dir(out) as tmp:
        save_adapter(backbone.model, tmp / layout.ADAPTER)
        if soft is not None:
            soft.save(tmp, teacher=prompt_config["teacher"])
        copy_tiny_backbone(backbone, scratch, tmp)
        write_json_atomic(
            tmp / layout.PROMPT_JSON,
            {
                "teacher": prompt_config["teacher"],
                "domain": dataset.domain,
                "soft_tokens": soft.n_tokens if soft is not None else 0,
                **config.prompt_settings().as_json(),
                "scoring": config.scoring,
                "popularity_weight": metrics.get("popularity_weight", 0.0),
                "backbone": backbone.name,
                "backbone_fingerprint": backbone.fingerprint(),
            },
        )
        write_json_atomic(tmp / layout.METRICS_JSON, metrics)
        write_json_atomic(tmp / layout.HISTORY_JSON, history)
        write_manifest(
            tmp,
            producer=layout.FINETUNE,
            config=config.model_dump(mode="json"),
            inputs=inputs,
            rows={"steps": config.steps},
            extra={
                "backbone": backbone.name,
                "backbone_fingerprint": backbone.fingerprint(),
                "soft_prompt": soft is not None,
            },
        )
