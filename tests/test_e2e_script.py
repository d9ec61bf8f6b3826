"""scripts/e2e-kind.sh against stand-in `kind`, `kubectl`, `docker` and python commands that record their
calls: the steps run in order, a failed run prints its failed task's logs and exits non-zero, and the
cluster is deleted whatever happens. scripts/e2e_check.py against a mocked KFP client and a moto S3 store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import e2e_check  # noqa: E402
from test_store import BUCKET, moto_endpoint, store  # noqa: E402, F401 (fixtures)

from delrec.store import QualityGate, publish_bundle  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

KIND = """#!/bin/sh
echo "kind $*" >> "$LOG"
case "$1" in
  get) [ ! -e "$STATE/cluster" ] || echo delrec-e2e ;;
  create) touch "$STATE/cluster" ;;
  delete) rm -f "$STATE/cluster" ;;
esac
exit 0
"""

# The run's pods: one failed task pod whose log ends in the error.
KUBECTL = """#!/bin/sh
echo "kubectl $*" >> "$LOG"
case "$*" in
  *"jsonpath={.data.accesskey}"*) printf %s QUtJRA== ;;
  *"jsonpath={.data.secretkey}"*) printf %s U0VDUkVU ;;
  *"get secret"*) exit 1 ;;
  *" exec -i "*) cmd=$(cat); case "$cmd" in "s3.configure") echo delrec-pipelines ;; esac ;;
  *"get pods -l pipeline/runid=run-42 --field-selector=status.phase=Failed -o name"*)
    echo pod/delrec-abc-system-container-impl-123 ;;
  *"logs pod/delrec-abc-system-container-impl-123"*) echo "RuntimeError: finetune ran out of patience" ;;
