"""The emulated-CUDA backend as the test suite sees it.

``tests/emulated/build.py`` compiles qkit's CUDA kernels for the CPU (HIP-CPU) into
``libqkit_emulated.so``, whose op kernels register as CPU kernels of ``qkit_emu::*``.
Here that library is loaded, ``qkit_emu`` gets ``qkit``'s schemas, and
:func:`emulating` makes every ``qkit`` op with an emulated kernel run it for CPU
tensors: the kernel behind ``torch.ops.qkit.*``'s CPU key is swapped for the
emulated one (and restored afterwards), so each path into the op (wrappers,
autograd, ``out=``, in-place, compiled graphs, the wrappers' straight calls)
reaches the CUDA kernels exactly as it would reach qkit's CPU kernels.

Enabled by ``QKIT_EMULATED_CUDA``: ``1`` for the default build folder
(``build/emulated``), or the library's path.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import qkit  # noqa: F401 - defines the qkit schemas

NAMESPACE = "qkit_emu"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "emulated" / "libqkit_emulated.so"
ENV = "QKIT_EMULATED_CUDA"

_schemas: torch.library.Library | None = None
_emulated: list[str] | None = None


def requested() -> bool:
    """Whether this run asked for the emulated backend (``$QKIT_EMULATED_CUDA``)."""
    return os.environ.get(ENV, "") not in ("", "0")


def library_path() -> Path:
    value = os.environ.get(ENV, "")
    return DEFAULT_LIBRARY if value in ("", "1") else Path(value)


def qkit_overloads() -> list[str]:
    """Every ``qkit`` op overload as ``name`` or ``name.overload``."""
    names = []
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("qkit::"):
            names.append(qualified.removeprefix("qkit::"))
    return sorted(names)


def _overload(namespace: str, name: str) -> torch._ops.OpOverload:
    op, _, overload = name.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")


def load() -> list[str]:
    """Loads the library once; returns the ``qkit`` overloads that have an emulated kernel."""
    global _schemas, _emulated
    if _emulated is not None:
        return _emulated
    path = library_path()
    if not path.exists():
        raise FileNotFoundError(f"{ENV} is set but {path} does not exist: build it with `bash ci/emulate_cuda.sh`")
    torch.ops.load_library(str(path))
    _schemas = torch.library.Library(NAMESPACE, "DEF")
    emulated = []
    for name in qkit_overloads():
        schema = str(_overload("qkit", name)._schema).removeprefix("qkit::")
        _schemas.define(schema)
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU"):
            emulated.append(name)
    if not emulated:
        raise RuntimeError(f"{path} registered no {NAMESPACE} kernels")
    _emulated = emulated
    return emulated


def _forward_to(target: torch._ops.OpOverload) -> Callable:
    def kernel(*args, **kwargs):
        # Below autograd, as the kernel this stands in for: qkit_emu has no autograd kernels.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return target(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def emulating() -> Iterator[None]:
    """Within the block, qkit ops on CPU tensors run the emulated CUDA kernels."""
    names = load()
    override = torch.library.Library("qkit", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel" is the point
            for name in names:
                override.impl(name, _forward_to(_overload(NAMESPACE, name)), "CPU")
        yield
    finally:
        override._destroy()
