"""What a built ``qkit._C`` needs from the system, read from its ELF dynamic section (binutils' nm/readelf).

Used by tests/test_build.py and, as a script, by ci/package.sh to print the findings:

    python tests/elf_audit.py path/to/_C.abi3.so

Every undefined dynamic symbol is put in one class; anything outside the allowed
classes (a mangled ``at::``/``c10::``/``torch::`` symbol, pybind11, a Python C API
function beyond the limited API, a CUDA runtime function) is what would tie the
binary to one torch, one CPython or one CUDA installation.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: The Python C API functions _C calls, each in the limited API of CPython 3.2+ (so
#: within abi3 for 3.10). A new one must be checked against the limited API before
#: it is added here (ci/package.sh also runs abi3audit over the wheel).
LIMITED_PYTHON_API = frozenset({"PyModule_Create2"})

#: Symbol versions of the C/C++ runtime: glibc, libstdc++, its C++ ABI, libgcc.
SYSTEM_VERSION = re.compile(r"^(GLIBC|GLIBCXX|CXXABI|GCC)_[\d.]+$")
#: Weak hooks every toolchain leaves undefined (gprof, transactional memory).
TOOLCHAIN_WEAK = frozenset({"__gmon_start__", "_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable"})
#: torch's stable C shim: plain C functions of torch/csrc/stable/c/shim.h and the
#: AOTInductor shim (torch/csrc/inductor/aoti_torch/c/shim.h).
TORCH_C_SHIM = re.compile(r"^(aoti_torch_|torch_)\w+$")
#: Mangled C++ names of torch, its libraries and pybind11.
TORCH_CXX = re.compile(r"^_Z\w*?(2at|3c10|5torch|6caffe2|8pybind11)")


@dataclass(frozen=True)
class Symbol:
    name: str
    version: str | None  # e.g. "GLIBC_2.34"; None when unversioned
    weak: bool


def undefined_symbols(path: Path) -> list[Symbol]:
    """The undefined dynamic symbols of ``path`` (what it imports at load time)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True).stdout
    symbols = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        kind, full = parts[-2], parts[-1]
        name, _, version = full.partition("@")
        symbols.append(Symbol(name, version.lstrip("@") or None, kind in ("w", "v")))
    return symbols


def defined_symbols(path: Path) -> list[str]:
    """The dynamic symbols ``path`` exports."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1].partition("@")[0] for line in out.splitlines() if line.strip()]


def needed_libraries(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


def demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def classify(symbol: Symbol, demangled: str) -> str | None:
    """The allowed class of one undefined symbol, or None when it is not allowed."""
    if symbol.version is not None:
        return "system" if SYSTEM_VERSION.match(symbol.version) else None
    if symbol.name in TOOLCHAIN_WEAK and symbol.weak:
        return "toolchain"
    if TORCH_C_SHIM.match(symbol.name):
        return "torch C shim"
    if symbol.name in LIMITED_PYTHON_API:
        return "limited Python API"
    # Unversioned C++ standard library (it can bind to a definition in a library
    # linked before libstdc++; at run time libstdc++ provides it).
    standard = re.match(r"^((typeinfo|vtable|VTT) for )?(std|__cxxabiv1|__gnu_cxx)::", demangled)
    if symbol.name.startswith("_Z") and not TORCH_CXX.match(symbol.name) and standard:
        return "system"
    return None


def audit(path: Path) -> dict[str, list[str]]:
    """``{class: [symbols]}`` of the undefined symbols, with ``"forbidden"`` for the rest."""
    symbols = undefined_symbols(path)
    report: dict[str, list[str]] = {}
    for symbol, pretty in zip(symbols, demangle([s.name for s in symbols]), strict=True):
        kind = classify(symbol, pretty) or "forbidden"
        shown = symbol.name if kind != "forbidden" else f"{symbol.name} ({pretty})"
        report.setdefault(kind, []).append(shown + (f"@{symbol.version}" if symbol.version else ""))
    return report


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("_", 1)[1].split("."))


def required_versions(path: Path) -> dict[str, str]:
    """The newest version ``path`` needs of each runtime (``{"GLIBC": "2.34", "GLIBCXX": ...}``)."""
    newest: dict[str, str] = {}
    for symbol in undefined_symbols(path):
        if symbol.version and SYSTEM_VERSION.match(symbol.version):
            family = symbol.version.split("_", 1)[0]
            if family not in newest or version_key(symbol.version) > version_key(f"{family}_{newest[family]}"):
                newest[family] = symbol.version.split("_", 1)[1]
    return newest


def glibc_symbols_newer_than(path: Path, limit: tuple[int, int]) -> list[str]:
    """``name@GLIBC_x.y`` for each symbol that needs a glibc newer than ``limit``."""
    return sorted(
        f"{s.name}@{s.version}"
        for s in undefined_symbols(path)
        if s.version and s.version.startswith("GLIBC_") and version_key(s.version)[:2] > limit
    )


def main(argv: list[str]) -> int:
    """Print the findings for each path; exit 1 if any has a forbidden import."""
    status = 0
    for arg in argv:
        path = Path(arg)
        report = audit(path)
        print(f"{path.name}: NEEDED {', '.join(needed_libraries(path))}")
        for kind in ("torch C shim", "limited Python API", "system", "toolchain", "forbidden"):
            print(f"  {kind:<20} {len(report.get(kind, []))} symbols")
        for name in report.get("forbidden", []):
            print(f"    FORBIDDEN {name}")
            status = 1
        print(f"  newest runtime versions needed: {required_versions(path)}")
        newer = glibc_symbols_newer_than(path, (2, 28))
        print(f"  glibc symbols newer than manylinux_2_28 (glibc 2.28): {len(newer)}")
        versions = sorted({s.split("@")[1] for s in newer}, key=version_key)
        for version in versions:
            names = [s.split("@")[0] for s in newer if s.endswith("@" + version)]
            print(f"    {version}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} ({len(names)})")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
