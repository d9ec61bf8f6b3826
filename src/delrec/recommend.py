"""Recommendations for every user: the teacher retrieves, DELRec reranks.

For each user the teacher scores every item after the user's whole known sequence (training items, then
the validation and test targets); items the user already has are excluded and the teacher's top
``retrieve_k`` go into DELRec's prompt as candidates. The fine-tuned LLM with its soft prompt scores them
(plus its popularity prior, if it was fitted one: :mod:`delrec.popularity`), and the best ``top_n`` by that
score are written as Parquet: user (the dataset's raw id), rank, item id
(raw), title, LLM score, teacher rank.

Users are processed in shards of ``shard_users``. Each finished shard is one Parquet file in the
checkpoint folder (``OUT.partial/``), so a killed run resumes at its first missing shard, and memory is
bounded by one shard whatever the number of users (the teacher's scores: ``shard_users`` x items floats).
The finished folder holds ``recommendations/part-*.parquet`` (row groups of at most ``row_group_rows``)
and a manifest naming its inputs.

Under torchrun (``torchrun --nproc-per-node N -m delrec.cli recommend ...``) each rank writes every N-th
missing shard into the shared ``OUT.partial/`` and rank 0 assembles the output: the same files as one
process writes.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from delrec import distributed, layout
from delrec.artifacts import (
    atomic_dir,
    config_hash,
    partial_dir,
    read_manifest,
    require_same_input,
    write_json_atomic,
    write_manifest,
)
from delrec.config import StageConfig
from delrec.data import Dataset, load_dataset
from delrec.data.dataset import EVAL_SPLITS
from delrec.errors import DelrecError
from delrec.evaluate import (
    delrec_prompt_config,
    finetuned_backbone,
    load_finetuned_adapter,
    model_scoring,
    prior_weight,
    stage2_builder,
)
from delrec.llm.scoring import score_all
from delrec.llm.soft_prompt import SoftPrompt
from delrec.popularity import log_counts, with_prior

log = logging.getLogger(__name__)

RUN_JSON = "run.json"  # in the checkpoint folder: which run its shards belong to
# What this stage writes into its checkpoint folder: the marker, the shards and their temporary names.
_OWN = (RUN_JSON, f".{RUN_JSON}.*", "part-*.parquet", "part-*.parquet.tmp")
SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("rank", pa.int16()),
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("llm_score", pa.float32()),
        ("teacher_rank", pa.int16()),
    ]
)


class RecommendConfig(StageConfig):
    """Config of ``delrec recommend``."""

    backbone: str | None = None
    """None: the backbone DELRec was fine-tuned on, as its prompt.json names it; another name must load
    the same weights (a saved tiny one is found by itself)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    retrieve_k: int = Field(20, ge=1, le=1000)
    """items the teacher retrieves per user; 20: the number of candidates the LLM learnt to rank"""
    top_n: int = Field(10, ge=1)
    """recommendations written per user (at most retrieve_k)"""
    users: list[str] | None = None
    """raw user ids to recommend for (None: every user)"""
    batch_size: int = Field(8, ge=1)
    scoring: Literal["mean", "sum", "first"] | None = None
    """None: as DELRec was fine-tuned (its prompt.json)"""
    shard_users: int = Field(512, ge=1)
    """users per Parquet file; the unit of resumption"""
    row_group_rows: int = Field(50_000, ge=1)

    FROM_EVALUATE: ClassVar[tuple[str, ...]] = ("backbone", "device", "bf16", "batch_size", "scoring")
    """the LLM settings recommend takes from evaluate's config: the model is scored as it was evaluated"""

    @classmethod
    def from_evaluate(cls, evaluate_config: dict, **fields) -> RecommendConfig:
        """The :attr:`FROM_EVALUATE` settings of an evaluate config + ``fields``."""
        return cls.from_dict(
            {k: v for k, v in evaluate_config.items() if k in cls.FROM_EVALUATE} | fields,
            source="recommend config",
        )

    @model_validator(mode="after")
    def _top_n_within_k(self) -> RecommendConfig:
        if self.top_n > self.retrieve_k:
            raise ValueError(f"top_n ({self.top_n}) must be at most retrieve_k ({self.retrieve_k})")
        return self


