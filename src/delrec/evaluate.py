"""Evaluation: DELRec, the teacher, popularity, the ablation and the untuned LLM on the same candidates.

Every model ranks the stored 20 candidates of each test example (option: the whole catalogue minus
the user's history). Each fine-tuned LLM scores a candidate title as it was trained to (its prompt.json
``scoring``: length-normalised log-likelihood by default, or sum, or first token; the untuned LLM as
DELRec), unless the config names one for all; the teacher ranks by its own scores; popularity by the
item's number of training interactions. Reported per model: HR@1/5/10, NDCG@5/10 and MRR with 95%
bootstrap intervals; for DELRec minus each other model, the difference with a paired bootstrap interval
(``prompt_only`` adds the untuned LLM with DELRec's soft prompt, paired against the untuned LLM too);
and the learning curves of distill and both finetunes. Written to ``metrics.json``, ``curves.json``,
``report.md`` and two charts.

The whole-catalogue protocol (``rerank_k`` > 0) answers what a team deploys for: the teacher ranks every
item the user has not interacted with, DELRec reorders the teacher's top K, and items beyond K keep the
teacher's order. HR@10, NDCG@10 and MRR of the target for the teacher alone and for teacher + DELRec,
with a paired interval of the difference (``catalogue_*`` metrics). DELRec scores only the examples
whose target is in the teacher's top K: any other target keeps its teacher rank (>= K) whatever the
rerank does, so the figures are those of reranking every example, at a fraction of the cost (on Amazon
Beauty the target is in the top 20 for 13% of users).

Under torchrun (:mod:`delrec.distributed`) each rank scores a contiguous share of the examples with the
LLMs; their ranks (and the rerank scores) are gathered, and rank 0 computes the metrics and writes the
output: the same figures as one process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from delrec import distributed, layout
from delrec.adapter_io import load_adapter
from delrec.artifacts import atomic_dir, require_same_input, write_json_atomic, write_manifest
from delrec.config import StageConfig
from delrec.data import Dataset, load_dataset
from delrec.errors import DelrecError
from delrec.llm.backbone import Backbone, stage_backbone
from delrec.llm.scoring import score_all
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import PromptBuilder, PromptSettings
from delrec.metrics import bootstrap_intervals, metrics_from_ranks, paired_bootstrap, target_ranks
from delrec.popularity import item_counts, log_counts, with_prior

log = logging.getLogger(__name__)

KS = (1, 5, 10)
REPORTED = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
LABELS = {
    "delrec": "DELRec",
    "teacher": "Teacher",
    "popularity": "Popularity",
    "ablation": "LLM w/o soft prompt",
    "prompt_only": "Untuned LLM + soft prompt",
    "zero_shot": "Untuned LLM",
}
# Paired differences, ``<a>_minus_<b>`` in metrics.json, each with a bootstrap interval over the same
# resampled users: DELRec minus every other model, and stage 1 alone (the soft prompt on the untuned LLM)
# minus the untuned LLM, which shows whether the distilled prompt carries anything into the LLM.
COMPARED = ("ablation", "prompt_only", "zero_shot", "teacher", "popularity")
PAIRS = (*(("delrec", other) for other in COMPARED), ("prompt_only", "zero_shot"))
# The whole-catalogue protocol's figures (the target among every item, not among 20 candidates).
CATALOGUE_REPORTED = ("HR@10", "NDCG@10", "MRR")
CATALOGUE_LABELS = {"teacher": "Teacher", "delrec": "Teacher + DELRec rerank"}
# Learning curves: name -> (stage folder, training-loss key, validation key) in that stage's history.json.
CURVES = {
    "distill_ta": ("distill", "loss_ta", "valid_ta_acc"),
    "distill_rps": ("distill", "loss_rps", "valid_rps_acc"),
    "finetune_delrec": ("delrec", "loss", "valid_hr1"),
    "finetune_ablation": ("ablation", "loss", "valid_hr1"),
}
HISTORY = layout.HISTORY_JSON


class EvaluateConfig(StageConfig):
    """Config of the evaluate stage."""

    backbone: str = "smollm2-135m"
    """must name the backbone the fine-tuned models were trained on (a saved tiny one is found by itself)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    seed: int = 42
    split: Literal["test", "valid"] = "test"
    max_examples: int | None = Field(None, ge=1)
    """score a seeded random subset of this many examples (None: all)"""
    batch_size: int = Field(8, ge=1)
    scoring: Literal["mean", "sum", "first"] | None = None
    """mean: length-normalised title log-likelihood; sum; first: first title token (the authors');
    None: as each model was fine-tuned (its prompt.json; the untuned LLM as DELRec)"""
    universe: Literal["candidates", "catalogue"] = "candidates"
    """rank within the 20 stored candidates, or among every item the user has not interacted with (the
    LLM's prompt then lists the teacher's top 20: the stored candidates would tell it the target)"""
    catalogue_chunk: int = Field(100, ge=1)
    """titles scored per forward pass in the catalogue universe"""
    zero_shot: bool = True
    """also score the untuned LLM (no adapter, no soft prompt)"""
    prompt_only: bool = False
    """also score the untuned LLM with DELRec's soft prompt and no adapter: what stage 1 alone carries
    into the LLM (paired against the untuned LLM when ``zero_shot`` is on too)"""
    rerank_k: int = Field(20, ge=0)
    """whole-catalogue protocol: DELRec reranks the teacher's top K of all items (K = 20, the number of
    candidates the LLM learnt to rank); 0: off"""
    bootstrap_samples: int = Field(1000, ge=10)


