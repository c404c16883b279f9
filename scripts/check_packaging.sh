#!/usr/bin/env bash
# Proves the layout rule of DESIGN.md: in a fresh virtualenv, from the
# repository root, the standard library's `operator` is not shadowed by the
# top-level operator/ folder, `python -m pip` works, and every kvmesh
# subpackage imports from an editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv --system-site-packages "$venv"
# --no-deps: the dependencies are checked by the main virtualenv; this checks the layout.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
  || "$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -m pip --version >/dev/null
"$venv/bin/python" - <<'PY'
import collections, operator, sys
assert hasattr(operator, "itemgetter"), f"stdlib operator shadowed by {operator.__file__}"
import kvmesh
for name in ("kvmesh.worker", "kvmesh.gateway", "kvmesh.operator"):
    __import__(name)
print("packaging ok:", kvmesh.__file__)
PY
(cd /tmp && "$venv/bin/python" -c "import kvmesh.worker, kvmesh.operator, operator; assert operator.itemgetter")
