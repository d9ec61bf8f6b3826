"""The whole graph through kfp.local (SubprocessRunner, use_venv=False) with the demo preset, publishing
to a real S3 endpoint on 127.0.0.1 (moto)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from test_store import BUCKET, moto_endpoint, store  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402


def test_demo_pipeline_runs_locally_and_publishes(tmp_path, store, moto_endpoint, capsys):  # noqa: F811
    registry = f"s3://{BUCKET}/registry"
    code = pipeline.main(
        [
            "run",
            "--preset",
            "demo",
            "--pipeline-root",
            str(tmp_path / "root"),
            f"publish_to={registry}",
            f"s3_endpoint={moto_endpoint}",
            "s3_secure=false",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    table = out[out.index("== DELRec metrics") :]
    for label in ("DELRec", "teacher", "LLM, no soft prompt", "HR@1", "NDCG@5"):
        assert label in table
    for task in (
        "preprocess",
        "train_teacher",
        "distill",
        "finetune",
        "finetune (ablation)",
        "evaluate",
        "publish",
    ):
        assert f"\n{task} " in table, task
    (run_dir,) = (tmp_path / "root").iterdir()
    assert f"run folder:  {run_dir}" in out
    for task in ("preprocess", "train-teacher", "distill", "finetune", "finetune-2", "evaluate", "publish"):
        assert (run_dir / task / "executor_output.json").is_file(), task

    # The bundle is in the registry under <pipeline>/<run>/, and `latest` follows the gate's verdict.
    (bundle_key,) = [k for k in store.list(registry) if k.endswith("/bundle.json")]
    run_uri = f"{registry}/{bundle_key.rsplit('/', 1)[0]}"
    assert bundle_key.split("/")[1] == run_dir.name  # the run's own name
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
    latest = f"{registry}/delrec/latest.json"
    assert store.exists(latest) == bundle["gate"]["passed"]
