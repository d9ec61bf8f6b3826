"""The preprocess stage: raw dataset -> cleaned, split, candidate-sampled Dataset folder."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np

from delrec.artifacts import atomic_dir, write_json_atomic, write_manifest
from delrec.config import StageConfig
from delrec.data.dataset import PRODUCER, Examples, write_dataset_files
from delrec.data.raw import RawData
from delrec.data.titles import clean_title
from delrec.errors import DelrecError

log = logging.getLogger(__name__)


class PreprocessConfig(StageConfig):
    """Config of the preprocess stage."""

    dataset: str = "synthetic"
    """ml-100k | ml-1m | beauty | home-kitchen | steam | generic | synthetic"""
    source: str | None = None
    """local path, URL or s3:// URI; None: the dataset's default download (cached)"""
    format: str | None = None
    """movielens | recbole | amazon-json | steam | generic | synthetic; None: inferred from dataset"""
    split: Literal["loo", "user"] = "loo"
    seed: int = 42
    num_candidates: int = 20
    max_history: int = 50
    """examples keep this many most recent history items"""
    kcore: int | None = None
    """k-core filter on users and items; None: 5 for Amazon datasets, off otherwise"""
    min_user_interactions: int = 3
    """users with fewer interactions (after filtering) are dropped: they give no test example"""
    synthetic_users: int = 200
    synthetic_items: int = 120
    synthetic_themes: int = 6


def _kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of interactions kept by iterative k-core filtering on users and items."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        _, u_inv, u_cnt = np.unique(users[keep], return_inverse=True, return_counts=True)
        _, i_inv, i_cnt = np.unique(items[keep], return_inverse=True, return_counts=True)
        ok = (u_cnt[u_inv] >= k) & (i_cnt[i_inv] >= k)
        if ok.all():
            return keep
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False


def _sample_candidates(
    rng: np.random.Generator, target: int, exclude: set[int], num_items: int, count: int
) -> np.ndarray:
    """The target plus ``count - 1`` distinct items outside ``exclude``, shuffled."""
    available = num_items - len(exclude | {target})
    if available < count - 1:
        raise DelrecError(
            f"only {available} items are left to sample {count - 1} negatives from; "
            "lower num_candidates or use a larger dataset"
        )
    chosen: list[int] = []
    taken = set(exclude) | {target}
    while len(chosen) < count - 1:
        for item in rng.integers(1, num_items + 1, size=2 * (count - 1 - len(chosen))).tolist():
            if item not in taken:
                taken.add(item)
                chosen.append(item)
                if len(chosen) == count - 1:
                    break
    out = np.array([target, *chosen], dtype=np.int64)
    rng.shuffle(out)
    return out


