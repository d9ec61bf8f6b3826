"""The teacher stage: train SASRec / GRU4Rec / Caser, evaluate it, export its top-k for distillation.

Training sees only ``dataset.train_sequences``; the validation split picks the best epoch (early
stopping on full-ranking NDCG@10) and the test split is scored once, with the best checkpoint.
Ranking excludes every item the user interacted with before the target (their training items before
that point and the example's history), as RecBole and the SASRec paper do.

A run checkpoints every epoch (into ``<out>.partial/`` by default; see :mod:`delrec.checkpoints`); started
again with the same config on the same dataset, it resumes there and ends with the same result as an
uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from delrec import layout
from delrec.artifacts import (
    atomic_dir,
    read_manifest,
    require_same_input,
    write_json_atomic,
    write_manifest,
)
from delrec.checkpoints import Checkpoints
from delrec.config import StageConfig
from delrec.data import Dataset, load_dataset
from delrec.data.dataset import SPLITS, Examples, left_padded
from delrec.errors import DelrecError
from delrec.loop import LoopResult, TrainLoop
from delrec.metrics import metrics_from_ranks, target_ranks
from delrec.teachers.models import Caser, GRU4Rec, SASRec, last_hidden

log = logging.getLogger(__name__)

PRODUCER = layout.TRAIN_TEACHER
FULL_KS = (10,)
CANDIDATE_KS = (1, 5, 10)


class TeacherConfig(StageConfig):
    """Config of the teacher stage. Sizes default to RecBole's (the anchor figures' baseline)."""

    model: Literal["sasrec", "gru4rec", "caser"] = "sasrec"
    max_len: int = Field(50, ge=1)
    """most recent history items the model reads"""
    hidden: int = Field(64, ge=1)
    """item embedding size (all models)"""
    layers: int = Field(2, ge=1)
    """SASRec blocks"""
    heads: int = Field(2, ge=1)
    inner: int = Field(256, ge=1)
    """SASRec feed-forward size"""
    rnn_hidden: int = Field(128, ge=1)
    rnn_layers: int = Field(1, ge=1)
    caser_window: int = Field(5, ge=1)
    """Caser reads the last caser_window items (the Caser paper's L)"""
    caser_vertical: int = Field(4, ge=1)
    caser_horizontal: int = Field(16, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    loss: Literal["ce", "bce"] = "ce"
    """ce: softmax cross-entropy over all items; bce: the SASRec paper's sampled binary cross-entropy"""
    num_negatives: int = Field(1, ge=1)
    """negatives per target for loss=bce"""
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(128, ge=1)
    """training windows (SASRec, GRU4Rec) or (history, next item) pairs (Caser) per step"""
    window_stride: int | None = Field(None, ge=1)
    """SASRec/GRU4Rec: long sequences are cut into max_len windows this far apart (None: max_len);
    each target is trained once per epoch, in the window that gives it the most context"""
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(5, ge=1)
    """stop after this many evaluations without a better validation NDCG@10"""
    eval_every: int = Field(1, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    """stop training once this many seconds have been spent (the best checkpoint is kept)"""
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False
    """bf16 autocast for the forward pass (AMX CPUs and GPUs)"""
    topk: int = Field(10, ge=1)
    topk_history: int = Field(0, ge=0)
    """how many of an example's most recent history items the exported top-k and stage 2's teacher scores
    (teacher_kd) are computed from; 0: as many as the teacher reads (max_len). The LLM's prompts show the
    last history_items (10): that value makes the teacher recommend for the history the prompt shows"""
    eval_batch_size: int = Field(1024, ge=1)


def build_model(config: TeacherConfig, num_items: int) -> nn.Module:
    if config.model == "sasrec":
        return SASRec(
            num_items,
            config.max_len,
            config.hidden,
            config.layers,
            config.heads,
            config.inner,
            config.dropout,
        )
    if config.model == "gru4rec":
        return GRU4Rec(num_items, config.hidden, config.rnn_hidden, config.rnn_layers, config.dropout)
    return Caser(
        num_items,
        config.hidden,
        config.caser_window,
        config.caser_vertical,
        config.caser_horizontal,
        config.dropout,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DelrecError("device 'cuda' requested but no CUDA device is available", field="device")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------
# Training data


def sequence_windows(sequences: list[np.ndarray], max_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (input, target) windows for the causal models; target 0 = no loss at that position.

    Windows end at the last item and step back ``stride`` items at a time. Where windows overlap, a
    target counts only in the newest window holding it among its last ``stride`` positions (or in the
    oldest window), so every target is trained exactly once, with at least max_len - stride context.
    """
    inputs, targets = [], []
    for seq in sequences:
        end = len(seq)
        while end > 1:
            start = max(0, end - max_len - 1)
            chunk = seq[start:end]
            inp = np.zeros(max_len, dtype=np.int64)
            tgt = np.zeros(max_len, dtype=np.int64)
            inp[max_len - len(chunk) + 1 :] = chunk[:-1]
            tgt[max_len - len(chunk) + 1 :] = chunk[1:]
            if start == 0:
                inputs.append(inp)
                targets.append(tgt)
                break
            tgt[: max_len - stride] = 0
            inputs.append(inp)
            targets.append(tgt)
            end -= stride
    if not inputs:
        raise DelrecError("no training sequence has two or more items: nothing to train on")
    return np.stack(inputs), np.stack(targets)


def next_item_pairs(sequences: list[np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(last ``window`` items, next item) for every position after the first of every sequence."""
    # Put ``window`` zeros before each sequence so every window starts in its own user's padding.
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = np.zeros(int((lengths + window).sum()), dtype=np.int64)
    starts = np.cumsum(lengths + window) - lengths  # where each sequence's first item lands
    item_pos = np.repeat(starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    flat[item_pos] = np.concatenate(sequences) if len(sequences) else []
    target_pos = item_pos[flat[item_pos - 1] != 0]  # skip each sequence's first item (no history)
    if not len(target_pos):
        raise DelrecError("no training sequence has two or more items: nothing to train on")
    windows = np.lib.stride_tricks.sliding_window_view(flat, window)
    return windows[target_pos - window].copy(), flat[target_pos].copy()


def _loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: TeacherConfig
) -> torch.Tensor:
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        hidden = model(inputs)
        if model.seq2seq:  # score only positions that have a target
            keep = targets > 0
            hidden, targets = hidden[keep], targets[keep]
        weights = model.item_weights()
        if config.loss == "ce":
            logits = hidden @ weights[1:].T  # item 0 is padding, never a target
            return F.cross_entropy(logits.float(), targets - 1)
        negatives = torch.randint(
            1, weights.shape[0], (len(targets), config.num_negatives), device=targets.device
        )
        pos = (hidden * weights[targets]).sum(-1).float()
        neg = torch.einsum("nd,nkd->nk", hidden, weights[negatives]).float()
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


# ---------------------------------------------------------------------------------------------------
# Scoring and evaluation


class PastItems:
    """Which items each example's user interacted with before its target (excluded from rankings)."""

    def __init__(self, dataset: Dataset):
        seqs = dataset.train_sequences
        self.stride = dataset.num_items + 1
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.offsets = np.cumsum(self.lengths) - self.lengths
        self.flat = np.concatenate(seqs) if len(seqs) else np.zeros(0, dtype=np.int64)
        users = np.repeat(np.arange(len(seqs)), self.lengths)
        positions = np.arange(len(self.flat)) - np.repeat(self.offsets, self.lengths)
        keys = users * self.stride + self.flat
        order = np.argsort(keys, kind="stable")
        self.keys, self.positions = keys[order], positions[order]

    def cutoffs(self, users: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """How many of each user's training items precede the target (all of them if it is not one)."""
        keys = users * self.stride + targets
        idx = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = (self.keys[idx] == keys) if len(self.keys) else np.zeros(len(keys), dtype=bool)
        return np.where(found, self.positions[idx] if len(self.keys) else 0, self.lengths[users])

    def indices(self, users: np.ndarray, cutoffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs of the first ``cutoffs[i]`` training items of ``users[i]``."""
        rows = np.repeat(np.arange(len(users)), cutoffs)
        within = np.arange(cutoffs.sum()) - np.repeat(np.cumsum(cutoffs) - cutoffs, cutoffs)
        return rows, self.flat[np.repeat(self.offsets[users], cutoffs) + within]

    def excluded(self, examples: Examples, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``rows``, item) pairs a ranking of those examples' targets leaves out, for every
        model alike: the user's training items before the target, and the example's history."""
        users, targets = examples.users[rows], examples.targets[rows]
        seen_rows, seen_items = self.indices(users, self.cutoffs(users, targets))
        histories = [np.asarray(examples.histories[r], dtype=np.int64) for r in rows]
        history_rows = np.repeat(np.arange(len(rows)), [len(h) for h in histories])
        return (
            np.concatenate([seen_rows, history_rows]),
            np.concatenate([seen_items, *histories]).astype(np.int64),
        )


def last_items(histories: Sequence[np.ndarray], last: int) -> list[np.ndarray]:
    """Each history's ``last`` most recent items (0: all of them)."""
    return [np.asarray(h)[-last:] if last else np.asarray(h) for h in histories]


@torch.no_grad()
def split_scores(
    model: nn.Module,
    dataset: Dataset,
    split: str,
    config: TeacherConfig,
    past: PastItems,
    history: int = 0,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Scores of every item for each example of ``split``, in batches: (rows, (batch, num_items + 1)).

    The model reads the last ``history`` items of each example's history (0: max_len). Padding (item 0)
    and the user's earlier items (the whole history's) score -inf.
    """
    model.eval()
    device = next(model.parameters()).device
    examples = dataset.examples[split]
    if not len(examples):
        return
    inputs = torch.from_numpy(left_padded(last_items(examples.histories, history), config.max_len))
    weights = model.item_weights().float()
    for start in range(0, len(examples), config.eval_batch_size):
        rows = slice(start, min(start + config.eval_batch_size, len(examples)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            hidden = last_hidden(model, inputs[rows].to(device))
        scores = hidden.float() @ weights.T
        scores[:, 0] = float("-inf")
        seen_rows, seen_items = past.excluded(examples, np.arange(rows.start, rows.stop))
        scores[torch.from_numpy(seen_rows).to(device), torch.from_numpy(seen_items).to(device)] = float(
            "-inf"
        )
        yield rows, scores


class CandidateTeacher:
    """A trained teacher that scores given candidates after given histories (stage 2's soft targets)."""

    def __init__(self, teacher_dir: str | os.PathLike):
        self.model, self.config = load_teacher(teacher_dir)

    @torch.no_grad()
    def probabilities(
        self, histories: list[np.ndarray], candidates: np.ndarray, temperature: float = 1.0
    ) -> np.ndarray:
        """Softmax of the teacher's scores of ``candidates`` (n, C) at ``temperature``: (n, C) float32."""
        inputs = torch.from_numpy(
            left_padded(last_items(histories, self.config.topk_history), self.config.max_len)
        )
        hidden = last_hidden(self.model, inputs).float()
        weights = self.model.item_weights().float()[torch.from_numpy(np.asarray(candidates))]
        scores = torch.einsum("nd,ncd->nc", hidden, weights)
        return torch.softmax(scores / temperature, dim=-1).numpy()


def evaluate_split(
    model: nn.Module,
    dataset: Dataset,
    split: str,
    config: TeacherConfig,
    past: PastItems,
    candidates: bool = True,
) -> dict[str, dict[str, float]]:
    """Full-ranking metrics of ``split`` and, where it has candidate sets, metrics on those."""
    examples = dataset.examples[split]
    targets = torch.from_numpy(examples.targets)
    cands = (
        torch.from_numpy(dataset.candidates[split]) if candidates and split in dataset.candidates else None
    )
    full_ranks, cand_ranks = [], []
    for rows, scores in split_scores(model, dataset, split, config, past):
        full_ranks.append(target_ranks(scores, targets[rows]))
        if cands is not None:
            batch = cands[rows].to(scores.device)
            cand_ranks.append(
                target_ranks(scores.gather(1, batch), (batch == targets[rows, None]).float().argmax(1))
            )
    out = {"full": metrics_from_ranks(np.concatenate(full_ranks), FULL_KS)}
    if cands is not None:
        out["candidates"] = metrics_from_ranks(np.concatenate(cand_ranks), CANDIDATE_KS)
    return out


def export_topk(model: nn.Module, dataset: Dataset, config: TeacherConfig, past: PastItems) -> pa.Table:
    """The top-k items (best first) and scores for every example of every split."""
    parts = []
    for split in SPLITS:
        items, scores = [], []
        for _, batch in split_scores(model, dataset, split, config, past, config.topk_history):
            values, indices = batch.topk(config.topk, dim=1)
            if not torch.isfinite(values).all():
                raise DelrecError(
                    f"some {split} example has fewer than topk={config.topk} items left once its history "
                    "is excluded; lower topk",
                    field="topk",
                )
            items.append(indices.cpu().numpy().astype(np.int32))
            scores.append(values.cpu().numpy().astype(np.float32))
        n = len(dataset.examples[split])
        items_arr = np.concatenate(items) if items else np.zeros((0, config.topk), np.int32)
        scores_arr = np.concatenate(scores) if scores else np.zeros((0, config.topk), np.float32)
        parts.append(
            pa.table(
                {
                    "split": pa.array([split] * n, pa.string()),
                    "row": pa.array(np.arange(n), pa.int32()),
                    "items": pa.FixedSizeListArray.from_arrays(items_arr.reshape(-1), config.topk).cast(
                        pa.list_(pa.int32())
                    ),
                    "scores": pa.FixedSizeListArray.from_arrays(scores_arr.reshape(-1), config.topk).cast(
                        pa.list_(pa.float32())
                    ),
                }
            )
        )
    return pa.concat_tables(parts)


# ---------------------------------------------------------------------------------------------------
# Checkpoints


# ---------------------------------------------------------------------------------------------------
# The stage


def train_teacher(
    dataset_dir: str | os.PathLike,
    config: TeacherConfig,
    out: str | os.PathLike,
    *,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Train a teacher on ``dataset_dir``; write weights, config, metrics, top-k and manifest to ``out``.

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is saved (for logging; an
    exception raised there stops the run, which a later call resumes). ``checkpoint``: where the training
    state is kept and resumed from, a folder or an ``s3://`` prefix (default ``<out>.partial``; see
    :class:`delrec.checkpoints.Checkpoints`). Returns flat metrics.
    """
    started = time.perf_counter()
    dataset = load_dataset(dataset_dir)
    torch.manual_seed(config.seed)
    training = _TeacherTraining(dataset, config)
    setup_s = time.perf_counter() - started
    checkpoints = Checkpoints.for_output(out, checkpoint)
    result = TrainLoop(
        name=f"train {config.model}",
        steps=config.max_epochs,
        seed=config.seed,
        stream=0,
        run_key={"config": config.hash(), "dataset": dataset.manifest["id"], "loop": "1"},
        checkpoints=checkpoints,
        step=training.epoch,
        state=training.state,
        restore=training.restore,
        evaluate=training.validate,
        score=lambda record: record["valid_NDCG@10"],
        snapshot=lambda: copy.deepcopy(training.model.state_dict()),
        eval_every=config.eval_every,
        checkpoint_every=1,
        postfix=("loss", "valid_NDCG@10"),
        stop=training.stop_reason,
        after_step=lambda epoch, record: training.epoch_end(epoch, record, on_epoch_end),
        evaluate_first=False,
        reseed=False,
        unit="epoch",
    ).run()
    if result.best_state is not None:
        training.model.load_state_dict(result.best_state)
    flat = training.finish(result, dataset_dir, out, started, setup_s)
    checkpoints.clear()
    log.info(
        "%s: test HR@10 %.4f NDCG@10 %.4f MRR@10 %.4f; best epoch %d after %.1f s",
        config.model,
        flat["test_HR@10"],
        flat["test_NDCG@10"],
        flat["test_MRR@10"],
        flat["best_epoch"],
        flat["seconds_to_best"],
    )
    return flat


class _TeacherTraining:
    """The teacher's epoch, validation, stopping rule, checkpoint state and outputs, for :class:`TrainLoop`.

    ``seconds`` counts training and validation time across resumes, for ``time_budget_s``.
    """

    def __init__(self, dataset: Dataset, config: TeacherConfig):
        self.dataset, self.config = dataset, config
        self.device = _device(config.device)
        self.model = build_model(config, dataset.num_items).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        if self.model.seq2seq:
            stride = min(config.window_stride or config.max_len, config.max_len)
            inputs, targets = sequence_windows(dataset.train_sequences, config.max_len, stride)
        else:
            inputs, targets = next_item_pairs(dataset.train_sequences, config.caser_window)
        self.inputs = torch.from_numpy(inputs).to(self.device)
        self.targets = torch.from_numpy(targets).to(self.device)
        self.past = PastItems(dataset)
        self.seconds = 0.0
        log.info(
            "%s: %d parameters, %d training %s, %s, %d torch threads",
            config.model,
            sum(p.numel() for p in self.model.parameters()),
            len(self.inputs),
            "windows" if self.model.seq2seq else "pairs",
            self.device,
            torch.get_num_threads(),
        )

    def epoch(self, index: int, rng: np.random.Generator) -> dict[str, float]:
        """One pass over the training windows in a random order (torch's RNG, carried in the state)."""
        begin = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(self.inputs), device=self.device)
        total, steps = 0.0, 0
        for first in range(0, len(order), self.config.batch_size):
            idx = order[first : first + self.config.batch_size]
            loss = _loss(self.model, self.inputs[idx], self.targets[idx], self.config)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
            steps += 1
        self.seconds += time.perf_counter() - begin
        return {"loss": total / max(steps, 1), "seconds": self.seconds}

    def validate(self) -> dict[str, float]:
        begin = time.perf_counter()
        result = evaluate_split(self.model, self.dataset, "valid", self.config, self.past, candidates=False)
        self.seconds += time.perf_counter() - begin
        return {"valid_NDCG@10": result["full"]["NDCG@10"], "seconds": self.seconds}

    def stop_reason(self, history: list[dict[str, float]], best_epoch: int) -> str | None:
        """Early stopping: ``patience`` validations without a better NDCG@10, or the time budget spent."""
        since_best = sum(1 for r in history if "valid_NDCG@10" in r and r["step"] > best_epoch)
        if since_best >= self.config.patience:
            return "patience"
        budget = self.config.time_budget_s
        if budget is not None and history[-1]["seconds"] >= budget:
            return "time_budget"
        return None

    def epoch_end(self, epoch: int, record: dict[str, float], hook) -> None:
        if "valid_NDCG@10" not in record:  # the loop logs the validated epochs
            log.info("epoch %d: loss %.4f, %.1f s", epoch, record["loss"], record["seconds"])
        if hook is not None:
            hook(epoch, record)

    def state(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "seconds": self.seconds,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.seconds = float(state["seconds"])

    def finish(
        self, result: LoopResult, dataset_dir, out, started: float, setup_s: float
    ) -> dict[str, float]:
        """Score the best model on valid and test, export its top-k and write the stage's output."""
        model, dataset, config = self.model, self.dataset, self.config
        evaluated = {
            split: evaluate_split(model, dataset, split, config, self.past) for split in ("valid", "test")
        }
        flat = {
            f"{split}_{name}": value
            for split, res in evaluated.items()
            for name, value in res["full"].items()
            if name in ("HR@10", "NDCG@10", "MRR@10")
        }
        for split, res in evaluated.items():
            flat.update({f"{split}_cand_{name}": value for name, value in res.get("candidates", {}).items()})
        best = next((r for r in result.history if r["step"] == result.best_step), result.history[-1])
        flat.update(
            epochs=float(result.history[-1]["step"]),
            best_epoch=float(best["step"]),
            seconds_to_best=best["seconds"],
            seconds_train=self.seconds,
            seconds_setup=setup_s,
        )
        table = export_topk(model, dataset, config, self.past)
        flat["seconds_total"] = time.perf_counter() - started
        metrics = {
            "model": config.model,
            "metrics": flat,
            "valid": evaluated["valid"],
            "test": evaluated["test"],
            "stopped": "max_epochs" if result.stopped == "steps" else result.stopped,
            "history": [
                {"epoch": r["step"]} | {k: v for k, v in r.items() if k != "step"} for r in result.history
            ],
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(),
            "device": str(self.device),
        }
        with atomic_dir(out) as tmp:
            weights = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(weights, tmp / layout.TEACHER_WEIGHTS)
            write_json_atomic(
                tmp / layout.CONFIG_JSON,
                {"teacher": config.model_dump(mode="json"), "num_items": dataset.num_items},
            )
            write_json_atomic(tmp / layout.METRICS_JSON, metrics)
            pq.write_table(table, tmp / layout.TOPK)
            write_manifest(
                tmp,
                producer=PRODUCER,
                config=config.model_dump(mode="json"),
                inputs={"dataset": dataset_dir},
                rows={split: len(dataset.examples[split]) for split in SPLITS},
                extra={"model": config.model, "topk": config.topk},
            )
        return flat


def load_teacher(teacher_dir: str | os.PathLike) -> tuple[nn.Module, TeacherConfig]:
    """The trained model (in eval mode, on CPU) and its config from a teacher folder."""
    teacher_dir = Path(teacher_dir)
    read_manifest(teacher_dir, producer=PRODUCER)
    saved = json.loads((teacher_dir / layout.CONFIG_JSON).read_text())
    config = TeacherConfig.from_dict(saved["teacher"], source=str(teacher_dir / layout.CONFIG_JSON))
    model = build_model(config, saved["num_items"])
    model.load_state_dict(load_file(teacher_dir / layout.TEACHER_WEIGHTS))
    return model.eval(), config


def load_topk(teacher_dir: str | os.PathLike, dataset_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The teacher's top-k item ids per split, aligned with ``dataset.examples[split]``: (n, k) int64.

    Refuses a teacher trained on another dataset than ``dataset_dir``.
    """
    manifest = require_same_input(teacher_dir, "dataset", dataset_dir, producer=PRODUCER)
    path = Path(teacher_dir) / layout.TOPK
    try:
        table = pq.read_table(path, columns=["split", "row", "items"])
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise DelrecError(f"missing or corrupt top-k table ({exc})", path=path) from exc
    k = manifest.get("topk", 10)
    out = {}
    for split in SPLITS:
        part = table.filter(pa.compute.equal(table.column("split"), split))
        rows = part.column("row").to_numpy()
        flat_items = pa.compute.list_flatten(part.column("items")).to_numpy().astype(np.int64)
        items = flat_items.reshape(len(part), k)
        expected = manifest["rows"].get(split, 0)
        if len(rows) != expected or not np.array_equal(np.sort(rows), np.arange(expected)):
            raise DelrecError(
                f"{split}: {len(rows)} rows, expected rows 0..{expected - 1}", path=path, field="row"
            )
        out[split] = items[np.argsort(rows)]
    return out
