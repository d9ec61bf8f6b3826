"""Splits, candidate sets, ordering, filtering and the written artifact; ML-100K where it is present."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared_dataset

from delrec.artifacts import read_manifest
from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.data.preprocess import build_dataset
from delrec.data.raw import RawData


def check_candidates(ds, full: dict[int, set[int]], num_candidates: int) -> None:
    """Every candidate set: the right size, distinct, the target in it, no other item of the user's."""
    for split in ("valid", "test"):
        ex, cands = ds.examples[split], ds.candidates[split]
        assert cands.shape == (len(ex), num_candidates)
        for row, (user, target) in enumerate(zip(ex.users, ex.targets, strict=True)):
            got = set(cands[row].tolist())
            assert len(got) == num_candidates
            assert target in got
            assert not (got - {target}) & full[int(user)]
            assert min(got) >= 1 and max(got) <= ds.num_items


def loo_sequences(ds) -> dict[int, list[int]]:
    """Under leave-one-out: each user's whole sequence = training part + validation + test target."""
    valid, test = ds.examples["valid"], ds.examples["test"]
    assert np.array_equal(valid.users, np.arange(ds.num_users))
    assert np.array_equal(test.users, np.arange(ds.num_users))
    return {
        u: [*ds.train_sequences[u].tolist(), int(valid.targets[u]), int(test.targets[u])]
        for u in range(ds.num_users)
    }


def test_leave_one_out(synthetic_dir):
    ds = load_dataset(synthetic_dir)
    seqs = loo_sequences(ds)
    valid, test, train = ds.examples["valid"], ds.examples["test"], ds.examples["train"]
    h = ds.manifest["config"]["max_history"]
    for u, seq in seqs.items():
        assert len(set(seq)) == len(seq)  # items are a set per user
        assert valid.histories[u].tolist() == seq[:-2][-h:]
        assert test.histories[u].tolist() == seq[:-1][-h:]
    # Every earlier prefix of the training part is a training example, and nothing else is.
    expected = sorted(
        (u, tuple(seq[:p][-h:]), seq[p]) for u, seq in seqs.items() for p in range(1, len(seq) - 2)
    )
    got = sorted(
        (int(u), tuple(hist.tolist()), int(t))
        for u, hist, t in zip(train.users, train.histories, train.targets, strict=True)
    )
    assert got == expected
    check_candidates(ds, {u: set(s) for u, s in seqs.items()}, 20)


def test_user_split(tmp_path):
    out = tmp_path / "user"
    stats = preprocess(
        PreprocessConfig(dataset="synthetic", split="user", synthetic_users=100, max_history=100), out
    )
    ds = load_dataset(out)
    groups = pq.read_table(out / "users.parquet").column("group").to_pylist()
    assert (groups.count("train"), groups.count("valid"), groups.count("test")) == (80, 10, 10)
    assert stats["users_per_group"] == {"test": 10, "train": 80, "valid": 10}
    held_out = {u for u, g in enumerate(groups) if g != "train"}
    assert set(ds.examples["train"].users.tolist()).isdisjoint(held_out)
    assert all(len(ds.train_sequences[u]) == 0 for u in held_out)
    full = {}
    for split in ("valid", "test"):
        ex = ds.examples[split]
        assert {groups[u] for u in ex.users} == {split} and len(set(ex.users.tolist())) == len(ex)
        for u, hist, t in zip(ex.users, ex.histories, ex.targets, strict=True):
            full[int(u)] = {*hist.tolist(), int(t)}
    check_candidates(ds, full, 20)


def test_seed_fixes_split_and_candidates(tmp_path):
    def build(seed, name):
        out = tmp_path / name
        preprocess(PreprocessConfig(dataset="synthetic", split="user", synthetic_users=60, seed=seed), out)
        return load_dataset(out)

    a, b, c = build(1, "a"), build(1, "b"), build(2, "c")
    assert np.array_equal(a.candidates["test"], b.candidates["test"])
    assert a.manifest["config_hash"] == b.manifest["config_hash"] != c.manifest["config_hash"]
    assert not np.array_equal(a.examples["test"].users, c.examples["test"].users)


def test_num_candidates_and_max_history(tmp_path):
    out = tmp_path / "d"
    preprocess(
        PreprocessConfig(dataset="synthetic", synthetic_users=40, num_candidates=7, max_history=4), out
    )
    ds = load_dataset(out)
    assert ds.candidates["test"].shape == (40, 7)
    assert max(len(h) for h in ds.examples["train"].histories) == 4
    check_candidates(ds, {u: set(s) for u, s in loo_sequences(ds).items()}, 7)


