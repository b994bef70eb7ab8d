#!/usr/bin/env bash
# The binary-compatibility promise, measured: one abi3 wheel (stable ABI of torch 2.10,
# CPython 3.10 limited API) installed next to several torch releases and CPythons, the whole
# suite run against the installed package each time. Not part of .ci/run: every torch but
# the local 2.13.0+cpu pulls its CUDA runtime packages (~4 GB per venv, from pip's cache
# after the first time) and each run takes minutes.
#
# Builds the wheel once (ci/build_wheel.sh: manylinux_2_28; CUDA kernels for one arch unless
# TORCH_CUDA_ARCH_LIST says otherwise), then for each entry makes a fresh venv, installs
# that torch, then the wheel (binary only; pip must leave torch alone), and runs
# `python -m qkit.info` and pytest over tests/ from outside the source tree. One line each.
#
# Usage: bash ci/torch_matrix.sh [TORCH_VERSION...]
#   default versions: the oldest supported (_builder.TORCH_TARGET, i.e. 2.10.0) and the newest
#   on the package index. Each runs under the default Python; in addition the oldest torch runs
#   under CPython 3.10 (the abi3 floor) and the newest under the newest CPython found here.
#   PYTHON               the Python that builds the wheel, and the default venv Python (python3)
#   QKIT_MATRIX          explicit entries instead, e.g. "3.10:2.10.0 3.13:2.15.0 default:2.13.0"
#   QKIT_MATRIX_WHEEL    test this wheel instead of building one
#   QKIT_MATRIX_PYTEST   pytest arguments (default: -q -p no:cacheprovider <repo>/tests)
#   QKIT_MATRIX_LOG      also append the result lines to this file
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY=${PYTHON:-python3}
work="$(mktemp -d "${TMPDIR:-/tmp}/qkit-matrix.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# The machine-wide pip constraints may cap torch below the newest release; the matrix
# installs exactly the versions it names.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

python_for() {  # python_for VERSION|default: the interpreter, or nothing
  if [ "$1" = default ]; then echo "$PY"; return; fi
  local candidate
  for candidate in "python$1" "$HOME/.pyenv/versions/$1"*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, sys.argv[1].split("."))))' "$1" 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
}

if [ -n "${QKIT_MATRIX:-}" ]; then
  read -r -a entries <<< "$QKIT_MATRIX"
else
  if [ "$#" -gt 0 ]; then
    versions=("$@")
  else
    oldest="$("$PY" -c 'import re; print(".".join(re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", open("python/qkit/_builder.py").read(), re.M).groups()) + ".0")')"
    newest="$("$PY" -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p')"
    [ -n "$newest" ] || { echo "torch_matrix.sh: could not ask the package index for torch's newest version" >&2; exit 1; }
    versions=("$oldest" "$newest")
  fi
  entries=()
  for v in "${versions[@]}"; do entries+=("default:$v"); done
  newest_py=""
  for minor in $(seq 20 -1 10); do
    if [ -n "$(python_for "3.$minor")" ]; then newest_py="3.$minor"; break; fi
  done
  [ -n "$(python_for 3.10)" ] && entries+=("3.10:${versions[0]}")
  [ -n "$newest_py" ] && [ "$newest_py" != 3.10 ] && entries+=("$newest_py:${versions[-1]}")
fi
echo "torch_matrix.sh: ${entries[*]}"

if [ -n "${QKIT_MATRIX_WHEEL:-}" ]; then
  wheel="$(cd "$(dirname "$QKIT_MATRIX_WHEEL")" && pwd)/$(basename "$QKIT_MATRIX_WHEEL")"
else
  export QKIT_BUILD_CUDA="${QKIT_BUILD_CUDA:-1}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  bash ci/build_wheel.sh "$work/wheelhouse"
  built=("$work"/wheelhouse/qkit-*.whl)
  wheel="${built[0]}"
fi
echo "torch_matrix.sh: wheel $(basename "$wheel")"
read -r -a pytest_args <<< "${QKIT_MATRIX_PYTEST:--q -p no:cacheprovider $ROOT/tests}"

results=()
status=0
for entry in "${entries[@]}"; do
  pyver="${entry%%:*}"
  torch_version="${entry#*:}"
  python="$(python_for "$pyver")"
  if [ -z "$python" ]; then
    results+=("torch $torch_version  CPython $pyver  SKIPPED: no such Python here")
    continue
  fi
  venv="$work/venv-$pyver-$torch_version"
  log="$work/$pyver-$torch_version.log"
  echo "== torch_matrix.sh: torch $torch_version on $("$python" -V) ($(date +%T))"
  start=$SECONDS
  line=""
  if ! { "$python" -m venv "$venv" && "$venv/bin/pip" install -q "torch==$torch_version"; } >"$log" 2>&1; then
    line="INSTALL OF torch==$torch_version FAILED ($(tail -1 "$log"))"
  elif ! "$venv/bin/pip" install -q --only-binary=:all: "$wheel[test]" >>"$log" 2>&1; then
    line="INSTALL OF THE WHEEL FAILED ($(tail -1 "$log"))"
  else
    have_torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    have_py="$("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
    verdict="$(cd "$work" && "$venv/bin/python" -m qkit.info 2>&1 | sed -n 's/^verdict: //p')"
    set +e
    (cd "$work" && QKIT_TEST_INSTALLED=1 "$venv/bin/python" -m pytest "${pytest_args[@]}") >>"$log" 2>&1
    rc=$?
    set -e
    summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran|error' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
    line="torch $have_torch  CPython $have_py  qkit.info: ${verdict:-?}  pytest: ${summary:-exit $rc}"
    if [ "$have_torch" != "$torch_version" ] && [ "${have_torch%%+*}" != "$torch_version" ]; then
      line="$line  (pip replaced torch $torch_version)"
      rc=1
    fi
    [ "$rc" = 0 ] || { line="$line  FAILED"; grep -E '^(FAILED|ERROR) ' "$log" | head -5 | sed 's/^/    /' >&2 || true; }
  fi
  case "$line" in *FAILED*) status=1 ;; esac
  results+=("$line ($((SECONDS - start)) s)")
  echo "${results[-1]}"
  rm -rf "$venv"  # ~5 GB each
done

echo
echo "== torch_matrix.sh: $(basename "$wheel"), $(date -u +%Y-%m-%dT%H:%MZ)"
printf '%s\n' "${results[@]}"
if [ -n "${QKIT_MATRIX_LOG:-}" ]; then
  { echo "== $(basename "$wheel"), $(date -u +%Y-%m-%dT%H:%MZ)"; printf '%s\n' "${results[@]}"; } >> "$QKIT_MATRIX_LOG"
fi
exit "$status"
