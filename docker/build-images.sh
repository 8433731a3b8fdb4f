#!/usr/bin/env bash
# `make images`: the wheels, the base image when it is the local one, then the llamadist image.
# Usage: docker/build-images.sh PYTHON TORCH_SPEC BASE_IMAGE IMAGE
set -euo pipefail
cd "$(dirname "$0")/.."
py=$1 torch_spec=$2 base=$3 image=$4
start=$SECONDS
if [ "$base" = "llamadist-base:bookworm" ]; then
  docker/build-base.sh "$base"
fi
docker/wheelhouse.sh "$py" "$torch_spec"
# The legacy builder: it needs no buildx plugin and reads BASE_IMAGE from the local store.
# The build stage is tagged too: its layers are the cache of the next build.
build() {
  DOCKER_BUILDKIT=0 docker build -q --build-arg BASE_IMAGE="$base" -f docker/Dockerfile "$@" docker \
    2>&1 | grep -v -e DEPRECATED -e BuildKit -e environment-variable -e '^ *$' || true
}
build --target build -t "${image%%:*}-build:cache"
build -t "$image"
docker image inspect "$image" >/dev/null
# Earlier builds of this image, untagged now (never anyone else's images).
docker image prune -f --filter label=llamadist.image=true >/dev/null
docker image prune -f --filter label=llamadist.build-stage=true >/dev/null
echo "image $image (base $base): $(docker image inspect -f '{{.Size}}' "$image" \
  | awk '{printf "%.0f MB", $1 / 1e6}'), built in $((SECONDS - start)) s"