def _raw(users, items, times, titles=None):
    return RawData(
        users=np.array(users, dtype=str),
        items=np.array(items, dtype=str),
        timestamps=np.array(times, dtype=np.int64),
        titles=titles if titles is not None else {str(i): f"T{i}" for i in range(1, 200)},
        domain="movies",
        source="test",
    )


def test_ties_keep_file_order_and_repeats_are_dropped(tmp_path):
    # User 1: items 5, 3, 9 share a time and must stay in file order; item 5 repeats later.
    raw = _raw(
        ["1"] * 6 + ["2"] * 3, ["7", "5", "3", "9", "5", "2", "11", "12", "13"], [1, 2, 2, 2, 3, 4, 1, 2, 3]
    )
    stats = build_dataset(raw, PreprocessConfig(dataset="generic", num_candidates=3), tmp_path / "d")
    ds = load_dataset(tmp_path / "d")
    seq = loo_sequences(ds)[0]
    assert [ds.raw_item_ids[i] for i in seq] == ["7", "5", "3", "9", "2"]
    assert stats["dropped"]["repeats"] == 1 and stats["interactions"] == 5 + 3


def test_numeric_raw_ids_order_items(tmp_path):
    raw = _raw(["2"] * 4 + ["10"] * 4, ["10", "9", "100", "2", "3", "1", "20", "11"], list(range(8)))
    build_dataset(raw, PreprocessConfig(dataset="generic", num_candidates=3), tmp_path / "d")
    ds = load_dataset(tmp_path / "d")
    assert ds.raw_item_ids[1:] == ["1", "2", "3", "9", "10", "11", "20", "100"]
    users = pq.read_table(tmp_path / "d" / "users.parquet").column("raw_id").to_pylist()
    assert users == ["2", "10"]


def test_kcore_and_short_users(tmp_path):
    # Item 9 is seen once, so a 2-core drops it; user d keeps 2 items, fewer than the 3 a user needs.
    sequences = {"a": "1 2 3 9", "b": "1 2 4 5", "c": "3 4 5 6", "e": "6 2 3 4", "d": "1 2"}
    users = [u for u, seq in sequences.items() for _ in seq.split()]
    items = [i for seq in sequences.values() for i in seq.split()]
    config = PreprocessConfig(dataset="generic", kcore=2, num_candidates=2)
    stats = build_dataset(_raw(users, items, list(range(len(items)))), config, tmp_path / "d")
    assert stats["dropped"]["kcore"] == 1 and stats["dropped"]["short_users"] == 1
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 6, 15)


def test_a_kcore_counts_distinct_items_not_repeated_interactions(tmp_path):
    # A 4-core: users b-f have 4 of items 1-5 each; user a's 4 interactions are 3 items (1 repeats).
    sequences = {
        "a": "1 1 2 3",
        "b": "1 2 3 4",
        "c": "1 2 3 5",
        "d": "1 2 4 5",
        "e": "1 3 4 5",
        "f": "2 3 4 5",
    }
    users = [u for u, seq in sequences.items() for _ in seq.split()]
    items = [i for seq in sequences.values() for i in seq.split()]
    config = PreprocessConfig(dataset="generic", kcore=4, num_candidates=2)
    stats = build_dataset(_raw(users, items, list(range(len(items)))), config, tmp_path / "d")
    ds = load_dataset(tmp_path / "d")
    assert stats["dropped"]["repeats"] == 1 and stats["dropped"]["kcore"] == 3  # user a's three items
    assert stats["users"] == 5 and all(len(set(seq)) >= 4 for seq in loo_sequences(ds).values())


