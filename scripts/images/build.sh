#!/usr/bin/env bash
# Builds the container images of the tests' single-node cluster with buildah; no registry anywhere.
#
#   base     a Debian rootfs made by mmdebstrap, imported as localhost/kvmesh-base:<key>
#   worker   Dockerfile.worker on that base (CPU build arguments) -> ghcr.io/kvmesh/kvmesh-worker:0.1.0
#   control  Dockerfile.control on that base                     -> ghcr.io/kvmesh/kvmesh:0.1.0
#   redis    Debian's redis-server on that base                  -> kvmesh.local/redis:<debian suite>
#   pause    the pod sandbox (pause.c, static)                   -> kvmesh.local/pause:1
#   coredns  CoreDNS from scripts/controlplane/build.sh           -> kvmesh.local/coredns:<version>
#
# Each image is saved as an uncompressed docker-archive under ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/images/,
# named by a hash of everything that goes into it (sources, Dockerfile, base, versions), and never rebuilt
# for the same inputs: an image counts as built while its archive exists, or once the e2e node has
# imported it (SHORT-KEY.imported, written by tests/e2e/node.py, which then deletes the archive to save
# disk). Prints one line per image: NAME<TAB>ARCHIVE<TAB>KEY (also written to images.tsv there).
# Needs root, buildah, mmdebstrap and gcc (scripts/bootstrap.sh --test installs them) and the CoreDNS
# binary (scripts/controlplane/build.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../controlplane/versions.env
source "$root/scripts/controlplane/versions.env"
cache=${KVMESH_CACHE:-$HOME/.cache/kvmesh}
out=$cache/images
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

log() { echo "images: $*" >&2; }
short_hash() { sha256sum | cut -c1-16; }
# Hash of files (paths relative to the repository root), bytecode and caches left out.
hash_paths() {
  (cd "$root" && find "$@" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z \
    | xargs -0 sha256sum) | short_hash
}

BASE_SUITE=bookworm
BASE_MIRROR=http://deb.debian.org/debian
# python3-dev and gcc: Triton compiles its launcher at run time (the worker image keeps both).
BASE_PACKAGES=python3,python3-venv,python3-dev,gcc,libc6-dev,libgomp1,ca-certificates
base_key=$(printf '%s\n' "$BASE_SUITE" "$BASE_PACKAGES" | short_hash)
base_image=localhost/kvmesh-base:$base_key

# Build steps reach PyPI and the Debian mirror with the host's CA bundle; pip reuses the host's cache.
host_ca=/etc/ssl/certs/ca-certificates.crt
run_opts=(--network host --layers --pull=false -v "$host_ca:$host_ca:ro")
mkdir -p "$HOME/.cache/pip"

build_base() {
  if buildah inspect --type image "$base_image" >/dev/null 2>&1; then return; fi
  local rootfs=$out/rootfs-$base_key.tar start=$SECONDS
  if [[ ! -f $rootfs ]]; then
    log "making the Debian $BASE_SUITE rootfs ($BASE_PACKAGES)"
    mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$rootfs.tmp" "$BASE_MIRROR"
    mv "$rootfs.tmp" "$rootfs"
  fi
  local ctx
  ctx=$(mktemp -d)
  ln "$rootfs" "$ctx/rootfs.tar" 2>/dev/null || cp "$rootfs" "$ctx/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$ctx/Containerfile"
  buildah bud --quiet -f "$ctx/Containerfile" -t "$base_image" "$ctx" >/dev/null
  rm -rf "$ctx"
  log "built $base_image in $((SECONDS - start))s"
}

