"""A stage's checkpoint workspace: where the pipeline says to keep it, and resuming from an object-store
prefix on a fresh machine (a retried KFP pod) after the first one died mid-way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loop import _make_loop
from test_store import BUCKET, moto_endpoint, store  # noqa: F401 (fixtures)
from test_teachers import Killed, _quick

from delrec import checkpoints as ck
from delrec.checkpoints import Checkpoints
from delrec.errors import DelrecError
from delrec.teachers import load_topk, train_teacher

ROOT = f"s3://{BUCKET}/checkpoints"


@pytest.fixture
def pipeline_env(monkeypatch):
    """The environment a training pod of the pipeline has."""
    for name, value in {
        ck.ENV_ROOT: ROOT,
        ck.ENV_RUN_ID: "3f1c-run",
        ck.ENV_TASK: "distill",
        "DELREC_S3_ENDPOINT": "minio:9000",
    }.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_a_pipeline_pod_checkpoints_under_its_run_and_task(pipeline_env):
    assert ck.location_from_env() == f"{ROOT}/3f1c-run/distill"
    pipeline_env.setenv(ck.ENV_TASK, "finetune-ablation")
    assert ck.location_from_env() == f"{ROOT}/3f1c-run/finetune-ablation"
    pipeline_env.setenv(ck.ENV_RUN_ID, "other-run")
    assert ck.location_from_env() == f"{ROOT}/other-run/finetune-ablation"


def test_without_a_run_id_or_endpoint_checkpoints_stay_beside_the_output(pipeline_env):
    # kfp.local applies a task's plain environment but sets no pod labels: a local run keeps <out>.partial.
    pipeline_env.delenv(ck.ENV_RUN_ID)
    assert ck.location_from_env() is None
    pipeline_env.setenv(ck.ENV_RUN_ID, "r")
    pipeline_env.delenv("DELREC_S3_ENDPOINT")
    assert ck.location_from_env() is None
    pipeline_env.delenv(ck.ENV_ROOT)
    assert ck.location_from_env() is None


def test_pipeline_py_runs_checkpoint_under_a_local_root_without_an_object_store(pipeline_env, tmp_path):
    # pipeline.py run: every run writes a new run folder, so a killed task resumes from <root>/local/<task>.
    pipeline_env.setenv(ck.ENV_ROOT, str(tmp_path))
    pipeline_env.setenv(ck.ENV_RUN_ID, "local")
    pipeline_env.delenv("DELREC_S3_ENDPOINT")
    assert ck.location_from_env() == str(tmp_path / "local" / "distill")


@pytest.mark.parametrize(("name", "value"), [(ck.ENV_ROOT, "mnt/checkpoints"), (ck.ENV_TASK, "")])
def test_a_misconfigured_workspace_fails_before_training(pipeline_env, name, value):
    pipeline_env.setenv(name, value)
    with pytest.raises(DelrecError, match=name):
        ck.location_from_env()


def test_default_and_local_folder(tmp_path):
    assert Checkpoints.for_output(tmp_path / "out").folder == tmp_path / "out.partial"
    assert Checkpoints.for_output(tmp_path / "out", tmp_path / "ws").folder == tmp_path / "ws"
    assert Checkpoints.for_output(tmp_path / "out").remote is None


@pytest.fixture
def s3_env(store, moto_endpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("DELREC_S3_SECURE", "0")
    return store


def test_the_training_loop_resumes_from_the_prefix_on_a_fresh_machine(s3_env, tmp_path):
    whole, whole_weight = _make_loop(Checkpoints(tmp_path / "whole"), steps=6)
    expected = whole.run()
    prefix = f"{ROOT}/run-1/distill"
    first_pod = Checkpoints.for_output(tmp_path / "pod1" / "out", prefix)
    killed, _ = _make_loop(first_pod, steps=6, crash_at=5)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert s3_env.list(prefix) == ["state.pt"]
    # The retried pod: a new machine, nothing of the first one's disk.
    second_pod = Checkpoints.for_output(tmp_path / "pod2" / "out", prefix)
    resumed, resumed_weight = _make_loop(second_pod, steps=6)
    result = resumed.run()
    assert result.resumed_from == 4
    assert torch.equal(resumed_weight, whole_weight)
    assert [r["loss"] for r in result.history[1:]] == [r["loss"] for r in expected.history[1:]]
    # Another run's prefix, or another config on this one, never resumes from it.
    other_task, _ = _make_loop(Checkpoints.for_output(tmp_path / "pod3" / "out", f"{ROOT}/run-1/finetune"))
    assert other_task.run().resumed_from == 0
    other_config, _ = _make_loop(Checkpoints.for_output(tmp_path / "pod4" / "out", prefix))
    other_config.run_key = {"config": "different"}
    assert other_config.run().resumed_from == 0


def test_a_killed_teacher_resumes_from_the_prefix_in_a_fresh_out_and_cleans_up(
    s3_env, synthetic_dir, tmp_path
):
    config = _quick("gru4rec", max_epochs=4)
    full = train_teacher(synthetic_dir, config, tmp_path / "full")
    prefix = f"{ROOT}/run-7/teacher"

    def kill_after_two(epoch, record):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_teacher(
            synthetic_dir,
            config,
            tmp_path / "pod1" / "teacher",
            on_epoch_end=kill_after_two,
            checkpoint=prefix,
        )
    assert s3_env.list(prefix) == ["state.pt"]
    out = tmp_path / "pod2" / "teacher"
    epochs_seen = []
    resumed = train_teacher(
        synthetic_dir, config, out, on_epoch_end=lambda e, r: epochs_seen.append(e), checkpoint=prefix
    )
    assert epochs_seen == [3, 4]  # not from epoch 1
    timing = {"seconds_to_best", "seconds_train", "seconds_setup", "seconds_total"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in full.items() if k not in timing
    }
    assert np.array_equal(
        load_topk(out, synthetic_dir)["train"], load_topk(tmp_path / "full", synthetic_dir)["train"]
    )
    # Done: the output is in place, the workspace is gone (here and in the store).
    assert s3_env.list(prefix) == [] and not (tmp_path / "pod2" / "teacher.partial").exists()


def test_clearing_a_named_folder_or_prefix_removes_only_the_stage_files(s3_env, tmp_path):
    # A user may point --checkpoint at a folder or prefix that holds other things (other runs' states,
    # published models): a finished stage removes its own files there, never the rest.
    folder = tmp_path / "ckpts"
    (folder / "other-run").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    local = Checkpoints.for_output(tmp_path / "out", folder)
    local.save({"step": 3})
    (local.folder / "backbone").mkdir()
    local.clear()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "other-run"]

    prefix = f"{ROOT}/models"
    s3_env.put_bytes(b"{}", f"{prefix}/latest.json")
    s3_env.put_bytes(b"x", f"{prefix}/run1/bundle.json")
    remote = Checkpoints.for_output(tmp_path / "out2", prefix)
    remote.save({"step": 3})
    assert "state.pt" in s3_env.list(prefix)
    remote.clear()
    assert sorted(s3_env.list(prefix)) == ["latest.json", "run1/bundle.json"]
    assert not remote.folder.exists()  # the stage's own <out>.partial goes whole