def test_a_held_out_users_rankings_and_recommendations_leave_out_every_earlier_item(tmp_path):
    from delrec.recommend import known_sequences
    from delrec.teachers.train import PastItems

    # The user split: a held-out user has no training sequence, and its history is longer than max_history.
    rng = np.random.default_rng(0)
    sequences = {str(u): [str(i) for i in rng.choice(np.arange(1, 81), 12, replace=False)] for u in range(30)}
    users = [u for u, seq in sequences.items() for _ in seq]
    items = [i for seq in sequences.values() for i in seq]
    config = PreprocessConfig(dataset="generic", split="user", max_history=3, num_candidates=5)
    build_dataset(_raw(users, items, [t for _ in sequences for t in range(12)]), config, tmp_path / "d")
    ds = load_dataset(tmp_path / "d")
    raw_users = pq.read_table(tmp_path / "d" / "users.parquet").column("raw_id").to_pylist()
    item_id = {raw: i for i, raw in enumerate(ds.raw_item_ids) if i}
    known = known_sequences(ds)
    for split in ("valid", "test"):
        examples = ds.examples[split]
        assert len(examples) and max(map(len, ds.examples["train"].histories)) == 3
        rows, excluded = PastItems(ds).excluded(examples, np.arange(len(examples)))
        for row, user in enumerate(examples.users):
            whole = [item_id[raw] for raw in sequences[raw_users[user]]]
            assert set(excluded[rows == row].tolist()) == set(whole[:-1])
            assert known[user].tolist() == whole


def test_artifact_files_stats_and_manifest(synthetic_dir):
    names = {p.name for p in synthetic_dir.iterdir()}
    assert names == {
        "items.parquet", "users.parquet", "train_sequences.parquet", "train.parquet", "valid.parquet",
        "test.parquet", "candidates.parquet", "stats.json", "manifest.json",
    }  # fmt: skip
    items = pq.read_table(synthetic_dir / "items.parquet")
    assert items.column_names == ["item_id", "raw_id", "title"]
    assert items.column("item_id").to_pylist() == list(range(1, items.num_rows + 1))
    assert pq.read_table(synthetic_dir / "test.parquet").column_names == ["user", "history", "target"]
    stats = json.loads((synthetic_dir / "stats.json").read_text())
    for key in ("users", "items", "interactions", "dropped", "sequence_length", "examples"):
        assert key in stats
    assert set(stats["sequence_length"]) >= {"p50", "p90", "p100"}
    manifest = read_manifest(synthetic_dir, producer="preprocess")
    assert manifest["config"]["dataset"] == "synthetic" and manifest["rows"]["users"] == stats["users"]
    assert manifest["config_hash"] == PreprocessConfig(**manifest["config"]).hash()


def test_synthetic_is_learnable(synthetic):
    """The synthetic data's next item mostly follows a chain: a bigram table beats chance by far."""
    pairs = [(int(s[i]), int(s[i + 1])) for s in synthetic.train_sequences for i in range(len(s) - 1)]
    table: dict[int, dict[int, int]] = {}
    for a, b in pairs:
        table.setdefault(a, {}).setdefault(b, 0)
        table[a][b] += 1
    test = synthetic.examples["test"]
    hits = sum(
        1
        for hist, target in zip(test.histories, test.targets, strict=True)
        if len(hist)
        and table.get(int(hist[-1]))
        and max(table[int(hist[-1])], key=table[int(hist[-1])].get) == target
    )
    assert hits / len(test) > 0.3  # chance is about 1 / num_items


# ------------------------------------------------------------------------------------------------
# MovieLens-100K from ../shared/datasets (skipped where absent)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    source = shared_dataset("ml-100k")
    out = tmp_path_factory.mktemp("ml") / "ml-100k"
    started = time.perf_counter()
    stats = preprocess(PreprocessConfig(dataset="ml-100k", source=str(source)), out)
    print(f"ML-100K preprocess: {time.perf_counter() - started:.2f} s")
    return stats, load_dataset(out)


def test_ml100k_stats(ml100k):
    stats, ds = ml100k
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)
    assert stats["dropped"]["no_title"] == 0
    assert ds.titles[1] == "Toy Story (1995)" and ds.raw_item_ids[1] == "1"
    assert "The Godfather (1972)" in ds.titles
    assert stats["sequence_length"]["p0"] == 20 and stats["sequence_length"]["p100"] == 737


def test_ml100k_candidates(ml100k):
    _, ds = ml100k
    seqs = loo_sequences(ds)
    assert sum(len(s) for s in seqs.values()) == 100_000
    check_candidates(ds, {u: set(s) for u, s in seqs.items()}, 20)


def test_ml100k_user_split(tmp_path):
    out = tmp_path / "ml-user"
    stats = preprocess(
        PreprocessConfig(dataset="ml-100k", source=str(shared_dataset("ml-100k")), split="user"), out
    )
    assert stats["users_per_group"] == {"train": 754, "valid": 94, "test": 95}
    ds = load_dataset(out)
    assert (len(ds.examples["valid"]), len(ds.examples["test"])) == (94, 95)
