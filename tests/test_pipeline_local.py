"""The whole graph through kfp.local (SubprocessRunner, use_venv=False) with the demo preset on a small
MovieLens-format source: the first run publishes to a real S3 endpoint on 127.0.0.1 (moto); the runs
after it show which stages the local task cache serves."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
from test_data_formats import write_ml100k
from test_store import BUCKET, moto_endpoint, store  # noqa: F401 (fixtures)

from delrec import store as st
from delrec.pipeline_cache import code_fingerprint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402

REGISTRY = f"s3://{BUCKET}/registry"
STAGES = ("preprocess", "train_teacher", "distill", "finetune", "finetune (ablation)", "evaluate")
# Never cached: it fingerprints the source in every run.
PREPARE = {"prepare": "ran"}
# The demo's tiny models with even fewer steps and examples: these runs check wiring and caching.
SHORT = [
    f"{stage}.{field}={value}"
    for stage in ("distill", "finetune")
    for field, value in {"steps": 2, "warmup_steps": 0, "eval_every": 2, "eval_examples": 8}.items()
] + [
    "distill.checkpoint_every=2",
    "finetune.checkpoint_every=2",
    "teacher.max_epochs=2",
    "evaluate.max_examples=20",
    "evaluate.bootstrap_samples=20",
]


def write_source(folder: Path) -> Path:
    """A MovieLens-100K-format folder: 30 users with 8 distinct items each among 40."""
    rows = [
        (user, (7 * user + 5 * step) % 40 + 1, 1_000_000 + 100 * step + user)
        for user in range(1, 31)
        for step in range(8)
    ]
    return write_ml100k(folder, rows)


def statuses(out: str) -> dict[str, str]:
    """The stage table of a run's output: task label -> ran | cached."""
    table = out[out.index("== wall time") :].split("\n\n")[0]
    found = re.findall(r"^(\S+(?: \(ablation\))?)\s+(ran|cached)\s", table, flags=re.M)
    return dict(found)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, moto_endpoint):  # noqa: F811
    """Five runs on one pipeline root, each one's output: first (publishes), again (unchanged),
    tampered (an evaluation file changed after the run), finetune_steps, source_byte."""
    tmp = tmp_path_factory.mktemp("cache")
    source = write_source(tmp / "ml-100k")
    st.S3Store.from_env(moto_endpoint, False).ensure_bucket(BUCKET)
    base = [
        "run",
        "--preset",
        "demo",
        "--pipeline-root",
        str(tmp / "root"),
        "--data",
        str(source),
        "preprocess.dataset=ml-100k",
        *SHORT,
    ]
    outputs = {}

    def run(name: str, *extra: str) -> str:
        printed = tmp / f"{name}.out"
        with printed.open("w") as handle, pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdout", handle)
            # The object store of the publish step, as a shell (or the cluster's ConfigMap) sets it.
            mp.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
            mp.setenv("DELREC_S3_SECURE", "false")
            assert pipeline.main([*base, *extra]) == 0, name
        outputs[name] = printed.read_text()
        return outputs[name]

    first = run("first", f"publish_to={REGISTRY}")
    outputs["root"] = str(tmp / "root")
    run("again")
    evaluation = Path(re.search(r"^evaluation:\s+(\S+)", first, flags=re.M)[1])
    (evaluation / "metrics.json").write_text((evaluation / "metrics.json").read_text() + " ")
    run("tampered")
    run("finetune_steps", "finetune.steps=4")
    (source / "u.data").write_bytes((source / "u.data").read_bytes().replace(b"\t4\t", b"\t5\t", 1))
    run("source_byte", "finetune.steps=4")
    return outputs


