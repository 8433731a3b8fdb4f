#!/usr/bin/env bash
# Build a local base image (Debian bookworm with python3) for hosts that cannot pull one:
# debootstrap a minimal root file system and `docker import` it. Skips when the image exists.
# Usage: docker/build-base.sh [IMAGE]   (default llamadist-base:bookworm)
set -euo pipefail
image=${1:-llamadist-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image: present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing (apt-get install debootstrap)"; exit 1; }
root=$(mktemp -d /var/tmp/llamadist-rootfs.XXXXXX)
cleanup() {
  # debootstrap mounts /proc and /sys inside the target; never delete through a mount.
  grep -o " $root/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
echo "debootstrap bookworm (python3, python3-venv) into $root"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -n 20 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/*
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' \
  -m "debootstrap bookworm + python3" - "$image"
docker image ls "$image"
