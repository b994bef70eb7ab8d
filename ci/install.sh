#!/usr/bin/env bash
# Set up a fresh machine for qkit development and build the extension in place.
# Idempotent: re-running only rebuilds what changed.
#   QKIT_BUILD_CUDA=1        fail unless the CUDA kernels are built (needs nvcc / CUDA_HOME)
#   TORCH_CUDA_ARCH_LIST     GPU architectures to compile (default: Ampere..Blackwell + PTX)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch is a build and run requirement; a CPU wheel is enough to build the CUDA kernels.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q ninja "setuptools>=77" wheel "pytest>=8" "hypothesis>=6" numpy ruff
# --no-build-isolation: build against the torch installed above instead of
# downloading another one into an isolated build environment.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
