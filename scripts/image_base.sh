#!/usr/bin/env bash
# A stand-in for the Dockerfile's PYTHON_IMAGE (python:3.11-slim-bookworm) where no container
# registry is reachable: Debian 12 "bookworm" from debootstrap, with Debian's Python 3.11 and
# venv, imported into podman's storage as $1 (default localhost/quorum-base:bookworm-python3.11).
# Same Debian release and Python minor version as the official image, so the Dockerfile's
# steps run unchanged (`python` comes from python-is-python3). Skipped if the image exists.
#
#   scripts/image_base.sh [IMAGE]
set -euo pipefail

IMAGE=${1:-localhost/quorum-base:bookworm-python3.11}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
RELEASE=bookworm

if podman image exists "$IMAGE"; then
    echo "base image $IMAGE already built"
    exit 0
fi

ROOTFS=$(mktemp -d /var/tmp/quorum-base.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase "$RELEASE" "$ROOTFS" "$MIRROR"
# Python through apt inside the new root (debootstrap's --include resolves dependencies
# only partly and fails on python3.11-venv).
printf 'deb %s %s main\n' "$MIRROR" "$RELEASE" > "$ROOTFS"/etc/apt/sources.list
chroot "$ROOTFS" /bin/sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends python3.11 python3.11-venv python-is-python3 ca-certificates && apt-get clean'
# The host's own CAs (e.g. of a TLS-intercepting egress proxy) are trusted here too, and pip
# uses the system bundle (PIP_CERT) as on the host; otherwise pip cannot reach PyPI here.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS"/usr/local/share/ca-certificates/
    chroot "$ROOTFS" update-ca-certificates
fi
# Same trimming as the official slim image: no package caches, lists, docs or man pages.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
PY=$(chroot "$ROOTFS" python --version)  # fails the build if `python` is missing
tar -C "$ROOTFS" --numeric-owner -c . \
    | podman import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["python3"]' - "$IMAGE"
echo "base image $IMAGE: $PY, Debian $(cat "$ROOTFS"/etc/debian_version)"
