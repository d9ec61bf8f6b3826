"""The preprocess stage: raw dataset -> cleaned, split, candidate-sampled Dataset folder."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from delrec import layout
from delrec.artifacts import atomic_dir, write_json_atomic, write_manifest
from delrec.data.config import PreprocessConfig
from delrec.data.dataset import PRODUCER, Examples, write_dataset_files
from delrec.data.download import redact_url
from delrec.data.raw import RawData
from delrec.data.sources import dataset_info, read_raw
from delrec.data.titles import clean_title
from delrec.errors import DelrecError

log = logging.getLogger(__name__)


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
            f"a user leaves only {available} items to sample {count - 1} negatives from; "
            "lower num_candidates or use a larger dataset",
            field="num_candidates",
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


def _check_given_split(raw: RawData) -> None:
    """``split: given`` needs a source that says each user's split, with train, valid and test users."""
    if raw.groups is None:
        raise DelrecError(
            f"split 'given' needs a source split by user (format llara); {raw.source} is not: use loo or user",
            field="split",
        )
    bad = sorted({g for g in raw.groups.values()} - {"train", "valid", "test"})
    missing = sorted({"train", "valid", "test"} - set(raw.groups.values()))
    if bad or missing:
        raise DelrecError(
            f"expected train, valid and test users; unknown groups {bad}, none in {missing}",
            path=raw.source,
            field="split",
        )
    unknown = set(np.unique(raw.users.astype(str)).tolist()) - set(raw.groups)
    if unknown:
        raise DelrecError(f"users with no split: {sorted(unknown)[:5]}", path=raw.source, field="split")


def _id_order(raw_ids: np.ndarray) -> np.ndarray:
    """Permutation ordering raw ids numerically when all are integers (ML item 1 first), else as text."""
    try:
        numbers = raw_ids.astype(np.int64)
    except (ValueError, OverflowError):
        return np.argsort(raw_ids, kind="stable")
    return np.lexsort((raw_ids, numbers))


def build_dataset(raw: RawData, config: PreprocessConfig, out: str | os.PathLike) -> dict:
    """Clean, filter, remap, split and sample candidates; write the Dataset folder atomically.

    Returns the stats written to ``stats.json``.
    """
    started = time.perf_counter()
    scheme = config.split or ("given" if raw.groups is not None else "loo")
    if scheme == "given":
        _check_given_split(raw)
    source = redact_url(raw.source)  # stats and manifest never carry credentials
    dropped = dict(raw.dropped)
    titles = {str(key): clean_title(value) for key, value in raw.titles.items() if value and value.strip()}
    titles = {key: value for key, value in titles.items() if value}
    kcore = config.kcore if config.kcore is not None else dataset_info(config.dataset).kcore
    # A user of a given split needs only a history and a target: its split is not made from its items.
    min_length = 2 if scheme == "given" else config.min_user_interactions
    sequences, user_raw, item_raw = _user_sequences(raw, titles, kcore, min_length, dropped)
    num_items, num_users = len(item_raw), len(sequences)

    rng = np.random.default_rng(config.seed)
    groups = _user_groups(scheme, raw, user_raw, rng)
    train_sequences, examples = _examples(sequences, groups, scheme, config.max_history)
    candidates = {
        split: _split_candidates(rng, examples[split], sequences, num_items, config.num_candidates)
        for split in ("valid", "test")
    }

    lengths = np.array([len(s) for s in sequences])
    stats: dict = {"dataset": config.dataset, "source": source, "raw_interactions": int(len(raw.users))}
    stats.update(
        users=num_users,
        items=num_items,
        interactions=int(lengths.sum()),
        dropped=dropped,
        split=scheme,
        examples={s: len(e) for s, e in examples.items()},
        users_per_group={g: groups.count(g) for g in sorted(set(groups))},
        sequence_length={f"p{q}": float(np.percentile(lengths, q)) for q in (0, 25, 50, 75, 90, 99, 100)},
        domain=raw.domain,
        kcore=kcore,
        num_candidates=config.num_candidates,
    )
    # A local source (path or file:// URL) is never replaced, whatever --force says.
    with atomic_dir(out, protect=[raw.source] if raw.source else []) as tmp:
        write_dataset_files(
            tmp,
            titles=[titles[r] for r in item_raw.tolist()],
            raw_item_ids=item_raw.tolist(),
            raw_user_ids=user_raw.tolist(),
            user_groups=groups,
            train_sequences=train_sequences,
            examples=examples,
            candidates=candidates,
        )
        stats["seconds"] = round(time.perf_counter() - started, 3)
        write_json_atomic(tmp / layout.STATS_JSON, stats)
        settings = config.model_dump(mode="json")
        if settings.get("source"):
            settings["source"] = redact_url(settings["source"])
        write_manifest(
            tmp,
            producer=PRODUCER,
            config=settings,
            rows={"items": num_items, "users": num_users, **{s: len(e) for s, e in examples.items()}},
            extra={"dataset": config.dataset, "domain": raw.domain, "source": source},
        )
    log.info(
        "wrote %s: %d users, %d items, %d interactions", out, num_users, num_items, stats["interactions"]
    )
    return stats


