"""Every raw format, read from small fixtures the tests write themselves.

The writer helpers here are also used by test_data_errors.py and test_data_download.py.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.data.formats import read_generic
from delrec.data.titles import clean_title
from delrec.errors import DelrecError

N_USERS, N_ITEMS, PER_USER = 6, 40, 8


def make_rows(seed: int = 0) -> list[tuple[int, int, int]]:
    """(user, item, time) rows: each user has PER_USER distinct items at increasing times, file order shuffled."""
    rows = []
    for user in range(1, N_USERS + 1):
        # Distinct items per user; user 1 has item 3 and user 3 has items 2 and 7 (checked below).
        items = [(7 * user + 5 * step) % N_ITEMS + 1 for step in range(PER_USER)]
        rows += [(user, item, 1_000_000 + 100 * step + user) for step, item in enumerate(items)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def raw_title(item: int) -> str:
    """A MovieLens-style title: every third has its article moved to the end; item 2 is accented."""
    if item == 2:
        return "Misérables, Les (1995)"
    return f"Film {item}, The (19{50 + item})" if item % 3 == 0 else f"Film {item} (19{50 + item})"


def user_sequences(rows) -> dict[int, list[int]]:
    """Each raw user's raw items in time order (what the readers must reconstruct)."""
    out: dict[int, list[int]] = {}
    for user, item, _ in sorted(rows, key=lambda r: (r[0], r[2])):
        out.setdefault(user, []).append(item)
    return out


def write_ml100k(folder: Path, rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in rows))
    flags = "|".join("0" * 19)
    lines = "".join(f"{i}|{raw_title(i)}|01-Jan-1995||http://x/{i}|{flags}\n" for i in range(1, N_ITEMS + 1))
    (folder / "u.item").write_bytes(lines.encode("latin-1"))  # u.item is latin-1, as GroupLens ships it
    return folder


def write_ml1m(folder: Path, rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in rows))
    lines = "".join(f"{i}::{raw_title(i)}::Drama|Comedy\n" for i in range(1, N_ITEMS + 1))
    (folder / "movies.dat").write_bytes(lines.encode("latin-1"))
    return folder


def zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, f"{prefix}/{path.name}")
    return archive


def write_recbole(folder: Path, name: str = "Amazon_Beauty", rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"U{u}\tA{i:03d}\t5.0\t{t}.0" for u, i, t in rows]
    (folder / f"{name}.inter").write_text("\n".join(inter) + "\n")
    item = ["item_id:token\ttitle:token\tbrand:token"]
    for i in range(1, N_ITEMS + 1):
        title = f"Lotion {i} &amp; Co"
        if i == 5:
            title = '"Cream\twith a tab"'  # RecBole quotes titles holding tabs
        if i == 7:
            title = ""  # no title: its interactions are dropped
        item.append(f"A{i:03d}\t{title}\tBrand")
    (folder / f"{name}.item").write_text("\n".join(item) + "\n")
    return folder


def write_amazon_json(folder: Path, rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "reviews_Beauty_5.json.gz", "wt") as handle:
        for u, i, t in rows:
            record = {"reviewerID": f"R{u}", "asin": f"B{i:03d}", "overall": 5.0, "unixReviewTime": t}
            handle.write(json.dumps(record) + "\n")
    with gzip.open(folder / "meta_Beauty.json.gz", "wt") as handle:
        for i in range(1, N_ITEMS + 1):
            record = {"asin": f"B{i:03d}", "categories": [["Beauty"]]}
            if i != 7:  # item 7 has no title
                record["title"] = f"Shampoo {i}"
            handle.write(repr(record) + "\n")  # the 2014 meta files are Python dict literals
    return folder


