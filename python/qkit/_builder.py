"""What ``qkit._C`` is made of: the one description ``setup.py`` builds from.

DeepSpeed users know it as ``QuantizerBuilder`` (``qkit.deepspeed`` re-exports it
with a ``load()`` that returns the prebuilt module). This file imports neither
torch nor the compiled module, so ``setup.py`` can read it before either exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Oldest torch whose stable ABI the bindings target (TORCH_TARGET_VERSION).
TORCH_TARGET = (2, 10)
#: Oldest CPython of the abi3 wheel (Py_LIMITED_API).
PYTHON_TARGET = (3, 10)
#: GPUs users have: Ampere, Hopper, Blackwell; PTX for the newest so later chips JIT it.
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0;10.0;12.0+PTX"
#: The default arch list per CUDA toolkit (oldest version first): every GPU generation the
#: toolkit can compile for from Ampere on, PTX for the newest. Blackwell (10.0, 12.0)
#: needs CUDA 12.8. A cubin for X.Y also runs on X.Z (Z > Y): 8.6 covers Ada (8.9),
#: 10.0 covers B300 (10.3), 12.0 covers GB10 (12.1).
CUDA_ARCHS_BY_VERSION: tuple[tuple[tuple[int, int], str], ...] = (
    ((11, 8), "8.0;8.6;9.0+PTX"),
    ((12, 8), DEFAULT_CUDA_ARCHS),
)
#: Memory one compiler job may take (nvcc with several archs, or g++ on torch's headers).
BYTES_PER_BUILD_JOB = 3 << 30

CPU_SOURCES = [
    "src/module.cpp",
    "src/binding_utils.cpp",
    "src/cpu_parallel.cpp",
    "src/quantize_ops.cpp",
    "src/zeropp_ops.cpp",
    "src/fp_ops.cpp",
    "kernels/cpu/quantize_cpu.cpp",
    "kernels/cpu/quantize_cpu_generic.cpp",
    "kernels/cpu/quantize_cpu_avx2.cpp",
    "kernels/cpu/quantize_cpu_avx512.cpp",
    "kernels/cpu/zeropp_cpu.cpp",
]
CUDA_SOURCES = [
    "kernels/cuda/quantize_cuda.cu",
    "kernels/cuda/zeropp_cuda.cu",
    "kernels/cuda/fp_cuda.cu",
]
INCLUDE_DIRS = ["include"]


def parse_version(text: str | None) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string like ``"12.8"`` or ``"13.0.88"`` (None if there is none)."""
    found = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def default_cuda_archs(cuda_version: str | None) -> str:
    """The default ``TORCH_CUDA_ARCH_LIST`` for a CUDA toolkit version (see :data:`CUDA_ARCHS_BY_VERSION`).

    Unknown or newer versions get the newest list; a toolkit older than the oldest
    entry is an error (it cannot compile for Ampere + Hopper).
    """
    version = parse_version(cuda_version)
    if version is None:
        return CUDA_ARCHS_BY_VERSION[-1][1]
    chosen = None
    for minimum, archs in CUDA_ARCHS_BY_VERSION:
        if version >= minimum:
            chosen = archs
    if chosen is None:
        oldest = ".".join(map(str, CUDA_ARCHS_BY_VERSION[0][0]))
        raise ValueError(f"CUDA {cuda_version} is too old for qkit's kernels: use CUDA >= {oldest}")
    return chosen


