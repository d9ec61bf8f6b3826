#!/usr/bin/env bash
# Run by `make kind-up`; works on any cluster with KFP 2.17 standalone. On the SeaweedFS that KFP installs as
# its object store: the buckets DELRec uses, and a user that may read, write and list only those buckets,
# whose random key becomes the secret of the pipeline pods (kubeflow/delrec-s3). KFP's admin key is never
# handed to them. Safe to re-run: an existing secret's key is kept and the user re-applied with it.
#
# KFP's NetworkPolicy admits only S3 traffic into the SeaweedFS pod, so the admin commands run inside it
# (`weed shell` against its own master, as KFP's set-up does), with the key on stdin, never in argv.
#
# Environment: KUBE_CONTEXT (kubectl context; default: the current one), NAMESPACE (kubeflow),
#   BUCKETS ("delrec-artifacts delrec-data delrec-models"), S3_USER (delrec-pipelines), SECRET (delrec-s3),
#   TIMEOUT (wait for SeaweedFS, 10m).
set -euo pipefail

KUBE_CONTEXT=${KUBE_CONTEXT:-}
NAMESPACE=${NAMESPACE:-kubeflow}
BUCKETS=${BUCKETS:-delrec-artifacts delrec-data delrec-models}
S3_USER=${S3_USER:-delrec-pipelines}
SECRET=${SECRET:-delrec-s3}
TIMEOUT=${TIMEOUT:-10m}

k() { kubectl ${KUBE_CONTEXT:+--context "$KUBE_CONTEXT"} -n "$NAMESPACE" "$@"; }
weed() { k exec -i deployment/seaweedfs -c seaweedfs -- /usr/bin/weed shell; }

echo "== object store: KFP's SeaweedFS in namespace $NAMESPACE"
k wait --for=condition=Available deployment/seaweedfs --timeout="$TIMEOUT"

if ! k get secret "$SECRET" >/dev/null 2>&1; then
  k create secret generic "$SECRET" \
    --from-literal=accesskey="$(python3 -c 'import secrets; print(secrets.token_hex(10))')" \
    --from-literal=secretkey="$(python3 -c 'import secrets; print(secrets.token_urlsafe(30))')"
fi
access="$(k get secret "$SECRET" -o jsonpath='{.data.accesskey}' | base64 -d)"
secret="$(k get secret "$SECRET" -o jsonpath='{.data.secretkey}' | base64 -d)"
[ -n "$access" ] && [ -n "$secret" ] || { echo "object-store-setup: secret $SECRET lacks accesskey/secretkey" >&2; exit 1; }

# s3.bucket.list prints one bucket a line, its name first.
existing="$(echo "s3.bucket.list" | weed | awk '{print $1}')"
for bucket in $BUCKETS; do
  if grep -qx -- "$bucket" <<<"$existing"; then
    echo "bucket $bucket exists"
  else
    echo "s3.bucket.create -name $bucket" | weed
  fi
done
# Read, Write and List on these buckets only: no Admin, no other bucket (KFP's mlpipeline included).
printf 's3.configure -user %s -access_key %s -secret_key %s -actions Read,Write,List -buckets %s -apply\n' \
  "$S3_USER" "$access" "$secret" "$(tr ' ' ',' <<<"$BUCKETS")" | weed >/dev/null
grep -q -- "$S3_USER" <<<"$(echo "s3.configure" | weed)" \
  || { echo "object-store-setup: user $S3_USER not in SeaweedFS's identities" >&2; exit 1; }
echo "object store ready: buckets $BUCKETS, user $S3_USER (key in secret $NAMESPACE/$SECRET)"
