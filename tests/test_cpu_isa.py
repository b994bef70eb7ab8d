"""Every CPU instruction-set variant of the kernels (generic, AVX2+F16C, AVX-512),
forced with QKIT_CPU_ISA in a fresh process, gives the reference's bits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


FLAGS = _cpu_flags()
ISAS = {
    "generic": set(),
    "avx2": {"avx2", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "f16c"},
}

# Sizes chosen to leave tails after every vector width and tile, and to take
# the block-of-groups path (full and ragged last blocks), the per-group sweep and
# the chunked large-group path; one group in a block sees NaN, another Inf; some
# groups have tiny ranges.
SCRIPT = r"""
import torch, qkit
from reference import codes_of_storage, ref_dequantize, ref_fake_quantize, ref_finite_mask, ref_quantize
from reference import ref_stochastic_fake_quantize
from helpers import assert_same
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for numel, groups in ((8 * 1031, 8), (6 * 37, 6), (70_000 * 2, 2), (2 * 5, 5), (48 * 100, 100), (64 * 40, 40)):
        # pairs along the last dimension: 4-bit storage packs them, odd groups straddle bytes
        x = (torch.randn(numel, generator=gen) * 3).to(dtype)
        if groups == 40:
            x[5 * 64 + 3], x[20 * 64 + 63] = float("nan"), float("-inf")
        # tiny-range groups (their steps are subnormal: codes divide by the step); the
        # last of a 2-group tensor takes the chunked large-group path
        n = numel // groups
        x[(groups - 1) * n :] *= 1e-40
        if groups >= 5:
            x[2 * n : 3 * n] *= 1e-45
        x = x.reshape(-1, 2)
        for sym in (True, False):
            assert_same(qkit.fake_quantize(x, groups, 5, sym), ref_fake_quantize(x, groups, 5, sym), "fake")
            for bits in (4, 8):
                q, p = qkit.quantize(x, groups, bits, sym)
                rq, rp = ref_quantize(x, groups, bits, sym)
                finite = ref_finite_mask(x, groups)  # a non-finite group's codes are unspecified
                assert_same(codes_of_storage(q, bits)[finite], codes_of_storage(rq, bits)[finite], "codes")
                assert_same(p, rp, "params")
                want = ref_dequantize(q, rp, groups, bits, sym, dtype)
                assert_same(qkit.dequantize(q, p, groups, bits, sym, dtype), want, "dequant")
            if numel < 10_000:  # the reference Philox is plain Python
                torch.manual_seed(7)
                seed = torch.empty(1, dtype=torch.int64).random_().item()
                torch.manual_seed(7)
                got = qkit.fake_quantize(x, groups, 5, sym, stochastic=True)
                assert_same(got, ref_stochastic_fake_quantize(x, groups, 5, sym, seed), "stochastic")
# The floating-point formats (docs/ops.md §10): tiles, tails, groups across packed bytes,
# a NaN and an Inf block, a group larger than a chunk.
from reference import ref_fake_quantize_fp, ref_quantize_fp, ref_philox_uniforms
for dtype in (torch.float32, torch.bfloat16):
    x = (torch.randn(96 * 44, generator=gen) * 3).to(dtype)
    x[7], x[100] = float("nan"), float("inf")
    x = x.reshape(-1, 4)
    for fmt in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1"):
        for scaling, groups in (("absmax", 11), ("absmax", 1), ("mx", x.numel() // 32), ("nvfp4", x.numel() // 16)):
            if scaling == "nvfp4" and fmt != "e2m1":
                continue
            q, s = qkit.quantize_fp(x, groups, fmt, scaling)
            rq, rs = ref_quantize_fp(x, groups, fmt, scaling)
            assert torch.equal(s.view(torch.uint8), rs.view(torch.uint8)), (fmt, scaling, "scales")
            assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), (fmt, scaling, "codes")
            want = ref_fake_quantize_fp(x, groups, fmt, scaling)
            assert_same(qkit.dequantize_fp(q, s, groups, fmt, scaling, dtype), want, "dequantize_fp")
            assert_same(qkit.fake_quantize_fp(x, groups, fmt, scaling), want, "fake_quantize_fp")
        torch.manual_seed(7)
        seed = torch.empty(1, dtype=torch.int64).random_().item()
        torch.manual_seed(7)
        got = qkit.fake_quantize_fp(x, 11, fmt, "absmax", True)
        assert_same(got, ref_fake_quantize_fp(x, 11, fmt, "absmax", ref_philox_uniforms(seed, x.numel())), "sr")
big = torch.randn(3 * 20000, generator=gen)
for fmt in ("e4m3", "e2m1"):
    q, s = qkit.quantize_fp(big, 3, fmt)
    rq, rs = ref_quantize_fp(big, 3, fmt)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs), fmt
