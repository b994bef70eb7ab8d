"""Builds the one compiled extension ``qkit._C`` (ahead of time, never on import).

CUDA kernels are built when a CUDA toolkit is found (``CUDA_HOME`` or ``nvcc`` on
PATH; ``QKIT_BUILD_CUDA=0/1`` overrides) and linked against the static CUDA
runtime, so the same binary also runs where there is no GPU at all. The source
list and flags come from ``python/qkit/_builder.py``.

Environment: ``QKIT_BUILD_CUDA=0/1``, ``QKIT_GLIBC_STUBS`` (link against an old glibc's
stubs: the manylinux_2_28 release wheel, docs/release-wheel.md), ``TORCH_CUDA_ARCH_LIST`` (default: per CUDA
version, see ``_builder.CUDA_ARCHS_BY_VERSION``), ``PYTORCH_ROCM_ARCH`` (ROCm),
``MAX_JOBS`` (default: from cores and memory; also caps nvcc ``--threads``).
ninja is required.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from setuptools import find_packages, setup
from setuptools.command.sdist import sdist
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
#: Written into an sdist (which has no .git) so builds from it still know their revision.
REVISION_FILE = "GIT_REVISION"


def _load_builder():
    spec = importlib.util.spec_from_file_location("_qkit_builder", ROOT / "python" / "qkit" / "_builder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


builder_mod = _load_builder()
builder = builder_mod.QuantizerBuilder()


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    for candidate in ("/usr/local/cuda",):
        if (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _cuda_has_library(cuda_home: str | None, name: str) -> bool:
    if cuda_home is None:
        return False
    return any((Path(cuda_home) / d / f"lib{name}.so").exists() for d in ("lib64", "lib", "targets/x86_64-linux/lib"))


def _nvcc_version(cuda_home: str | None) -> str | None:
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        return None
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def _want_cuda(rocm: bool, cuda_home: str | None) -> bool:
    forced = os.environ.get("QKIT_BUILD_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return rocm or cuda_home is not None


def _git_revision() -> str | None:
    """The commit this tree is at (``+dirty`` with uncommitted changes), or the sdist's record of it."""
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        if Path(top).resolve() == ROOT:  # not some enclosing repository an sdist was unpacked into
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    recorded = ROOT / REVISION_FILE
    if recorded.exists():
        return recorded.read_text().strip() or None
    return None


def _require_ninja() -> None:
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(
            "qkit builds with ninja, which was not found: `pip install ninja` (an isolated build "
            "installs it from pyproject.toml's build requirements)"
        )


def _tolerate_cuda_major_mismatch() -> None:
    """Let a CUDA build of torch build qkit with another CUDA major version.

    torch refuses to build a CUDA extension whose nvcc major version differs from its
    own CUDA's, because such an extension would normally share torch's CUDA runtime.
    ``qkit._C`` links its own runtime statically and uses none of torch's CUDA
    libraries (streams cross as plain handles), so the mismatch is harmless here.
    """
    check = getattr(cpp_extension, "_check_cuda_version", None)
    mismatch = getattr(cpp_extension, "CUDA_MISMATCH_MESSAGE", None)
    if check is None or mismatch is None:
        return

    def tolerant(*args: Any, **kwargs: Any) -> None:
        try:
            check(*args, **kwargs)
        except RuntimeError as error:
            if not error.args or error.args[0] != mismatch:
                raise
            print(f"qkit: {mismatch % error.args[1:]} (harmless: qkit links its own CUDA runtime)", file=sys.stderr)

    cpp_extension._check_cuda_version = tolerant


def _configure() -> dict[str, Any]:
    """Everything about this build that is decided before compiling (and recorded after)."""
    import torch

    rocm = getattr(torch.version, "hip", None) is not None
    cuda_home = _find_cuda_home()
    with_cuda = _want_cuda(rocm, cuda_home)
    if with_cuda and not rocm and _nvcc_version(cuda_home) is None:
        raise RuntimeError(
            "QKIT_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found: set CUDA_HOME, or QKIT_BUILD_CUDA=0 for CPU only"
        )
    cuda_version = _nvcc_version(cuda_home) if with_cuda and not rocm else None
    glibc_stubs = os.environ.get("QKIT_GLIBC_STUBS") or None
    if glibc_stubs and not (Path(glibc_stubs) / "libc.so").exists():
        raise RuntimeError(f"QKIT_GLIBC_STUBS={glibc_stubs} holds no libc.so stub: make it with ci/glibc_stubs.sh")
    jobs = builder_mod.max_jobs()
    # torch's BuildExtension reads MAX_JOBS for ninja's -j.
    os.environ["MAX_JOBS"] = str(jobs)
    arch_list = None
    if with_cuda and not rocm:
        arch_list = builder.cuda_arch_list(cuda_version)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return {
        "rocm": rocm,
        "cuda_home": cuda_home,
        "with_cuda": with_cuda,
        "cuda_version": cuda_version,
        "arch_list": arch_list,
        "max_jobs": jobs,
        "glibc_stubs": glibc_stubs,
        "nvcc_threads": min(jobs, builder_mod.count_archs(arch_list)) if arch_list else 1,
    }


