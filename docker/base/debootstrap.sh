#!/usr/bin/env bash
# Builds a minimal Debian base image from Debian's own packages with debootstrap and
# imports it into the local Docker engine, for machines that cannot pull images.
#
#   docker/base/debootstrap.sh [base-tag [tools-tag]]
#     defaults: radflow-local/debian:bookworm-slim, radflow-local/debian:bookworm-tools
#
# The base is debootstrap's `minbase` (essential packages, apt) plus ca-certificates,
# upgraded from bookworm-updates and bookworm-security, with apt lists, caches,
# documentation and locales removed: it plays the part of debian:bookworm-slim in the
# local build (docker/build-local.sh). The tools image adds curl and wget, for the
# model fetcher and the NATS health check. Needs root and `apt-get install
# debootstrap`; reaches only the Debian mirror (from the host, not from a container).
set -euo pipefail

tag=${1:-radflow-local/debian:bookworm-slim}
tools_tag=${2:-radflow-local/debian:bookworm-tools}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [[ $(id -u) -ne 0 ]]; then
  echo "debootstrap needs root" >&2
  exit 1
fi
# Installed from Debian's packages when missing, as .ci/setup installs what the tests need.
command -v debootstrap >/dev/null || {
  echo "installing debootstrap (Debian package)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

rootfs=$(mktemp -d /var/tmp/radflow-rootfs.XXXXXX)
chmod 755 "$rootfs"
cleanup() {
  umount "$rootfs/proc" 2>/dev/null || true
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" >/dev/null

cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
SOURCES
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive sh -c \
  'apt-get update -qq && apt-get -y -qq upgrade >/dev/null && apt-get clean'
umount "$rootfs/proc"

# What a slim image leaves out: package lists and caches (apt-get update restores
# them), documentation, manual pages, translations, logs.
slim() {
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
  : >"$rootfs/etc/machine-id"
}

import() { # tag title
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.title=$2 org.opencontainers.image.version=$version" \
    - "$1" >/dev/null
  echo "$1 (Debian $version)"
}

version=$(cat "$rootfs/etc/debian_version")
slim
import "$tag" "debian-$suite-minbase"

mount -t proc proc "$rootfs/proc"
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive sh -c \
  'apt-get update -qq && apt-get install -y -qq --no-install-recommends curl wget >/dev/null && apt-get clean'
umount "$rootfs/proc"
slim
import "$tools_tag" "debian-$suite-minbase-tools"
