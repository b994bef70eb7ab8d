#!/usr/bin/env bash
# The main job: set up (idempotent) and run the qkit demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
exec "${PYTHON:-python3}" -m qkit.demo "$@"
