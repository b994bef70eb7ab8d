#!/usr/bin/env bash
# Set up a fresh machine for qkit development and build the extension in place.
# Idempotent: re-running rebuilds only when a source changed (QKIT_FORCE_BUILD=1 forces it).
#   QKIT_BUILD_CUDA=1        fail unless the CUDA kernels are built (needs nvcc / CUDA_HOME)
#   TORCH_CUDA_ARCH_LIST     GPU architectures to compile (default: Ampere..Blackwell + PTX)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch is a build and run requirement; a CPU wheel is enough to build the CUDA kernels.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q ninja "setuptools>=77" wheel build "pytest>=8" "hypothesis>=6" numpy ruff
# qkit's one runtime dependency besides torch (the editable install below is --no-deps).
"$PY" -m pip install -q "hjson>=3.1"
# Optional integrations the test suite covers: torchao for qkit.pt2e (--no-deps:
# it declares no requirements, and must never replace the torch above).
"$PY" -m pip install -q --no-deps "torchao==0.18.0"
# The demo's extra (qkit[demo]): its end-to-end test and `qkit demo` need it.
"$PY" -m pip install -q scikit-learn matplotlib tqdm
# Rebuild only when a source is newer than the last build's record (or the
# record is missing, or the module does not import).
record=python/qkit/_build_info.json
if [ -f "$record" ] && [ -z "${QKIT_FORCE_BUILD:-}" ] \
   && [ -z "$(find src kernels include setup.py pyproject.toml python/qkit/_builder.py -newer "$record" -print -quit)" ] \
   && "$PY" -c "import qkit._C" 2>/dev/null; then
  exit 0
fi
# --no-build-isolation: build against the torch installed above instead of
# downloading another one into an isolated build environment.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