def default_max_jobs(cpu_count: int | None, memory_bytes: int | None) -> int:
    """Parallel compile jobs when ``MAX_JOBS`` is not set: one per core, as many as memory allows."""
    jobs = max(1, cpu_count or 1)
    if memory_bytes:
        jobs = min(jobs, max(1, memory_bytes // BYTES_PER_BUILD_JOB))
    return jobs


def max_jobs(environ: Mapping[str, str] | None = None) -> int:
    """``MAX_JOBS`` if it is a positive integer, else :func:`default_max_jobs` for this machine."""
    environ = os.environ if environ is None else environ
    value = environ.get("MAX_JOBS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        cpus: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count()
    try:
        memory: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = None
    return default_max_jobs(cpus, memory)


def count_archs(arch_list: str) -> int:
    """How many targets nvcc compiles for a ``TORCH_CUDA_ARCH_LIST`` (``+PTX`` adds one)."""
    entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
    return len(entries) + sum(e.endswith("+PTX") for e in entries)


def torch_target_macro() -> str:
    """The value of TORCH_TARGET_VERSION for :data:`TORCH_TARGET` (torch's encoding)."""
    major, minor = TORCH_TARGET
    return f"0x{(major << 56) | (minor << 48):016x}ULL"


def glibc_stub_link_args(stubs: str) -> list[str]:
    """Link arguments that bind _C's libc references to the glibc stubs in ``stubs``.

    ``-L`` puts the stubs' ``libc.so``/``libdl.so``/... ahead of the system's for every
    ``-l`` (g++'s own ``-lc`` and ``-lm`` included), and ``-rpath-link`` makes the linker
    read them, not the system's, as the dependencies of libstdc++ and torch's libraries.
    libpthread/libdl/librt are named because before glibc 2.34 their functions lived there,
    not in libc; ``--as-needed`` keeps each only if _C uses it. The stubs' ``libc.so`` is a
    linker script, as glibc's is, that adds libc_nonshared.a and the dynamic loader.
    """
    return [
        f"-L{stubs}",
        f"-Wl,-rpath-link,{stubs}",
        "-Wl,--as-needed",
        "-lpthread",
        "-ldl",
        "-lrt",
        "-Wl,--no-as-needed",
    ]


@dataclass
class ExtensionFlags:
    """Everything platform-specific about compiling and linking ``qkit._C``."""

    define_macros: list[tuple[str, str | None]] = field(default_factory=list)
    cxx: list[str] = field(default_factory=list)
    nvcc: list[str] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)
    link_args: list[str] = field(default_factory=list)


def extension_flags(
    *,
    with_cuda: bool,
    rocm: bool = False,
    rocm_archs: str | None = None,
    link_curand: bool = True,
    nvcc_threads: int = 1,
    glibc_stubs: str | None = None,
) -> ExtensionFlags:
    """Compile/link flags of ``qkit._C`` for one build flavour (a pure function, unit-tested).

    Args:
        with_cuda: build the GPU kernels (CUDA, or HIP when ``rocm``).
        rocm: torch is a ROCm build; the CUDA sources are hipified by torch and
            compiled by hipcc (``QKIT_ROCM`` is defined for the few ROCm-only lines).
        rocm_archs: ``PYTORCH_ROCM_ARCH`` (``;``-separated gfx targets).
        link_curand: keep DeepSpeed's random-library link contract: ``-lcurand`` on
            CUDA, ``-lhiprand`` on ROCm. It is linked ``--as-needed``: the kernels use
            qkit's own Philox, so the library never becomes a load-time dependency.
        nvcc_threads: nvcc ``--threads`` (archs compiled in parallel; CUDA only).
        glibc_stubs: a directory of an old glibc's link-time stubs (``ci/glibc_stubs.sh``,
            ``QKIT_GLIBC_STUBS``): _C is linked against them instead of this machine's glibc,
            so it needs no newer glibc than theirs (the manylinux_2_28 release wheel; Linux only).
    """
    flags = ExtensionFlags()
    # Py_LIMITED_API itself is defined by torch's BuildExtension (py_limited_api=True).
    flags.define_macros = [("TORCH_TARGET_VERSION", torch_target_macro())]
    # FP contraction off everywhere: CPU and GPU must round every step alike.
    # Hidden visibility: _C exports PyInit__C and nothing else.
    # -fno-trapping-math: qkit never reads FP exception flags, so the compiler may compute
    # both arms of a select (values are unchanged); without it GCC keeps the FP formats'
    # per-element selects (include/qkit/fp_formats.h) as branches and vectorises no loop.
    flags.cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden"]
    if glibc_stubs:
        flags.define_macros.append(("QKIT_GLIBC_STUBS", "1"))
        flags.link_args += glibc_stub_link_args(glibc_stubs)
    if not with_cuda:
        return flags
    flags.define_macros.append(("QKIT_WITH_CUDA", "1"))
    if rocm:
        flags.define_macros.append(("QKIT_ROCM", "1"))
        flags.nvcc = ["-O3", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden"]
        flags.nvcc += [f"--offload-arch={a}" for a in (rocm_archs or "").replace(",", ";").split(";") if a]
        if link_curand:
            flags.link_args = ["-Wl,--as-needed", "-lhiprand", "-Wl,--no-as-needed"]
        return flags
    flags.nvcc = [
        "-O3",
        "-std=c++17",
        "--fmad=false",
        "--expt-relaxed-constexpr",
        "-Xcompiler=-fvisibility=hidden",
        f"--threads={max(1, nvcc_threads)}",
    ]
    # The CUDA runtime is linked statically so the same binary imports on a
    # machine with no CUDA installed (CPU users) and under any CUDA torch;
    # --exclude-libs keeps its symbols out of _C's dynamic symbol table.
    flags.libraries = ["cudart_static", "rt", "dl"]
    flags.link_args = ["-Wl,--exclude-libs,ALL", *flags.link_args]
    if link_curand:
        flags.link_args += ["-Wl,--as-needed", *QuantizerBuilder().extra_ldflags(), "-Wl,--no-as-needed"]
    return flags


class QuantizerBuilder:
    """DeepSpeed's op-builder shape for qkit's quantizer (``NAME = "quantizer"``)."""

    BUILD_VAR = "DS_BUILD_QUANTIZER"
    NAME = "quantizer"

    def __init__(self, name: str | None = None) -> None:
        self.name = self.NAME if name is None else name

    def absolute_name(self) -> str:
        return f"deepspeed.ops.quantizer.{self.NAME}_op"

    def is_rocm_pytorch(self) -> bool:
        try:
            import torch
        except ImportError:
            return False
        return getattr(torch.version, "hip", None) is not None

    def sources(self) -> list[str]:
        """Source files, relative to the project root (CPU bindings first)."""
        return [*CPU_SOURCES, *CUDA_SOURCES]

    def include_paths(self) -> list[str]:
        return list(INCLUDE_DIRS)

    def extra_ldflags(self) -> list[str]:
        return [] if self.is_rocm_pytorch() else ["-lcurand"]

    def cuda_arch_list(self, cuda_version: str | None = None) -> str:
        """``TORCH_CUDA_ARCH_LIST`` if set, else the default for the toolkit's version."""
        return os.environ.get("TORCH_CUDA_ARCH_LIST") or default_cuda_archs(cuda_version)