def _teacher_scores(
    dataset: Dataset, teacher_dir: str | os.PathLike, split: str, rows: np.ndarray
) -> np.ndarray:
    """The teacher's scores of every item (history and padding -inf) for the chosen examples."""
    from delrec.teachers import load_teacher
    from delrec.teachers.train import PastItems, split_scores

    model, teacher_config = load_teacher(teacher_dir)
    teacher_config = teacher_config.model_copy(update={"device": "cpu", "bf16": False})
    chunks = [
        scores.cpu().numpy()
        for _, scores in split_scores(model, dataset, split, teacher_config, PastItems(dataset))
    ]
    return np.concatenate(chunks)[rows]


def item_score_ranks(
    item_scores: np.ndarray, dataset: Dataset, split: str, rows: np.ndarray, universe: str
) -> np.ndarray:
    """Target ranks from scores of every item id (columns 0..N, 0 = padding) for the chosen examples."""
    examples = dataset.examples[split]
    if universe == "catalogue":
        return _catalogue_ranks(item_scores[:, 1:], dataset, split, rows)
    cands = dataset.candidates[split][rows]
    return target_ranks(
        np.take_along_axis(item_scores, cands, axis=1), (cands == examples.targets[rows, None]).argmax(axis=1)
    )


def popularity_ranks(
    dataset: Dataset, split: str, rows: np.ndarray, universe: str = "candidates"
) -> np.ndarray:
    """Ranks of the targets when every example's items are ordered by training interactions."""
    counts = item_counts(dataset).astype(np.float64)
    return item_score_ranks(np.broadcast_to(counts, (len(rows), len(counts))), dataset, split, rows, universe)


def model_scoring(configured: str | None, prompt_config: dict) -> str:
    """The reduction to score a fine-tuned model with: ``configured``, else the one it was trained with
    (prompt.json ``scoring``; ``mean`` for a model saved before the field existed)."""
    return configured or prompt_config.get("scoring", "mean")


def prior_weight(prompt_config: dict) -> float:
    """The popularity prior's weight a fine-tuned model scores with (prompt.json ``popularity_weight``;
    0, no prior, for the untuned LLM and a model saved before the field existed)."""
    return float(prompt_config.get("popularity_weight", 0.0))


def stage2_builder(
    backbone: Backbone, dataset: Dataset, soft: SoftPrompt | None, prompt_config: dict
) -> PromptBuilder:
    """The stage-2 prompt a fine-tuned model was trained on (``prompt_config``: its prompt.json)."""
    return PromptBuilder.for_dataset(
        backbone,
        dataset,
        teacher=prompt_config.get("teacher", ""),
        n_soft=soft.n_tokens if soft is not None else 0,
        settings=PromptSettings.from_json(prompt_config),
    )


