"""The build description (one source of truth for setup.py and the DeepSpeed builder),
the ROCm/CUDA flag branches, and what the built ``qkit._C`` depends on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import qkit
from qkit import _builder, _loader

ROOT = Path(__file__).resolve().parents[1]


def test_sources_are_exactly_the_tree() -> None:
    listed = set(_builder.QuantizerBuilder().sources())
    on_disk = {
        str(p.relative_to(ROOT))
        for folder in ("src", "kernels")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".cpp", ".cu")
    }
    assert listed == on_disk
    assert all((ROOT / inc).is_dir() for inc in _builder.QuantizerBuilder().include_paths())


def test_torch_target_macro_encodes_2_10() -> None:
    assert _builder.torch_target_macro() == "0x020a000000000000ULL"


def test_cpu_flags_have_no_gpu_parts() -> None:
    flags = _builder.extension_flags(with_cuda=False)
    assert flags.nvcc == [] and flags.libraries == [] and flags.link_args == []
    assert ("QKIT_WITH_CUDA", "1") not in flags.define_macros
    assert "-ffp-contract=off" in flags.cxx


def test_cuda_flags_link_static_runtime_and_keep_curand_contract() -> None:
    flags = _builder.extension_flags(with_cuda=True)
    assert ("QKIT_WITH_CUDA", "1") in flags.define_macros
    assert "--fmad=false" in flags.nvcc  # GPU rounds every step like the CPU
    assert "cudart_static" in flags.libraries and "cudart" not in flags.libraries
    # -lcurand only ever linked as-needed: never a load-time dependency.
    i = flags.link_args.index("-lcurand")
    assert flags.link_args[i - 1] == "-Wl,--as-needed"


def test_cuda_flags_without_curand() -> None:
    flags = _builder.extension_flags(with_cuda=True, link_curand=False)
    assert "-lcurand" not in flags.link_args


def test_rocm_flags_drop_curand_and_take_offload_archs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_builder.QuantizerBuilder, "is_rocm_pytorch", lambda self: True)
    assert _builder.QuantizerBuilder().extra_ldflags() == []
    flags = _builder.extension_flags(with_cuda=True, rocm=True, rocm_archs="gfx90a;gfx942")
    everything = [*flags.cxx, *flags.nvcc, *flags.libraries, *flags.link_args]
    assert not any("curand" in f for f in everything)
    assert "--offload-arch=gfx90a" in flags.nvcc and "--offload-arch=gfx942" in flags.nvcc
    assert "--fmad=false" not in flags.nvcc  # nvcc-only spelling


def test_build_record_matches_the_loaded_module() -> None:
    record = _loader.build_record()
    assert record is not None, "setup.py writes python/qkit/_build_info.json"
    assert record["torch_target"] == "2.10"
    assert _loader.load() is not None
    if os.environ.get("QKIT_EXPECT_CUDA_BUILD") == "1":
        assert record["cuda_kernels"], "CI builds the CUDA kernels; the record says they were not"


def _elf_needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
def test_extension_needs_no_cuda_library_at_load_time() -> None:
    so = Path(qkit._C.__file__)
    needed = _elf_needed(so)
    assert not [lib for lib in needed if re.match(r"lib(cudart|cuda|curand|torch_cuda|c10_cuda)\b", lib)], needed


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_extension_uses_only_torch_stable_c_abi() -> None:
    so = Path(qkit._C.__file__)
    out = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True)
    symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    # Mangled C++ symbols of torch (at::, c10::, torch::) or pybind11 would tie the
    # binary to one torch version.
    forbidden = [s for s in symbols if re.match(r"_Z\w*(N?(2at|3c10|5torch|8pybind11))", s)]
    assert forbidden == []