# The FP kernels' other walks (test_fp_ops.py's WALKS): many small groups per tile, 16 as a
# constant, one group per sweep with a tail tile, FP6 groups of no whole packing unit.
for numel, groups in ((4100, 820), (2048, 128), (3900, 3), (1048, 4)):
    w = torch.randn(numel, generator=gen)
    for fmt in ("e4m3", "e3m2", "e2m1"):
        q, s = qkit.quantize_fp(w, groups, fmt)
        rq, rs = ref_quantize_fp(w, groups, fmt)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs), (fmt, groups)
        want = ref_fake_quantize_fp(w, groups, fmt)
        assert_same(qkit.fake_quantize_fp(w, groups, fmt), want, "fake_quantize_fp walk")
        assert_same(qkit.dequantize_fp(q, s, groups, fmt), want, "dequantize_fp walk")
print("ok")
"""


def run_with_isa(isa: str, script: str, timeout_s: float) -> str:
    """Run ``script`` in a fresh interpreter whose qkit takes the ``isa`` kernels (skips if this
    CPU lacks it); its stdout, after asserting it exited 0."""
    if not ISAS[isa] <= FLAGS and isa != "generic":
        pytest.skip(f"this CPU lacks {sorted(ISAS[isa] - FLAGS)}")
    env = {**os.environ, "QKIT_CPU_ISA": isa, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("isa", sorted(ISAS))
def test_forced_isa_matches_reference(isa: str) -> None:
    assert run_with_isa(isa, SCRIPT, 300).strip().endswith("ok")


# The fused quantized reduction (kernels/cpu/zeropp_cpu_impl.h): output groups of 64
# (several tiles per task, a short last tile), of 5000 (one group per tile) and odd ones,
# codes and params from the quantizer per tensor, L = 8 and 2.
REDUCTION_SCRIPT = r"""
import torch
from reference import codes_of_storage, ref_finite_mask, ref_quantize, ref_quantized_reduction, ref_reduction_sum
from helpers import assert_same
gen = torch.Generator().manual_seed(1)
for devices, per_tensor, in_size, out_groups in ((8, 200, 96, 300), (2, 2, 5000, 2), (2, 3, 1001, 3)):
    values = per_tensor * in_size
    for sym in (True, False):
        for bits in (4, 8):
            if bits == 4 and values % 2:
                continue
            parts = [ref_quantize(torch.randn(values, generator=gen) * (j + 1), per_tensor, bits, sym)
                     for j in range(devices)]
            q, p = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
            args = (devices * per_tensor, out_groups, bits, sym, devices)
            got_q, got_p = torch.ops.qkit.quantized_reduction(q, p, *args)
            want_q, want_p = ref_quantized_reduction(q, p, *args)
            assert_same(got_p, want_p, "params")
            finite = ref_finite_mask(ref_reduction_sum(q, p, devices * per_tensor, bits, sym, devices), out_groups)
            assert_same(codes_of_storage(got_q, bits)[finite], codes_of_storage(want_q, bits)[finite], "codes")
print("ok")
"""


@pytest.mark.parametrize("isa", sorted(ISAS))
def test_forced_isa_quantized_reduction(isa: str) -> None:
    assert run_with_isa(isa, REDUCTION_SCRIPT, 300).strip().endswith("ok")