# image SHORT NAME KEY BUILDAH-BUD-ARGS...: builds NAME unless its archive for KEY exists, then saves it.
image() {
  local short=$1 name=$2 key=$3
  shift 3
  local archive=$out/$short-$key.tar start=$SECONDS
  if [[ ! -f $archive && ! -f $out/$short-$key.imported ]]; then
    log "building $name ($short, key $key)"
    local previous
    previous=$(buildah images --noheading --format '{{.ID}}' "$name" 2>/dev/null || true)
    buildah bud "${run_opts[@]}" -t "$name" "$@" >"$out/$short.log" 2>&1 \
      || { tail -n 40 "$out/$short.log" >&2; log "building $name failed (log: $out/$short.log)"; exit 1; }
    # The build it replaces: its own top layers go, the cached layers both share stay.
    if [[ -n $previous && $previous != "$(buildah images --noheading --format '{{.ID}}' "$name")" ]]; then
      buildah rmi "$previous" >/dev/null 2>&1 || true
    fi
    rm -f "$archive.tmp"
    buildah push --quiet "$name" "docker-archive:$archive.tmp:$name" >/dev/null
    mv "$archive.tmp" "$archive"
    find "$out" -maxdepth 1 \( -name "$short-*.tar" -o -name "$short-*.imported" \) \
      ! -name "$short-$key.*" -delete
    log "built $name in $((SECONDS - start))s"
  fi
  printf '%s\t%s\t%s\n' "$name" "$archive" "$key" >>"$out/images.tsv.tmp"
}

rm -f "$out/images.tsv.tmp"
# Working containers of interrupted builds; and, when the disk runs low, the layer cache of earlier builds
# (the next build of the worker then installs its dependencies again). A worker build from nothing needs
# about 6 GB here, 6 GB for its archive and 12 GB in containerd's store (blobs and unpacked layers).
buildah rm --all >/dev/null
if (( $(df --output=avail -k /var/lib/containers | tail -n 1) < 20 * 1024 * 1024 )); then
  log "less than 20 GB free: pruning buildah's layer cache"
  buildah rmi --prune >/dev/null || true
fi
build_base
ctx_paths=(kvmesh worker gateway operator proto pyproject.toml setup.py README.md constraints.txt .dockerignore)

key=$(cat <(hash_paths "${ctx_paths[@]}" Dockerfile.worker) <(echo "$base_key") | short_hash)
image worker ghcr.io/kvmesh/kvmesh-worker:0.1.0 "$key" -f "$root/Dockerfile.worker" \
  -v "$HOME/.cache/pip:/root/.cache/pip" \
  --build-arg "BASE_IMAGE=$base_image" --build-arg "BUILDER_IMAGE=$base_image" \
  --build-arg TORCH_INDEX=https://pypi.org/simple --build-arg FLASH_ATTN_VERSION= "$root"

key=$(cat <(hash_paths "${ctx_paths[@]}" Dockerfile.control) <(echo "$base_key") | short_hash)
image control ghcr.io/kvmesh/kvmesh:0.1.0 "$key" -f "$root/Dockerfile.control" \
  --build-arg "BASE_IMAGE=$base_image" "$root"

key=$(cat <(hash_paths scripts/images/Containerfile.redis) <(echo "$base_key") | short_hash)
image redis "kvmesh.local/redis:$BASE_SUITE" "$key" -f "$here/Containerfile.redis" \
  --build-arg "BASE_IMAGE=$base_image" "$here"

# context_image SHORT NAME KEY CONTAINERFILE FILE...: an image from a throwaway context of FILEs.
context_image() {
  local short=$1 name=$2 key=$3 containerfile=$4 ctx
  shift 4
  ctx=$(mktemp -d)
  cp "$@" "$ctx/"
  cp "$containerfile" "$ctx/Containerfile"
  image "$short" "$name" "$key" "$ctx"
  rm -rf "$ctx"
}

pause_bin=$(mktemp -d)/pause
gcc -static -Os -o "$pause_bin" "$here/pause.c"
key=$(hash_paths scripts/images/pause.c scripts/images/Containerfile.pause)
context_image pause kvmesh.local/pause:1 "$key" "$here/Containerfile.pause" "$pause_bin"
rm -rf "$(dirname "$pause_bin")"

coredns=$cache/bin/coredns-$COREDNS_VERSION/coredns
# scripts/controlplane/build.sh may be building it right now (bootstrap runs both at once): its lock.
flock "$cache/.build.lock" true
[[ -x $coredns ]] || { log "missing $coredns: run scripts/controlplane/build.sh"; exit 1; }
key=$(cat <(sha256sum <"$coredns") <(hash_paths scripts/images/Containerfile.coredns) | short_hash)
context_image coredns "kvmesh.local/coredns:$COREDNS_VERSION" "$key" "$here/Containerfile.coredns" "$coredns"

mv "$out/images.tsv.tmp" "$out/images.tsv"
cat "$out/images.tsv"
