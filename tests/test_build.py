"""The build description (one source of truth for setup.py and the DeepSpeed builder),
the ROCm/CUDA flag branches, the build defaults, and what the built ``qkit._C`` depends on:
only torch's stable C shim, the limited Python API and the C/C++ runtime, no CUDA library,
and which glibc it needs."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import torch

import elf_audit
import qkit
from qkit import _builder, _loader

ROOT = Path(__file__).resolve().parents[1]
BINUTILS = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("nm", "readelf", "c++filt")), reason="needs binutils (nm, readelf)"
)


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
    flags = _builder.extension_flags(with_cuda=True, nvcc_threads=3)
    assert ("QKIT_WITH_CUDA", "1") in flags.define_macros
    assert ("QKIT_ROCM", "1") not in flags.define_macros
    assert "--fmad=false" in flags.nvcc  # GPU rounds every step like the CPU
    assert "--threads=3" in flags.nvcc and "-Xcompiler=-fvisibility=hidden" in flags.nvcc
    assert "cudart_static" in flags.libraries and "cudart" not in flags.libraries
    assert "-Wl,--exclude-libs,ALL" in flags.link_args  # cudart_static's symbols stay inside _C
    # -lcurand only ever linked as-needed: never a load-time dependency.
    i = flags.link_args.index("-lcurand")
    assert flags.link_args[i - 1] == "-Wl,--as-needed"


def test_cuda_flags_without_curand() -> None:
    flags = _builder.extension_flags(with_cuda=True, link_curand=False)
    assert "-lcurand" not in flags.link_args


def test_rocm_flags_drop_curand_and_take_offload_archs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_builder.QuantizerBuilder, "is_rocm_pytorch", lambda self: True)
    assert _builder.QuantizerBuilder().extra_ldflags() == []
    flags = _builder.extension_flags(with_cuda=True, rocm=True, rocm_archs="gfx90a;gfx942", nvcc_threads=4)
    everything = [*flags.cxx, *flags.nvcc, *flags.libraries, *flags.link_args]
    assert not any("curand" in f or "cudart" in f for f in everything)
    assert ("QKIT_WITH_CUDA", "1") in flags.define_macros and ("QKIT_ROCM", "1") in flags.define_macros
    offload = [f for f in flags.nvcc if f.startswith("--offload-arch")]
    assert offload == ["--offload-arch=gfx90a", "--offload-arch=gfx942"]
    # hipcc takes clang flags: none of nvcc's spellings.
    assert not [f for f in flags.nvcc if f.startswith(("--fmad", "--expt-", "-Xcompiler", "--threads"))]
    assert "-ffp-contract=off" in flags.nvcc  # the same no-FMA rule, clang's spelling
    # hiprand replaces curand, linked as-needed like curand on CUDA.
    i = flags.link_args.index("-lhiprand")
    assert flags.link_args[i - 1] == "-Wl,--as-needed"
    assert _builder.extension_flags(with_cuda=True, rocm=True, rocm_archs="gfx90a", link_curand=False).link_args == []
    # PYTORCH_ROCM_ARCH may also be comma-separated, and empty.
    comma = _builder.extension_flags(with_cuda=True, rocm=True, rocm_archs="gfx1100,gfx1201")
    assert "--offload-arch=gfx1201" in comma.nvcc
    assert not [f for f in _builder.extension_flags(with_cuda=True, rocm=True).nvcc if "offload" in f]


def test_sources_survive_hipify(tmp_path: Path) -> None:
    """torch's hipify (what BuildExtension runs under ROCm) leaves nothing CUDA-only behind.

    The hipified host files are compile-checked with this machine's C++ compiler; the
    hipified kernel file needs hipcc, which CI does not have (so it is checked by text only).
    """
    hipify_python = pytest.importorskip("torch.utils.hipify.hipify_python")
    from torch.utils.hipify.cuda_to_hip_mappings import MATH_TRANSPILATIONS

    for folder in ("src", "kernels", "include"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    cuda_sources = [tmp_path / s for s in _builder.CUDA_SOURCES]
    for source in cuda_sources:
        text = source.read_text()
        # hipify turns std::min( into ::min( in CUDA files, which HIP lacks on the host.
        assert not [f for f in MATH_TRANSPILATIONS if f"{f}(" in text], source
    results = hipify_python.hipify(
        project_directory=str(tmp_path),
        output_directory=str(tmp_path),
        includes=[str(tmp_path / "*")],
        is_pytorch_extension=True,
        show_detailed=False,
        show_progress=False,
    )
    hipified = {Path(r.hipified_path) for r in results.values() if r.hipified_path}
    kernels = [p for p in hipified if p.suffix == ".hip"]
    assert len(kernels) == len(cuda_sources)
    for path in hipified:
        code = re.sub(r"//.*", "", path.read_text())
        assert not re.search(r"\bcuda(Stream_t|Error_t|GetLastError|Success)\b|cuda_runtime\.h", code), path
    assert "hip/hip_runtime.h" in kernels[0].read_text()
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler to check the hipified host sources")
    torch_include = Path(torch.__file__).parent / "include"
    defines = [f"-D{k}={v}" for k, v in _builder.extension_flags(with_cuda=True, rocm=True).define_macros]
    defines += ["-DUSE_ROCM=1", "-D__HIP_PLATFORM_AMD__=1"]  # what torch adds for HIP extensions
    includes = [f"-I{tmp_path / 'include'}", f"-I{torch_include}", f"-I{sysconfig.get_paths()['include']}"]
    for path in sorted(p for p in hipified if p.suffix == ".cpp"):
        done = subprocess.run(
            [compiler, "-std=c++17", "-fsyntax-only", *defines, *includes, str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{path.name}:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize(
    "cuda_version,expected",
    [
        ("13.0", "8.0;8.6;9.0;10.0;12.0+PTX"),
        ("12.8", "8.0;8.6;9.0;10.0;12.0+PTX"),
        ("12.9.1", "8.0;8.6;9.0;10.0;12.0+PTX"),
        ("12.6", "8.0;8.6;9.0+PTX"),  # no Blackwell before CUDA 12.8
        ("11.8", "8.0;8.6;9.0+PTX"),
        (None, _builder.DEFAULT_CUDA_ARCHS),
    ],
)
def test_default_arch_list_per_cuda_version(cuda_version: str | None, expected: str) -> None:
    assert _builder.default_cuda_archs(cuda_version) == expected
    assert expected.endswith("+PTX") and expected.count("+PTX") == 1  # PTX for the newest only


def test_arch_list_env_wins_and_old_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _builder.QuantizerBuilder().cuda_arch_list("12.6") == "9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert _builder.QuantizerBuilder().cuda_arch_list("12.6") == "8.0;8.6;9.0+PTX"
    with pytest.raises(ValueError, match="too old"):
        _builder.default_cuda_archs("11.0")
    assert _builder.count_archs("8.0;8.6;9.0;10.0;12.0+PTX") == 6


def test_max_jobs_default_and_override() -> None:
    gib = 1 << 30
    assert _builder.default_max_jobs(16, 128 * gib) == 16  # cores bound
    assert _builder.default_max_jobs(16, 8 * gib) == 2  # memory bound (3 GiB a job)
    assert _builder.default_max_jobs(2, 1 * gib) == 1  # never zero
    assert _builder.default_max_jobs(None, None) == 1
    assert _builder.max_jobs({"MAX_JOBS": "7"}) == 7
    assert _builder.max_jobs({"MAX_JOBS": "0"}) >= 1  # not a usable value: the default
    assert _builder.max_jobs({}) >= 1


def test_build_record_matches_the_loaded_module() -> None:
    record = _loader.build_record()
    assert record is not None, "setup.py writes python/qkit/_build_info.json"
    assert record["torch_target"] == "2.10"
    assert _loader.load() is not None
    if os.environ.get("QKIT_EXPECT_CUDA_BUILD") == "1":
        assert record["cuda_kernels"], "CI builds the CUDA kernels; the record says they were not"


def _extension() -> Path:
    assert _loader.load() is not None, _loader.load_error()
    return Path(qkit._C.__file__)


@BINUTILS
def test_extension_needs_no_cuda_library_at_load_time() -> None:
    needed = elf_audit.needed_libraries(_extension())
    assert not [lib for lib in needed if re.match(r"lib(cudart|cuda|curand|torch_cuda|c10_cuda|hip|amdhip)", lib)]
    assert not [lib for lib in needed if lib.startswith(("libpython", "libtorch_python"))], needed


@BINUTILS
def test_extension_imports_only_the_stable_surface() -> None:
    """Every undefined symbol is torch's stable C shim, the limited Python API or the C/C++ runtime."""
    report = elf_audit.audit(_extension())
    assert report.get("forbidden", []) == []
    assert report["torch C shim"] and report["limited Python API"] == ["PyModule_Create2"]


