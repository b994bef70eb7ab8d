"""Builds the one compiled extension ``qkit._C`` (ahead of time, never on import).

CUDA kernels are built when a CUDA toolkit is found (``CUDA_HOME`` or ``nvcc`` on
PATH; ``QKIT_BUILD_CUDA=0/1`` overrides) and linked against the static CUDA
runtime, so the same binary also runs where there is no GPU at all. The source
list and flags come from ``python/qkit/_builder.py``.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent


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


def _want_cuda(rocm: bool, cuda_home: str | None) -> bool:
    forced = os.environ.get("QKIT_BUILD_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return rocm or cuda_home is not None


def _write_build_record(with_cuda: bool, rocm: bool, cuda_home: str | None) -> None:
    import torch

    cuda_version = None
    if with_cuda and not rocm and cuda_home:
        nvcc = Path(cuda_home) / "bin" / "nvcc"
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"release (\d+\.\d+)", out)
        cuda_version = found.group(1) if found else None
    record = {
        "qkit_version": VERSION,
        "torch_target": ".".join(map(str, builder_mod.TORCH_TARGET)),
        "python_target": ".".join(map(str, builder_mod.PYTHON_TARGET)),
        "built_with_torch": torch.__version__,
        "platform": sys.platform,
        "cuda_kernels": with_cuda and not rocm,
        "rocm_kernels": with_cuda and rocm,
        "cuda_version": cuda_version,
        "cuda_arch_list": builder.cuda_arch_list() if with_cuda and not rocm else None,
        "rocm_arch_list": os.environ.get("PYTORCH_ROCM_ARCH") if rocm else None,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (ROOT / "python" / "qkit" / "_build_info.json").write_text(json.dumps(record, indent=2) + "\n")


def _extension():
    import torch

    rocm = getattr(torch.version, "hip", None) is not None
    cuda_home = _find_cuda_home()
    with_cuda = _want_cuda(rocm, cuda_home)
    # DeepSpeed's -lcurand contract, kept where the toolkit has cuRAND (minimal
    # toolkits do not; the kernels never call it either way).
    link_curand = rocm or _cuda_has_library(cuda_home, "curand")
    flags = builder_mod.extension_flags(
        with_cuda=with_cuda, rocm=rocm, rocm_archs=os.environ.get("PYTORCH_ROCM_ARCH"), link_curand=link_curand
    )
    _write_build_record(with_cuda, rocm, cuda_home)
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
        if cuda_home is None:
            raise RuntimeError("QKIT_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        # A CPU build of torch does not look for a toolkit; point it at ours.
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", builder.cuda_arch_list())
    ext = cpp_extension.CUDAExtension(**common)
    # torch adds its own CUDA libraries; _C needs none of them (the current
    # stream is looked up at run time), only the static runtime.
    ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]
    ext.libraries += [lib for lib in flags.libraries if lib not in ext.libraries]
    if not rocm:
        ext.library_dirs.append(str(Path(cuda_home) / "lib64"))
    return ext


VERSION = "0.1.0"

setup(
    version=VERSION,
    packages=find_packages("python"),
    package_dir={"": "python"},
    package_data={"qkit": ["_build_info.json", "py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