def known_sequences(dataset: Dataset) -> list[np.ndarray]:
    """Each user's whole known sequence: its training sequence, then its validation and test targets
    (under leave-one-out, every item it has). A user with no training sequence (the ``user`` split) gets
    its example's history + target (that example keeps the whole history)."""
    sequences = [np.asarray(seq, dtype=np.int64) for seq in dataset.train_sequences]
    for split in EVAL_SPLITS:  # in time order: a test history ends with the validation target
        examples = dataset.examples[split]
        for user, history, target in zip(examples.users, examples.histories, examples.targets, strict=True):
            seq, history = sequences[user], np.asarray(history, dtype=np.int64)
            if len(history) and np.array_equal(seq[len(seq) - len(history) :], history):
                sequences[user] = np.append(seq, target)  # the history is the tail of what we know
            elif len(history) + 1 > len(seq):
                sequences[user] = np.append(history, target)
    return sequences


@torch.no_grad()
def teacher_retrieve(
    model: torch.nn.Module, max_len: int, sequences: Sequence[np.ndarray], k: int
) -> np.ndarray:
    """The teacher's top ``k`` item ids after each sequence, best first, the sequence's own items excluded."""
    from delrec.teachers.models import last_hidden

    device = next(model.parameters()).device
    inputs = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            inputs[row, max_len - len(tail) :] = tail
    scores = last_hidden(model, torch.from_numpy(inputs).to(device)).float() @ model.item_weights().float().T
    scores[:, 0] = float("-inf")  # padding
    rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    seen = np.concatenate(sequences) if len(rows) else np.zeros(0, dtype=np.int64)
    scores[torch.from_numpy(rows).to(device), torch.from_numpy(seen).to(device)] = float("-inf")
    if k > scores.shape[1] - 1:
        raise DelrecError(
            f"retrieve_k {k} exceeds the catalogue's {scores.shape[1] - 1} items", field="retrieve_k"
        )
    return scores.topk(k, dim=1).indices.cpu().numpy()


def _raw_user_ids(dataset_dir: Path, num_users: int) -> list[str]:
    table = pq.read_table(dataset_dir / layout.USERS, columns=["user", "raw_id"])
    raw = [""] * num_users
    for user, raw_id in zip(table["user"].to_pylist(), table["raw_id"].to_pylist(), strict=True):
        raw[user] = raw_id
    return raw


def _chosen_users(config: RecommendConfig, raw_ids: list[str], sequences: list[np.ndarray]) -> np.ndarray:
    if config.users is None:
        return np.array([u for u, seq in enumerate(sequences) if len(seq)], dtype=np.int64)
    index = {raw: user for user, raw in enumerate(raw_ids)}
    unknown = [u for u in config.users if u not in index]
    if unknown:
        raise DelrecError(f"unknown user id(s) {unknown[:5]} (of {len(unknown)})", field="users")
    return np.array([index[u] for u in config.users], dtype=np.int64)


