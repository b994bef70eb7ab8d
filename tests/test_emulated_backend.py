"""The emulated-CUDA backend is really in the loop when a test runs on "emu".

Runs only under ``QKIT_EMULATED_CUDA`` (``bash ci/emulate_cuda.sh``): the profiler
must see the ``qkit_emu`` kernels inside :func:`emulating` and qkit's own outside.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import qkit
from conftest import EMULATED
from emulated import backend

pytestmark = [pytest.mark.emulated, EMULATED]


def _ops_seen(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("qkit")}


def _calls() -> None:
    x = torch.randn(4, 64)
    q, p = qkit.quantize(x, groups=4, bits=8)
    qkit.dequantize(q, p, groups=4, bits=8)
    qkit.fake_quantize(x, groups=4, bits=4)


def test_emulated_kernels_run_inside_and_only_inside() -> None:
    with backend.emulating():
        inside = _ops_seen(_calls)
    outside = _ops_seen(_calls)
    for op in ("quantize", "dequantize", "fake_quantize"):
        assert f"qkit_emu::{op}" in inside, inside
        assert f"qkit_emu::{op}" not in outside, outside


def test_every_op_with_a_device_kernel_is_emulated() -> None:
    """Each qkit op with a compiled CPU kernel has an emulated (CUDA) one, so none escapes to the CPU kernels."""
    has_cpu_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    compiled = [n for n in backend.qkit_overloads() if has_cpu_kernel(f"qkit::{n}", "CPU")]
    assert compiled
    assert sorted(backend.load()) == sorted(compiled)
