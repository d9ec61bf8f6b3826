import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from delrec import artifacts
from delrec.artifacts import (
    atomic_dir,
    check_reusable,
    load_checkpoint,
    read_manifest,
    require_same_input,
    save_checkpoint,
    sweep_stale,
    write_manifest,
)
from delrec.errors import DelrecError


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_our_output_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    write_manifest(out, producer="preprocess", config={})
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    assert (out / "old.txt").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-* or .tmp-* left


def test_atomic_dir_refuses_a_folder_that_is_not_ours_unless_forced(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_text("precious")
    with pytest.raises(DelrecError, match="not a delrec output"), atomic_dir(out):
        pass
    assert (out / "cat.jpg").read_text() == "precious"
    with (
        pytest.raises(DelrecError, match="would replace the input"),
        atomic_dir(out, force=True, protect=[out]),
    ):
        pass
    with pytest.raises(DelrecError, match="would replace the input"):
        with atomic_dir(tmp_path, force=True, protect=[out]):  # a parent of the input
            pass
    with atomic_dir(out, force=True) as tmp:
        (tmp / "x").write_text("x")
    assert [p.name for p in out.iterdir()] == ["x"]


def test_atomic_dir_takes_an_empty_folder_and_removes_parents_it_created(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "a").write_text("a")
    assert (empty / "a").is_file()
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new" / "deep" / "out"):
        raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_stale_temporary_folders_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    host = artifacts._safe_host()
    stale = tmp_path / f".out.tmp-{host}-{pid}-abc"
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-abc"
    foreign_old = tmp_path / ".out.tmp-otherhost-7-abc"
    foreign_new = tmp_path / ".out.tmp-otherhost-8-abc"
    for folder in (stale, live, foreign_old, foreign_new):
        folder.mkdir()
    hour_ago = time.time() - 2 * artifacts.STALE_AFTER_S
    os.utime(foreign_old, (hour_ago, hour_ago))
    removed = sweep_stale(tmp_path / "out")
    assert sorted(removed) == sorted([stale, foreign_old])
    assert live.exists() and foreign_new.exists()


def test_manifest_records_and_verifies_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.bin").write_bytes(b"\x01" * 1000)
    (tmp_path / "sub" / "a.txt").write_text("a")
    manifest = write_manifest(tmp_path, producer="preprocess", config={})
    assert manifest["files"]["model.bin"]["size"] == 1000
    assert set(manifest["files"]) == {"model.bin", "sub/a.txt"}
    read_manifest(tmp_path)
    with open(tmp_path / "model.bin", "r+b") as handle:  # same size, overwritten bytes
        handle.seek(500)
        handle.write(b"\x02")
    with pytest.raises(DelrecError, match=r"model.bin.*files.model.bin.*sha256 does not match"):
        read_manifest(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"\x01" * 10)
    with pytest.raises(DelrecError, match="size 10 bytes, the manifest records 1000"):
        read_manifest(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"\x01" * 1000)
    (tmp_path / "sub" / "a.txt").unlink()
    with pytest.raises(DelrecError, match="a.txt.*missing"):
        read_manifest(tmp_path, verify=True)


def test_checkpoint_round_trip_and_run_key(tmp_path):
    state = {"run_key": {"config": "a"}, "rng": torch.get_rng_state(), "history": [{"loss": 1.0}]}
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path, {"config": "a"})
    assert torch.equal(loaded["rng"], state["rng"])
    assert load_checkpoint(tmp_path, {"config": "b"}) is None
    with pytest.raises(TypeError, match="plain types"):
        save_checkpoint(tmp_path, {"run_key": {}, "bad": object()})


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"run_key": {"config": "a"}, "x": _Payload()}, tmp_path / "state.pt")
    assert load_checkpoint(tmp_path, {"config": "a"}) is None
    assert not (tmp_path / "PWNED").exists()


