"""Loads ``qkit._C`` once, and explains a failure instead of hiding it.

If the compiled module cannot be loaded, ``import qkit`` still succeeds (so
``python -m qkit.info`` and the pure-Python parts work) and the first op call
raises :class:`QkitLoadError` saying what was built, what is running, and what
to do about it.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import resources
from types import ModuleType
from typing import Any

import torch


class QkitLoadError(RuntimeError):
    """The compiled kernels (``qkit._C``) could not be loaded in this process."""


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
    return {
        "python": platform.python_version(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cuda_available": cuda_ok,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else [],
    }


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
    hint = "reinstall the wheel that matches this platform, or build from source: pip install --no-build-isolation ."
    if built is not None:
        target = tuple(int(p) for p in built["torch_target"].split("."))
        have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
        if have < target:
            hint = f"upgrade torch to >= {built['torch_target']} (this build's stable-ABI floor)"
        elif built["platform"] != sys.platform:
            hint = f"this build is for {built['platform']}; install the wheel for {sys.platform}"
    lines.append(f"what to do: {hint}; `python -m qkit.info` prints the full record")
    return "\n".join(lines)


_module: ModuleType | None = None
_error: QkitLoadError | None = None


def load() -> ModuleType | None:
    """Import ``qkit._C`` (once). Returns None, and remembers why, on failure."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    try:
        from qkit import _C

        _module = _C
    except (ImportError, OSError) as exc:
        _error = QkitLoadError(_diagnose(exc))
    return _module


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
