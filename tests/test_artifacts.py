import json

import pytest

from delrec.artifacts import atomic_dir, read_manifest, require_same_input, write_manifest
from delrec.errors import DelrecError


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_existing_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    assert (out / "old.txt").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


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
