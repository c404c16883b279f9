#!/usr/bin/env bash
# The whole test suite: lint, stale-stub check, packaging check, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
PYTHON=.venv/bin/python ./scripts/gen_proto.sh --check
./scripts/check_packaging.sh
python -m pytest -q -rs "$@"