def write_steam(folder: Path, rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "steam_reviews.json.gz", "wt") as handle:
        for u, i, t in rows:
            day = np.datetime64("2015-01-01") + np.timedelta64(t - 1_000_000, "D")
            record = {
                "username": f"gamer{u}",
                "product_id": str(1000 + i),
                "date": str(day),
                "early_access": False,
            }
            handle.write(repr(record) + "\n")
    with gzip.open(folder / "steam_games.json.gz", "wt") as handle:
        for i in range(1, N_ITEMS + 1):
            name_key = "app_name" if i % 2 else "title"  # some records have only app_name
            handle.write(repr({"id": str(1000 + i), name_key: f"Quest {i}", "price": 4.99}) + "\n")
        handle.write(repr({"app_name": "no id, ignored"}) + "\n")
    return folder


def write_sequences(folder: Path, rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    seqs = user_sequences(rows)
    (folder / "user_sequence.txt").write_text(
        "".join(f"U{u} " + " ".join(f"A{i:03d}" for i in items) + "\n" for u, items in seqs.items())
    )
    lines = ["asin\ttitle"] + [f"A{i:03d}\tSerum {i}" for i in range(1, N_ITEMS + 1)]
    (folder / "item_titles.tsv").write_text("\n".join(lines) + "\n")
    return folder


def write_generic(folder: Path, kind: str = "csv", rows=None) -> Path:
    rows = make_rows() if rows is None else rows
    folder.mkdir(parents=True, exist_ok=True)
    inter = pa.table(
        {
            "user": [f"user-{u}" for u, _, _ in rows],
            "item": [f"it{i}" for _, i, _ in rows],
            "timestamp": [t for _, _, t in rows],
        }
    )
    items = pa.table(
        {
            "item": [f"it{i}" for i in range(1, N_ITEMS + 1)],
            "title": [f"Book {i}" for i in range(1, N_ITEMS + 1)],
        }
    )
    if kind == "parquet":
        pq.write_table(inter, folder / "interactions.parquet")
        pq.write_table(items, folder / "items.parquet")
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(inter, folder / "interactions.csv")
        pacsv.write_csv(items, folder / "items.csv")
    return folder


LLARA_PAD = N_ITEMS  # LLaRA pads with the id one past the last title (ids 0..N_ITEMS-1 have titles)


def write_llara(folder: Path) -> Path:
    """LLaRA windows of the fixture users: users 1-4 train, 5 valid, 6 test; rows right-padded to 10."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "id2name.txt").write_text("".join(f"{i}::Quest {i}\n" for i in range(N_ITEMS)))
    groups = {1: "train", 2: "train", 3: "train", 4: "train", 5: "valid", 6: "test"}
    files = {"train": "train_sample1000.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
    for split, name in files.items():
        lines = []
        for user, items in user_sequences(make_rows()).items():
            if groups[user] == split:
                history = [i - 1 for i in items[:-1]]  # LLaRA ids start at 0
                seq = history + [LLARA_PAD] * (10 - len(history))
                lines.append(json.dumps({"seq": seq, "next": items[-1] - 1, "len_seq": len(history)}))
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def run(tmp_path: Path, **config):
    out = tmp_path / "out"
    stats = preprocess(PreprocessConfig(num_candidates=5, **config), out)
    return stats, load_dataset(out)


def check_sequences(ds, raw_user_prefix: str, raw_item: callable, dropped_items=()) -> None:
    """Each user's full sequence (train part + valid + test target) equals the fixture's, in time order."""
    users = {
        u: [i for i in items if i not in dropped_items] for u, items in user_sequences(make_rows()).items()
    }
    raw_users = pq.read_table(ds.path / "users.parquet").column("raw_id").to_pylist()
    for user, raw_user in enumerate(raw_users):
        seq = [
            *ds.train_sequences[user].tolist(),
            ds.examples["valid"].targets[user],
            ds.examples["test"].targets[user],
        ]
        got = [ds.raw_item_ids[i] for i in seq]
        expected = [raw_item(i) for i in users[int(raw_user.removeprefix(raw_user_prefix))]]
        assert got == expected, raw_user


def test_movielens_100k_folder_and_zip(tmp_path):
    folder = write_ml100k(tmp_path / "ml")
    stats, ds = run(tmp_path, dataset="ml-100k", source=str(folder))
    assert (stats["users"], stats["items"], stats["interactions"]) == (
        N_USERS,
        len(ds.titles) - 1,
        N_USERS * PER_USER,
    )
    assert ds.domain == "movies"
    check_sequences(ds, "", str)
    by_raw = dict(zip(ds.raw_item_ids, ds.titles, strict=True))
    assert by_raw["2"] == "Les Misérables (1995)"  # latin-1 decoded, article moved
    assert by_raw["3"] == "The Film 3 (1953)"
    # Items are numbered in numeric order of their raw ids ("10" after "9"), not as text.
    raw_ids = [int(r) for r in ds.raw_item_ids[1:]]
    assert raw_ids == sorted(raw_ids)

    archive = zip_folder(folder, tmp_path / "ml-100k.zip", "ml-100k")
    stats_zip, ds_zip = run(tmp_path / "z", dataset="ml-100k", source=str(archive))
    assert stats_zip["users"] == stats["users"] and ds_zip.titles == ds.titles
    assert np.array_equal(ds_zip.candidates["test"], ds.candidates["test"])


def test_latin1_title_is_decoded(tmp_path):
    rows = [(u, 8 * (u - 1) + i, u * 100 + i) for u in (1, 2) for i in range(1, 9)]
    _, ds = run(tmp_path, dataset="ml-100k", source=str(write_ml100k(tmp_path / "ml", rows)))
    assert ds.titles[2] == "Les Misérables (1995)"


def test_movielens_1m(tmp_path):
    stats, ds = run(tmp_path, dataset="ml-1m", source=str(write_ml1m(tmp_path / "ml1m")))
    assert stats["users"] == N_USERS and stats["interactions"] == N_USERS * PER_USER
    check_sequences(ds, "", str)


def test_recbole_atomic(tmp_path):
    folder = write_recbole(tmp_path / "beauty")
    stats, ds = run(tmp_path, dataset="beauty", source=str(folder), kcore=0)
    n7 = sum(1 for _, i, _ in make_rows() if i == 7)
    assert stats["dropped"]["no_title"] == n7
    assert stats["interactions"] == N_USERS * PER_USER - n7
    assert ds.domain == "products"
    titles = dict(zip(ds.raw_item_ids, ds.titles, strict=True))
    assert "A007" not in titles
    assert titles["A005"] == "Cream with a tab"
    assert titles["A003"] == "Lotion 3 & Co"
    check_sequences(ds, "U", lambda i: f"A{i:03d}", dropped_items=(7,))
    # The .inter file itself, and a zip of the folder (as RUCAIBox publishes it), also work as the source.
    stats_file, _ = run(tmp_path / "f", dataset="beauty", source=str(folder / "Amazon_Beauty.inter"), kcore=0)
    assert stats_file["interactions"] == stats["interactions"]
    archive = zip_folder(folder, tmp_path / "Amazon_Beauty.zip", "Amazon_Beauty")
    stats_zip, ds_zip = run(tmp_path / "z", dataset="beauty", source=str(archive), kcore=0)
    assert stats_zip["interactions"] == stats["interactions"] and ds_zip.titles == ds.titles


def test_amazon_json(tmp_path):
    folder = write_amazon_json(tmp_path / "amazon")
    stats, ds = run(tmp_path, dataset="beauty", format="amazon-json", source=str(folder), kcore=0)
    assert stats["dropped"]["no_title"] == sum(1 for _, i, _ in make_rows() if i == 7)
    check_sequences(ds, "R", lambda i: f"B{i:03d}", dropped_items=(7,))
    assert ds.titles[1] == f"Shampoo {int(ds.raw_item_ids[1][1:])}"


def test_kcore_default_for_amazon(tmp_path):
    """Amazon datasets default to a 5-core filter (MovieLens to none: the tests above keep every item).

    No fixture item has 5 users, so the default filter leaves nothing, and the error says so.
    """
    folder = write_amazon_json(tmp_path / "amazon")
    with pytest.raises(DelrecError, match="no interactions left after filtering"):
        run(tmp_path, dataset="beauty", format="amazon-json", source=str(folder))


def test_steam(tmp_path):
    folder = write_steam(tmp_path / "steam")
    stats, ds = run(tmp_path, dataset="steam", source=str(folder), kcore=0)
    assert stats["interactions"] == N_USERS * PER_USER and ds.domain == "games"
    check_sequences(ds, "gamer", lambda i: str(1000 + i))
    titles = dict(zip(ds.raw_item_ids, ds.titles, strict=True))
    assert all(titles[r] == f"Quest {int(r) - 1000}" for r in ds.raw_item_ids[1:])


def test_sequences(tmp_path):
    stats, ds = run(
        tmp_path, dataset="beauty", format="sequences", source=str(write_sequences(tmp_path / "s")), kcore=0
    )
    assert stats["interactions"] == N_USERS * PER_USER
    check_sequences(ds, "U", lambda i: f"A{i:03d}")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_generic(tmp_path, kind):
    stats, ds = run(tmp_path, dataset="generic", source=str(write_generic(tmp_path / "g", kind)))
    assert stats["interactions"] == N_USERS * PER_USER and ds.domain == "products"
    check_sequences(ds, "user-", lambda i: f"it{i}")


def test_generic_iso_dates_and_domain(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    # Written newest first: the ISO dates, not the file order, must decide the sequence.
    lines = [f"u{u},i{5 * u + k},2020-01-{20 - k:02d}T10:00:00" for u in (1, 2, 3) for k in range(5)]
    (folder / "interactions.csv").write_text("user,item,timestamp\n" + "\n".join(lines) + "\n")
    (folder / "items.csv").write_text("item,title\n" + "".join(f"i{i},Song {i}\n" for i in range(1, 30)))
    _, ds = run(tmp_path, dataset="generic", source=str(folder), domain="movies")
    assert ds.domain == "movies" and ds.num_users == 3
    first = [*ds.train_sequences[0].tolist(), ds.examples["valid"].targets[0], ds.examples["test"].targets[0]]
    assert [ds.raw_item_ids[i] for i in first] == ["i9", "i8", "i7", "i6", "i5"]


@pytest.mark.parametrize(
    ("stamps", "line", "message"),
    [
        (["1", "2", "x7"], 4, "expected a number, as the first row's '1' is, got 'x7'"),
        (
            ["2020-01-01", "2020-01-02", "5"],
            4,
            "expected an ISO date, as the first row's '2020-01-01' is, got '5'",
        ),
        (["soon", "1", "2"], 2, "expected a number or an ISO date"),
    ],
)
def test_a_text_timestamp_of_the_wrong_kind_is_named_with_its_line(tmp_path, stamps, line, message):
    folder = tmp_path / "g"
    folder.mkdir()
    rows = "".join(f"u1,i{k},{stamp}\n" for k, stamp in enumerate(stamps))
    (folder / "interactions.csv").write_text("user,item,timestamp\n" + rows)
    (folder / "items.csv").write_text("item,title\n" + "".join(f"i{k},Song {k}\n" for k in range(3)))
    with pytest.raises(DelrecError, match=re.escape(message)) as err:
        read_generic(folder)
    assert err.value.path == f"{folder / 'interactions.csv'}:{line}" and err.value.field == "timestamp"


def test_timestamps_stored_as_text_numbers_are_read_as_numbers(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    # As text "100" < "20.5" < "9"; as numbers 9 < 20.5 < 100: the order tells which way they were read.
    table = pa.table({"user": ["u1"] * 3, "item": ["i1", "i2", "i3"], "timestamp": ["100", "9", "20.5"]})
    pq.write_table(table, folder / "interactions.parquet")
    (folder / "items.csv").write_text("item,title\n" + "".join(f"i{k},Song {k}\n" for k in range(1, 4)))
    assert read_generic(folder).timestamps.tolist() == [2, 0, 1]


def test_synthetic_sizes_and_titles(tmp_path):
    stats, ds = run(tmp_path, dataset="synthetic", synthetic_users=30, synthetic_items=40)
    assert stats["users"] == 30 and ds.num_items <= 40
    assert all(len(t.split()) == 3 for t in ds.titles[1:])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Godfather, The (1972)", "The Godfather (1972)"),
        ("Room with a View, A (1986)", "A Room with a View (1986)"),
        ("Affair to Remember, An (1957)", "An Affair to Remember (1957)"),
        ("Misérables, Les (1995)", "Les Misérables (1995)"),
        ("Big Blue, The (Grand bleu, Le) (1988)", "The Big Blue (Le Grand bleu) (1988)"),
        ("Good, The Bad and The Ugly, The (1966)", "The Good, The Bad and The Ugly (1966)"),
        ("Crabtree &amp; Evelyn   Hand  Cream", "Crabtree & Evelyn Hand Cream"),
        ("Star Wars (1977)", "Star Wars (1977)"),
        ("Nell (1994)", "Nell (1994)"),
    ],
)
def test_clean_title(raw, clean):
    assert clean_title(raw) == clean


def test_llara_windows_keep_their_own_split_and_train_on_held_out_histories(tmp_path):
    stats, ds = run(tmp_path, dataset="steam-llara", source=str(write_llara(tmp_path / "llara")))
    assert stats["split"] == "given" and ds.domain == "games"
    assert stats["users_per_group"] == {"train": 4, "valid": 1, "test": 1}
    assert stats["interactions"] == N_USERS * PER_USER  # the padding never becomes an item
    expected = {user: [str(i - 1) for i in items] for user, items in user_sequences(make_rows()).items()}
    raw_users = pq.read_table(ds.path / "users.parquet").column("raw_id").to_pylist()
    by_raw = {raw: index for index, raw in enumerate(raw_users)}
    (valid_user,) = ds.examples["valid"].users.tolist()
    (test_user,) = ds.examples["test"].users.tolist()
    assert raw_users[valid_user] == "valid-1" and raw_users[test_user] == "test-1"
    for raw, fixture_user in (("valid-1", 5), ("test-1", 6)):
        user = by_raw[raw]
        split = raw.split("-")[0]
        history = ds.examples[split].histories[0].tolist()
        assert [ds.raw_item_ids[i] for i in history] == expected[fixture_user][:-1]
        assert ds.raw_item_ids[ds.examples[split].targets[0]] == expected[fixture_user][-1]
        # The held-out user's history trains; its target never does.
        assert ds.train_sequences[user].tolist() == history
    train_user = by_raw["train-1"]
    assert [ds.raw_item_ids[i] for i in ds.train_sequences[train_user]] == expected[1]
    held_out_targets = {int(ds.examples[s].targets[0]) for s in ("valid", "test")}
    for user, target in zip(ds.examples["train"].users, ds.examples["train"].targets, strict=True):
        if user in (valid_user, test_user):
            assert target not in held_out_targets
    titles = dict(zip(ds.raw_item_ids, ds.titles, strict=True))
    assert titles["0"] == "Quest 0"


def test_a_given_split_needs_a_source_split_by_user(tmp_path):
    with pytest.raises(DelrecError, match="split 'given' needs a source split by user") as caught:
        run(tmp_path, dataset="ml-100k", source=str(write_ml100k(tmp_path / "ml")), split="given")
    assert caught.value.field == "split"
