#!/usr/bin/env bash
# `make kind-load`: copy locally built images into the nodes of the kind cluster, through an image archive
# (works with docker and podman alike). Images not built here are skipped with a warning.
#   ENGINE=docker|podman KIND_CLUSTER=delrec scripts/kind-load.sh IMAGE...
set -euo pipefail

ENGINE=${ENGINE:-docker}
KIND=${KIND:-kind}
KIND_CLUSTER=${KIND_CLUSTER:-delrec}
[ $# -gt 0 ] || { echo "usage: $0 IMAGE..." >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
loaded=0
for image in "$@"; do
  if ! "$ENGINE" image inspect "$image" >/dev/null 2>&1; then
    echo "kind-load: $image is not built here (make image-cpu / image-gpu): skipped" >&2
    continue
  fi
  echo "== loading $image into kind cluster $KIND_CLUSTER"
  "$ENGINE" save -o "$tmp/image.tar" "$image"
  "$KIND" load image-archive "$tmp/image.tar" --name "$KIND_CLUSTER"
  rm -f "$tmp/image.tar"
  loaded=$((loaded + 1))
done
[ "$loaded" -gt 0 ] || { echo "kind-load: no image loaded" >&2; exit 1; }