class _LLMRanker:
    """Scores the chosen examples' candidates (or the catalogue) with one backbone configuration.

    In the catalogue universe the prompt lists ``listed`` (the teacher's top C, one row per example): the
    stored candidates hold the target, a hint the teacher and popularity ranks never get.
    """

    def __init__(
        self,
        dataset: Dataset,
        config: EvaluateConfig,
        split: str,
        rows: np.ndarray,
        listed: np.ndarray | None = None,
    ):
        self.dataset, self.config, self.split, self.rows = dataset, config, split, rows
        self.examples = dataset.examples[split]
        self.candidates = dataset.candidates[split][rows]
        self.listed = listed
        self.logc = log_counts(dataset)

    def _builder(self, backbone: Backbone, soft: SoftPrompt | None, prompt_config: dict) -> PromptBuilder:
        return stage2_builder(backbone, self.dataset, soft, prompt_config)

    def candidate_scores(
        self,
        backbone: Backbone,
        soft: SoftPrompt | None,
        prompt_config: dict,
        candidates: np.ndarray,
        desc: str,
    ) -> np.ndarray:
        """LLM scores (examples, K) of each chosen example's K candidates, which the prompt lists too."""
        builder = self._builder(backbone, soft, prompt_config)
        prompts = [
            builder.stage2(self.examples.histories[r], cands, soft=soft is not None)
            for r, cands in zip(self.rows, candidates, strict=True)
        ]
        answers = [[builder.answer(int(i)) for i in cands] for cands in candidates]
        scores = score_all(
            backbone,
            soft,
            prompts,
            answers,
            desc=desc,
            batch_size=self.config.batch_size,
            reduction=model_scoring(self.config.scoring, prompt_config),
            skip=builder.answer_skip,
        )
        return with_prior(scores, candidates, self.logc, prior_weight(prompt_config))

    def ranks(
        self, backbone: Backbone, soft: SoftPrompt | None, prompt_config: dict, desc: str
    ) -> np.ndarray:
        ex = self.examples
        if self.config.universe == "candidates":
            scores = self.candidate_scores(backbone, soft, prompt_config, self.candidates, desc)
            target_index = (self.candidates == ex.targets[self.rows, None]).argmax(axis=1)
            return target_ranks(scores, target_index)
        builder = self._builder(backbone, soft, prompt_config)
        prompts = [
            builder.stage2(ex.histories[r], cands, soft=soft is not None)
            for r, cands in zip(self.rows, self.listed, strict=True)
        ]
        kw = {
            "batch_size": self.config.batch_size,
            "reduction": model_scoring(self.config.scoring, prompt_config),
            "skip": builder.answer_skip,
        }
        items = np.arange(1, self.dataset.num_items + 1)
        scores = np.zeros((len(self.rows), len(items)), dtype=np.float32)
        for start in range(0, len(items), self.config.catalogue_chunk):
            chunk = items[start : start + self.config.catalogue_chunk]
            answers = [[builder.answer(int(i)) for i in chunk]] * len(prompts)
            scores[:, start : start + len(chunk)] = score_all(
                backbone, soft, prompts, answers, desc=f"{desc} {start}", **kw
            )
        scores = with_prior(
            scores, np.broadcast_to(items, scores.shape), self.logc, prior_weight(prompt_config)
        )
        return _catalogue_ranks(scores, self.dataset, self.split, self.rows)


def _catalogue_ranks(item_scores: np.ndarray, dataset: Dataset, split: str, rows: np.ndarray) -> np.ndarray:
    """Ranks of the targets among all items (columns = items 1..N), every item the user had before the
    target excluded (its earlier training items and the example's history), for every model alike: the
    teacher's own scores exclude the same."""
    from delrec.teachers.train import PastItems

    examples = dataset.examples[split]
    scores = item_scores.copy()
    seen_rows, seen_items = PastItems(dataset).excluded(examples, rows)
    scores[seen_rows, seen_items - 1] = -np.inf
    return target_ranks(scores, examples.targets[rows] - 1)


