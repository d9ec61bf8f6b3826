"""Bad input: each case gives a clear error naming the file and line or field, exit 2, nothing at --out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_formats import (
    write_amazon_json,
    write_generic,
    write_llara,
    write_ml100k,
    write_recbole,
    write_steam,
    zip_folder,
)

from delrec.cli import main


def fails(tmp_path: Path, capsys, *args: str, expect: list[str]) -> str:
    """Run ``delrec preprocess ARGS`` and check: exit 2, every ``expect`` in the message, nothing left."""
    out = tmp_path / "out"
    code = main(["preprocess", "--out", str(out), "--num-candidates", "5", *args])
    message = capsys.readouterr().err
    assert code == 2, message
    assert "delrec preprocess: error: " in message  # after any progress-bar output
    for part in expect:
        assert part in message, message
    assert "Traceback" not in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left
    return message


def test_a_source_for_the_generated_synthetic_dataset_is_refused(tmp_path, capsys):
    # Else the run trains on generated data while its manifest names the user's files.
    folder = write_ml100k(tmp_path / "ml")
    fails(tmp_path, capsys, "--dataset", "synthetic", "--source", str(folder), expect=["synthetic dataset"])


def test_an_unwritable_out_is_named_as_the_user_typed_it(capsys):
    # /proc takes no new folders (even as root): the error names --out, not our temporary name beside it.
    assert main(["preprocess", "--out", "/proc/delrec-out", "--synthetic-users", "5"]) == 2
    assert "error: /proc/delrec-out: No such file or directory" in capsys.readouterr().err


def test_truncated_ratings_file(tmp_path, capsys):
    folder = write_ml100k(tmp_path / "ml")
    data = folder / "u.data"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:3])  # cut inside the last line
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "ml-100k",
        "--source",
        str(folder),
        expect=[f"u.data:{len(lines)}", "expected 4 fields"],
    )


def test_garbled_ratings_value(tmp_path, capsys):
    folder = write_ml100k(tmp_path / "ml")
    data = folder / "u.data"
    lines = data.read_text().splitlines()
    lines[4] = lines[4].rsplit("\t", 1)[0] + "\tyesterday"
    data.write_text("\n".join(lines) + "\n")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "ml-100k",
        "--source",
        str(folder),
        expect=["u.data:5", "'timestamp'", "yesterday"],
    )


def test_garbled_title_file(tmp_path, capsys):
    folder = write_ml100k(tmp_path / "ml")
    with open(folder / "u.item", "ab") as handle:
        handle.write(b"no separators here\n")
    fails(tmp_path, capsys, "--dataset", "ml-100k", "--source", str(folder), expect=["u.item:41"])


def test_missing_title_file(tmp_path, capsys):
    folder = write_ml100k(tmp_path / "ml")
    (folder / "u.item").unlink()
    fails(
        tmp_path, capsys, "--dataset", "ml-100k", "--source", str(folder), expect=["u.item", "missing file"]
    )


def test_truncated_zip(tmp_path, capsys):
    archive = zip_folder(write_ml100k(tmp_path / "ml"), tmp_path / "ml-100k.zip", "ml-100k")
    archive.write_bytes(archive.read_bytes()[:-200])
    fails(tmp_path, capsys, "--dataset", "ml-100k", "--source", str(archive), expect=["ml-100k.zip", "zip"])


def test_truncated_gzip(tmp_path, capsys):
    folder = write_amazon_json(tmp_path / "amazon")
    reviews = folder / "reviews_Beauty_5.json.gz"
    reviews.write_bytes(reviews.read_bytes()[:-30])
    fails(
        tmp_path, capsys, "--dataset", "beauty", "--format", "amazon-json", "--kcore", "0", "--source", str(folder),
        expect=["reviews_Beauty_5.json.gz", "truncated or corrupt gzip"],
    )  # fmt: skip


def test_garbled_json_line(tmp_path, capsys):
    folder = write_amazon_json(tmp_path / "amazon")
    reviews = folder / "reviews_Beauty_5.json.gz"
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]
    reviews.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    fails(
        tmp_path, capsys, "--dataset", "beauty", "--format", "amazon-json", "--kcore", "0", "--source", str(folder),
        expect=["reviews_Beauty_5.json.gz:3", "not a JSON object"],
    )  # fmt: skip


@pytest.mark.parametrize("stamp", [1e20, -(2**70)])
def test_a_review_time_beyond_int64(tmp_path, capsys, stamp):
    folder = write_amazon_json(tmp_path / "amazon")
    reviews = folder / "reviews_Beauty_5.json.gz"
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    record = json.loads(lines[4])
    record["unixReviewTime"] = stamp
    lines[4] = json.dumps(record)
    reviews.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    fails(
        tmp_path, capsys, "--dataset", "beauty", "--format", "amazon-json", "--kcore", "0", "--source", str(folder),
        expect=[f"reviews_Beauty_5.json.gz:5: field 'unixReviewTime': expected a Unix time in seconds, got {stamp!r}"],
    )  # fmt: skip


def test_record_without_a_field(tmp_path, capsys):
    folder = write_steam(tmp_path / "steam")
    reviews = folder / "steam_reviews.json.gz"
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    lines[6] = repr({"username": "x", "date": "2015-01-01"})
    reviews.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    fails(
        tmp_path, capsys, "--dataset", "steam", "--kcore", "0", "--source", str(folder),
        expect=["steam_reviews.json.gz:7", "'product_id'"],
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_missing_column(tmp_path, capsys, kind):
    folder = write_generic(tmp_path / "g", kind)
    path = folder / f"interactions.{kind}"
    if kind == "parquet":
        pq.write_table(pq.read_table(path).drop_columns(["timestamp"]), path)
    else:
        lines = path.read_text().splitlines()
        path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "generic",
        "--source",
        str(folder),
        expect=[f"interactions.{kind}", "field 'timestamp'"],
    )


def test_truncated_recbole_inter(tmp_path, capsys):
    folder = write_recbole(tmp_path / "r")
    inter = folder / "Amazon_Beauty.inter"
    text = inter.read_text()
    inter.write_text(text[: len(text) - 12])  # cut inside the last line
    n = len(text.splitlines())
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "beauty",
        "--kcore",
        "0",
        "--source",
        str(folder),
        expect=[f"Amazon_Beauty.inter:{n}", "expected 4 fields"],
    )


def test_missing_column_recbole(tmp_path, capsys):
    folder = write_recbole(tmp_path / "r")
    item = folder / "Amazon_Beauty.item"
    item.write_text(item.read_text().replace("title:token", "name:token", 1))
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "beauty",
        "--kcore",
        "0",
        "--source",
        str(folder),
        expect=["Amazon_Beauty.item:1", "field 'title'"],
    )


def test_unparsable_timestamps(tmp_path, capsys):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "interactions.csv").write_text("user,item,timestamp\nu1,i1,soon\nu1,i2,later\n")
    (folder / "items.csv").write_text("item,title\ni1,A\ni2,B\n")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "generic",
        "--source",
        str(folder),
        expect=["interactions.csv", "field 'timestamp'"],
    )


@pytest.mark.parametrize(
    ("line", "expect"),
    [("u1,i2", "expected 3 fields"), ('u1,"i2,3', "expected 3 fields"), ("u1,,5", "field 'item'")],
)
def test_bad_csv_line(tmp_path, capsys, line, expect):
    folder = write_generic(tmp_path / "g", "csv")
    path = folder / "interactions.csv"
    lines = path.read_text().splitlines()
    lines[5] = line
    path.write_text("\n".join(lines) + "\n")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "generic",
        "--source",
        str(folder),
        expect=["interactions.csv:6", expect],
    )


def test_unreadable_encoding(tmp_path, capsys):
    folder = write_generic(tmp_path / "g", "csv")
    items = folder / "items.csv"
    data = items.read_bytes().splitlines()
    data[3] = "it3,Caf\u00e9".encode("latin-1")  # latin-1 bytes in a UTF-8 file
    items.write_bytes(b"\n".join(data) + b"\n")
    fails(tmp_path, capsys, "--dataset", "generic", "--source", str(folder), expect=["items.csv:4", "utf-8"])


def test_unreadable_encoding_in_titles_table(tmp_path, capsys):
    folder = write_recbole(tmp_path / "r")
    item = folder / "Amazon_Beauty.item"
    data = item.read_bytes().splitlines()
    data[2] = data[2] + b" \xe9"
    item.write_bytes(b"\n".join(data) + b"\n")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "beauty",
        "--kcore",
        "0",
        "--source",
        str(folder),
        expect=["Amazon_Beauty.item:3", "utf-8"],
    )


def test_unknown_dataset_and_format(tmp_path, capsys):
    fails(tmp_path, capsys, "--dataset", "ml-10m", expect=["unknown dataset 'ml-10m'", "ml-100k"])
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "generic",
        "--format",
        "xml",
        "--source",
        str(tmp_path),
        expect=["unknown format 'xml'"],
    )


def test_empty_after_filtering(tmp_path, capsys):
    folder = write_generic(tmp_path / "g", "parquet")
    pq.write_table(pa.table({"item": ["nothing"], "title": ["Unused"]}), folder / "items.parquet")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "generic",
        "--source",
        str(folder),
        expect=["no interactions left after filtering", "no_title"],
    )


@pytest.mark.parametrize("dataset", ["generic", "beauty"])
def test_an_empty_csv_or_inter_file(tmp_path, capsys, dataset):
    folder = (write_generic if dataset == "generic" else write_recbole)(tmp_path / "src")
    empty = next(p for p in folder.iterdir() if p.name in ("interactions.csv", "Amazon_Beauty.inter"))
    empty.write_text("")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        dataset,
        "--source",
        str(folder),
        expect=[f"{empty}: empty file: expected a header line"],
    )


def test_missing_source(tmp_path, capsys):
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "ml-1m",
        "--source",
        str(tmp_path / "nowhere"),
        expect=["nowhere", "source not found"],
    )
    fails(tmp_path, capsys, "--dataset", "steam", expect=["has no default download", "--source"])
    fails(
        tmp_path, capsys, "--dataset", "ml-1m", "--source", str(tmp_path), expect=["no MovieLens rating file"]
    )


def test_bad_config_values(tmp_path, capsys):
    fails(tmp_path, capsys, "--dataset", "synthetic", "--synthetic-themes", "12", expect=["synthetic_themes"])
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "synthetic",
        "--synthetic-items",
        "40",
        "--num-candidates",
        "60",
        expect=["num_candidates"],
    )


def test_failure_keeps_an_existing_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["preprocess", "--out", str(out), "--synthetic-users", "20"]) == 0
    before = (out / "manifest.json").read_text()
    assert (
        main(["preprocess", "--out", str(out), "--dataset", "generic", "--source", str(tmp_path / "none")])
        == 2
    )
    assert (out / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        ('{"seq": [1, 2, "x"], "next": 3, "len_seq": 3}', ["field 'seq'", "a list of integer item ids"]),
        ('{"seq": [1, 2], "next": [3], "len_seq": 2}', ["field 'next'", "an integer item id"]),
        ('{"seq": [1, 2], "next": 3, "len_seq": 5}', ["field 'len_seq'", "from 0 to 2"]),
    ],
)
def test_bad_llara_row(tmp_path, capsys, line, expect):
    folder = write_llara(tmp_path / "llara")
    valid = folder / "valid.jsonl"
    valid.write_text(valid.read_text() + line + "\n")
    fails(
        tmp_path,
        capsys,
        "--dataset",
        "steam-llara",
        "--source",
        str(folder),
        expect=["valid.jsonl:2", *expect],
    )


def test_llara_without_titles_or_a_split_file(tmp_path, capsys):
    folder = write_llara(tmp_path / "llara")
    (folder / "test.jsonl").unlink()
    fails(
        tmp_path, capsys, "--dataset", "steam-llara", "--source", str(folder), expect=["no LLaRA test file"]
    )
    (folder / "id2name.txt").unlink()
    fails(tmp_path, capsys, "--dataset", "steam-llara", "--source", str(folder), expect=["id2name.txt"])
