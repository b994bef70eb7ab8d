#!/usr/bin/env bash
# Source builds against the oldest supported torch: compile every host source of qkit._C
# (syntax only, the flags setup.py uses) against torch's own include tree, by default the
# torch of _builder.TORCH_TARGET (2.10.0). Newer torch headers offer macros the oldest
# lacks (e.g. STABLE_TORCH_ERROR_CODE_CHECK, 2.13+); this catches their use in ~20 s.
#
# The headers come from the torch wheel on PyPI (pip download --no-deps, ~900 MB once),
# of which only torch/include/ is unpacked and kept, in QKIT_CI_CACHE (default
# ~/.cache/qkit-ci/torch-<version>/torch/include, ~60 MB); the wheel itself is deleted.
# Nothing is installed.
#
# Usage: bash ci/check_torch_headers.sh [TORCH_VERSION...]
#   PYTHON         the Python that runs the check and gives Python.h (default python3)
#   QKIT_CI_CACHE  where the unpacked include trees are kept (default ~/.cache/qkit-ci)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cache="${QKIT_CI_CACHE:-$HOME/.cache/qkit-ci}"
if [ "$#" -eq 0 ]; then
  target="$("$PY" -c 'import re; print(".".join(re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", open("python/qkit/_builder.py").read(), re.M).groups()))')"
  set -- "$target.0"
fi

status=0
for version in "$@"; do
  include="$cache/torch-$version/torch/include"
  if [ ! -f "$include/torch/csrc/stable/library.h" ]; then
    echo "check_torch_headers.sh: fetching torch $version's headers into $cache/torch-$version"
    work="$(mktemp -d "${TMPDIR:-/tmp}/qkit-headers.XXXXXX")"
    # Any platform wheel of that version has the same headers; this machine's is the one pip picks.
    if ! PIP_CONSTRAINT=/dev/null "$PY" -m pip download -q --no-deps --only-binary=:all: "torch==$version" -d "$work"; then
      echo "check_torch_headers.sh: could not download torch==$version from the package index" >&2
      rm -rf "$work"
      exit 1
    fi
    wheel=("$work"/torch-*.whl)
    rm -rf "$cache/torch-$version.partial"
    mkdir -p "$cache/torch-$version.partial"
    "$PY" - "${wheel[0]}" "$cache/torch-$version.partial" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith("torch/include/")])
EOF
    rm -rf "$work" "$cache/torch-$version"
    mv "$cache/torch-$version.partial" "$cache/torch-$version"
  fi
  echo "== check_torch_headers.sh: qkit's host sources against torch $version's headers"
  "$PY" tests/header_check.py --torch-include "$include" || status=1
done
[ "$status" = 0 ] || echo "check_torch_headers.sh: FAILED: a source build against the torch above would not compile" >&2
exit "$status"
