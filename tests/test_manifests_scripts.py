"""scripts/kind-up.sh and scripts/kind-load.sh, run against stand-in `kind`, `kubectl` and image-engine
commands that record their arguments: the order of the install steps, the pinned KFP version, secrets
created once and never overwritten, and the cluster context on every kubectl call."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# `kubectl exec -i ... weed shell` reads SeaweedFS shell commands on stdin: recorded in $STATE/weed, answered
# from $STATE/buckets and $STATE/users. The secret's key decodes to AKIDPIPE / SKPIPELINE42.
KUBECTL = """#!/bin/sh
echo "kubectl $*" >> "$LOG"
case "$*" in
  *"get secret delrec-s3 -o jsonpath={.data.accesskey}"*) printf %s QUtJRFBJUEU= ;;
  *"get secret delrec-s3 -o jsonpath={.data.secretkey}"*) printf %s U0tQSVBFTElORTQy ;;
  *"get secret"*) [ -e "$STATE/secrets" ] || exit 1 ;;
  *" exec -i "*)
    cmd=$(cat); echo "$cmd" >> "$STATE/weed"
    case "$cmd" in
      "s3.bucket.list") [ ! -e "$STATE/buckets" ] || cat "$STATE/buckets" ;;
      "s3.configure") [ ! -e "$STATE/users" ] || cat "$STATE/users" ;;
      "s3.configure "*) [ -n "$WEED_IGNORES_CONFIGURE" ] || echo delrec-pipelines >> "$STATE/users" ;;
    esac ;;
esac
exit 0
"""

KIND = """#!/bin/sh
echo "kind $*" >> "$LOG"
if [ "$1" = get ]; then [ -e "$STATE/cluster" ] && echo delrec; fi
exit 0
"""

ENGINE = """#!/bin/sh
echo "engine $*" >> "$LOG"
if [ "$1 $2" = "image inspect" ]; then case "$3" in *gpu*) exit 1 ;; esac; fi
if [ "$1" = save ]; then echo archive > "$3"; fi
exit 0
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("kubectl", KUBECTL), ("kind", KIND), ("engine", ENGINE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "STATE": str(state)}
    return env, log, state


def run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_kind_up_installs_in_order_and_creates_secrets_once(stubs):
    env, log, state = stubs
    out = run("kind-up.sh", env)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    kubectl = [c for c in calls if c.startswith("kubectl ")]
    assert all("--context kind-delrec" in c for c in kubectl), "a kubectl call without the cluster's context"

    def index(fragment: str) -> int:
        hits = [i for i, c in enumerate(calls) if fragment in c]
        assert hits, f"no call with {fragment!r}"
        return hits[0]

    kfp = "github.com/kubeflow/pipelines/manifests/kustomize"
    order = [
        "kind create cluster --name delrec --config manifests/kind/cluster.yaml",
        f"apply -k {kfp}/cluster-scoped-resources?ref=2.17.1",
        "wait --for condition=established",
        f"apply -k {kfp}/env/platform-agnostic?ref=2.17.1",
        "apply -k manifests/overlays/kind",
        "-n kubeflow wait --for=condition=Available deployment --all",
        "job/delrec-model-cache-init",
        "-n kubeflow wait --for=condition=Available deployment/seaweedfs",
        "-n kubeflow create secret generic delrec-s3",
        "-n kubeflow exec -i deployment/seaweedfs",
    ]
    positions = [index(fragment) for fragment in order]
    assert positions == sorted(positions)
    assert "http://localhost:8080" in out.stdout

    # A second run reuses the cluster and never replaces existing credentials.
    (state / "cluster").touch()
    (state / "secrets").touch()
    log.write_text("")
    out = run("kind-up.sh", {**env, "KFP_VERSION": "2.17.0", "OVERLAY": "gpu"})
    assert out.returncode == 0, out.stderr
    calls = log.read_text()
    assert "kind create cluster" not in calls and "create secret" not in calls
    assert "env/platform-agnostic?ref=2.17.0" in calls and "apply -k manifests/overlays/gpu" in calls


def test_object_store_setup_gives_pipelines_their_own_key_on_their_buckets_only(stubs):
    env, log, state = stubs
    env = {**env, "KUBE_CONTEXT": "kind-x"}
    out = run("object-store-setup.sh", env)
    assert out.returncode == 0, out.stderr
    calls = log.read_text()
    assert all("--context kind-x -n kubeflow" in c for c in calls.splitlines())
    assert "create secret generic delrec-s3 --from-literal=accesskey=" in calls
    weed = (state / "weed").read_text().splitlines()
    assert [c for c in weed if c.startswith("s3.bucket.create")] == [
        f"s3.bucket.create -name {b}" for b in ("delrec-artifacts", "delrec-data", "delrec-models")
    ]
    (configure,) = [c for c in weed if c.startswith("s3.configure -user")]
    assert configure == (
        "s3.configure -user delrec-pipelines -access_key AKIDPIPE -secret_key SKPIPELINE42 "
        "-actions Read,Write,List -buckets delrec-artifacts,delrec-data,delrec-models -apply"
    )
    # The key travels on stdin only: never in a command line, never printed.
    assert "SKPIPELINE42" not in calls + out.stdout + out.stderr

    # Again, with the secret and two buckets in place: the same key re-applied, only the missing bucket made.
    (state / "secrets").touch()
    (state / "buckets").write_text(
        "  delrec-artifacts\tsize:0\n  delrec-data-old\n  delrec-models\n  mlpipeline\n"
    )
    (state / "weed").write_text("")
    log.write_text("")
    assert run("object-store-setup.sh", env).returncode == 0
    weed = (state / "weed").read_text()
    assert "create secret" not in log.read_text()
    assert [c for c in weed.splitlines() if "s3.bucket.create" in c] == ["s3.bucket.create -name delrec-data"]
    assert "-access_key AKIDPIPE -secret_key SKPIPELINE42" in weed


def test_object_store_setup_fails_when_the_user_does_not_appear(stubs):
    env, _, _ = stubs
    out = run("object-store-setup.sh", {**env, "WEED_IGNORES_CONFIGURE": "1"})
    assert out.returncode == 1 and "user delrec-pipelines not in SeaweedFS's identities" in out.stderr


def test_kind_up_refuses_an_unknown_overlay(stubs):
    env, log, _ = stubs
    out = run("kind-up.sh", {**env, "OVERLAY": "nope"})
    assert out.returncode == 1 and "no overlay manifests/overlays/nope" in out.stderr
    assert not log.exists()


def test_kind_load_loads_built_images_and_skips_missing_ones(stubs):
    env, log, _ = stubs
    env = {**env, "ENGINE": "engine", "KIND_CLUSTER": "demo"}
    out = run("kind-load.sh", env, "reg/delrec-cpu:0.1.0", "reg/delrec-gpu:0.1.0")
    assert out.returncode == 0, out.stderr
    assert "delrec-gpu:0.1.0 is not built here" in out.stderr
    calls = log.read_text()
    assert "engine save -o" in calls and "reg/delrec-cpu:0.1.0" in calls
    assert calls.count("kind load image-archive") == 1 and "--name demo" in calls

    out = run("kind-load.sh", env, "reg/delrec-gpu:0.1.0")
    assert out.returncode == 1 and "no image loaded" in out.stderr
