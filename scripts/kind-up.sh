#!/usr/bin/env bash
# `make kind-up`: a local kind cluster running KFP standalone and DELRec's manifests, ready for
# `make submit`. Safe to re-run: an existing cluster, install and secrets are kept.
#
# Environment (the Makefile passes its variables of the same names):
#   KIND_CLUSTER  cluster name (delrec)        KIND_CONFIG  kind config (manifests/kind/cluster.yaml)
#   OVERLAY       manifests/overlays/OVERLAY (kind, gpu, kind-gpu)  KFP_VERSION  KFP release to install (2.17.1)
#   TIMEOUT       how long to wait for KFP to come up (20m)  KIND  the kind binary (kind)
# With podman instead of docker: export KIND_EXPERIMENTAL_PROVIDER=podman.
set -euo pipefail
cd "$(dirname "$0")/.."

KIND=${KIND:-kind}
KIND_CLUSTER=${KIND_CLUSTER:-delrec}
KIND_CONFIG=${KIND_CONFIG:-manifests/kind/cluster.yaml}
OVERLAY=${OVERLAY:-kind}
KFP_VERSION=${KFP_VERSION:-2.17.1}
TIMEOUT=${TIMEOUT:-20m}
KFP_MANIFESTS=github.com/kubeflow/pipelines/manifests/kustomize

need() { command -v "$1" >/dev/null 2>&1 || { echo "kind-up: '$1' not found: $2" >&2; exit 1; }; }
need "$KIND" "install kind (v0.29.0 or later): https://kind.sigs.k8s.io/docs/user/quick-start/"
need kubectl "install kubectl (1.31 or later): https://kubernetes.io/docs/tasks/tools/"
need python3 "needed to generate random credentials"
need base64 "needed to read the generated credentials back"
need git "kubectl fetches the KFP manifests from GitHub with git"
[ -d "manifests/overlays/$OVERLAY" ] || { echo "kind-up: no overlay manifests/overlays/$OVERLAY" >&2; exit 1; }

# No pipe into `grep -q` here: under pipefail its early exit can fail the pipeline.
clusters="$("$KIND" get clusters 2>/dev/null || true)"
if grep -qx "$KIND_CLUSTER" <<<"$clusters"; then
  echo "== kind cluster $KIND_CLUSTER exists: reusing it"
else
  echo "== creating kind cluster $KIND_CLUSTER from $KIND_CONFIG"
  "$KIND" create cluster --name "$KIND_CLUSTER" --config "$KIND_CONFIG" --wait 5m
fi
# Every kubectl call names the cluster: the user's current context is left alone.
k() { kubectl --context "kind-$KIND_CLUSTER" "$@"; }

echo "== installing Kubeflow Pipelines $KFP_VERSION (standalone, platform-agnostic)"
k apply -k "$KFP_MANIFESTS/cluster-scoped-resources?ref=$KFP_VERSION"
k wait --for condition=established --timeout=120s crd/applications.app.k8s.io
k apply -k "$KFP_MANIFESTS/env/platform-agnostic?ref=$KFP_VERSION"

echo "== applying manifests/overlays/$OVERLAY"
k apply -k "manifests/overlays/$OVERLAY"

echo "== waiting for KFP (the first start pulls images: 5-15 minutes)"
k -n kubeflow wait --for=condition=Available deployment --all --timeout="$TIMEOUT"
k -n kubeflow wait --for=condition=Complete job/delrec-model-cache-init --timeout=10m

# Buckets and the pipelines' own least-privilege key on KFP's SeaweedFS (random, created once, never
# written to disk).
KUBE_CONTEXT="kind-$KIND_CLUSTER" scripts/object-store-setup.sh

cat <<MSG

KFP is ready on kind cluster '$KIND_CLUSTER'.
  UI and API:    http://localhost:8080
  S3 API:        http://localhost:9000  (KFP's SeaweedFS; buckets delrec-artifacts, delrec-data, delrec-models;
                 key in secret kubeflow/delrec-s3)
  Pipeline root: s3://delrec-artifacts/v2 (kfp-launcher ConfigMap in namespace kubeflow)
If the cluster was not made from manifests/kind/cluster.yaml (no port mappings), forward the UI instead:
  kubectl --context kind-$KIND_CLUSTER -n kubeflow port-forward svc/ml-pipeline-ui 8080:80
Next: make image-cpu kind-load && make submit PRESET=demo PARAMS="gpus=0"
MSG
