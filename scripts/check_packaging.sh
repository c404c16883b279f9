#!/usr/bin/env bash
# Proves the layout rule of DESIGN.md: in a fresh virtualenv, from the
# repository root, the standard library's `operator` is not shadowed by the
# top-level operator/ folder, `python -m pip` works, and every kvmesh
# subpackage imports from an editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
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

# The control image (Dockerfile.control) installs only these; the gateway and operator must import
# with them alone, torch and transformers absent.
# (pip warns that kvmesh's own torch requirement is unmet: that is the point.)
"$venv/bin/python" -m pip install -q -c constraints.txt grpcio grpcio-health-checking grpcio-reflection \
  protobuf prometheus-client redis xxhash numpy pyyaml kopf kubernetes 2>"$venv/pip.log" \
  || { cat "$venv/pip.log" >&2; exit 1; }
(cd /tmp && "$venv/bin/python" - <<'PY'
import sys
import kvmesh.gateway.cli, kvmesh.gateway.server, kvmesh.gateway.up, kvmesh.operator.main, kvmesh.client  # noqa: E401,F401
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not heavy, f"the control image would need {heavy}"
print("control image imports ok")
PY
)