def test_no_weights_only_false_in_the_package():
    src = Path(artifacts.__file__).parent
    offenders = [p for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


def test_manifest_round_trip_and_producer_check(tmp_path):
    write_manifest(tmp_path, producer="preprocess", config={"b": 1, "a": 2}, rows={"items": 3})
    manifest = read_manifest(tmp_path, producer="preprocess")
    assert manifest["rows"] == {"items": 3}
    with pytest.raises(DelrecError, match="expected the output of 'train_teacher'"):
        read_manifest(tmp_path, producer="train_teacher")


def test_manifest_missing_or_wrong_schema(tmp_path):
    with pytest.raises(DelrecError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DelrecError, match="schema version 99"):
        read_manifest(tmp_path)


def test_require_same_input_detects_a_mismatched_pair(tmp_path):
    data_a, data_b, model = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    for d in (data_a, data_b, model):
        d.mkdir()
    write_manifest(data_a, producer="preprocess", config={"seed": 1})
    write_manifest(data_b, producer="preprocess", config={"seed": 2})
    write_manifest(model, producer="train_teacher", config={}, inputs={"dataset": data_a})
    require_same_input(model, "dataset", data_a)
    with pytest.raises(DelrecError, match="inputs.dataset"):
        require_same_input(model, "dataset", data_b)


def test_an_output_is_reusable_only_with_the_same_config_and_inputs(tmp_path):
    data_a, data_b, teacher, soft, model = (tmp_path / n for n in ("a", "b", "t", "s", "m"))
    for d in (data_a, data_b, teacher, soft, model):
        d.mkdir()
    write_manifest(data_a, producer="preprocess", config={"seed": 1})
    write_manifest(data_b, producer="preprocess", config={"seed": 2})
    write_manifest(teacher, producer="train_teacher", config={}, inputs={"dataset": data_a})
    write_manifest(soft, producer="distill", config={}, inputs={"dataset": data_a})
    config = {"seed": 42, "lr": 3e-4, "target_modules": None}
    write_manifest(model, producer="finetune", config=config, inputs={"dataset": data_a, "teacher": teacher})
    before = (model / "manifest.json").read_bytes()
    inputs = {"dataset": data_a, "teacher": teacher}

    check_reusable(model, producer="finetune", config=dict(config), inputs=inputs)
    refusals = [
        ({**config, "seed": 1}, inputs, "config.seed.*seed=42, this run asks for seed=1"),
        ({**config, "lr": 1e-3}, inputs, "config.lr"),
        ({**config, "steps": 100}, inputs, "config.steps.*steps=\\(not set\\)"),
        ({"seed": 42, "lr": 3e-4}, inputs, "config.target_modules"),
        (config, {**inputs, "dataset": data_b}, "inputs.dataset"),
        (config, {**inputs, "distill": soft}, "inputs.distill"),
        (config, {"dataset": data_a}, "inputs.teacher.*does not give"),
    ]
    for asked, given, message in refusals:
        with pytest.raises(DelrecError, match=message):
            check_reusable(model, producer="finetune", config=asked, inputs=given)
    with pytest.raises(DelrecError, match="expected the output of 'distill'"):
        check_reusable(model, producer="distill", config=config, inputs=inputs)
    assert (model / "manifest.json").read_bytes() == before  # refusing touches nothing


def test_artifacts_get_the_permissions_mkdir_and_open_would_give(tmp_path):
    # mkdtemp/mkstemp make private (0700/0600) folders and files: renamed into place they would lock the
    # user's team out of an artifact on a shared volume.
    from delrec.artifacts import atomic_dir, write_json_atomic

    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "data.txt").write_text("x")
    write_json_atomic(tmp_path / "out" / "extra.json", {"a": 1})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("x")

    def mode(path):
        return path.stat().st_mode & 0o777

    assert mode(tmp_path / "out") == mode(tmp_path / "plain")
    assert mode(tmp_path / "out" / "extra.json") == mode(tmp_path / "plain.txt")
