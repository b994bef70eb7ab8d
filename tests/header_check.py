"""Compile qkit's host sources against one torch's include tree, syntax only (no torch install needed).

The bindings target torch's stable ABI of :data:`qkit._builder.TORCH_TARGET` (2.10), so a
source build must compile against every torch from that one on; headers of a newer torch
offer macros and functions the oldest does not have. ci/check_torch_headers.sh fetches the
oldest torch's ``torch/include`` tree and runs this over it:

    python tests/header_check.py --torch-include ~/.cache/qkit-ci/torch-2.10.0/torch/include

Each C++ source of ``qkit._C`` is compiled with ``-fsyntax-only`` and the defines and flags
setup.py uses (from ``_builder.extension_flags``, plus the ones torch's BuildExtension adds),
once as the CPU-only build and once as the CUDA build's host side (``QKIT_WITH_CUDA``).
Exit status 1 if any source fails in either flavour.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_builder() -> ModuleType:
    """``python/qkit/_builder.py`` without importing qkit (or torch)."""
    spec = importlib.util.spec_from_file_location("_qkit_builder_check", ROOT / "python" / "qkit" / "_builder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def compile_command(
    builder: ModuleType, source: str, torch_include: Path, python_include: Path, *, with_cuda: bool, cxx: str = "c++"
) -> list[str]:
    """The syntax-only compile of one source, with the flags setup.py would give it."""
    flags = builder.extension_flags(with_cuda=with_cuda, link_curand=False)
    defines = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in flags.define_macros]
    major, minor = builder.PYTHON_TARGET
    # What torch's BuildExtension adds for a py_limited_api extension named qkit._C.
    defines += [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-DPy_LIMITED_API=0x{major:02X}{minor:02X}0000",
        "-DTORCH_EXTENSION_NAME=_C",
    ]
    includes = [f"-I{ROOT / d}" for d in builder.INCLUDE_DIRS]
    includes += [f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}"]
    includes += [f"-I{python_include}"]
    return [cxx, "-fsyntax-only", "-fPIC", "-Wall", *defines, *includes, *flags.cxx, str(ROOT / source)]


def check(torch_include: Path, *, jobs: int, cxx: str, verbose: bool) -> int:
    builder = load_builder()
    if not (torch_include / "torch" / "csrc" / "stable" / "library.h").exists():
        print(f"header_check: {torch_include} is not a torch include tree (no torch/csrc/stable/library.h)")
        return 2
    python_include = Path(sysconfig.get_paths()["include"])
    jobs_list = [
        (
            source,
            with_cuda,
            compile_command(builder, source, torch_include, python_include, with_cuda=with_cuda, cxx=cxx),
        )
        for with_cuda in (False, True)
        for source in builder.CPU_SOURCES
    ]
    start = time.monotonic()

    def run(job: tuple[str, bool, list[str]]) -> tuple[str, bool, list[str], subprocess.CompletedProcess[str]]:
        source, with_cuda, command = job
        return source, with_cuda, command, subprocess.run(command, capture_output=True, text=True, check=False)

    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for source, with_cuda, command, done in pool.map(run, jobs_list):
            flavour = "CUDA host" if with_cuda else "CPU"
            status = "ok" if done.returncode == 0 else "FAILED"
            print(f"  {status:<6} {source} ({flavour})")
            if verbose or done.returncode != 0:
                print("    $ " + shlex.join(command))
            if done.returncode != 0:
                failed += 1
                print("\n".join("    " + line for line in (done.stderr or done.stdout).strip().splitlines()[:40]))
    took = time.monotonic() - start
    print(f"header_check: {len(jobs_list) - failed}/{len(jobs_list)} compiled against {torch_include} ({took:.0f} s)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--torch-include", type=Path, required=True, help="a torch wheel's torch/include directory")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--cxx", default=os.environ.get("CXX", "c++"))
    parser.add_argument("--verbose", action="store_true", help="print every compile command")
    args = parser.parse_args(argv)
    return check(args.torch_include.resolve(), jobs=args.jobs, cxx=args.cxx, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
