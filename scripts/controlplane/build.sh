#!/usr/bin/env bash
# Builds the local Kubernetes cluster used by tests/controlplane and tests/e2e from Go modules:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy from
# k8s.io/kubernetes, etcd from go.etcd.io/etcd/server/v3, and CoreDNS (the cluster DNS of the e2e node,
# with the few plugins it uses: coredns/main.go) from github.com/coredns/coredns. Binaries are cached per version under
#   ${KVMESH_CACHE:-$HOME/.cache/kvmesh}/bin/k8s-<version>/ and .../bin/etcd-<version>/
# and a cached version is never rebuilt. Safe to run again; needs only the Go module proxy.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KVMESH_CACHE:-$HOME/.cache/kvmesh}
k8s_bin=$cache/bin/k8s-$KUBERNETES_VERSION
etcd_bin=$cache/bin/etcd-$ETCD_VERSION
coredns_bin=$cache/bin/coredns-$COREDNS_VERSION
# Non-interactive shells (CI) may not have the Go toolchain's directory on PATH.
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
  export PATH=/usr/local/go/bin:$PATH
fi
# Builds use the installed Go; a module asking for a newer one fails loudly instead of downloading.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
export CGO_ENABLED=0 GOFLAGS=-mod=mod
nice_go=(nice -n 10 go)

log() { echo "controlplane: $*" >&2; }

have() { # have DIR BINARY... -> all present and executable
  local dir=$1; shift
  local b
  for b in "$@"; do [[ -x $dir/$b ]] || return 1; done
}

# new_wrapper DIR: an empty module from which `go build` resolves the real modules; unlike
# `go install pkg@version`, a main module may carry the replace directives these builds need.
new_wrapper() {
  command -v go >/dev/null || { log "building needs the go command (Go >= 1.26)"; exit 1; }
  rm -rf "$1" && mkdir -p "$1"
  printf 'module kvmesh.local/controlplane-build\n\ngo 1.26\n' >"$1/go.mod"
}

k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

build_kubernetes() {
  if have "$k8s_bin" "${k8s_cmds[@]}"; then
    log "${k8s_cmds[*]} $KUBERNETES_VERSION cached"
    return
  fi
  local src=$cache/src/k8s-$KUBERNETES_VERSION start=$SECONDS
  local minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  local staging=v0.$minor.${KUBERNETES_VERSION##*.}
  log "building ${k8s_cmds[*]} $KUBERNETES_VERSION (staging modules $staging)"
  new_wrapper "$src"
  cd "$src"
  # k8s.io/kubernetes points its staging modules (k8s.io/api, client-go, ...) at ./staging with
  # replace directives that only apply inside its own repository; point them at their releases.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
  local mod
  for mod in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace="$mod=$mod@$staging"
  done
  local pkgs=("${k8s_cmds[@]/#/k8s.io/kubernetes/cmd/}")
  "${nice_go[@]}" get "${pkgs[@]/%/@$KUBERNETES_VERSION}"
  # The version the binaries report (kubectl version, /version), as Kubernetes' own build sets it.
  local x="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    x+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$k8s_bin.tmp"
  "${nice_go[@]}" build -trimpath -ldflags="-s -w$x" -o "$k8s_bin.tmp/" "${pkgs[@]}"
  rm -rf "$k8s_bin" && mv "$k8s_bin.tmp" "$k8s_bin"
  log "built ${k8s_cmds[*]} in $((SECONDS - start))s"
}

build_etcd() {
  if have "$etcd_bin" etcd; then
    log "etcd $ETCD_VERSION cached"
    return
  fi
  local src=$cache/src/etcd-$ETCD_VERSION start=$SECONDS
  log "building etcd $ETCD_VERSION"
  new_wrapper "$src"
  cd "$src"
  "${nice_go[@]}" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  mkdir -p "$etcd_bin.tmp"
  "${nice_go[@]}" build -trimpath -ldflags="-s -w" -o "$etcd_bin.tmp/etcd" go.etcd.io/etcd/server/v3
  rm -rf "$etcd_bin" && mv "$etcd_bin.tmp" "$etcd_bin"
  log "built etcd in $((SECONDS - start))s"
}

build_coredns() {
  if have "$coredns_bin" coredns; then
    log "coredns $COREDNS_VERSION cached"
    return
  fi
  local src=$cache/src/coredns-$COREDNS_VERSION start=$SECONDS
  log "building coredns $COREDNS_VERSION"
  new_wrapper "$src"
  cp "$here/coredns/main.go" "$src/main.go"
  cd "$src"
  "${nice_go[@]}" get "github.com/coredns/coredns@$COREDNS_VERSION"
  "${nice_go[@]}" mod tidy
  mkdir -p "$coredns_bin.tmp"
  "${nice_go[@]}" build -trimpath -ldflags="-s -w" -o "$coredns_bin.tmp/coredns" .
  rm -rf "$coredns_bin" && mv "$coredns_bin.tmp" "$coredns_bin"
  log "built coredns in $((SECONDS - start))s"
}

# One build at a time per cache (two `make test` at once would share the wrapper and output dirs).
mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
build_etcd
build_kubernetes
build_coredns
for cmd in "${k8s_cmds[@]}"; do printf '%-24s %s\n' "$cmd:" "$k8s_bin/$cmd"; done
printf '%-24s %s\n' "etcd:" "$etcd_bin/etcd" "coredns:" "$coredns_bin/coredns"
