#!/usr/bin/env bash
# cibuildwheel's before-all: install the CUDA toolkit parts qkit's build needs (nvcc and
# the static runtime, nothing else) at a pinned version, in the manylinux_2_28 container
# (AlmaLinux 8, dnf, NVIDIA's rhel8 repository). The arch list then follows from the
# version (python/qkit/_builder.py: CUDA_ARCHS_BY_VERSION) unless TORCH_CUDA_ARCH_LIST is set.
#
#   QKIT_CUDA_VERSION   pinned toolkit version (default below); the wheel links its runtime
#                       statically, so users' drivers must support this CUDA version.
#
# Outside such a container (a machine that already has nvcc) it installs nothing and
# says which toolkit the build will use; without nvcc and dnf it fails.
set -euo pipefail
QKIT_CUDA_VERSION="${QKIT_CUDA_VERSION:-12.8}"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"

if [ -x "$cuda_home/bin/nvcc" ] || command -v nvcc >/dev/null 2>&1; then
  nvcc_bin="$cuda_home/bin/nvcc"; [ -x "$nvcc_bin" ] || nvcc_bin="$(command -v nvcc)"
  echo "install_cuda.sh: using the installed toolkit: $("$nvcc_bin" --version | grep -o 'release [0-9.]*')"
  exit 0
fi
if ! command -v dnf >/dev/null 2>&1; then
  echo "install_cuda.sh: no nvcc and no dnf: install a CUDA toolkit (nvcc + cudart) and set CUDA_HOME" >&2
  exit 1
fi

case "$(uname -m)" in
  x86_64) repo_arch=x86_64 ;;
  aarch64) repo_arch=sbsa ;;
  *) echo "install_cuda.sh: no CUDA toolkit for $(uname -m)" >&2; exit 1 ;;
esac
pkg_version="${QKIT_CUDA_VERSION/./-}"   # 12.8 -> 12-8
dnf install -y -q dnf-plugins-core
dnf config-manager --add-repo "https://developer.download.nvidia.com/compute/cuda/repos/rhel8/${repo_arch}/cuda-rhel8.repo"
# nvcc pulls in its own parts (crt, nvvm); cudart-devel has the headers and libcudart_static.a.
dnf install -y -q "cuda-nvcc-${pkg_version}" "cuda-cudart-devel-${pkg_version}"
dnf clean all
ln -sfn "/usr/local/cuda-${QKIT_CUDA_VERSION}" /usr/local/cuda
installed="$(/usr/local/cuda/bin/nvcc --version | grep -o 'release [0-9.]*')"
if [ "$installed" != "release ${QKIT_CUDA_VERSION}" ]; then
  echo "install_cuda.sh: wanted CUDA ${QKIT_CUDA_VERSION}, got ${installed}" >&2
  exit 1
fi
echo "install_cuda.sh: installed CUDA ${QKIT_CUDA_VERSION} in /usr/local/cuda-${QKIT_CUDA_VERSION}"
