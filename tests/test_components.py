"""Each KFP component's python_func called directly on small local data (no KFP runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model
from test_store import BUCKET, moto_endpoint, store  # noqa: F401 (fixtures)

from delrec.artifacts import read_manifest
from delrec.store import local_fingerprint, upload_dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import components  # noqa: E402

SYNTHETIC = {"dataset": "synthetic", "synthetic_users": 60, "synthetic_items": 40}


def art(cls, path: Path):
    return cls(name=path.name, uri=str(path), metadata={})


def test_components_use_the_project_images_and_install_nothing():
    from delrec.images import cpu_image, gpu_image

    expected = {
        "preprocess": cpu_image(),
        "train_teacher": cpu_image(),
        "distill": gpu_image(),
        "finetune": gpu_image(),
        "evaluate": cpu_image(),
        "publish": cpu_image(),
        "recommend": cpu_image(),
    }
    for name, image in expected.items():
        container = getattr(components, name).component_spec.implementation.container
        assert container.image == image, name
        # The image holds delrec and kfp: nothing is pip-installed when the task starts.
        assert "pip install" not in container.command[2] and "executor_main" in container.command[2], name


def test_preprocess_component(tmp_path):
    ds, metrics = art(Dataset, tmp_path / "dataset"), art(Metrics, tmp_path / "metrics")
    components.preprocess.python_func(config=SYNTHETIC, dataset=ds, metrics=metrics, source_fingerprint="abc")
    manifest = read_manifest(ds.path, producer="preprocess")
    assert manifest["config"]["synthetic_users"] == 60
    assert metrics.metadata["users"] == ds.metadata["users"] > 0
    assert metrics.metadata["wall_seconds"] > 0
    assert ds.metadata["fingerprint"] == "abc"
    # The metrics also in the Metrics artifact's file (kfp.local caches only outputs with a file).
    assert json.loads(Path(metrics.path).read_text()) == metrics.metadata
    assert ds.metadata["content_fingerprint"] == local_fingerprint(ds.path)


def test_preprocess_component_reads_an_s3_source(tmp_path, store, moto_endpoint, monkeypatch):  # noqa: F811
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = ["user,item,timestamp"]
    for user in range(30):
        for t, item in enumerate(rng.choice(40, size=8, replace=False)):
            rows.append(f"u{user},i{item},{t}")
    (raw / "interactions.csv").write_text("\n".join(rows) + "\n")
    (raw / "items.csv").write_text("item,title\n" + "".join(f"i{i},Item number {i}\n" for i in range(40)))
    uri = upload_dataset(store, "tiny", raw, f"s3://{BUCKET}/raw")
    # As the pipeline's s3_config_map ConfigMap sets them on a cluster.
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("DELREC_S3_SECURE", "false")
    ds, metrics = art(Dataset, tmp_path / "dataset"), art(Metrics, tmp_path / "metrics")
    components.preprocess.python_func(
        config={"dataset": "generic", "kcore": 1},
        dataset=ds,
        metrics=metrics,
        source=uri,
    )
    assert read_manifest(ds.path)["config"]["source"] == uri
    assert ds.metadata["users"] == 30 and ds.metadata["source"] == uri


def test_train_teacher_component(tmp_path, synthetic_dir):
    teacher, metrics = art(Model, tmp_path / "teacher"), art(Metrics, tmp_path / "metrics")
    config = {"hidden": 16, "inner": 32, "layers": 1, "max_epochs": 1, "batch_size": 64, "device": "cpu"}
    components.train_teacher.python_func(
        config=config, dataset=art(Dataset, synthetic_dir), teacher=teacher, metrics=metrics
    )
    assert read_manifest(teacher.path, producer="train_teacher")["config"]["hidden"] == 16
    assert (Path(teacher.path) / "topk.parquet").is_file()
    assert metrics.metadata["wall_seconds"] > 0 and len(metrics.metadata) > 1


def test_a_retried_training_pod_resumes_from_the_run_workspace(
    tmp_path,
    synthetic_dir,
    store,  # noqa: F811
    moto_endpoint,  # noqa: F811
    monkeypatch,
    caplog,
):
    """The environment the pipeline gives a training pod makes the component checkpoint to
    ``<root>/<run id>/<task>``: the retry, on a fresh disk, resumes there and removes it when done."""
    from delrec import checkpoints

    for name, value in {
        checkpoints.ENV_ROOT: f"s3://{BUCKET}/checkpoints",
        checkpoints.ENV_RUN_ID: "run-1",
        checkpoints.ENV_TASK: "teacher",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)  # the delrec-object-store ConfigMap's
    monkeypatch.setenv("DELREC_S3_SECURE", "false")
    config = {"hidden": 16, "inner": 32, "layers": 1, "max_epochs": 2, "batch_size": 64, "device": "cpu"}
    real = checkpoints.Checkpoints.save

    def save_then_die(self, state):
        real(self, state)
        raise KeyboardInterrupt  # the pod is killed after its first checkpoint

    def run(pod: str) -> Model:
        teacher = art(Model, tmp_path / pod / "teacher")
        components.train_teacher.python_func(
            config=config,
            dataset=art(Dataset, synthetic_dir),
            teacher=teacher,
            metrics=art(Metrics, tmp_path / pod / "metrics"),
        )
        return teacher

    prefix = f"s3://{BUCKET}/checkpoints/run-1/teacher"
    with monkeypatch.context() as m:
        m.setattr(checkpoints.Checkpoints, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run("pod1")
    assert store.list(prefix) == ["state.pt"]
    with caplog.at_level("INFO", logger="delrec"):
        teacher = run("pod2")
    assert "after epoch 1" in caplog.text  # resumed, not started again
    assert read_manifest(teacher.path, producer="train_teacher")
    assert store.list(prefix) == []


def test_publish_component(tmp_path, store, moto_endpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("DELREC_S3_SECURE", "false")
    folders = {}
    for name in ("model", "soft_prompt", "evaluation"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / f"{name}.bin").write_bytes(name.encode())
    out = components.publish.python_func(
        metrics={"delrec_HR@1": 0.5, "teacher_HR@1": 0.25},
        preprocess_config={"dataset": "synthetic"},
        teacher_config={"model": "sasrec"},
        distill_config={},
        finetune_config={},
        evaluate_config={},
        model=art(Model, folders["model"]),
        soft_prompt=art(Model, folders["soft_prompt"]),
        evaluation=art(Artifact, folders["evaluation"]),
        destination=f"s3://{BUCKET}/registry",
        pipeline_name="delrec",
        run_id="run-1",
        run_name="",
        gate={"margin": 0.1},
    )
    assert out.passed and out.uri == f"s3://{BUCKET}/registry/delrec/run-1"
    assert store.get_json(f"s3://{BUCKET}/registry/delrec/latest.json")["run"] == "run-1"
    assert "configs/configs.json" in store.list(out.uri)
    configs = json.loads(store.get_bytes(f"{out.uri}/configs/configs.json"))
    assert configs["teacher"] == {"model": "sasrec"} and configs["preprocess"] == {"dataset": "synthetic"}


def test_llm_stage_components(tmp_path, synthetic_dir):
    """distill -> finetune (and the ablation) -> evaluate with the demo preset's tiny models."""
    from delrec.config import load_preset

    preset = load_preset("demo")
    # The demo's tiny models with even fewer steps and examples: this checks the wiring, not learning.
    short = {"steps": 2, "warmup_steps": 0, "eval_every": 2, "eval_examples": 8, "checkpoint_every": 2}
    preset["teacher"].update(max_epochs=2)
    preset["distill"].update(short)
    preset["finetune"].update(short)
    preset["evaluate"].update(max_examples=20, bootstrap_samples=20)
    data = art(Dataset, synthetic_dir)
    teacher = art(Model, tmp_path / "teacher")
    components.train_teacher.python_func(
        config=preset["teacher"], dataset=data, teacher=teacher, metrics=art(Metrics, tmp_path / "m0")
    )
    soft = art(Model, tmp_path / "soft")
    components.distill.python_func(
        config=preset["distill"],
        dataset=data,
        teacher=teacher,
        soft_prompt=soft,
        metrics=art(Metrics, tmp_path / "m1"),
    )
    assert read_manifest(soft.path, producer="distill")
    tuned, ablation = art(Model, tmp_path / "tuned"), art(Model, tmp_path / "ablation")
    components.finetune.python_func(
        config=preset["finetune"],
        dataset=data,
        model=tuned,
        metrics=art(Metrics, tmp_path / "m2"),
        soft_prompt=soft,
    )
    components.finetune.python_func(
        config=preset["finetune"], dataset=data, model=ablation, metrics=art(Metrics, tmp_path / "m3")
    )
    assert tuned.metadata["soft_prompt"] and not ablation.metadata["soft_prompt"]
    metrics = art(Metrics, tmp_path / "m4")
    report, html = art(Markdown, tmp_path / "report.md"), art(HTML, tmp_path / "report.html")
    flat = components.evaluate.python_func(
        config=preset["evaluate"],
        dataset=data,
        teacher=teacher,
        delrec=tuned,
        ablation=ablation,
        evaluation=art(Artifact, tmp_path / "evaluation"),
        report=report,
        report_html=html,
        metrics=metrics,
        distill=soft,
    )
    assert flat and all(isinstance(v, float) for v in flat.values())
    assert "delrec_minus_popularity_HR@1_lo" in flat and "| distill_ta |" in Path(report.path).read_text()
    assert {k: metrics.metadata[k] for k in flat} == flat
    assert Path(report.path).read_text().strip()
    assert Path(html.path).read_text().startswith("<!doctype html>")
    # Every stage leaves its metrics in its Metrics file and a fingerprint of each output's files.
    for i in range(5):
        logged = json.loads((tmp_path / f"m{i}").read_text())
        assert logged["wall_seconds"] > 0 and len(logged) > 1
    for output in (teacher, soft, tuned, ablation, report, html):
        assert output.metadata["content_fingerprint"] == local_fingerprint(output.path)
    recs = art(Dataset, tmp_path / "recs")
    uri = components.recommend.python_func(
        evaluate_config={**preset["evaluate"], "device": "cpu"},
        top_n=3,
        dataset=data,
        teacher=teacher,
        delrec=tuned,
        recommendations=recs,
    )
    assert uri == "" and recs.metadata["rows"] == 3 * recs.metadata["users"] > 0
    assert read_manifest(recs.path, producer="recommend")