esac
exit 0
"""

DOCKER = """#!/bin/sh
echo "docker $*" >> "$LOG"
[ "$1" = build ] && [ -n "$FAIL_BUILD" ] && exit 3
[ "$1" = save ] && echo archive > "$3"
exit 0
"""

# The venv's python: image names, submit, and the two checks of scripts/e2e_check.py.
PYTHON = """#!/bin/sh
echo "python $*" >> "$LOG"
case "$*" in
  "-m delrec.images") echo "reg/delrec-cpu:0.1.0-abc reg/delrec-gpu:0.1.0-abc" ;;
  "pipeline.py submit"*) echo "submitted run run-42" ;;
  "scripts/e2e_check.py wait"*) [ -z "$FAIL_RUN" ] || { echo "failed tasks: finetune" >&2; exit 1; } ;;
  "scripts/e2e_check.py bundle"*)
    [ "$DELREC_S3_SECRET_KEY" = SECRET ] && [ "$DELREC_S3_ENDPOINT" = http://localhost:9000 ] || exit 5 ;;
esac
exit 0
"""


@pytest.fixture
def e2e(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("kind", KIND), ("kubectl", KUBECTL), ("docker", DOCKER), ("py", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LOG": str(log),
        "STATE": str(state),
        "ENGINE": "docker",
        "PY": "py",
    }

    def run(**extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "e2e-kind.sh")],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return out, log.read_text().splitlines() if log.exists() else []

    return run, state


def position(calls: list[str], fragment: str) -> int:
    hits = [i for i, c in enumerate(calls) if fragment in c]
    assert hits, f"no call with {fragment!r}"
    return hits[0]


def test_e2e_runs_every_step_in_order_and_deletes_the_cluster(e2e):
    run, _ = e2e
    out, calls = run()
    assert out.returncode == 0, out.stdout + out.stderr
    order = [
        "kind create cluster --name delrec-e2e --config manifests/kind/cluster.yaml",
        "apply -k manifests/overlays/kind",
        "exec -i deployment/seaweedfs",
        "python -m delrec.images",
        "docker build -f docker/Dockerfile -t reg/delrec-cpu:0.1.0-abc .",
        "kind load image-archive",
        "python pipeline.py submit --host http://localhost:8080 --preset demo",
        "python scripts/e2e_check.py wait --host http://localhost:8080 --run-id run-42",
        "python scripts/e2e_check.py bundle --registry s3://delrec-models/e2e --run-id run-42",
        "kind delete cluster --name delrec-e2e",
    ]
    positions = [position(calls, f) for f in order]
    assert positions == sorted(positions)
    # The pipelines' key is read for the bundle check after the run.
    key_read = max(i for i, c in enumerate(calls) if "jsonpath={.data.secretkey}" in c)
    assert position(calls, "e2e_check.py wait") < key_read < position(calls, "e2e_check.py bundle")
    assert calls[-1] == "kind delete cluster --name delrec-e2e"
    submit = calls[position(calls, "pipeline.py submit")]
    assert "gpus=0" in submit and "publish_to=s3://delrec-models/e2e" in submit
    assert "reg/delrec-gpu" not in " ".join(c for c in calls if c.startswith("docker build"))
    assert all("--context kind-delrec-e2e" in c for c in calls if c.startswith("kubectl "))
    assert "e2e: PASSED" in out.stdout and "SECRET" not in out.stdout + out.stderr


def test_a_failed_run_prints_the_failed_task_logs_exits_non_zero_and_tears_down(e2e):
    run, _ = e2e
    out, calls = run(FAIL_RUN="1")
    assert out.returncode == 1
    assert "RuntimeError: finetune ran out of patience" in out.stderr
    assert "pod/delrec-abc-system-container-impl-123" in out.stderr and "e2e: FAILED" in out.stderr
    assert not [c for c in calls if "e2e_check.py bundle" in c]
    assert position(calls, "logs pod/delrec-abc") < position(calls, "kind delete cluster")
    assert calls[-1] == "kind delete cluster --name delrec-e2e"


def test_a_failed_build_still_tears_down_and_keep_keeps_the_cluster(e2e):
    run, _ = e2e
    out, calls = run(FAIL_BUILD="1")
    assert out.returncode == 3
    assert not [c for c in calls if "pipeline.py submit" in c]
    assert calls[-1] == "kind delete cluster --name delrec-e2e"

    out, calls = run(FAIL_RUN="1", KEEP="1")
    assert out.returncode == 1 and "KEEP=1" in out.stdout
    assert calls.count("kind delete cluster --name delrec-e2e") == 1  # the failed build's only


def test_a_leftover_cluster_is_deleted_before_a_fresh_one_is_made(e2e):
    run, state = e2e
    (state / "cluster").touch()
    out, calls = run()
    assert out.returncode == 0, out.stderr
    assert position(calls, "kind delete cluster") < position(calls, "kind create cluster")


# --------------------------------------------------------------------------- scripts/e2e_check.py


def kfp_run(state: str, tasks: dict[str, str]) -> SimpleNamespace:
    details = [SimpleNamespace(display_name=n, state=s) for n, s in tasks.items()]
    return SimpleNamespace(state=state, run_details=SimpleNamespace(task_details=details))


def test_wait_succeeds_only_on_a_succeeded_run_and_names_failed_tasks(capsys):
    client = mock.Mock()
    client.wait_for_run_completion.return_value = kfp_run("SUCCEEDED", {"finetune": "SUCCEEDED"})
    assert e2e_check.wait("h", "run-1", 60, client) == 0
    client.wait_for_run_completion.assert_called_with("run-1", timeout=60)
    client.wait_for_run_completion.return_value = kfp_run(
        "FAILED", {"distill": "SUCCEEDED", "finetune": "FAILED"}
    )
    assert e2e_check.wait("h", "run-1", 60, client) == 1
    assert "failed tasks: finetune" in capsys.readouterr().err


def published(tmp_path: Path, store, metrics: dict) -> str:  # noqa: F811
    parts = {}
    for name in ("model", "soft_prompt", "evaluation"):
        parts[name] = tmp_path / name
        parts[name].mkdir()
        (parts[name] / "file.bin").write_bytes(name.encode())
    registry = f"s3://{BUCKET}/e2e"
    publish_bundle(
        store, parts, base=registry, pipeline="delrec", run="run-7", metrics=metrics, gate=QualityGate()
    )
    return registry


def test_bundle_check_passes_a_complete_bundle_with_metrics(tmp_path, store, capsys):  # noqa: F811
    registry = published(tmp_path, store, {"delrec_HR@1": 0.3, "teacher_HR@1": 0.2})
    assert e2e_check.check_bundle(registry, "run-7", store) == 0
    assert "delrec_HR@1: 0.3" in capsys.readouterr().out


def test_bundle_check_fails_on_a_missing_file_metric_or_bundle(tmp_path, store, capsys):  # noqa: F811
    registry = published(tmp_path, store, {"delrec_HR@1": float("nan"), "teacher_HR@1": 0.2})
    store.client.remove_object(BUCKET, "e2e/delrec/run-7/model/file.bin")
    assert e2e_check.check_bundle(registry, "run-7", store) == 1
    err = capsys.readouterr().err
    assert "model/file.bin listed but absent" in err and "metric delrec_HR@1 is nan" in err
    assert e2e_check.check_bundle(registry, "run-8", store) == 1
    assert "no bundle.json" in capsys.readouterr().err
