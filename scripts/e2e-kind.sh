#!/usr/bin/env bash
# `make e2e`: the kind path end to end, on a machine with Docker (or Podman) and kind: a fresh kind cluster
# with KFP and DELRec's manifests (scripts/kind-up.sh), the CPU image built and loaded (scripts/kind-load.sh),
# the demo preset submitted without GPUs and publishing to the object store, the run awaited, the published
# bundle and its metrics checked in the object store, the cluster deleted (also when a step fails).
# Exits 0 only if every step worked; when the run fails, the logs of its failed task pods are printed.
#
# Environment: PRESET (demo), KIND_CLUSTER (delrec-e2e; an existing one of that name is deleted first),
#   ENGINE (docker when its daemon answers, else podman), KIND (kind), PY (.venv/bin/python: kfp, delrec),
#   KFP_HOST (http://localhost:8080), S3_ENDPOINT (http://localhost:9000), REGISTRY (s3://delrec-models/e2e),
#   RUN_TIMEOUT_S (3600), LOG_LINES (200 per failed pod), KEEP=1 keeps the cluster for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."

KIND=${KIND:-kind}
KIND_CLUSTER=${KIND_CLUSTER:-delrec-e2e}
PRESET=${PRESET:-demo}
PY=${PY:-.venv/bin/python}
KFP_HOST=${KFP_HOST:-http://localhost:8080}
S3_ENDPOINT=${S3_ENDPOINT:-http://localhost:9000}
REGISTRY=${REGISTRY:-s3://delrec-models/e2e}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-3600}
LOG_LINES=${LOG_LINES:-200}
KEEP=${KEEP:-}
if [ -z "${ENGINE:-}" ]; then
  if docker info >/dev/null 2>&1; then ENGINE=docker; elif command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi
export KIND KIND_CLUSTER ENGINE

need() { command -v "$1" >/dev/null 2>&1 || { echo "e2e: '$1' not found: $2" >&2; exit 1; }; }
need "$KIND" "install kind (v0.29.0 or later)"
need kubectl "install kubectl (1.31 or later)"
need "$ENGINE" "install docker or podman"
need "$PY" "make the venv first (make test), or set PY to a python with kfp and delrec"

k() { kubectl --context "kind-$KIND_CLUSTER" "$@"; }

teardown() {
  local status=$?
  if [ -n "$KEEP" ]; then
    echo "== KEEP=1: kind cluster $KIND_CLUSTER kept (make kind-down KIND_CLUSTER=$KIND_CLUSTER)"
  else
    echo "== deleting kind cluster $KIND_CLUSTER"
    "$KIND" delete cluster --name "$KIND_CLUSTER" || status=1
  fi
  if [ "$status" -eq 0 ]; then echo "e2e: PASSED"; else echo "e2e: FAILED (exit $status)" >&2; fi
  exit "$status"
}

# The failed task pods of a run (KFP labels each with its run id) and their logs, on stderr.
failed_task_logs() {
  local pods
  pods="$(k -n kubeflow get pods -l "pipeline/runid=$1" --field-selector=status.phase=Failed -o name || true)"
  if [ -z "$pods" ]; then
    echo "e2e: no failed pod of run $1; its pods:" >&2
    k -n kubeflow get pods -l "pipeline/runid=$1" >&2 || true
    return
  fi
  for pod in $pods; do
    echo "---- $pod (last $LOG_LINES lines)" >&2
    k -n kubeflow logs "$pod" --all-containers --tail="$LOG_LINES" >&2 || true
  done
}

# A cluster left from an earlier try would hide a broken install: start from nothing.
clusters="$("$KIND" get clusters 2>/dev/null || true)"
if grep -qx "$KIND_CLUSTER" <<<"$clusters"; then
  echo "== deleting the leftover kind cluster $KIND_CLUSTER"
  "$KIND" delete cluster --name "$KIND_CLUSTER"
fi
trap teardown EXIT

echo "== 1/5 kind cluster, KFP, manifests, object store"
scripts/kind-up.sh

echo "== 2/5 CPU image, loaded into the cluster"
images="$(PYTHONPATH=src "$PY" -m delrec.images)"
cpu_image="${images%% *}"
[ -n "$cpu_image" ] || { echo "e2e: no image name from delrec.images" >&2; exit 1; }
"$ENGINE" build -f docker/Dockerfile -t "$cpu_image" .
scripts/kind-load.sh "$cpu_image"

echo "== 3/5 submitting preset $PRESET"
submitted="$("$PY" pipeline.py submit --host "$KFP_HOST" --preset "$PRESET" --experiment delrec-e2e \
  gpus=0 "publish_to=$REGISTRY")"
echo "$submitted"
run_id="$(sed -n 's/^submitted run //p' <<<"$submitted")"
[ -n "$run_id" ] || { echo "e2e: no run id in the submit output" >&2; exit 1; }

echo "== 4/5 waiting for run $run_id (at most ${RUN_TIMEOUT_S}s)"
if ! "$PY" scripts/e2e_check.py wait --host "$KFP_HOST" --run-id "$run_id" --timeout "$RUN_TIMEOUT_S"; then
  failed_task_logs "$run_id"
  exit 1
fi

echo "== 5/5 bundle and metrics of run $run_id in $REGISTRY"
DELREC_S3_ACCESS_KEY="$(k -n kubeflow get secret delrec-s3 -o jsonpath='{.data.accesskey}' | base64 -d)"
DELREC_S3_SECRET_KEY="$(k -n kubeflow get secret delrec-s3 -o jsonpath='{.data.secretkey}' | base64 -d)"
export DELREC_S3_ACCESS_KEY DELREC_S3_SECRET_KEY DELREC_S3_ENDPOINT="$S3_ENDPOINT"
PYTHONPATH=src "$PY" scripts/e2e_check.py bundle --registry "$REGISTRY" --run-id "$run_id"
