#!/usr/bin/env bash
# Make a local base image for docker/Dockerfile where no registry can be reached: a minimal Debian
# bookworm (Python 3.11 + venv) root filesystem from debootstrap, imported into podman or docker.
# Needs root, debootstrap and a Debian mirror. The root filesystem stays outside the repository.
#
#   sudo scripts/build-base-rootfs.sh [IMAGE]        default IMAGE: localhost/delrec-base:bookworm
#   make image-cpu BASE_IMAGE=localhost/delrec-base:bookworm
set -euo pipefail

IMAGE=${1:-localhost/delrec-base:bookworm}
WORK=${WORK:-/tmp/delrec-base}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
rootfs=$WORK/rootfs

if [ ! -x "$rootfs/usr/bin/python3" ]; then
  rm -rf "$rootfs"
  mkdir -p "$WORK"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$MIRROR"
fi
# Package caches and lists are not part of an image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar --numeric-owner -C "$rootfs" -c . \
  | "$ENGINE" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$IMAGE"
"$ENGINE" run --rm "$IMAGE" python3 --version
echo "base image: $IMAGE"