def _stub_glibc(stubs: str | None) -> str | None:
    """``"glibc 2.28 (stubs)"`` for a stub directory made by ci/glibc_stubs.sh, else None."""
    if not stubs:
        return None
    found = re.search(
        r"gnu\.(\d+\.\d+)", (Path(stubs) / "MADE_BY").read_text() if (Path(stubs) / "MADE_BY").exists() else ""
    )
    return f"glibc {found.group(1) if found else '?'} (stubs)"


def _build_record(config: dict[str, Any]) -> dict[str, Any]:
    import torch

    with_cuda, rocm = config["with_cuda"], config["rocm"]
    libc, libc_version = platform.libc_ver()
    return {
        "qkit_version": VERSION,
        "torch_target": ".".join(map(str, builder_mod.TORCH_TARGET)),
        "python_target": ".".join(map(str, builder_mod.PYTHON_TARGET)),
        "built_with_torch": torch.__version__,
        "platform": sys.platform,
        "machine": platform.machine(),
        "build_libc": f"{libc} {libc_version}".strip() or None,
        # The glibc _C was linked against when not this machine's (ci/glibc_stubs.sh).
        "link_libc": _stub_glibc(config["glibc_stubs"]),
        "cpu_kernels": True,
        "cuda_kernels": with_cuda and not rocm,
        "rocm_kernels": with_cuda and rocm,
        "cuda_version": config["cuda_version"],
        "cuda_runtime": "static" if with_cuda and not rocm else None,
        "cuda_arch_list": config["arch_list"],
        "rocm_arch_list": os.environ.get("PYTORCH_ROCM_ARCH") if rocm else None,
        "git_revision": _git_revision(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _extension(config: dict[str, Any]):
    rocm, cuda_home, with_cuda = config["rocm"], config["cuda_home"], config["with_cuda"]
    # DeepSpeed's -lcurand contract, kept where the toolkit has cuRAND (minimal
    # toolkits do not; the kernels never call it either way).
    link_curand = rocm or _cuda_has_library(cuda_home, "curand")
    flags = builder_mod.extension_flags(
        with_cuda=with_cuda,
        rocm=rocm,
        rocm_archs=os.environ.get("PYTORCH_ROCM_ARCH"),
        link_curand=link_curand,
        nvcc_threads=config["nvcc_threads"],
        glibc_stubs=config["glibc_stubs"],
    )
    sources = builder.sources() if with_cuda else builder_mod.CPU_SOURCES
    common = dict(
        name="qkit._C",
        sources=sources,
        include_dirs=[str(ROOT / d) for d in builder.include_paths()],
        define_macros=flags.define_macros,
        extra_compile_args={"cxx": flags.cxx, "nvcc": flags.nvcc},
        extra_link_args=flags.link_args,
        py_limited_api=True,
    )
    if not with_cuda:
        return cpp_extension.CppExtension(**common)
    if not rocm:
        # A CPU build of torch does not look for a toolkit; point it at ours.
        cpp_extension.CUDA_HOME = cuda_home
        _tolerate_cuda_major_mismatch()
    ext = cpp_extension.CUDAExtension(**common)
    # torch adds its own CUDA libraries; _C needs none of them (the current
    # stream is looked up at run time), only the static runtime.
    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]
    ext.libraries += [lib for lib in flags.libraries if lib not in ext.libraries]
    if not rocm:
        ext.library_dirs.append(str(Path(cuda_home) / "lib64"))
    return ext


CONFIG = _configure()


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with ninja required, and the build record written beside ``_C``."""

    def run(self) -> None:
        _require_ninja()
        kind = (
            "CPU only" if not CONFIG["with_cuda"] else ("ROCm" if CONFIG["rocm"] else f"CUDA {CONFIG['cuda_version']}")
        )
        detail = (
            f", archs {CONFIG['arch_list']}, nvcc --threads={CONFIG['nvcc_threads']}" if CONFIG["arch_list"] else ""
        )
        print(f"qkit: building _C ({kind}{detail}, MAX_JOBS={CONFIG['max_jobs']})", file=sys.stderr)
        super().run()
        # In place (editable installs) the record sits beside the source tree's _C;
        # otherwise in the build tree that becomes the wheel.
        package = ROOT / "python" / "qkit" if self.inplace else Path(self.build_lib) / "qkit"
        package.mkdir(parents=True, exist_ok=True)
        (package / "_build_info.json").write_text(json.dumps(_build_record(CONFIG), indent=2) + "\n")


class Sdist(sdist):
    """An sdist that remembers the git revision it was made from (it ships no .git)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        revision = _git_revision()
        if revision:
            target = Path(base_dir) / REVISION_FILE
            target.unlink(missing_ok=True)  # may be a hard link to the source tree's copy
            target.write_text(revision + "\n")


setup(
    version=VERSION,
    packages=find_packages("python"),
    package_dir={"": "python"},
    package_data={"qkit": ["_build_info.json", "py.typed"]},
    ext_modules=[_extension(CONFIG)],
    cmdclass={"build_ext": BuildExtension, "sdist": Sdist},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
