"""What ``qkit._C`` is made of: the one description ``setup.py`` builds from.

DeepSpeed users know it as ``QuantizerBuilder`` (``qkit.deepspeed`` re-exports it
with a ``load()`` that returns the prebuilt module). This file imports neither
torch nor the compiled module, so ``setup.py`` can read it before either exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Oldest torch whose stable ABI the bindings target (TORCH_TARGET_VERSION).
TORCH_TARGET = (2, 10)
#: Oldest CPython of the abi3 wheel (Py_LIMITED_API).
PYTHON_TARGET = (3, 10)
#: GPUs users have: Ampere, Hopper, Blackwell; PTX for the newest so later chips JIT it.
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0;10.0;12.0+PTX"

CPU_SOURCES = [
    "src/module.cpp",
    "src/binding_utils.cpp",
    "src/cpu_parallel.cpp",
    "src/quantize_ops.cpp",
    "src/zeropp_ops.cpp",
    "kernels/cpu/quantize_cpu.cpp",
    "kernels/cpu/quantize_cpu_generic.cpp",
    "kernels/cpu/quantize_cpu_avx2.cpp",
    "kernels/cpu/quantize_cpu_avx512.cpp",
    "kernels/cpu/zeropp_cpu.cpp",
]
CUDA_SOURCES = [
    "kernels/cuda/quantize_cuda.cu",
    "kernels/cuda/zeropp_cuda.cu",
]
INCLUDE_DIRS = ["include"]


def torch_target_macro() -> str:
    """The value of TORCH_TARGET_VERSION for :data:`TORCH_TARGET` (torch's encoding)."""
    major, minor = TORCH_TARGET
    return f"0x{(major << 56) | (minor << 48):016x}ULL"


@dataclass
class ExtensionFlags:
    """Everything platform-specific about compiling and linking ``qkit._C``."""

    define_macros: list[tuple[str, str | None]] = field(default_factory=list)
    cxx: list[str] = field(default_factory=list)
    nvcc: list[str] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)
    link_args: list[str] = field(default_factory=list)


def extension_flags(
    *, with_cuda: bool, rocm: bool = False, rocm_archs: str | None = None, link_curand: bool = True
) -> ExtensionFlags:
    """Compile/link flags of ``qkit._C`` for one build flavour (a pure function, unit-tested).

    Args:
        with_cuda: build the GPU kernels (CUDA, or HIP when ``rocm``).
        rocm: torch is a ROCm build; the CUDA sources are hipified by torch.
        rocm_archs: ``PYTORCH_ROCM_ARCH`` (``;``-separated gfx targets).
        link_curand: keep DeepSpeed's ``-lcurand`` link contract (CUDA only). It is
            linked ``--as-needed``: the kernels use qkit's own Philox, so the
            library never becomes a load-time dependency.
    """
    flags = ExtensionFlags()
    # Py_LIMITED_API itself is defined by torch's BuildExtension (py_limited_api=True).
    flags.define_macros = [("TORCH_TARGET_VERSION", torch_target_macro())]
    # FP contraction off everywhere: CPU and GPU must round every step alike.
    flags.cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fvisibility=hidden"]
    if not with_cuda:
        return flags
    flags.define_macros.append(("QKIT_WITH_CUDA", "1"))
    if rocm:
        flags.nvcc = ["-O3", "-std=c++17", "-ffp-contract=off"]
        flags.nvcc += [f"--offload-arch={a}" for a in (rocm_archs or "").replace(",", ";").split(";") if a]
        flags.libraries = ["hiprand"] if link_curand else []
        return flags
    flags.nvcc = ["-O3", "-std=c++17", "--fmad=false", "--expt-relaxed-constexpr"]
    # The CUDA runtime is linked statically so the same binary imports on a
    # machine with no CUDA installed (CPU users) and under any CUDA torch.
    flags.libraries = ["cudart_static", "rt", "dl"]
    if link_curand:
        flags.link_args = ["-Wl,--as-needed", *QuantizerBuilder().extra_ldflags(), "-Wl,--no-as-needed"]
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

    def cuda_arch_list(self) -> str:
        return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
