#!/usr/bin/env bash
# Regenerates the Python stubs for proto/kvmesh/v1 into kvmesh/v1.
# With --check, fails when the committed stubs differ from freshly generated ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=.
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/kvmesh/v1"
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/kvmesh/v1/*.proto
touch "$out/kvmesh/v1/__init__.py"
if [[ "${1:-}" == "--check" ]]; then
  if ! diff -r -x __pycache__ -x __init__.py "$out/kvmesh/v1" kvmesh/v1 >/dev/null; then
    echo "generated stubs in kvmesh/v1 are stale: run scripts/gen_proto.sh" >&2
    diff -r -x __pycache__ -x __init__.py "$out/kvmesh/v1" kvmesh/v1 | head -20 >&2
    exit 1
  fi
  echo "proto stubs up to date"
fi