@BINUTILS
def test_torch_symbols_are_declared_by_the_c_shim_headers() -> None:
    """The torch symbols _C imports are C functions of torch's stable shim headers (not internals)."""
    include = Path(torch.__file__).parent / "include" / "torch" / "csrc"
    headers = [include / "stable" / "c" / "shim.h", *sorted((include / "inductor" / "aoti_torch" / "c").glob("*.h"))]
    declared = "\n".join(h.read_text() for h in headers if h.exists())
    used = elf_audit.audit(_extension())["torch C shim"]
    assert [name for name in used if not re.search(rf"\b{name}\b", declared)] == []


@pytest.mark.parametrize(
    "name,version,weak",
    [
        ("_ZN3c106detail14torchCheckFailEPKcS2_jRKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE", None, False),
        ("_ZN2at6TensorD1Ev", None, False),
        ("_ZN5torch7Library4implEv", None, False),
        ("_ZN8pybind116handle8dec_refEv", None, False),
        ("_Py_Dealloc", None, False),
        ("PyLong_FromLong", None, False),  # limited API, but not one _C is known to use
        ("cudaLaunchKernel", "libcudart.so.13", False),
        ("cudaMalloc", None, False),
        ("__gmon_start__", None, False),  # only ever weak
    ],
)
def test_classifier_rejects_what_breaks_the_abi_claims(name: str, version: str | None, weak: bool) -> None:
    symbol = elf_audit.Symbol(name, version, weak)
    pretty = elf_audit.demangle([name])[0] if shutil.which("c++filt") else name
    assert elf_audit.classify(symbol, pretty) is None


