#!/usr/bin/env bash
# Build a DeepGuard image with podman (no Docker engine, no Docker Hub): `make image`, or
#   deploy/image/build.sh [podman build options...]
# 1. a Debian bookworm base made by debootstrap and imported into podman (once per machine);
# 2. the model: MODEL_URI (default the registry's champion) exported as an MLflow model folder into build/image/model;
# 3. podman build of the Dockerfile's TARGET (server by default) with BASE_IMAGE set to that base, pip reaching
#    PyPI through the host's network and CA bundle.
# Environment: IMAGE, TARGET, MODEL_URI, BASE, PYTHON (the project's venv python), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-localhost/deepguard-server:latest}
TARGET=${TARGET:-server}
MODEL_URI=${MODEL_URI:-models:/deepguard-detector@champion}
BASE=${BASE:-localhost/deepguard-base:bookworm}
PYTHON=${PYTHON:-.venv/bin/python}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=/etc/ssl/certs/ca-certificates.crt

for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install podman buildah runc uidmap fuse-overlayfs containernetworking-plugins debootstrap)" >&2; exit 2; }
done

if ! podman image exists "$BASE"; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "build.sh: making $BASE with debootstrap (minbase, python3)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
    tar -C "$rootfs" -c . | podman import - "$BASE" >/dev/null
fi

# A build without cached layers holds the 2.5 GB venv about three times at its peak (the container's files, the
# layer blob being committed under TMPDIR, the stored layer): measured 8.8 GB on top of what was used before.
need_gb=10
for dir in "$(podman info --format '{{.Store.GraphRoot}}')" "${TMPDIR:-/var/tmp}"; do
    free_gb=$(df -P -BG "$dir" 2>/dev/null | awk 'NR==2 {sub("G", "", $4); print $4}')
    if [ -n "$free_gb" ] && [ "$free_gb" -lt "$need_gb" ]; then
        echo "build.sh: warning: ${free_gb} GB free on $dir; a build without cached layers needs about ${need_gb} GB" \
             "(free some: podman image prune, pip cache purge, old clones)" >&2
    fi
done

"$PYTHON" deploy/image/export_model.py "$MODEL_URI" build/image/model

start=$(date +%s)
podman build --format docker --isolation chroot --pull=never --network host --target "$TARGET" \
    -v "$CA:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt --build-arg BASE_IMAGE="$BASE" \
    -t "$IMAGE" "$@" .
echo "build.sh: built $IMAGE ($TARGET) in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
