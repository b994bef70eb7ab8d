"""Builds the emulated-CUDA backend: qkit's unmodified CUDA kernels run on the CPU.

``kernels/cuda/*.cu`` are hipified by ``torch.utils.hipify`` and compiled by the host
C++ compiler against HIP-CPU (AMD's header-only HIP runtime for CPUs, one fiber per
GPU thread); ``src/*.cpp`` are compiled with ``QKIT_EMULATED_CUDA``, so the bindings
hand CPU tensors' memory to the CUDA launchers and register the kernels as the CPU
kernels of the ``qkit_emu`` namespace. The result, ``libqkit_emulated.so``, is a test
tool only: it is never part of the wheel or the sdist's build.

    python tests/emulated/build.py [--out DIR] [--hip-cpu DIR]

HIP-CPU is looked up at ``--hip-cpu``, ``$QKIT_HIP_CPU``, then ``../shared/tools/hip-cpu``
beside the checkout. Rebuilds are incremental (ninja).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "build" / "emulated"
LIBRARY_NAME = "libqkit_emulated.so"
HERE = Path(__file__).resolve().parent


def _builder():
    spec = importlib.util.spec_from_file_location("_qkit_builder", ROOT / "python" / "qkit" / "_builder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def find_hip_cpu(explicit: str | None = None) -> Path | None:
    """The HIP-CPU checkout to build against, or None when there is none."""
    candidates = [explicit, os.environ.get("QKIT_HIP_CPU"), str(ROOT.parent / "shared" / "tools" / "hip-cpu")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "hip" / "hip_runtime.h").exists():
            return Path(candidate).resolve()
    return None


def _write_if_changed(path: Path, text: str) -> None:
    """Leaves unchanged files alone so ninja does not recompile them."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def hipify_tree(out: Path) -> list[Path]:
    """Hipified copies of ``kernels/`` and ``include/`` under ``out/tree``; returns the kernel files."""
    from torch.utils.hipify import hipify_python

    builder = _builder()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for folder in ("kernels", "include"):
            shutil.copytree(ROOT / folder, work / folder)
        results = hipify_python.hipify(
            project_directory=str(work),
            output_directory=str(work),
            includes=[str(work / "*")],
            is_pytorch_extension=True,
            show_detailed=False,
            show_progress=False,
        )
        for path in sorted(p for p in work.rglob("*") if p.is_file()):
            _write_if_changed(out / "tree" / path.relative_to(work), path.read_text())
        kernels = []
        for source in builder.CUDA_SOURCES:
            result = results.get(str(work / source))
            hipified = getattr(result, "hipified_path", None)
            if not hipified:
                raise RuntimeError(f"hipify produced nothing for {source}")
            kernels.append(out / "tree" / Path(hipified).relative_to(work))
    return kernels


def write_ninja(out: Path, hip_cpu: Path, kernels: list[Path]) -> None:
    import torch

    builder = _builder()
    torch_include = Path(torch.__file__).parent / "include"
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = builder.extension_flags(with_cuda=True)
    defines = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in flags.define_macros]
    common = ["-fPIC", "-DNDEBUG", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden", "-w"]
    # Bindings and CPU kernels: the flags of qkit._C, plus the emulation switch.
    torch_flags = [*common, "-O2", *defines, "-DQKIT_EMULATED_CUDA=1", f"-I{ROOT / 'include'}"]
    torch_flags += [f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}"]
    # Kernels: HIP-CPU with NVIDIA's 32-lane warp; cuda_compat.h maps the *_sync shuffles.
    hip_flags = [*common, "-O1", "-DHIP_CPU_WARP_SIZE=32", f"-I{hip_cpu / 'include'}"]
    hip_flags += [f"-I{out / 'tree' / 'include'}", "-include", str(hip_cpu / "cuda_compat.h")]
    link = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltbb", "-lpthread"]
    cxx = os.environ.get("CXX", "c++")
    objects: list[tuple[str, Path, str]] = []
    sources = [s for s in builder.CPU_SOURCES if s != "src/module.cpp"]  # no Python module: loaded by torch
    for source in sources:
        objects.append(("cxx_torch", ROOT / source, source.replace("/", "_") + ".o"))
    for kernel in kernels:
        objects.append(("cxx_hip", kernel, kernel.name + ".o"))
    objects.append(("cxx_hip", HERE / "runtime.cpp", "runtime.o"))
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"torch_flags = {shlex.join(torch_flags)}",
        f"hip_flags = {shlex.join(hip_flags)}",
        f"ldflags = {shlex.join(link)}",
        "rule cxx_torch",
        "  command = $cxx -MMD -MF $out.d $torch_flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule cxx_hip",
        "  command = $cxx -MMD -MF $out.d -x c++ $hip_flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "rule link",
        "  command = $cxx -shared $in -o $out $ldflags",
    ]
    for rule, source, obj in objects:
        lines.append(f"build obj/{obj}: {rule} {source}")
    lines.append(f"build {LIBRARY_NAME}: link {' '.join('obj/' + o for _, _, o in objects)}")
    lines.append(f"default {LIBRARY_NAME}")
    _write_if_changed(out / "build.ninja", "\n".join(lines) + "\n")


def build(out: Path = DEFAULT_OUT, hip_cpu: Path | None = None, jobs: int | None = None) -> Path:
    """Builds (or brings up to date) the emulated backend; returns the library's path."""
    hip_cpu = hip_cpu or find_hip_cpu()
    if hip_cpu is None:
        raise FileNotFoundError("HIP-CPU not found: pass --hip-cpu, set $QKIT_HIP_CPU, or see ../shared/tools/hip-cpu")
    out.mkdir(parents=True, exist_ok=True)
    kernels = hipify_tree(out)
    write_ninja(out, hip_cpu, kernels)
    ninja = shutil.which("ninja") or str(Path(sysconfig.get_paths()["scripts"]) / "ninja")
    command = [ninja, "-C", str(out)]
    if jobs:
        command += ["-j", str(jobs)]
    subprocess.run(command, check=True)
    return out / LIBRARY_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="build folder (default: build/emulated)")
    parser.add_argument("--hip-cpu", default=None, help="HIP-CPU checkout (default: $QKIT_HIP_CPU, ../shared/...)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: ninja's)")
    args = parser.parse_args(argv)
    hip_cpu = find_hip_cpu(args.hip_cpu)
    if hip_cpu is None:
        print("emulated CUDA: HIP-CPU not found (--hip-cpu, $QKIT_HIP_CPU, ../shared/tools/hip-cpu)", file=sys.stderr)
        return 2
    library = build(args.out, hip_cpu, args.jobs)
    print(library)
    return 0


if __name__ == "__main__":
    sys.exit(main())
