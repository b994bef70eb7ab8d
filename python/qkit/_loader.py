"""Loads ``qkit._C`` once, and explains a failure instead of hiding it.

If the compiled module cannot be loaded, ``import qkit`` still succeeds (so
``python -m qkit.info`` and the pure-Python parts work) and the first op call
raises :class:`QkitLoadError` saying what was built, what is running, and what
to do about it. ``QKIT_SKIP_EXTENSION=1`` skips loading on purpose (the same
error then says so).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import sys
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

#: Set to 1 to import qkit without loading ``qkit._C`` (ops then raise QkitLoadError).
SKIP_ENV = "QKIT_SKIP_EXTENSION"


class QkitLoadError(RuntimeError):
    """The compiled kernels (``qkit._C``) could not be loaded in this process."""


def skip_requested() -> bool:
    """Whether ``QKIT_SKIP_EXTENSION`` asks not to load ``qkit._C``."""
    return os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def build_record() -> dict[str, Any] | None:
    """How ``qkit._C`` was built (written by ``setup.py``), or None if unknown."""
    try:
        text = resources.files("qkit").joinpath("_build_info.json").read_text()
    except (FileNotFoundError, OSError):
        return None
    return json.loads(text)


def runtime_record() -> dict[str, Any]:
    """What this process has: Python, torch, its CUDA/ROCm, the GPUs it sees."""
    cuda_ok = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda_ok else 0
    return {
        "python": platform.python_version(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "libc": " ".join(platform.libc_ver()).strip() or None,
        "wheel_tags": wheel_tags(),
        "cuda_available": cuda_ok,
        "gpus": [torch.cuda.get_device_name(i) for i in range(count)],
        "gpu_capabilities": [".".join(map(str, torch.cuda.get_device_capability(i))) for i in range(count)],
    }


def wheel_tags() -> list[str]:
    """The tags of the wheel this qkit was installed from (its ``dist-info/WHEEL``), e.g.
    ``["cp310-abi3-manylinux_2_28_x86_64"]``; empty when this qkit is not such an install
    (a source tree on ``sys.path``, or metadata that belongs to another copy)."""
    try:
        dist = metadata.distribution("qkit")
        here = Path(__file__).resolve().parent / "__init__.py"
        if Path(str(dist.locate_file("qkit/__init__.py"))).resolve() != here:
            return []
        text = dist.read_text("WHEEL") or ""
    except (metadata.PackageNotFoundError, OSError):
        return []
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


#: glibc of the legacy manylinux tags (PEP 600 tags carry theirs: manylinux_2_28).
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def glibc_of_tag(tag: str) -> tuple[int, int] | None:
    """The glibc a wheel tag (or just its platform part) requires, None for a non-manylinux tag."""
    found = re.search(r"manylinux_(\d+)_(\d+)_", tag)
    if found:
        return int(found.group(1)), int(found.group(2))
    for legacy, glibc in LEGACY_MANYLINUX.items():
        if re.search(rf"(^|-|\.){legacy}_", tag):
            return glibc
    return None


def version_tuple(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``2.13.0+cpu``, or None."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def build_mismatches(built: dict[str, Any], running: dict[str, Any]) -> list[str]:
    """Where a build record cannot fit the running process, each with what to do.

    Args:
        built: :func:`build_record`.
        running: needs ``torch``, ``platform`` and ``machine`` as in :func:`runtime_record`.
    """
    found = []
    target = version_tuple(str(built.get("torch_target", "")))
    have = version_tuple(str(running["torch"]))
    if target and have and have < target:
        found.append(
            f"torch {running['torch']} is older than this build's target: upgrade torch to >= "
            f"{built['torch_target']} (this build's stable-ABI floor): pip install --upgrade 'torch>="
            f"{built['torch_target']}'"
        )
    glibc_problem = glibc_mismatch(running)
    if glibc_problem:
        found.append(glibc_problem)
    built_machine = built.get("machine", running["machine"])
    if built.get("platform", running["platform"]) != running["platform"] or built_machine != running["machine"]:
        found.append(
            f"this build is for {built.get('platform')}/{built_machine}, running on "
            f"{running['platform']}/{running['machine']}: install the wheel for {running['platform']}/"
            f"{running['machine']}"
        )
    return found


def glibc_mismatch(running: dict[str, Any]) -> str | None:
    """One line of what to do when this system's glibc is older than the installed wheel's tag allows.

    Args:
        running: needs ``libc`` (``"glibc 2.27"``) and ``wheel_tags`` as in :func:`runtime_record`.
    """
    libc = str(running.get("libc") or "")
    have = version_tuple(libc.removeprefix("glibc").strip()) if libc.startswith("glibc") else None
    for tag in running.get("wheel_tags") or []:
        need = glibc_of_tag(tag)
        if have and need and have < need:
            need_text = ".".join(map(str, need))
            return (
                f"this system's glibc {'.'.join(map(str, have))} is older than the glibc {need_text} the installed "
                f"wheel ({tag}) needs: build qkit from source here (pip install --no-binary qkit "
                f"--no-build-isolation qkit, with torch and a C++17 compiler installed), or run on glibc >= {need_text}"
            )
    return None


def fit_problems(built: dict[str, Any] | None, running: dict[str, Any]) -> list[str]:
    """:func:`build_mismatches` (or, without a build record, only the glibc check): each one line."""
    if built is not None:
        return build_mismatches(built, running)
    problem = glibc_mismatch(running)
    return [problem] if problem else []


def _hint(error: BaseException, built: dict[str, Any] | None) -> str:
    """What to do about one load failure: the specific cause where the message shows it."""
    text = str(error)
    reinstall = (
        "reinstall qkit (pip install --force-reinstall qkit), or build it here: pip install --no-build-isolation ."
    )
    here = {
        "torch": torch.__version__,
        "platform": sys.platform,
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()).strip() or None,
        "wheel_tags": wheel_tags(),
    }
    problems = fit_problems(built, here)
    if problems:
        return problems[0]
    glibc = re.search(r"GLIBC(?:XX)?_[\d.]+", text)
    if glibc:
        libc = " ".join(platform.libc_ver()).strip() or "an older C library"
        return (
            f"_C needs {glibc.group(0)} but this system has {libc}: install qkit's manylinux_2_28 wheel (glibc "
            "2.28 and newer), or build from source on this machine: pip install --no-build-isolation ."
        )
    missing_lib = re.search(r"(lib[\w.+-]+\.so[.\d]*): cannot open shared object file", text)
    if missing_lib:
        lib = missing_lib.group(1)
        if lib.startswith(("libcuda", "libcurand", "libc10_cuda", "libtorch_cuda")):
            return (
                f"this _C was linked against {lib}, which qkit's own builds never are (they link the CUDA runtime "
                f"statically): it was built by something else; {reinstall}"
            )
        if lib.startswith(("libtorch", "libc10")):
            return f"{lib} is torch's: import torch first (import qkit does), and check torch imports on its own"
        return f"{lib} is missing on this system; {reinstall}"
    if "undefined symbol" in text:
        return (
            "_C refers to a symbol this torch/Python does not export: it was not built against the stable ABI "
            f"(torch >= {built['torch_target'] if built else '2.10'}, CPython >= 3.10 abi3) or is corrupt; {reinstall}"
        )
    if isinstance(error, ModuleNotFoundError):
        return (
            "_C is not there: in a source checkout build it (pip install --no-build-isolation -e .), else " + reinstall
        )
    if "ELF" in text or "wrong ELF class" in text:
        return f"_C is not a library for this machine ({platform.machine()}) or is damaged; {reinstall}"
    if "qkit::" in text or "registration" in text.lower():
        return "the op registrations clash: another copy of qkit._C is loaded in this process; import only one qkit"
    return reinstall


def _diagnose(error: BaseException) -> str:
    built = build_record()
    running = runtime_record()
    lines = [f"qkit's compiled kernels (qkit._C) could not be loaded: {type(error).__name__}: {error}"]
    if built is None:
        lines.append("built: no build record (_build_info.json) - this qkit was not built by its setup.py")
    else:
        lines.append(
            "built: for torch >= {torch_target} (built with torch {built_with_torch}), CPython >= {python_target}, "
            "{platform}, CUDA kernels: {cuda_kernels} (CUDA {cuda_version}, archs {cuda_arch_list})".format(**built)
        )
    lines.append(
        "running: torch {torch} (CUDA {torch_cuda}, HIP {torch_hip}), Python {python}, {platform}/{machine}".format(
            **running
        )
    )
    lines.append(f"what to do: {_hint(error, built)}; `python -m qkit.info` prints the full record")
    return "\n".join(lines)


_module: ModuleType | None = None
_error: QkitLoadError | None = None


def load() -> ModuleType | None:
    """Import ``qkit._C`` (once). Returns None, and remembers why, on failure."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if skip_requested():
        _error = QkitLoadError(
            f"qkit's compiled kernels (qkit._C) were not loaded: {SKIP_ENV}={os.environ[SKIP_ENV]} is set "
            f"(on purpose); unset it to use the kernels"
        )
        return None
    try:
        _module = importlib.import_module("qkit._C")
    except Exception as exc:  # a broken _C must never break `import qkit`
        _error = QkitLoadError(_diagnose(exc))
    return _module


def skipped() -> bool:
    """Whether loading was skipped on purpose (``QKIT_SKIP_EXTENSION``)."""
    load()
    return _module is None and skip_requested()


def load_error() -> QkitLoadError | None:
    load()
    return _error


def require() -> ModuleType:
    """The loaded module, or the specific reason it is not there."""
    module = load()
    if module is None:
        assert _error is not None
        raise _error
    return module