def teacher_topk(item_scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` best item ids by the teacher (columns = item ids; excluded items score -inf)."""
    return np.argsort(-item_scores, axis=1, kind="stable")[:, :k]


def retrieved(item_scores: np.ndarray, topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Which targets the teacher's top K holds by its own (tie-pessimistic) rank: a target tied with
    items at the K-th place is in ``topk`` by item id, but ranked by the teacher below K it must not be
    moved by the rerank either, or ties would count for the rerank and against the teacher."""
    in_topk = (topk == targets[:, None]).any(axis=1)
    return in_topk & (target_ranks(item_scores, targets) < topk.shape[1])


def reranked_target_ranks(
    item_scores: np.ndarray, topk: np.ndarray, llm_scores: np.ndarray, targets: np.ndarray
) -> np.ndarray:
    """0-based target ranks when the LLM reorders the teacher's top K and later items keep the teacher's
    order: a :func:`retrieved` target takes its LLM rank there, any other keeps its teacher rank (>= K)."""
    position = (topk == targets[:, None]).argmax(axis=1)
    return np.where(
        retrieved(item_scores, topk, targets),
        target_ranks(llm_scores, position),
        target_ranks(item_scores, targets),
    )


def load_finetuned_adapter(backbone: Backbone, folder: Path) -> None:
    if not (folder / layout.ADAPTER).is_dir():
        raise DelrecError(
            f"no {layout.ADAPTER}/ folder: expected the output of the finetune stage", path=folder
        )
    backbone.model = load_adapter(backbone.model, folder / layout.ADAPTER)


def _unload_adapter(backbone: Backbone) -> None:
    backbone.model = backbone.model.unload()


def finetuned_prompt_config(folder: str | os.PathLike, dataset_dir: str | os.PathLike, role: str) -> dict:
    require_same_input(folder, "dataset", dataset_dir, producer="finetune")
    path = Path(folder) / layout.PROMPT_JSON
    if not path.is_file():
        raise DelrecError(
            f"no {layout.PROMPT_JSON}: expected the output of the finetune stage ({role})", path=folder
        )
    return json.loads(path.read_text())


def finetuned_backbone(
    spec: str, delrec_dir: Path, prompt_config: dict, *, titles, device: str, bf16: bool
) -> Backbone:
    """The backbone DELRec was fine-tuned on (no adapter yet), refused if its weights differ from those
    ``prompt_config`` (DELRec's prompt.json) names."""
    backbone = stage_backbone(spec, delrec_dir, titles=titles, device=device, autocast=bf16)
    if backbone.fingerprint() != prompt_config["backbone_fingerprint"]:
        raise DelrecError(
            f"backbone {spec!r} has other weights than the one DELRec was fine-tuned on",
            path=delrec_dir / layout.PROMPT_JSON,
            field="backbone_fingerprint",
        )
    return backbone


def _chosen_rows(dataset: Dataset, config: EvaluateConfig, dataset_dir) -> np.ndarray:
    """All examples of the split, or a seeded random subset of ``max_examples``."""
    n = len(dataset.examples[config.split])
    if n == 0:
        raise DelrecError(f"the {config.split} split has no examples", path=dataset_dir)
    if config.max_examples is not None and config.max_examples < n:
        return np.sort(np.random.default_rng(config.seed).choice(n, size=config.max_examples, replace=False))
    return np.arange(n)


def delrec_prompt_config(delrec_dir: str | os.PathLike, dataset_dir: str | os.PathLike) -> dict:
    """DELRec's prompt config (its prompt.json), refused if it was fine-tuned without a soft prompt."""
    config = finetuned_prompt_config(delrec_dir, dataset_dir, "delrec")
    if not config.get("soft_tokens"):
        raise DelrecError(
            "has no soft prompt: pass the DELRec model (finetuned from distill)", path=delrec_dir
        )
    return config


def _prompt_configs(delrec_dir, ablation_dir, dataset_dir) -> tuple[dict, dict | None]:
    """The prompt configs of DELRec and the ablation, checked to be comparable."""
    delrec_config = delrec_prompt_config(delrec_dir, dataset_dir)
    if ablation_dir is None:
        return delrec_config, None
    ablation_config = finetuned_prompt_config(ablation_dir, dataset_dir, "ablation")
    if ablation_config["backbone_fingerprint"] != delrec_config["backbone_fingerprint"]:
        raise DelrecError(
            "the ablation was fine-tuned from other base weights than DELRec; re-run both on the same backbone",
            path=Path(ablation_dir) / layout.PROMPT_JSON,
            field="backbone_fingerprint",
        )
    return delrec_config, ablation_config


def _check_teacher(teacher_dir, delrec_dir, delrec_config: dict, distill_dir) -> None:
    """The teacher given is the one DELRec's soft prompt was distilled from: its rows and every
    "DELRec minus teacher" figure would otherwise compare with another model under DELRec's label."""
    from delrec.llm.tasks import teacher_name

    named = delrec_config.get("teacher", "")
    if named and teacher_name(teacher_dir) != named:
        raise DelrecError(
            f"DELRec was distilled from a {named} teacher, but the teacher given is a {teacher_name(teacher_dir)}",
            path=teacher_dir,
        )
    if distill_dir is not None:
        require_same_input(delrec_dir, "distill", distill_dir, producer=layout.FINETUNE)
        require_same_input(distill_dir, "teacher", teacher_dir, producer=layout.DISTILL)


def _llm_ranks(
    dataset: Dataset,
    config: EvaluateConfig,
    rows: np.ndarray,
    delrec: tuple[Path, dict],
    ablation: tuple[Path, dict] | None,
    rerank: tuple[np.ndarray, np.ndarray] | None = None,
    listed: np.ndarray | None = None,
    *,
    device: str,
) -> tuple[dict[str, np.ndarray], str, np.ndarray | None]:
    """Ranks of DELRec, the ablation and the untuned LLM (one backbone, adapters swapped in turn), and
    if ``rerank`` = (positions in ``rows``, their K candidates) is given, DELRec's scores of those
    candidates (the teacher's top K of the catalogue), one row per position. ``listed``: what the
    prompts list in the catalogue universe (one row per example of ``rows``).

    Under torchrun each rank scores its share of ``rows``; every rank returns the figures of all rows.
    """
    (delrec_dir, delrec_config) = delrec
    torch.manual_seed(config.seed)
    backbone = finetuned_backbone(
        config.backbone,
        delrec_dir,
        delrec_config,
        titles=dataset.titles,
        device=device,
        bf16=config.bf16,
    )
    share = distributed.shard_indices(len(rows))
    ranker = _LLMRanker(dataset, config, config.split, rows[share], None if listed is None else listed[share])
    soft = SoftPrompt.load(delrec_dir, backbone.device)
    ranks = {}
    load_finetuned_adapter(backbone, delrec_dir)
    ranks["delrec"] = ranker.ranks(backbone, soft, delrec_config, "DELRec")
    rerank_scores = None
    if rerank is not None:
        positions, candidates = rerank
        mine = distributed.shard_indices(len(positions))
        rerank_scores = np.zeros((0, candidates.shape[1]), dtype=np.float32)
        if len(mine):
            rerank_scores = _LLMRanker(dataset, config, config.split, rows[positions[mine]]).candidate_scores(
                backbone, soft, delrec_config, candidates[mine], "DELRec rerank"
            )
    _unload_adapter(backbone)
    if ablation is not None:
        load_finetuned_adapter(backbone, ablation[0])
        ranks["ablation"] = ranker.ranks(backbone, None, ablation[1], "ablation")
        _unload_adapter(backbone)
    untuned = {**delrec_config, "popularity_weight": 0.0}  # the prior is fitted in training
    if config.prompt_only:
        ranks["prompt_only"] = ranker.ranks(backbone, soft, untuned, "soft prompt only")
    if config.zero_shot:
        ranks["zero_shot"] = ranker.ranks(backbone, None, untuned, "zero-shot")
    ranks = {model: distributed.gather_rows(r) for model, r in ranks.items()}
    if rerank_scores is not None:
        rerank_scores = distributed.gather_rows(rerank_scores)
    return ranks, backbone.name, rerank_scores


def _model_results(
    ranks: dict[str, np.ndarray], config: EvaluateConfig, models=LABELS, ks: tuple[int, ...] = KS
) -> dict:
    """Each model's metrics and 95% bootstrap intervals, in the order of ``models``."""
    return {
        model: {
            "metrics": metrics_from_ranks(ranks[model], ks),
            "ci95": bootstrap_intervals(ranks[model], ks, samples=config.bootstrap_samples, seed=config.seed),
        }
        for model in models
        if model in ranks
    }


def _paired_results(ranks: dict[str, np.ndarray], config: EvaluateConfig) -> dict:
    """``<a>_minus_<b>``: {metric: {diff, lo, hi}} for every pair in ``PAIRS`` whose two models were scored."""
    out = {}
    for a, b in PAIRS:
        if a in ranks and b in ranks:
            paired = paired_bootstrap(
                ranks[a], ranks[b], KS, samples=config.bootstrap_samples, seed=config.seed
            )
            out[f"{a}_minus_{b}"] = {m: paired[m] for m in REPORTED}
    return out


def comparison_label(comparison: str) -> str:
    """``"delrec_minus_zero_shot"`` -> ``"DELRec - Untuned LLM"``."""
    return " - ".join(_label(model) for model in comparison.split("_minus_"))


def _catalogue_results(ranks: dict[str, np.ndarray], k: int, config: EvaluateConfig) -> dict:
    """The whole-catalogue protocol: teacher alone and teacher + DELRec rerank, and the paired difference."""
    ks = (10,)
    paired = paired_bootstrap(
        ranks["delrec"], ranks["teacher"], ks, samples=config.bootstrap_samples, seed=config.seed
    )
    return {
        "k": k,
        "target_in_topk": float(np.mean(ranks["teacher"] < k)),
        "models": _model_results(ranks, config, CATALOGUE_LABELS, ks),
        "paired": {"delrec_minus_teacher": {m: paired[m] for m in CATALOGUE_REPORTED}},
    }


def _flat_metrics(results: dict, paired: dict, catalogue: dict | None = None) -> dict[str, float]:
    """The figures the pipeline logs: ``<model>_<metric>`` and ``<a>_minus_<b>_<metric>[_lo|_hi]``."""
    flat = {
        f"{model}_{name}": float(value)
        for model, res in results.items()
        for name, value in res["metrics"].items()
        if name in REPORTED
    }
    for comparison, cells in paired.items():
        for metric, cell in cells.items():
            flat[f"{comparison}_{metric}"] = cell["diff"]
            flat[f"{comparison}_{metric}_lo"] = cell["lo"]
            flat[f"{comparison}_{metric}_hi"] = cell["hi"]
    if catalogue:
        # catalogue_<model>_<metric> and catalogue_delrec_minus_teacher_<metric>[_lo|_hi]: gate-able names
        for model, res in catalogue["models"].items():
            for name in CATALOGUE_REPORTED:
                flat[f"catalogue_{model}_{name}"] = float(res["metrics"][name])
        for comparison, cells in catalogue["paired"].items():
            for metric, cell in cells.items():
                for suffix, key in (("", "diff"), ("_lo", "lo"), ("_hi", "hi")):
                    flat[f"catalogue_{comparison}_{metric}{suffix}"] = cell[key]
    return flat


def _read_history(folder: Path) -> list[dict] | None:
    path = folder / HISTORY
    try:
        history = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("no learning curve from %s: %s", path, exc)
        return None
    if not isinstance(history, list):
        log.warning("no learning curve from %s: not a list of records", path)
        return None
    return [r for r in history if isinstance(r, dict) and "step" in r]


def learning_curves(folders: dict[str, str | os.PathLike | None]) -> dict:
    """Training loss and validation figure against step for every curve in ``CURVES`` whose stage
    folder (``folders[stage]``) has a history; a missing or unreadable history only drops its curve.

    Returns ``{curve: {"loss": [[step, loss], ...], "valid": [[step, value], ...], "valid_metric": key}}``.
    """
    histories = {stage: _read_history(Path(f)) for stage, f in folders.items() if f is not None}
    curves = {}
    for name, (stage, loss_key, valid_key) in CURVES.items():
        history = histories.get(stage)
        if history:
            curves[name] = {
                "loss": [[r["step"], r[loss_key]] for r in history if loss_key in r],
                "valid": [[r["step"], r[valid_key]] for r in history if valid_key in r],
                "valid_metric": valid_key,
            }
    return curves


def _label(model: str) -> str:
    return LABELS.get(model, model)


def _plot_metrics(folder: Path, results: dict, meta: dict, plt) -> None:
    """metrics.png: a grouped bar chart of every model's metrics with the 95% intervals."""
    models = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(models)
    x = np.arange(len(REPORTED))
    for i, model in enumerate(models):
        values = np.array([results[model]["metrics"][m] for m in REPORTED])
        lo = np.array([results[model]["ci95"][m][0] for m in REPORTED])
        hi = np.array([results[model]["ci95"][m][1] for m in REPORTED])
        # A percentile interval of few resamples can miss the value itself: no negative error bar.
        errors = np.clip([values - lo, hi - values], 0, None)
        ax.bar(x + i * width, values, width, yerr=errors, capsize=2, label=_label(model))
    ax.set_xticks(x + width * (len(models) - 1) / 2, REPORTED)
    ax.set_ylim(0, 1)
    ax.set_title(f"{meta['dataset']} ({meta['split']}, {meta['examples']} examples, {meta['universe']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "metrics.png", dpi=120)
    plt.close(fig)


def _plot_curves(folder: Path, curves: dict, plt) -> None:
    """curves.png: training loss (left) and the validation figure (right) against step."""
    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        if curve["loss"]:
            steps, values = zip(*curve["loss"], strict=True)
            loss_ax.plot(steps, values, label=name, linewidth=1)
        if curve["valid"]:
            steps, values = zip(*curve["valid"], strict=True)
            valid_ax.plot(steps, values, marker="o", label=f"{name} ({curve['valid_metric']})")
    loss_ax.set(title="training loss", xlabel="step")
    valid_ax.set(title="validation HR@1 (finetune) / accuracy (distill)", xlabel="step", ylim=(0, 1))
    for ax in (loss_ax, valid_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=120)
    plt.close(fig)


def _verdict(cell: dict) -> str:
    """Whether the 95% interval of a difference excludes 0, and on which side."""
    if cell["lo"] > 0:
        return "higher"
    if cell["hi"] < 0:
        return "lower"
    return "unclear"


def _catalogue_lines(catalogue: dict, examples: int) -> list[str]:
    k = catalogue["k"]
    lines = [
        "## The whole catalogue: the teacher retrieves, DELRec reranks",
        "",
        f"The teacher ranks every item the user has not interacted with; DELRec reorders its top {k}; items "
        f"beyond {k} keep the teacher's order. {examples} examples; the target is in the teacher's top {k} "
        f"for {catalogue['target_in_topk']:.1%} of them (DELRec can only move those).",
        "",
        "| model | " + " | ".join(CATALOGUE_REPORTED) + " |",
        "|---|" + "---|" * len(CATALOGUE_REPORTED),
    ]
    for model, res in catalogue["models"].items():
        m, ci = res["metrics"], res["ci95"]
        cells = [f"{m[x]:.4f} [{ci[x][0]:.3f}, {ci[x][1]:.3f}]" for x in CATALOGUE_REPORTED]
        lines.append(f"| {CATALOGUE_LABELS[model]} | " + " | ".join(cells) + " |")
    cells = catalogue["paired"]["delrec_minus_teacher"].values()
    row = [f"{c['diff']:+.4f} [{c['lo']:+.3f}, {c['hi']:+.3f}] {_verdict(c)}" for c in cells]
    lines += ["| rerank minus teacher (paired) | " + " | ".join(row) + " |", ""]
    return lines


def _report_lines(
    results: dict, paired: dict, curves: dict, meta: dict, catalogue: dict | None = None
) -> list[str]:
    lines = [
        f"# DELRec evaluation: {meta['dataset']}",
        "",
        f"Split `{meta['split']}`, {meta['examples']} examples, ranking universe `{meta['universe']}`, "
        f"LLM scoring `{meta['scoring']}`, backbone `{meta['backbone']}`, teacher {meta['teacher']}. "
        "Popularity ranks by the number of training interactions. Cells: value [95% bootstrap interval].",
        "",
        "| model | " + " | ".join(REPORTED) + " |",
        "|---|" + "---|" * len(REPORTED),
    ]
    for model, res in results.items():
        m, ci = res["metrics"], res["ci95"]
        cells = [f"{m[k]:.4f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k in REPORTED]
        lines.append(f"| {_label(model)} | " + " | ".join(cells) + " |")
    weights = {model: w for model, w in meta.get("popularity_weight", {}).items() if w}
    if weights:
        lines += [
            "",
            "With a popularity prior fitted on validation examples after fine-tuning, "
            "weight x log(1 + training interactions) added to the LLM's score: "
            + ", ".join(f"{_label(model)} weight {w:.3f}" for model, w in weights.items())
            + "; the untuned LLM has none.",
        ]
    n = meta["candidates"]  # None in the whole-catalogue universe
    chance = [f"Chance level of HR@1 with {n} candidates: {1 / n:.3f}.", ""] if n else []
    lines += ["", *chance, "![metrics](metrics.png)", ""]
    if paired:
        lines += [
            "## DELRec against each model (paired)",
            "",
            "The first model minus the second, on the same examples; 95% interval of a paired bootstrap (each "
            "resample draws the same users for both). higher / lower: the interval excludes 0; unclear: it "
            "does not. Untuned LLM + soft prompt - untuned LLM is what stage 1 alone carries into the LLM.",
            "",
            "| difference | " + " | ".join(REPORTED) + " |",
            "|---|" + "---|" * len(REPORTED),
        ]
        for comparison, cells in paired.items():
            row = [f"{c['diff']:+.4f} [{c['lo']:+.3f}, {c['hi']:+.3f}] {_verdict(c)}" for c in cells.values()]
            lines.append(f"| {comparison_label(comparison)} | " + " | ".join(row) + " |")
        lines.append("")
    if catalogue:
        lines += _catalogue_lines(catalogue, meta["examples"])
    if curves:
        lines += [
            "## Learning curves",
            "",
            "| curve | steps | first loss | last loss | validation | first | last | best (step) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, c in curves.items():
            loss = [v for _, v in c["loss"]]
            valid = c["valid"]
            best = max(valid, key=lambda sv: sv[1]) if valid else None
            cells = [
                str(max([s for s, _ in c["loss"] + valid], default=0)),
                f"{loss[0]:.4f}" if loss else "-",
                f"{loss[-1]:.4f}" if loss else "-",
                c["valid_metric"],
                f"{valid[0][1]:.4f}" if valid else "-",
                f"{valid[-1][1]:.4f}" if valid else "-",
                f"{best[1]:.4f} ({best[0]})" if best else "-",
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "![learning curves](curves.png)", ""]
    return lines


def write_report(
    folder: Path,
    results: dict,
    meta: dict,
    paired: dict | None = None,
    curves: dict | None = None,
    catalogue: dict | None = None,
):
    """report.md (metrics, paired differences, the whole-catalogue protocol, learning curves), metrics.png
    and curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_metrics(folder, results, meta, plt)
    if curves:
        _plot_curves(folder, curves, plt)
    lines = _report_lines(results, paired or {}, curves or {}, meta, catalogue)
    (folder / "report.md").write_text("\n".join(lines))


def evaluate(
    dataset_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    config: EvaluateConfig,
    out: str | os.PathLike,
    delrec_dir: str | os.PathLike,
    ablation_dir: str | os.PathLike | None = None,
    distill_dir: str | os.PathLike | None = None,
) -> dict:
    """Score every model on the same examples; write metrics.json, curves.json, report.md, the charts and
    ranks.parquet. ``distill_dir`` only adds distill's learning curves. Returns the flat metrics."""
    started = time.time()
    device = distributed.init_from_env(config.device)
    dataset = load_dataset(dataset_dir)
    require_same_input(teacher_dir, "dataset", dataset_dir, producer=layout.TRAIN_TEACHER)
    rows = _chosen_rows(dataset, config, dataset_dir)
    delrec_config, ablation_config = _prompt_configs(delrec_dir, ablation_dir, dataset_dir)
    _check_teacher(teacher_dir, delrec_dir, delrec_config, distill_dir)

    teacher_scores = _teacher_scores(dataset, teacher_dir, config.split, rows)
    ranks = {
        "teacher": item_score_ranks(teacher_scores, dataset, config.split, rows, config.universe),
        "popularity": popularity_ranks(dataset, config.split, rows, config.universe),
    }
    ablation = (Path(ablation_dir), ablation_config) if ablation_dir is not None else None
    targets = dataset.examples[config.split].targets[rows]
    topk = teacher_topk(teacher_scores, config.rerank_k) if config.rerank_k else None
    rerank = None
    if topk is not None:  # only a target inside the teacher's top K can move (module doc)
        inside = np.flatnonzero(retrieved(teacher_scores, topk, targets))
        rerank = (inside, topk[inside])
    n_candidates = int(dataset.candidates[config.split].shape[1])
    listed = None
    if config.universe == "catalogue":  # as many items as the stored candidate sets, none of them a hint
        listed = teacher_topk(teacher_scores, n_candidates)
    llm_ranks, backbone_name, rerank_scores = _llm_ranks(
        dataset, config, rows, (Path(delrec_dir), delrec_config), ablation, rerank, listed, device=device
    )
    if not distributed.is_main():  # rank 0 computes the metrics and writes them
        return distributed.broadcast_object(None)
    ranks |= llm_ranks
    catalogue, catalogue_ranks = None, {}
    if rerank is not None:
        llm_scores = np.full(topk.shape, np.nan, dtype=np.float32)  # never read outside ``inside``
        llm_scores[rerank[0]] = rerank_scores
        catalogue_ranks = {
            "teacher": target_ranks(teacher_scores, targets),
            "delrec": reranked_target_ranks(teacher_scores, topk, llm_scores, targets),
        }
        catalogue = _catalogue_results(catalogue_ranks, config.rerank_k, config)

    results = _model_results(ranks, config)
    paired = _paired_results(ranks, config)
    curves = learning_curves({"distill": distill_dir, "delrec": delrec_dir, "ablation": ablation_dir})
    meta = {
        "dataset": dataset.name,
        "split": config.split,
        "examples": int(len(rows)),
        "universe": config.universe,
        # the number each example's target is ranked among (None: the whole catalogue)
        "candidates": n_candidates if config.universe == "candidates" else None,
        "scoring": model_scoring(config.scoring, delrec_config),
        "backbone": backbone_name,
        "teacher": delrec_config.get("teacher", ""),
        # each fine-tuned model's popularity prior (0: none; :mod:`delrec.popularity`)
        "popularity_weight": {
            model: prior_weight(prompt_config)
            for model, prompt_config in (("delrec", delrec_config), ("ablation", ablation_config))
            if prompt_config is not None
        },
        "seconds": time.time() - started,
    }
    flat = _flat_metrics(results, paired, catalogue)
    with atomic_dir(out) as tmp:
        write_json_atomic(
            tmp / layout.METRICS_JSON,
            {"meta": meta, "models": results, "paired": paired, "catalogue": catalogue, "flat": flat},
        )
        write_json_atomic(tmp / layout.CURVES_JSON, curves)
        pq.write_table(
            pa.table(
                {"row": pa.array(rows, pa.int32())}
                | {m: pa.array(r, pa.int32()) for m, r in ranks.items()}
                | {f"catalogue_{m}": pa.array(r, pa.int32()) for m, r in catalogue_ranks.items()}
            ),
            tmp / layout.RANKS,
        )
        write_report(tmp, results, meta, paired, curves, catalogue)
        inputs = {"dataset": dataset_dir, "teacher": teacher_dir, "delrec": delrec_dir}
        inputs |= {k: v for k, v in (("ablation", ablation_dir), ("distill", distill_dir)) if v is not None}
        write_manifest(
            tmp,
            producer=layout.EVALUATE,
            config=config.model_dump(mode="json"),
            inputs=inputs,
            rows={"examples": int(len(rows))},
        )
    log.info(
        "evaluate done in %.0f s: %s",
        meta["seconds"],
        ", ".join(f"{_label(m)} HR@1 {r['metrics']['HR@1']:.4f}" for m, r in results.items()),
    )
    return distributed.broadcast_object(flat)  # the other ranks wait for the output, then agree
