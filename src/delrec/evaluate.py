"""Evaluation: DELRec, the teacher, the ablation and the untuned LLM on the same candidate sets.

Every model ranks the stored 20 candidates of each test example (option: the whole catalogue minus
the user's history). The LLMs score each candidate title by its length-normalised log-likelihood
(options: sum, first token); the teacher ranks by its own scores. Reported per model: HR@1/5/10,
NDCG@5/10 and MRR with 95% bootstrap intervals, in ``metrics.json``, ``report.md`` and a bar chart.
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

from delrec import layout
from delrec.artifacts import atomic_dir, require_same_input, write_json_atomic, write_manifest
from delrec.config import StageConfig
from delrec.data import Dataset, load_dataset
from delrec.errors import DelrecError
from delrec.llm.backbone import Backbone, stage_backbone
from delrec.llm.scoring import score_all
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import PromptBuilder
from delrec.metrics import bootstrap_intervals, metrics_from_ranks, target_ranks

log = logging.getLogger(__name__)

PRODUCER = layout.EVALUATE
ADAPTER = layout.ADAPTER
PROMPT_JSON = layout.PROMPT_JSON
KS = (1, 5, 10)
REPORTED = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
LABELS = {
    "delrec": "DELRec",
    "teacher": "Teacher",
    "ablation": "LLM w/o soft prompt",
    "zero_shot": "Untuned LLM",
}


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
    scoring: Literal["mean", "sum", "first"] = "mean"
    """mean: length-normalised title log-likelihood; sum; first: first title token (the authors')"""
    universe: Literal["candidates", "catalogue"] = "candidates"
    """rank within the 20 stored candidates, or among every item the user has not interacted with"""
    catalogue_chunk: int = Field(100, ge=1)
    """titles scored per forward pass in the catalogue universe"""
    zero_shot: bool = True
    """also score the untuned LLM (no adapter, no soft prompt)"""
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


class _LLMRanker:
    """Scores the chosen examples' candidates (or the catalogue) with one backbone configuration."""

    def __init__(self, dataset: Dataset, config: EvaluateConfig, split: str, rows: np.ndarray):
        self.dataset, self.config, self.rows = dataset, config, rows
        self.examples = dataset.examples[split]
        self.candidates = dataset.candidates[split][rows]

    def ranks(
        self, backbone: Backbone, soft: SoftPrompt | None, prompt_config: dict, desc: str
    ) -> np.ndarray:
        builder = PromptBuilder(
            backbone,
            self.dataset.titles,
            domain=self.dataset.domain,
            teacher=prompt_config.get("teacher", ""),
            n_soft=soft.n_tokens if soft is not None else 0,
            history_items=prompt_config.get("history_items", 10),
            max_prompt_tokens=prompt_config.get("max_prompt_tokens", 768),
            max_title_chars=prompt_config.get("max_title_chars", 80),
        )
        ex = self.examples
        prompts = [
            builder.stage2(ex.histories[r], cands, soft=soft is not None)
            for r, cands in zip(self.rows, self.candidates, strict=True)
        ]
        kw = {
            "batch_size": self.config.batch_size,
            "reduction": self.config.scoring,
            "skip": builder.answer_skip,
        }
        if self.config.universe == "candidates":
            answers = [[builder.answer(int(i)) for i in cands] for cands in self.candidates]
            scores = score_all(backbone, soft, prompts, answers, desc=desc, **kw)
            target_index = (self.candidates == ex.targets[self.rows, None]).argmax(axis=1)
            return target_ranks(scores, target_index)
        items = np.arange(1, self.dataset.num_items + 1)
        scores = np.zeros((len(self.rows), len(items)), dtype=np.float32)
        for start in range(0, len(items), self.config.catalogue_chunk):
            chunk = items[start : start + self.config.catalogue_chunk]
            answers = [[builder.answer(int(i)) for i in chunk]] * len(prompts)
            scores[:, start : start + len(chunk)] = score_all(
                backbone, soft, prompts, answers, desc=f"{desc} {start}", **kw
            )
        return _catalogue_ranks(scores, self.examples, self.rows)


def _catalogue_ranks(item_scores: np.ndarray, examples, rows: np.ndarray) -> np.ndarray:
    """Ranks of the targets among all items (columns = items 1..N), the user's history excluded."""
    scores = item_scores.copy()
    for out_row, row in enumerate(rows):
        scores[out_row, examples.histories[row] - 1] = -np.inf
    return target_ranks(scores, examples.targets[rows] - 1)


def _load_adapter(backbone: Backbone, folder: Path):
    from peft import PeftModel

    if not (folder / ADAPTER).is_dir():
        raise DelrecError(f"no {ADAPTER}/ folder: expected the output of the finetune stage", path=folder)
    backbone.model = PeftModel.from_pretrained(backbone.model, folder / ADAPTER)
    backbone.model.eval()


def _unload_adapter(backbone: Backbone) -> None:
    backbone.model = backbone.model.unload()


def _finetuned_config(folder: str | os.PathLike, dataset_dir: str | os.PathLike, role: str) -> dict:
    require_same_input(folder, "dataset", dataset_dir, producer="finetune")
    path = Path(folder) / PROMPT_JSON
    if not path.is_file():
        raise DelrecError(
            f"no {PROMPT_JSON}: expected the output of the finetune stage ({role})", path=folder
        )
    return json.loads(path.read_text())


def write_report(folder: Path, results: dict, meta: dict) -> None:
    """report.md with the metrics table and metrics.png, a grouped bar chart with the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(models)
    x = np.arange(len(REPORTED))
    for i, model in enumerate(models):
        values = np.array([results[model]["metrics"][m] for m in REPORTED])
        lo = np.array([results[model]["ci95"][m][0] for m in REPORTED])
        hi = np.array([results[model]["ci95"][m][1] for m in REPORTED])
        ax.bar(
            x + i * width,
            values,
            width,
            yerr=[values - lo, hi - values],
            capsize=2,
            label=LABELS.get(model, model),
        )
    ax.set_xticks(x + width * (len(models) - 1) / 2, REPORTED)
    ax.set_ylim(0, 1)
    ax.set_title(f"{meta['dataset']} ({meta['split']}, {meta['examples']} examples, {meta['universe']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "metrics.png", dpi=120)
    plt.close(fig)
    lines = [
        f"# DELRec evaluation: {meta['dataset']}",
        "",
        f"Split `{meta['split']}`, {meta['examples']} examples, ranking universe `{meta['universe']}`, "
        f"LLM scoring `{meta['scoring']}`, backbone `{meta['backbone']}`, teacher {meta['teacher']}. "
        "Cells: value [95% bootstrap interval].",
        "",
        "| model | " + " | ".join(REPORTED) + " |",
        "|---|" + "---|" * len(REPORTED),
    ]
    for model in models:
        m, ci = results[model]["metrics"], results[model]["ci95"]
        cells = [f"{m[k]:.4f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k in REPORTED]
        lines.append(f"| {LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Chance level of HR@1 with 20 candidates: {1 / 20:.3f}.",
        "",
        "![metrics](metrics.png)",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))


def evaluate(
    dataset_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    config: EvaluateConfig,
    out: str | os.PathLike,
    delrec_dir: str | os.PathLike,
    ablation_dir: str | os.PathLike | None = None,
) -> dict:
    """Score every model on the same examples; write metrics.json, report.md, metrics.png, ranks.parquet."""
    started = time.time()
    dataset = load_dataset(dataset_dir)
    require_same_input(teacher_dir, "dataset", dataset_dir, producer="train_teacher")
    split = config.split
    n = len(dataset.examples[split])
    if n == 0:
        raise DelrecError(f"the {split} split has no examples", path=dataset_dir)
    rows = np.arange(n)
    if config.max_examples is not None and config.max_examples < n:
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size=config.max_examples, replace=False))
    delrec_config = _finetuned_config(delrec_dir, dataset_dir, "delrec")
    if not delrec_config.get("soft_tokens"):
        raise DelrecError(
            "has no soft prompt: pass the DELRec model (finetuned from distill)", path=delrec_dir
        )
    ablation_config = (
        _finetuned_config(ablation_dir, dataset_dir, "ablation") if ablation_dir is not None else None
    )
    if (
        ablation_config is not None
        and ablation_config["backbone_fingerprint"] != delrec_config["backbone_fingerprint"]
    ):
        raise DelrecError(
            "the ablation was fine-tuned from other base weights than DELRec; re-run both on the same backbone",
            path=Path(ablation_dir) / PROMPT_JSON,
            field="backbone_fingerprint",
        )

    ranks: dict[str, np.ndarray] = {}
    teacher_scores = _teacher_scores(dataset, teacher_dir, split, rows)
    examples = dataset.examples[split]
    if config.universe == "candidates":
        cands = dataset.candidates[split][rows]
        ranks["teacher"] = target_ranks(
            np.take_along_axis(teacher_scores, cands, axis=1),
            (cands == examples.targets[rows, None]).argmax(axis=1),
        )
    else:
        ranks["teacher"] = _catalogue_ranks(teacher_scores[:, 1:], examples, rows)

    torch.manual_seed(config.seed)
    backbone = stage_backbone(
        config.backbone, delrec_dir, titles=dataset.titles, device=config.device, autocast=config.bf16
    )
    if backbone.fingerprint() != delrec_config["backbone_fingerprint"]:
        raise DelrecError(
            f"backbone {config.backbone!r} has other weights than the one DELRec was fine-tuned on",
            path=Path(delrec_dir) / PROMPT_JSON,
            field="backbone_fingerprint",
        )
    ranker = _LLMRanker(dataset, config, split, rows)
    soft = SoftPrompt.load(delrec_dir, backbone.device)
    _load_adapter(backbone, Path(delrec_dir))
    ranks["delrec"] = ranker.ranks(backbone, soft, delrec_config, "DELRec")
    _unload_adapter(backbone)
    if ablation_dir is not None:
        _load_adapter(backbone, Path(ablation_dir))
        ranks["ablation"] = ranker.ranks(backbone, None, ablation_config, "ablation")
        _unload_adapter(backbone)
    if config.zero_shot:
        ranks["zero_shot"] = ranker.ranks(backbone, None, delrec_config, "zero-shot")

    results = {}
    for model in ("delrec", "teacher", "ablation", "zero_shot"):
        if model in ranks:
            results[model] = {
                "metrics": metrics_from_ranks(ranks[model], KS),
                "ci95": bootstrap_intervals(
                    ranks[model], KS, samples=config.bootstrap_samples, seed=config.seed
                ),
            }
    meta = {
        "dataset": dataset.name,
        "split": split,
        "examples": int(len(rows)),
        "universe": config.universe,
        "scoring": config.scoring,
        "backbone": backbone.name,
        "teacher": delrec_config.get("teacher", ""),
        "seconds": time.time() - started,
    }
    flat = {
        f"{model}_{name}": float(value)
        for model, res in results.items()
        for name, value in res["metrics"].items()
        if name in REPORTED
    }
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", {"meta": meta, "models": results, "flat": flat})
        pq.write_table(
            pa.table(
                {"row": pa.array(rows, pa.int32())} | {m: pa.array(r, pa.int32()) for m, r in ranks.items()}
            ),
            tmp / "ranks.parquet",
        )
        write_report(tmp, results, meta)
        inputs = {"dataset": dataset_dir, "teacher": teacher_dir, "delrec": delrec_dir}
        if ablation_dir is not None:
            inputs["ablation"] = ablation_dir
        write_manifest(
            tmp,
            producer=PRODUCER,
            config=config.model_dump(mode="json"),
            inputs=inputs,
            rows={"examples": int(len(rows))},
        )
    log.info(
        "evaluate done in %.0f s: %s",
        meta["seconds"],
        ", ".join(f"{LABELS[m]} HR@1 {r['metrics']['HR@1']:.4f}" for m, r in results.items()),
    )
    return flat
