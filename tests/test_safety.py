"""Never lose or corrupt a user's data, never run a stranger's code: each case through the CLI.

Every refusal: exit 2, a message naming the file (and line or field), no traceback, and nothing
written or deleted (no hidden ``.tmp-*`` / ``.old-*`` folder left either).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data_formats import write_amazon_json, write_generic, write_ml100k, write_recbole

from delrec import artifacts, layout
from delrec.artifacts import load_checkpoint, partial_dir
from delrec.cli import main
from delrec.data import download
from delrec.errors import DelrecError

SMALL = ["--num-candidates", "5"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def preprocess_ml100k(capsys, source, out, *extra: str):
    """``delrec preprocess --dataset ml-100k`` on ``source`` (plus ``extra`` options): (exit code, stderr)."""
    return run(
        capsys,
        "preprocess",
        "--dataset",
        "ml-100k",
        "--source",
        str(source),
        "--out",
        str(out),
        *SMALL,
        *extra,
    )


def preprocess_generic(capsys, source, out):
    """``delrec preprocess --dataset generic`` on ``source``: (exit code, stderr)."""
    return run(
        capsys, "preprocess", "--dataset", "generic", "--source", str(source), "--out", str(out), *SMALL
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its content."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if layout.TMP_TAG in p.name or layout.OLD_TAG in p.name]


def preprocess_ok(capsys, source: Path, out: Path, *extra: str) -> None:
    code, err = preprocess_ml100k(capsys, source, out, *extra)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------- --out


def test_out_holding_someone_elses_files_is_refused_and_kept(tmp_path, capsys):
    source = write_ml100k(tmp_path / "ml")
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    before = snapshot(tmp_path)
    code, err = preprocess_ml100k(capsys, source, out)
    assert code == 2
    assert f"{out}: field 'out': exists and is not a delrec output" in err and "--force" in err
    assert snapshot(tmp_path) == before
    assert hidden_leftovers(tmp_path) == []


def test_force_replaces_a_foreign_folder_but_never_the_source(tmp_path, capsys):
    source = write_ml100k(tmp_path / "ml")
    before = snapshot(source)
    for out in (source, tmp_path):  # the source itself, and a folder holding it
        code, err = preprocess_ml100k(capsys, source, out, "--force")
        assert code == 2 and "would replace the input" in err, err
    code, err = run(
        capsys, "preprocess", "--dataset", "ml-100k", "--source", str(source), "--out", str(source), *SMALL
    )
    assert code == 2 and "would replace the input" in err
    assert snapshot(source) == before
    other = tmp_path / "scratch"
    other.mkdir()
    (other / "junk").write_text("x")
    preprocess_ok(capsys, source, other, "--force")
    assert (other / layout.MANIFEST).is_file() and not (other / "junk").exists()


@pytest.mark.parametrize("spelling", ["tilde", "file_url", "symlink"])
def test_force_never_replaces_the_source_however_it_is_spelled(tmp_path, capsys, monkeypatch, spelling):
    home = tmp_path / "home"
    source = write_ml100k(home / "raw" / "ml")
    before = snapshot(source)
    monkeypatch.setenv("HOME", str(home))
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(home / "raw")
    named = {"tilde": "~/raw/ml", "file_url": source.as_uri(), "symlink": str(tmp_path / "link" / "ml")}
    code, err = preprocess_ml100k(capsys, named[spelling], home / "raw", "--force")
    assert code == 2 and "would replace the input" in err, err
    assert snapshot(source) == before


def test_our_own_output_is_replaced_without_force(tmp_path, capsys):
    source = write_ml100k(tmp_path / "ml")
    out = tmp_path / "data"
    preprocess_ok(capsys, source, out)
    preprocess_ok(capsys, source, out, "--seed", "3")
    assert json.loads((out / layout.MANIFEST).read_text())["config"]["seed"] == 3
    assert hidden_leftovers(tmp_path) == []


def test_our_output_holding_the_users_own_files_is_refused_and_kept(tmp_path, capsys):
    source = write_ml100k(tmp_path / "ml")
    out = tmp_path / "data"
    preprocess_ok(capsys, source, out)
    (out / "my_analysis.ipynb").write_text("hours of work")
    before = snapshot(tmp_path)
    code, err = preprocess_ml100k(capsys, source, out, "--seed", "3")
    assert code == 2
    assert f"{out}: field 'out': holds files that are not part of the delrec output" in err
    assert "my_analysis.ipynb" in err and "--force" in err
    assert snapshot(tmp_path) == before
    assert hidden_leftovers(tmp_path) == []


def test_files_in_subfolders_are_ours_only_if_the_manifest_lists_them(tmp_path):
    out = tmp_path / "model"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "weights.safetensors").write_bytes(b"w")
    artifacts.write_manifest(out, producer=layout.FINETUNE, config={})
    assert artifacts.check_out(out) == out
    (out / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(DelrecError, match="adapter/notes.txt"):
        artifacts.check_out(out)


def test_a_stage_input_is_never_replaced_even_though_it_is_ours(tmp_path, capsys, synthetic_dir):
    code, err = run(
        capsys, "train-teacher", "--data", str(synthetic_dir), "--out", str(synthetic_dir), "--force"
    )
    assert code == 2 and "would replace the input" in err
    artifacts.read_manifest(synthetic_dir, producer="preprocess")  # intact


@pytest.mark.parametrize("case", ["dot", "file", "below_file", "symlink"])
def test_bad_out_paths(tmp_path, capsys, monkeypatch, case):
    source = write_ml100k(tmp_path / "ml")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    out, expect = {
        "dot": (".", "is the current folder"),
        "file": ("notes.txt", "exists and is not a folder"),
        "below_file": ("notes.txt/sub/out", "is a file, not a folder"),
        "symlink": ("link", "symbolic link"),
    }[case]
    if case == "symlink":
        (work / "link").symlink_to(tmp_path / "ml")
    before = snapshot(tmp_path)
    code, err = run(
        capsys, "preprocess", "--dataset", "ml-100k", "--source", str(source), "--out", out, *SMALL
    )
    assert code == 2 and expect in err, err
    assert snapshot(tmp_path) == before
    assert hidden_leftovers(work) == [] and hidden_leftovers(tmp_path) == []


def test_stale_temporary_folder_of_a_killed_run_is_cleaned(tmp_path, capsys):
    source = write_ml100k(tmp_path / "ml")
    # What a run killed during its final write leaves: pid 2**22+1 is above Linux's pid_max, so dead.
    stale = tmp_path / f".data{layout.TMP_TAG}{artifacts._safe_host()}-{2**22 + 1}-x1"
    stale.mkdir()
    (stale / "items.parquet").write_bytes(b"half")
    preprocess_ok(capsys, source, tmp_path / "data")
    assert not stale.exists()
    assert hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- checkpoints


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_resume_checkpoint_runs_no_code(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    partial = partial_dir(tmp_path / "out")
    partial.mkdir()
    run_key = {"config": "c"}
    torch.save({"run_key": run_key, "step": 3, "evil": _Payload()}, partial / layout.CHECKPOINT)
    assert load_checkpoint(partial, run_key) is None
    assert not (tmp_path / "PWNED").exists()
    assert "ignoring unreadable checkpoint" in caplog.text


class _Killed(Exception):
    pass


def _plain_leaves(value, where="state") -> list[str]:
    """Paths of everything in ``value`` that is neither a tensor, a plain value nor a container of them."""
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _plain_leaves(v, f"{where}.{k}")]
    if isinstance(value, list | tuple):
        return [bad for i, v in enumerate(value) for bad in _plain_leaves(v, f"{where}[{i}]")]
    plain = (torch.Tensor, str, int, float, bool, type(None))
    return [] if isinstance(value, plain) else [f"{where}: {type(value).__name__}"]


def test_teacher_checkpoint_holds_only_tensors_and_plain_values(tmp_path, synthetic_dir):
    """A run killed after epoch 1 leaves <out>.partial/state.pt, which loads with weights_only=True (no
    pickled objects, so nothing a crafted file could run) and holds the model and optimizer state."""
    from delrec.teachers import TeacherConfig, train_teacher

    def kill(epoch, record):
        raise _Killed

    out = tmp_path / "teacher"
    config = TeacherConfig(model="gru4rec", hidden=16, rnn_hidden=16, max_epochs=2, device="cpu")
    with pytest.raises(_Killed):
        train_teacher(synthetic_dir, config, out, on_epoch_end=kill)
    state = torch.load(partial_dir(out) / layout.CHECKPOINT, weights_only=True)
    assert _plain_leaves(state) == []
    assert state["step"] == 1 and state["best"]["step"] == 1
    weights = state["stage"]["model"]
    assert "item_emb.weight" in weights and all(isinstance(t, torch.Tensor) for t in weights.values())
    assert state["stage"]["optimizer"]["state"]


# ---------------------------------------------------------------------------------------------- corrupted inputs


def test_a_model_file_with_overwritten_bytes_is_refused(tmp_path, capsys, synthetic_dir):
    out = tmp_path / "teacher"
    code, err = run(
        capsys, "train-teacher", "--data", str(synthetic_dir), "--out", str(out), "--max-epochs", "1",
        "--model", "gru4rec",
    )  # fmt: skip
    assert code == 0, err
    weights = out / layout.TEACHER_WEIGHTS
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # same size, different bytes
        handle.seek(size - 8)
        handle.write(b"\x00" * 8)
    artifacts._VERIFIED.clear()
    from delrec.errors import DelrecError
    from delrec.teachers import load_teacher

    with pytest.raises(
        DelrecError, match=rf"{weights}: field 'files.model.safetensors': sha256 does not match"
    ):
        load_teacher(out)


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path, synthetic_dir):
    from delrec.errors import DelrecError

    folder = tmp_path / "copy"
    folder.mkdir()
    for p in synthetic_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "extra.safetensors").write_bytes(b"x" * 100)
    artifacts.write_manifest(folder, producer="preprocess", config={})
    (folder / "extra.safetensors").write_bytes(b"x" * 40)
    with pytest.raises(
        DelrecError, match=r"extra.safetensors: field 'files.extra.safetensors': size 40 bytes"
    ):
        artifacts.read_manifest(folder)


def test_candidates_file_with_the_wrong_schema(tmp_path, synthetic_dir):
    from delrec.data import load_dataset
    from delrec.errors import DelrecError

    folder = tmp_path / "data"
    folder.mkdir()
    for p in synthetic_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    table = pq.read_table(folder / layout.CANDIDATES)
    bad = table.drop_columns(["candidates"]).append_column("candidates", pa.array(["x"] * len(table)))
    pq.write_table(bad, folder / layout.CANDIDATES)
    artifacts.write_manifest(
        folder, producer="preprocess", config={}
    )  # a re-signed folder: schema still checked
    with pytest.raises(
        DelrecError, match=r"candidates.parquet: field 'candidates': expected list<int>, got string"
    ):
        load_dataset(folder)


# ---------------------------------------------------------------------------------------------- bad values


def _edit_udata(folder: Path, line: int, edit) -> None:
    data = folder / "u.data"
    lines = data.read_text().splitlines()
    lines[line - 1] = edit(lines[line - 1])
    data.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda line: line.rsplit("\t", 1)[0] + "\tNaN", "timestamp"),
        (lambda line: line.rsplit("\t", 1)[0] + "\t", "timestamp"),
        (lambda line: "\t" + line.split("\t", 1)[1], "user"),
        (lambda line: line.split("\t")[0] + "\tNULL\t" + "\t".join(line.split("\t")[2:]), "item"),
    ],
    ids=["nan_time", "empty_time", "empty_user", "null_item"],
)
def test_movielens_missing_values(tmp_path, capsys, edit, field):
    source = write_ml100k(tmp_path / "ml")
    source.joinpath("u.data").write_text("\n" + source.joinpath("u.data").read_text())  # a blank first line
    _edit_udata(source, 5, edit)
    code, err = preprocess_ml100k(capsys, source, tmp_path / "o")
    assert code == 2 and f"u.data:5: field '{field}': missing" in err, err
    assert not (tmp_path / "o").exists() and hidden_leftovers(tmp_path) == []


def test_recbole_non_finite_timestamp(tmp_path, capsys):
    folder = write_recbole(tmp_path / "rb", "Beauty")
    inter = next(folder.glob("*.inter"))
    lines = inter.read_text().splitlines()
    lines[3] = "\t".join([*lines[3].split("\t")[:3], "inf"])
    inter.write_text("\n".join(lines) + "\n")
    code, err = run(
        capsys,
        "preprocess",
        "--dataset",
        "beauty",
        "--source",
        str(folder),
        "--out",
        str(tmp_path / "o"),
        "--kcore",
        "0",
        *SMALL,
    )
    assert code == 2 and f"{inter.name}:4: field 'timestamp': not a finite value (inf)" in err, err


def test_generic_csv_and_parquet_bad_values(tmp_path, capsys):
    folder = write_generic(tmp_path / "g", "csv")
    inter = folder / "interactions.csv"
    lines = inter.read_text().splitlines()
    lines[2] = "   ," + lines[2].split(",", 1)[1]
    inter.write_text("\n".join(lines) + "\n")
    code, err = preprocess_generic(capsys, folder, tmp_path / "o")
    assert code == 2 and "interactions.csv:3: field 'user': missing" in err, err

    folder = write_generic(tmp_path / "p", "parquet")
    table = pq.read_table(folder / "interactions.parquet")
    users = pa.array([[1, 2]] * len(table), pa.list_(pa.int64()))
    pq.write_table(
        table.set_column(table.column_names.index("user"), "user", users), folder / "interactions.parquet"
    )
    code, err = preprocess_generic(capsys, folder, tmp_path / "o")
    assert (
        code == 2 and "interactions.parquet: field 'user': expected integer or string ids, got list<" in err
    ), err

    table = table.set_column(
        table.column_names.index("timestamp"),
        "timestamp",
        pa.array([float("nan")] + [1.0] * (len(table) - 1)),
    )
    pq.write_table(table, folder / "interactions.parquet")
    code, err = preprocess_generic(capsys, folder, tmp_path / "o")
    assert (
        code == 2 and "interactions.parquet (data row 1): field 'timestamp': not a finite value (nan)" in err
    ), err


def test_json_nan_timestamp_and_negative_warning(tmp_path, capsys, caplog):
    folder = write_amazon_json(tmp_path / "am")
    reviews = next(folder.glob("reviews_*"))
    import gzip

    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    record = json.loads(lines[1])
    record["unixReviewTime"] = float("nan")
    lines[1] = json.dumps(record)
    reviews.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    args = [
        "preprocess",
        "--dataset",
        "beauty",
        "--format",
        "amazon-json",
        "--source",
        str(folder),
        "--kcore",
        "0",
        *SMALL,
    ]
    code, err = run(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 2 and f"{reviews.name}:2: field 'unixReviewTime': not a finite value (nan)" in err, err
    record["unixReviewTime"] = -5
    lines[1] = json.dumps(record)
    reviews.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    code, err = run(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "1 negative unixReviewTime value(s)" in caplog.text


def test_negative_seed_is_refused(tmp_path, capsys):
    code, err = run(capsys, "preprocess", "--seed", "-1", "--out", str(tmp_path / "o"))
    assert code == 2 and "field 'seed': must be 0 or more, got -1" in err
    assert not (tmp_path / "o").exists()


def test_empty_latin1_file_exits_cleanly(tmp_path):
    """In a fresh process with torch imported (where the threaded CSV reader aborted with exit 134)."""
    import subprocess
    import sys

    source = write_ml100k(tmp_path / "ml")
    (source / "u.data").write_bytes(b"")
    script = (
        "import torch, sys; from delrec.cli import main; "
        f"sys.exit(main(['preprocess','--dataset','ml-100k','--source',{str(source)!r},'--out',{str(tmp_path / 'o')!r}]))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(artifacts.__file__).parents[1])}
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "delrec preprocess: error:" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- sources


def test_zip_over_the_size_cap_is_refused(tmp_path, capsys, monkeypatch):
    source = write_ml100k(tmp_path / "ml")
    archive = tmp_path / "ml.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for p in source.iterdir():
            handle.write(p, f"ml-100k/{p.name}")
        handle.writestr("ml-100k/padding.bin", b"\0" * 200_000)  # compresses to almost nothing
    monkeypatch.setattr(download, "ZIP_MAX_BYTES", 100_000)
    code, err = preprocess_ml100k(capsys, archive, tmp_path / "o")
    assert code == 2 and "ml.zip: unpacks to" in err and "more than the 100000 allowed" in err, err
    monkeypatch.setattr(download, "ZIP_MAX_BYTES", 1 << 30)
    monkeypatch.setattr(download, "ZIP_MAX_MEMBERS", 2)
    code, err = preprocess_ml100k(capsys, archive, tmp_path / "o")
    assert code == 2 and "3 members, more than the 2 allowed" in err, err


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, server.server_address[1]
    server.shutdown()


def test_credentials_in_source_urls_are_redacted(tmp_path, capsys, http_server):
    root, port = http_server
    source = write_ml100k(tmp_path / "ml")
    with zipfile.ZipFile(root / "ml.zip", "w") as handle:
        for p in source.iterdir():
            handle.write(p, f"ml-100k/{p.name}")
    url = f"http://127.0.0.1:{port}/ml.zip?X-Amz-Credential=AKIAXXX&X-Amz-Signature=deadbeefsecret"
    out = tmp_path / "o"
    code, err = run(
        capsys,
        "preprocess",
        "--dataset",
        "ml-1m",
        "--source",
        url,
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "c"),
        *SMALL,
    )
    assert code == 0, err
    for name in (layout.MANIFEST, layout.STATS_JSON):
        text = (out / name).read_text()
        assert "deadbeefsecret" not in text and "AKIAXXX" not in text
        assert "X-Amz-Signature=REDACTED" in text
    code, err = run(
        capsys, "preprocess", "--dataset", "ml-1m", "--source", f"http://alice:hunter2@127.0.0.1:{port}/ml.zip",
        "--out", str(tmp_path / "o2"), "--cache-dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert code == 2 and "hunter2" not in err and "REDACTED@127.0.0.1" in err, err
    assert download.redact_url("/local/path?x=1") == "/local/path?x=1"