@pytest.mark.parametrize(
    ("env", "route"),
    [({"DELREC_NPROC_PER_NODE": "2"}, "torchrun"), ({"DELREC_TRAINER": "trainjob"}, "trainjob")],
)
def test_training_components_hand_more_than_one_rank_to_delrec_launch(tmp_path, monkeypatch, env, route):
    """The components only choose: the ranks run under torchrun in the pod, or in a TrainJob; the
    metrics come back from the stage's output either way (the routes are tested in test_launch.py and
    test_trainjob.py)."""
    from delrec import launch, trainjob

    calls = []

    def torchrun(stage, config, inputs, out, *, nproc_per_node):
        calls.append((stage, inputs, nproc_per_node))
        Path(out).mkdir()
        return {"loss": 0.5}

    def submit(stage, config, inputs, out):
        calls.append((stage, {k: v.uri for k, v in inputs.items() if v}, out.uri))
        Path(out.path).mkdir()
        return {"loss": 0.5}

    monkeypatch.setattr(launch, "run_torchrun", torchrun)
    monkeypatch.setattr(trainjob, "run_stage", submit)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data, teacher = art(Dataset, tmp_path / "data"), art(Model, tmp_path / "teacher")
    soft, model = art(Model, tmp_path / "soft"), art(Model, tmp_path / "model")
    components.distill.python_func(
        config={"steps": 3},
        dataset=data,
        teacher=teacher,
        soft_prompt=soft,
        metrics=art(Metrics, tmp_path / "m1"),
    )
    components.finetune.python_func(
        config={}, dataset=data, model=model, metrics=art(Metrics, tmp_path / "m2")
    )
    if route == "torchrun":
        assert calls == [
            ("distill", {"data": data.path, "teacher": teacher.path}, 2),
            ("finetune", {"data": data.path}, 2),  # the ablation: no soft prompt
        ]
    else:  # the TrainJob reads the inputs at their object-store URIs
        assert calls == [
            ("distill", {"data": data.uri, "teacher": teacher.uri}, soft.uri),
            ("finetune", {"data": data.uri}, model.uri),
        ]
    assert soft.metadata["loss"] == 0.5 and model.metadata["soft_prompt"] is False
    assert json.loads((tmp_path / "m1").read_text())["loss"] == 0.5