STD_PREFIXES = ("std::", "typeinfo for std::", "typeinfo name for std::", "vtable for std::", "void std::")


@BINUTILS
def test_extension_exports_only_its_init() -> None:
    exported = elf_audit.defined_symbols(_extension())
    linker = {"_edata", "_end", "__bss_start", "_init", "_fini"}
    pretty = elf_audit.demangle(exported)
    ours = [n for n, p in zip(exported, pretty, strict=True) if n not in linker and not p.startswith(STD_PREFIXES)]
    assert ours == ["PyInit__C"]


def _claimed_manylinux() -> tuple[int, int] | None:
    """The glibc floor the running _C claims: the manylinux container's target, or the installed wheel's tag."""
    tags = [os.environ.get("AUDITWHEEL_PLAT", "")]
    with contextlib.suppress(metadata.PackageNotFoundError):
        tags += (metadata.distribution("qkit").read_text("WHEEL") or "").splitlines()
    for tag in tags:
        found = re.search(r"manylinux_(\d+)_(\d+)_", tag)
        if found:
            return int(found.group(1)), int(found.group(2))
        if re.search(r"manylinux2014_", tag):
            return 2, 17
    return None


@BINUTILS
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc systems only")
def test_glibc_requirement_fits_what_is_claimed() -> None:
    """The newest glibc _C needs is within its manylinux tag (when it has one) and this system's glibc.

    A _C linked against this Debian 12 machine's own glibc needs 2.34 (libc's dlopen/pthread
    symbols since 2.34, libstdc++'s __libc_single_threaded since 2.32); the release wheel is
    linked against glibc 2.28's stubs instead (ci/glibc_stubs.sh) and needs at most 2.28.
    Installed from a wheel, _C is held to the wheel's tag; in a manylinux container (or
    under ci/build_wheel.sh), to AUDITWHEEL_PLAT.
    """
    so = _extension()
    needed = elf_audit.required_versions(so).get("GLIBC")
    assert needed is not None
    need = tuple(int(p) for p in needed.split(".")[:2])
    have = tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2])
    assert need <= have
    claimed = _claimed_manylinux()
    if claimed is not None:
        newer = elf_audit.glibc_symbols_newer_than(so, claimed)
        assert newer == [], f"_C claims manylinux_{claimed[0]}_{claimed[1]} but needs: {newer}"


