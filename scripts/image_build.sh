#!/usr/bin/env bash
# Builds the image with podman (buildah inside), `make image` / `make image-gpu`:
#
#   scripts/image_build.sh cpu|gpu [IMAGE]
#
# The base image is pulled from its registry (python:3.11-slim-bookworm for cpu, the CUDA
# image for gpu). Where no registry can be reached, the cpu base is made here instead by
# scripts/image_base.sh (debootstrap of the same Debian 12 with Python 3.11); the gpu build
# then uses that same base in place of the CUDA one, which checks every step of the gpu
# stages but gives no usable GPU image, so it is tagged <tag>-standin.
# RUN steps are isolated with chroot (ISOLATION=oci where containers can run); layers and
# pip's cache mount are kept, so a rebuild after a source change takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${1:?usage: image_build.sh cpu|gpu [IMAGE]}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SUFFIX=; [ "$TARGET" = gpu ] && SUFFIX=-gpu
IMAGE=${2:-${IMAGE:-localhost/quorum:$VERSION$SUFFIX}}
dockerfile_arg() { sed -n "s/^ARG $1=//p" Dockerfile; }
PYTHON_IMAGE=${PYTHON_IMAGE:-$(dockerfile_arg PYTHON_IMAGE)}
CUDA_IMAGE=${CUDA_IMAGE:-$(dockerfile_arg CUDA_IMAGE)}
LOCAL_BASE=localhost/quorum-base:bookworm-python3.11

have_or_pull() { podman image exists "$1" || podman pull --quiet "$1" >/dev/null 2>&1; }

args=(--format docker --layers --isolation "${ISOLATION:-chroot}" --target "$TARGET")
if [ "$TARGET" = cpu ]; then
    if ! have_or_pull "$PYTHON_IMAGE"; then
        echo "image_build: cannot pull $PYTHON_IMAGE; building the stand-in $LOCAL_BASE" >&2
        scripts/image_base.sh "$LOCAL_BASE"
        PYTHON_IMAGE=$LOCAL_BASE
    fi
    args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
elif [ "$TARGET" = gpu ]; then
    if ! have_or_pull "$CUDA_IMAGE"; then
        echo "image_build: cannot pull $CUDA_IMAGE; building the gpu stages on $LOCAL_BASE" \
             "instead (no CUDA in it: tagged $IMAGE-standin, not for use)" >&2
        scripts/image_base.sh "$LOCAL_BASE"
        CUDA_IMAGE=$LOCAL_BASE
        IMAGE=$IMAGE-standin
    fi
    args+=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE")
else
    echo "unknown target $TARGET (cpu or gpu)" >&2
    exit 2
fi

start=$(date +%s)
podman build "${args[@]}" -t "$IMAGE" .
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base=$PYTHON_IMAGE; [ "$TARGET" = gpu ] && base=$CUDA_IMAGE
echo "image_build: $IMAGE ($TARGET, base $base):" \
     "$((size / 1000000)) MB, built in $(( $(date +%s) - start )) s"