def build_dataset(raw: RawData, config: PreprocessConfig, out: str | os.PathLike) -> dict:
    """Clean, filter, remap, split and sample candidates; write the Dataset folder atomically.

    Returns the stats written to ``stats.json``.
    """
    started = time.perf_counter()
    stats: dict = {"dataset": config.dataset, "source": raw.source, "raw_interactions": int(len(raw.users))}
    dropped = dict(raw.dropped)
    titles = {key: clean_title(value) for key, value in raw.titles.items() if value and value.strip()}
    has_title = np.fromiter((item in titles for item in raw.items), dtype=bool, count=len(raw.items))
    dropped["no_title"] = dropped.get("no_title", 0) + int((~has_title).sum())
    users, items, times = raw.users[has_title], raw.items[has_title], raw.timestamps[has_title]
    kcore = config.kcore if config.kcore is not None else (5 if raw.domain == "products" else 0)
    if kcore > 1:
        keep = _kcore(users, items, kcore)
        dropped["kcore"] = int((~keep).sum())
        users, items, times = users[keep], items[keep], times[keep]
    if len(users) == 0:
        raise DelrecError(
            f"no interactions left after filtering (dropped: {dropped})", path=raw.source
        )

    # Contiguous ids: items 1..N in order of first appearance in the sorted catalogue, users 0..U-1.
    item_raw, item_idx = np.unique(items.astype(str), return_inverse=True)
    user_raw, user_idx = np.unique(users.astype(str), return_inverse=True)
    order = np.lexsort((np.arange(len(times)), times, user_idx))  # by user, then time, stable on ties
    user_idx, item_idx = user_idx[order], item_idx[order] + 1
    bounds = np.flatnonzero(np.diff(user_idx)) + 1
    sequences = np.split(item_idx, bounds)
    seq_users = user_idx[np.r_[0, bounds]]
    # Repeated interactions with the same item keep the first (the datasets here have none, but the
    # candidate sampler relies on "items the user interacted with" being a set).
    sequences = [seq[np.sort(np.unique(seq, return_index=True)[1])] for seq in sequences]
    long_enough = [len(s) >= config.min_user_interactions for s in sequences]
    dropped["short_users"] = int(len(sequences) - sum(long_enough))
    sequences = [s for s, ok in zip(sequences, long_enough, strict=True) if ok]
    seq_users = seq_users[np.array(long_enough, dtype=bool)]
    if not sequences:
        raise DelrecError(
            f"no user has {config.min_user_interactions}+ interactions after filtering", path=raw.source
        )
    # Re-index users and items that survived so both stay contiguous.
    used_items = np.unique(np.concatenate(sequences))
    remap = np.zeros(len(item_raw) + 1, dtype=np.int64)
    remap[used_items] = np.arange(1, len(used_items) + 1)
    sequences = [remap[s] for s in sequences]
    item_raw = item_raw[used_items - 1]
    user_raw = user_raw[seq_users]
    num_items, num_users = len(item_raw), len(sequences)

    rng = np.random.default_rng(config.seed)
    h = config.max_history
    examples: dict[str, dict[str, list]] = {s: {"users": [], "histories": [], "targets": []} for s in ("train", "valid", "test")}

    def add(split: str, user: int, seq: np.ndarray, pos: int) -> None:
        examples[split]["users"].append(user)
        examples[split]["histories"].append(seq[max(0, pos - h) : pos])
        examples[split]["targets"].append(int(seq[pos]))

    train_sequences: list[np.ndarray] = []
    if config.split == "loo":
        groups = ["all"] * num_users
        for user, seq in enumerate(sequences):
            train_part = seq[:-2]
            train_sequences.append(train_part)
            for pos in range(1, len(train_part)):
                add("train", user, seq, pos)
            add("valid", user, seq, len(seq) - 2)
            add("test", user, seq, len(seq) - 1)
    else:
        perm = rng.permutation(num_users)
        n_train, n_valid = int(round(0.8 * num_users)), int(round(0.1 * num_users))
        groups = [""] * num_users
        for rank, user in enumerate(perm):
            groups[user] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
        for user, seq in enumerate(sequences):
            if groups[user] == "train":
                train_sequences.append(seq)
                for pos in range(1, len(seq)):
                    add("train", user, seq, pos)
            else:
                train_sequences.append(seq[:0])
                add(groups[user], user, seq, len(seq) - 1)

    final = {
        split: Examples(
            users=np.array(parts["users"], dtype=np.int64),
            histories=parts["histories"],
            targets=np.array(parts["targets"], dtype=np.int64),
        )
        for split, parts in examples.items()
    }
    candidates = {}
    for split in ("valid", "test"):
        ex = final[split]
        candidates[split] = np.stack(
            [
                _sample_candidates(rng, int(t), set(sequences[u].tolist()), num_items, config.num_candidates)
                for u, t in zip(ex.users, ex.targets, strict=True)
            ]
        ) if len(ex) else np.zeros((0, config.num_candidates), dtype=np.int64)

    lengths = np.array([len(s) for s in sequences])
    stats.update(
        users=num_users,
        items=num_items,
        interactions=int(lengths.sum()),
        dropped=dropped,
        split=config.split,
        examples={s: len(e) for s, e in final.items()},
        users_per_group={g: groups.count(g) for g in sorted(set(groups))},
        sequence_length={f"p{q}": float(np.percentile(lengths, q)) for q in (0, 25, 50, 75, 90, 99, 100)},
        domain=raw.domain,
        num_candidates=config.num_candidates,
    )
    with atomic_dir(out) as tmp:
        write_dataset_files(
            tmp,
            titles=[titles[str(r)] for r in item_raw],
            raw_item_ids=[str(r) for r in item_raw],
            raw_user_ids=[str(r) for r in user_raw],
            user_groups=groups,
            train_sequences=train_sequences,
            examples=final,
            candidates=candidates,
        )
        stats["seconds"] = round(time.perf_counter() - started, 3)
        write_json_atomic(tmp / "stats.json", stats)
        write_manifest(
            tmp,
            producer=PRODUCER,
            config=config.model_dump(mode="json"),
            rows={"items": num_items, "users": num_users, **{s: len(e) for s, e in final.items()}},
            extra={"dataset": config.dataset, "domain": raw.domain},
        )
    log.info("wrote %s: %d users, %d items, %d interactions", out, num_users, num_items, stats["interactions"])
    return stats


def preprocess(config: PreprocessConfig, out: str | os.PathLike) -> dict:
    """Read the configured dataset (downloading it if needed) and write the Dataset folder at ``out``."""
    from delrec.data.formats import read_raw

    raw = read_raw(config)
    return build_dataset(raw, config, Path(out))