def _user_sequences(
    raw: RawData, titles: dict[str, str], kcore: int, min_length: int, dropped: dict[str, int]
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each kept user's items in time order, items re-indexed 1..N (0 pads); raw user and item ids.

    Drops (counted in ``dropped``) interactions with untitled items, repeats of an item, those outside
    the k-core (of distinct items), and users with fewer than ``min_length`` items. Users and items are
    in raw-id order.
    """
    # Work on integer codes of the distinct raw ids: the per-id work is then per item, not per interaction.
    item_raw, item_codes = np.unique(raw.items.astype(str), return_inverse=True)
    user_raw, user_codes = np.unique(raw.users.astype(str), return_inverse=True)
    item_has_title = np.array([key in titles for key in item_raw.tolist()], dtype=bool)
    has_title = item_has_title[item_codes] if len(item_codes) else np.zeros(0, dtype=bool)
    dropped["no_title"] = dropped.get("no_title", 0) + int((~has_title).sum())
    dropped["no_title_items"] = int((~item_has_title).sum())
    if dropped["no_title"]:
        log.info(
            "dropped %d interactions with %d items that have no title",
            dropped["no_title"],
            dropped["no_title_items"],
        )
    users, items, times = user_codes[has_title], item_codes[has_title], raw.timestamps[has_title]
    order = np.lexsort((np.arange(len(times)), times, users))  # by user, then time, stable on ties
    users, items = users[order], items[order]
    # A repeated interaction with an item keeps the first: the candidate sampler relies on "items the
    # user interacted with" being a set, and re-consuming is not what the next-item task predicts.
    # Before the k-core, so that a user kept by a k-core has k distinct items.
    first = np.zeros(len(users), dtype=bool)
    first[np.unique(users.astype(np.int64) * len(item_raw) + items, return_index=True)[1]] = True
    dropped["repeats"] = int((~first).sum())
    users, items = users[first], items[first]
    if kcore > 1 and len(users):
        keep = _kcore(users, items, kcore)
        dropped["kcore"] = int((~keep).sum())
        users, items = users[keep], items[keep]
    if len(users) == 0:
        raise DelrecError(f"no interactions left after filtering (dropped: {dropped})", path=raw.source)

    bounds = np.flatnonzero(np.diff(users)) + 1
    per_user = np.split(items, bounds)
    seq_users = users[np.r_[0, bounds]]
    long_enough = np.array([len(s) >= min_length for s in per_user], dtype=bool)
    dropped["short_users"] = int((~long_enough).sum())
    if not long_enough.any():
        raise DelrecError(
            f"no user has {min_length}+ interactions after filtering (dropped: {dropped})",
            path=raw.source,
        )
    kept_users = seq_users[long_enough]
    user_perm = _id_order(user_raw[kept_users])
    sequences = [per_user[i] for i in np.flatnonzero(long_enough)[user_perm]]
    user_raw = user_raw[kept_users[user_perm]]
    used_items = np.unique(np.concatenate(sequences))
    used_items = used_items[_id_order(item_raw[used_items])]
    remap = np.zeros(len(item_raw), dtype=np.int64)
    remap[used_items] = np.arange(1, len(used_items) + 1)
    return [remap[s] for s in sequences], user_raw, item_raw[used_items]


def _user_groups(scheme: str, raw: RawData, user_raw: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Each user's group: "all" (loo: every user gives a train, valid and test example), the source's
    (given), or a seeded 80/10/10 draw of train, valid and test users (user)."""
    num_users = len(user_raw)
    if scheme == "loo":
        return ["all"] * num_users
    if scheme == "given":
        return [raw.groups[user] for user in user_raw.tolist()]
    if num_users < 3:
        raise DelrecError(f"the user split needs 3+ users, {num_users} left after filtering", path=raw.source)
    perm = rng.permutation(num_users)
    # 80/10/10 (the paper's code); at least one validation and one test user on tiny data.
    n_valid = max(1, int(round(0.1 * num_users)))
    n_train = min(int(round(0.8 * num_users)), num_users - n_valid - 1)
    groups = [""] * num_users
    for rank, user in enumerate(perm):
        groups[user] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return groups


def _examples(
    sequences: list[np.ndarray], groups: list[str], scheme: str, max_history: int
) -> tuple[list[np.ndarray], dict[str, Examples]]:
    """Each user's training sequence, and the (user, history, target) examples of every split.

    loo: a user's last item is its test target, the one before its validation target, the rest trains.
    given and user: a valid or test user's last item is its target. Under given its history also trains
    (observed data, as every user's prefix is under loo); under user, it does not, and the example keeps
    the whole history (not the last ``max_history``): it is the only record of every item the user had,
    which rankings leave out and recommendations must not repeat.
    """
    parts: dict[str, dict[str, list]] = {
        s: {"users": [], "histories": [], "targets": []} for s in ("train", "valid", "test")
    }

    def add(split: str, user: int, seq: np.ndarray, pos: int, whole: bool = False) -> None:
        parts[split]["users"].append(user)
        parts[split]["histories"].append(seq[0 if whole else max(0, pos - max_history) : pos])
        parts[split]["targets"].append(int(seq[pos]))

    train_sequences: list[np.ndarray] = []
    for user, seq in enumerate(sequences):
        group = groups[user]
        if scheme == "loo":
            train_part = seq[:-2]
        elif group == "train":
            train_part = seq
        else:
            train_part = seq[:-1] if scheme == "given" else seq[:0]
        train_sequences.append(train_part)
        for pos in range(1, len(train_part)):
            add("train", user, seq, pos)
        if scheme == "loo":
            add("valid", user, seq, len(seq) - 2)
            add("test", user, seq, len(seq) - 1)
        elif group != "train":
            add(group, user, seq, len(seq) - 1, whole=scheme == "user")
    examples = {
        split: Examples(
            users=np.array(p["users"], dtype=np.int64),
            histories=p["histories"],
            targets=np.array(p["targets"], dtype=np.int64),
        )
        for split, p in parts.items()
    }
    return train_sequences, examples


def _split_candidates(
    rng: np.random.Generator, examples: Examples, sequences: list[np.ndarray], num_items: int, n: int
) -> np.ndarray:
    """``n`` candidates per example: its target and items the user never interacted with."""
    if not len(examples):
        return np.zeros((0, n), dtype=np.int64)
    return np.stack(
        [
            _sample_candidates(rng, int(t), set(sequences[u].tolist()), num_items, n)
            for u, t in zip(examples.users, examples.targets, strict=True)
        ]
    )


def preprocess(
    config: PreprocessConfig, out: str | os.PathLike, *, cache: str | os.PathLike | None = None
) -> dict:
    """Read the configured dataset (downloading it if needed) and write the Dataset folder at ``out``.

    ``cache`` is the download cache (default ``$DELREC_CACHE`` or ``~/.cache/delrec``). On any error
    nothing is written at ``out``.
    """
    started = time.perf_counter()
    raw = read_raw(config, cache=Path(cache) if cache is not None else None)
    log.info(
        "read %d interactions from %s in %.2f s", len(raw.users), raw.source, time.perf_counter() - started
    )
    stats = build_dataset(raw, config, Path(out))
    stats["seconds_total"] = round(time.perf_counter() - started, 3)
    return stats