LD_SO = Path("/lib64/ld-linux-x86-64.so.2") if platform.machine() == "x86_64" else Path("/lib/ld-linux-aarch64.so.1")
NO_CUDART_SCRIPT = """
import ctypes, sys
for name in ["libcudart.so"] + [f"libcudart.so.{v}" for v in range(10, 16)]:
    try:
        ctypes.CDLL(name)
    except OSError:
        continue
    print("libcudart is still findable:", name)
    sys.exit(3)
import torch, qkit
assert qkit._loader.load_error() is None, qkit._loader.load_error()
assert qkit._loader.build_record()["cuda_kernels"], "not a CUDA-enabled build"
x = torch.randn(128, 64)
q, p = qkit.quantize(x, 128, 8)
assert torch.equal(qkit.dequantize(q, p, dtype=torch.float32), qkit.fake_quantize(x, 128, 8))
maps = open("/proc/self/maps").read()
assert "libcudart" not in maps and "libcuda.so" not in maps, "a CUDA library was loaded"
print("ok")
"""


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch loads libcudart itself")
@pytest.mark.skipif(not LD_SO.exists(), reason="needs glibc's dynamic loader to hide the ld.so cache")
def test_cuda_build_imports_with_no_libcudart_on_the_loader_path() -> None:
    """The CUDA-enabled _C imports and runs its CPU ops where no CUDA runtime can be found at all.

    The process runs under ld.so --inhibit-cache with LD_LIBRARY_PATH and CUDA_HOME
    removed, so a libcudart installed outside the default library directories (as
    CUDA toolkits are) cannot be found; the script proves that first.
    """
    record = _loader.build_record() or {}
    if not record.get("cuda_kernels"):
        assert os.environ.get("QKIT_EXPECT_CUDA_BUILD") != "1", "CI builds the CUDA kernels"
        pytest.skip("this qkit was built without CUDA kernels")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "cuda" not in p.lower())
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [str(LD_SO), "--inhibit-cache", sys.executable, "-c", NO_CUDART_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(done.stdout.strip() + " (installed in a default library directory)")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_glibc_stub_link_args_bind_libc_to_the_stubs() -> None:
    flags = _builder.extension_flags(with_cuda=True, glibc_stubs="/stubs")
    assert ("QKIT_GLIBC_STUBS", "1") in flags.define_macros
    assert flags.link_args[0] == "-Wl,--exclude-libs,ALL"
    assert "-L/stubs" in flags.link_args and "-Wl,-rpath-link,/stubs" in flags.link_args
    # Before glibc 2.34 the static CUDA runtime's dlopen/pthread_*/shm_open lived in these.
    for lib in ("-lpthread", "-ldl", "-lrt"):
        assert lib in flags.link_args
    cpu = _builder.extension_flags(with_cuda=False, glibc_stubs="/stubs")
    assert "-L/stubs" in cpu.link_args and ("QKIT_GLIBC_STUBS", "1") in cpu.define_macros
    assert not any("stubs" in arg for arg in _builder.extension_flags(with_cuda=True).link_args)


@BINUTILS
def test_built_with_glibc_stubs_needs_no_newer_glibc() -> None:
    """A _C the build record says was linked against glibc stubs needs no newer glibc than theirs."""
    record = _loader.build_record() or {}
    stubs = re.match(r"glibc (\d+)\.(\d+) \(stubs\)", str(record.get("link_libc") or ""))
    if stubs is None:
        pytest.skip("this _C was linked against the build machine's own glibc")
    limit = (int(stubs.group(1)), int(stubs.group(2)))
    assert elf_audit.glibc_symbols_newer_than(_extension(), limit) == []
