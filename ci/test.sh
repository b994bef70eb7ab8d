#!/usr/bin/env bash
# The test command: set up (idempotent), lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check setup.py python tests
"$PY" -m ruff format --check setup.py python tests
"$PY" -m pytest -q tests "$@"