class _Shard:
    """Recommendations for one shard of users (retrieve, then rerank)."""

    def __init__(
        self,
        dataset: Dataset,
        raw_users: list[str],
        config: RecommendConfig,
        teacher,
        backbone,
        soft,
        prompt_config,
    ):
        self.dataset, self.raw_users, self.config = dataset, raw_users, config
        self.teacher_model, self.teacher_max_len = teacher
        self.backbone, self.soft = backbone, soft
        self.builder = stage2_builder(backbone, dataset, soft, prompt_config)
        self.scoring = model_scoring(config.scoring, prompt_config)
        self.logc, self.prior_weight = log_counts(dataset), prior_weight(prompt_config)

    def table(self, users: np.ndarray, sequences: list[np.ndarray]) -> pa.Table:
        seqs = [sequences[u] for u in users]
        retrieved = teacher_retrieve(self.teacher_model, self.teacher_max_len, seqs, self.config.retrieve_k)
        prompts = [
            self.builder.stage2(seq, cands, soft=True) for seq, cands in zip(seqs, retrieved, strict=True)
        ]
        answers = [[self.builder.answer(int(i)) for i in cands] for cands in retrieved]
        scores = score_all(
            self.backbone,
            self.soft,
            prompts,
            answers,
            batch_size=self.config.batch_size,
            reduction=self.scoring,
            skip=self.builder.answer_skip,
            desc="rerank",
        )
        scores = with_prior(scores, retrieved, self.logc, self.prior_weight)
        # Best LLM score first; a tie keeps the teacher's order (stable sort).
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.config.top_n]
        n = self.config.top_n
        items = np.take_along_axis(retrieved, order, axis=1)
        return pa.table(
            {
                "user": np.repeat(np.array([self.raw_users[u] for u in users], dtype=object), n),
                "rank": np.tile(np.arange(1, n + 1, dtype=np.int16), len(users)),
                "item_id": [self.dataset.raw_item_ids[i] for i in items.ravel()],
                "title": [self.dataset.titles[i] for i in items.ravel()],
                "llm_score": np.take_along_axis(scores, order, axis=1).ravel().astype(np.float32),
                "teacher_rank": (order + 1).ravel().astype(np.int16),
            },
            schema=SCHEMA,
        )


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _prepare_partial(partial: Path, run: dict) -> None:
    """Keep the shards of an interrupted run of this exact config and inputs; otherwise start afresh.

    A folder holding anything this stage does not write (say the user's files) is refused, never removed.
    """
    marker = partial / RUN_JSON
    if partial.is_dir():
        foreign = sorted(
            p.name
            for p in partial.iterdir()
            if not (p.is_file() and any(fnmatch.fnmatchcase(p.name, own) for own in _OWN))
        )
        if foreign:
            raise DelrecError(
                f"holds files recommend did not write ({', '.join(foreign[:5])}): "
                "move them away or remove the folder",
                path=partial,
                field="out",
            )
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError):  # missing, or cut short by a run killed while writing it
            previous = None
        if previous == run:
            return
        log.warning("%s holds shards of another run (config or inputs differ): starting afresh", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json_atomic(marker, run)


def recommend(
    dataset_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    delrec_dir: str | os.PathLike,
    config: RecommendConfig,
    out: str | os.PathLike,
) -> dict:
    """Write the top ``top_n`` of the teacher's ``retrieve_k`` after DELRec's rerank for every user (or
    ``config.users``) to ``out/recommendations/``. Resumes from ``OUT.partial/``. Returns counts and speed."""
    from delrec.teachers import load_teacher

    started = time.time()
    # Under torchrun each rank writes every world-th missing shard; rank 0 assembles the output.
    device = distributed.init_from_env(config.device)
    dataset_dir, delrec_dir = Path(dataset_dir), Path(delrec_dir)
    dataset = load_dataset(dataset_dir)
    require_same_input(teacher_dir, "dataset", dataset_dir, producer=layout.TRAIN_TEACHER)
    prompt_config = delrec_prompt_config(delrec_dir, dataset_dir)
    if config.backbone is None:  # resolved before the run key, so naming it or not resumes the same run
        config = config.model_copy(update={"backbone": prompt_config["backbone"]})
    sequences = known_sequences(dataset)
    raw_users = _raw_user_ids(dataset_dir, len(sequences))
    users = _chosen_users(config, raw_users, sequences)
    shards = [users[i : i + config.shard_users] for i in range(0, len(users), config.shard_users)]

    # Every input is loaded and checked before OUT.partial is touched: a command refused here (a backbone
    # other than DELRec's, say) never discards the shards of an interrupted run with the right options.
    teacher_model, teacher_config = load_teacher(teacher_dir)
    teacher_model.eval()
    backbone = finetuned_backbone(
        config.backbone, delrec_dir, prompt_config, titles=dataset.titles, device=device, bf16=config.bf16
    )
    load_finetuned_adapter(backbone, delrec_dir)
    soft = SoftPrompt.load(delrec_dir, backbone.device)
    teacher_model.to(backbone.device)

    partial = partial_dir(out)
    inputs = {"dataset": dataset_dir, "teacher": teacher_dir, "delrec": delrec_dir}
    run = {
        "config": config_hash(config.model_dump(mode="json")),
        "inputs": {k: read_manifest(v, verify=False)[layout.M_ID] for k, v in inputs.items()},
    }
    if distributed.is_main():
        _prepare_partial(partial, run)
    distributed.barrier()
    missing = [i for i in range(len(shards)) if not (partial / _shard_name(i)).is_file()]
    if len(missing) < len(shards):
        log.info("resuming: %d of %d shards already written", len(shards) - len(missing), len(shards))
    todo = missing[distributed.rank() :: distributed.world_size()]

    if todo:
        shard = _Shard(
            dataset, raw_users, config, (teacher_model, teacher_config.max_len), backbone, soft, prompt_config
        )
        mine = sum(len(shards[i]) for i in todo)
        with tqdm(total=mine, unit="user", desc="recommend", disable=not distributed.is_main()) as bar:
            for index in todo:
                table = shard.table(shards[index], sequences)
                tmp = partial / (_shard_name(index) + ".tmp")
                pq.write_table(table, tmp, row_group_size=config.row_group_rows)
                os.replace(tmp, partial / _shard_name(index))
                bar.update(len(shards[index]))

    distributed.barrier()  # every rank's shards are written
    if not distributed.is_main():
        return distributed.broadcast_object(None)
    with atomic_dir(out) as tmp:
        folder = tmp / layout.RECOMMENDATIONS
        folder.mkdir()
        for index in range(len(shards)):
            shutil.copy2(partial / _shard_name(index), folder / _shard_name(index))
        stats = {
            "users": int(len(users)),
            "rows": int(len(users) * config.top_n),
            "shards": len(shards),
            "seconds": round(time.time() - started, 1),
        }
        stats["users_per_s"] = round(stats["users"] / max(stats["seconds"], 1e-9), 3)
        write_manifest(
            tmp,
            producer=layout.RECOMMEND,
            config=config.model_dump(mode="json"),
            inputs=inputs,
            rows={"users": stats["users"], "recommendations": stats["rows"]},
        )
    shutil.rmtree(partial, ignore_errors=True)
    log.info(
        "recommend: %d users, %d rows in %.0f s (%.2f users/s)",
        stats["users"],
        stats["rows"],
        stats["seconds"],
        stats["users_per_s"],
    )
    return distributed.broadcast_object(stats)


def publish_recommendations(store, folder: str | os.PathLike, base: str, pipeline: str, run: str) -> str:
    """Upload a finished ``recommend`` folder to ``<base>/<pipeline>/recommendations/<run>/`` and return
    that URI. Never over an earlier upload of the same run id, unless it is this very folder's (a retried
    task whose first attempt finished the upload); the manifest goes last, so a reader that finds it finds
    every shard."""
    from delrec.store import join_uri

    manifest = read_manifest(folder, producer=layout.RECOMMEND)
    uri = join_uri(base, f"{pipeline}/{layout.RECOMMENDATIONS}/{run}")
    if store.exists(join_uri(uri, layout.MANIFEST)):
        if store.get_json(join_uri(uri, layout.MANIFEST)) == manifest:
            log.info("%s already holds these recommendations (an earlier attempt of this run)", uri)
            return uri
        raise DelrecError(
            "already holds other recommendations of this run id: refusing to overwrite them", path=uri
        )
    store.put_dir(Path(folder) / layout.RECOMMENDATIONS, join_uri(uri, layout.RECOMMENDATIONS))
    store.put_file(Path(folder) / layout.MANIFEST, join_uri(uri, layout.MANIFEST))
    return uri