def test_demo_pipeline_runs_locally_and_publishes(runs, store):  # noqa: F811
    out = runs["first"]
    table = out[out.index("== DELRec metrics") :]
    for label in ("DELRec", "teacher", "LLM, no soft prompt", "HR@1", "NDCG@5"):
        assert label in table
    # The whole-catalogue protocol follows the candidate tables: the figure a team decides on.
    catalogue = table[table.index("== whole catalogue") : table.index("== wall time")]
    for label in ("teacher + DELRec rerank", "rerank - teacher", "NDCG@10", "MRR"):
        assert label in catalogue
    assert statuses(out) == {**PREPARE, **dict.fromkeys(STAGES, "ran"), "publish": "ran"}
    run_dir = Path(re.search(r"^run folder:\s+(\S+)", out, flags=re.M)[1])
    assert run_dir.parent == Path(runs["root"])
    for task in (
        "prepare",
        "preprocess",
        "train-teacher",
        "distill",
        "finetune",
        "finetune-2",
        "evaluate",
        "publish",
    ):
        assert (run_dir / task / "executor_output.json").is_file(), task
    # The training tasks checkpointed under the root, where the next run finds a killed one's state
    # (each run writes a new run folder); a finished task leaves none behind.
    (workspace,) = (Path(runs["root"]) / ".checkpoints").iterdir()  # one folder: one code version
    assert workspace.name == f"local-{code_fingerprint()}"
    assert {p.name for p in workspace.iterdir()} == {"teacher", "distill", "finetune", "finetune-ablation"}
    assert not list(workspace.rglob("state.pt"))

    # The bundle is in the registry under <pipeline>/<job id>/, and `latest` follows the gate's verdict.
    (bundle_key,) = [k for k in store.list(REGISTRY) if k.endswith("/bundle.json")]
    run_uri = f"{REGISTRY}/{bundle_key.rsplit('/', 1)[0]}"
    assert bundle_key.split("/")[1] and bundle_key.split("/")[1] != run_dir.name  # the id, not the name
    keys = store.list(run_uri)
    for expected in (
        "configs/configs.json",
        "evaluation/report.md",
        "evaluation/metrics.json",
        "bundle.json",
    ):
        assert expected in keys
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("soft_prompt/") for k in keys)
    bundle = store.get_json(f"{run_uri}/bundle.json")
    assert math.isfinite(bundle["metrics"]["delrec_HR@1"])
    assert bundle["run_name"] == run_dir.name  # the name is recorded, for people
    latest = f"{REGISTRY}/delrec/latest.json"
    assert store.exists(latest) == bundle["gate"]["passed"]


def test_an_unchanged_rerun_serves_every_stage_from_the_cache(runs):
    out = runs["again"]
    assert statuses(out) == {**PREPARE, **dict.fromkeys(STAGES, "cached")}
    assert "1 tasks ran, 6 cached" in out
    run_dir = Path(re.search(r"^run folder:\s+(\S+)", out, flags=re.M)[1])
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {"prepare"}
    # The metrics table and each stage's own time come from the first run's artifacts.
    first_run = re.search(r"^run folder:\s+\S+/(\S+)", runs["first"], flags=re.M)[1]
    assert "| " in out[out.index("== DELRec metrics") :] and out.count(first_run) >= len(STAGES)


def test_a_cached_artifact_whose_files_changed_is_a_miss(runs):
    assert statuses(runs["tampered"]) == {
        **PREPARE,
        **dict.fromkeys(STAGES[:-1], "cached"),
        "evaluate": "ran",
    }


def test_a_changed_finetune_config_reruns_finetune_and_downstream_only(runs):
    assert statuses(runs["finetune_steps"]) == {
        **PREPARE,
        "preprocess": "cached",
        "train_teacher": "cached",
        "distill": "cached",
        "finetune": "ran",
        "finetune (ablation)": "ran",
        "evaluate": "ran",
    }


def test_a_changed_byte_of_the_source_reruns_everything(runs):
    # The same path, one changed byte: prepare's fingerprint changes, and with it every key downstream.
    assert statuses(runs["source_byte"]) == {**PREPARE, **dict.fromkeys(STAGES, "ran")}
