#!/usr/bin/env bash
# Link-time stand-ins of an old glibc (default 2.28, manylinux_2_28's), for building a wheel
# that runs on RHEL/Rocky/Alma 8 from a machine with a newer glibc (docs/release-wheel.md).
#
# The stubs are zig's (the `ziglang` package on PyPI): `zig cc -target x86_64-linux-gnu.2.28`
# writes shared objects libc.so.6, libdl.so.2, libpthread.so.0, librt.so.1, libm.so.6 and
# ld-linux-x86-64.so.2 whose symbol tables hold exactly the functions and symbol versions of
# that glibc release (generated from glibc's own ABI lists), and no code. Linking against
# them instead of this machine's glibc binds every libc reference of _C (and of the static
# CUDA runtime linked into it) to a version that glibc 2.28 has: dlopen@GLIBC_2.2.5, not
# dlopen@GLIBC_2.34. At run time the real glibc, which keeps every old version, provides them.
#
# Prints the directory (also given the lib<name>.so names the linker's -l looks for).
# Usage: bash ci/glibc_stubs.sh [GLIBC_VERSION]      (default 2.28)
#   QKIT_CI_CACHE  where the stubs and the zig tools venv are kept (default ~/.cache/qkit-ci)
#   PYTHON         makes the tools venv (default python3)
#   ZIGLANG_SPEC   the ziglang package to install (default ziglang==0.17.1, what was tested)
set -euo pipefail
glibc="${1:-2.28}"
arch="$(uname -m)"
cache="${QKIT_CI_CACHE:-$HOME/.cache/qkit-ci}"
out="$cache/glibc-$glibc-$arch"
if [ -f "$out/libc.so" ] && [ -f "$out/libc_nonshared.a" ]; then
  echo "$out"
  exit 0
fi
case "$arch" in
  x86_64) ld_so=ld-linux-x86-64.so.2 ;;
  aarch64) ld_so=ld-linux-aarch64.so.1 ;;
  *) echo "glibc_stubs.sh: no stubs for $arch" >&2; exit 1 ;;
esac
tools="$cache/zig-venv"
if [ ! -x "$tools/bin/python" ] || ! "$tools/bin/python" -m ziglang version >/dev/null 2>&1; then
  echo "glibc_stubs.sh: installing ${ZIGLANG_SPEC:-ziglang==0.17.1} into $tools" >&2
  "${PYTHON:-python3}" -m venv "$tools"
  "$tools/bin/pip" install -q "${ZIGLANG_SPEC:-ziglang==0.17.1}" >&2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/qkit-glibc.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo 'int qkit_glibc_stub_probe(void) { return 0; }' > "$work/probe.c"
# zig writes the stubs into its cache while linking anything against that glibc.
ZIG_GLOBAL_CACHE_DIR="$work/zig-cache" ZIG_LOCAL_CACHE_DIR="$work/zig-local" \
  "$tools/bin/python" -m ziglang cc -target "$arch-linux-gnu.$glibc" -shared -o "$work/probe.so" "$work/probe.c" >&2
libc_stub="$(find "$work/zig-cache" -name libc.so.6 -print -quit)"
[ -n "$libc_stub" ] || { echo "glibc_stubs.sh: zig left no libc.so.6 stub in its cache" >&2; exit 1; }
from="$(dirname "$libc_stub")"
rm -rf "$out.partial" && mkdir -p "$out.partial"
for lib in libc.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libm.so.6; do
  [ -f "$from/$lib" ] || { echo "glibc_stubs.sh: zig made no $lib stub" >&2; exit 1; }
  cp "$from/$lib" "$out.partial/$lib"
  [ "$lib" = libc.so.6 ] || ln -s "$lib" "$out.partial/${lib%%.so*}.so"   # what -ldl, ... look for
done
# zig names the dynamic loader's stub libld.so.2; its SONAME is the loader's real name.
cp "$from/libld.so.2" "$out.partial/$ld_so"
# -lc reads a linker script, as with glibc's own libc.so: the shared part, plus the few
# functions glibc always links statically (atexit, at_quick_exit, pthread_atfork,
# __stack_chk_fail_local: libc_nonshared.a, whose code calls only old libc entry points).
nonshared="$(${CC:-gcc} -print-file-name=libc_nonshared.a)"
[ -f "$nonshared" ] || { echo "glibc_stubs.sh: no libc_nonshared.a from ${CC:-gcc} (install libc6-dev)" >&2; exit 1; }
cp "$nonshared" "$out.partial/libc_nonshared.a"
cat > "$out.partial/libc.so" <<EOF
/* glibc $glibc link-time stubs (zig) for qkit's release wheel: ci/glibc_stubs.sh */
GROUP ( $out/libc.so.6 $out/libc_nonshared.a AS_NEEDED ( $out/$ld_so ) )
EOF
readelf -d "$out.partial/libc.so.6" | grep -q 'SONAME.*\[libc.so.6\]' \
  || { echo "glibc_stubs.sh: the libc stub has no libc.so.6 SONAME" >&2; exit 1; }
echo "zig $("$tools/bin/python" -m ziglang version), target $arch-linux-gnu.$glibc" > "$out.partial/MADE_BY"
rm -rf "$out" && mv "$out.partial" "$out"
echo "$out"
