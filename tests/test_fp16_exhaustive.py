"""Every fp16 bit pattern through the CPU kernels' fp16 conversions, in every
instruction-set variant (forced with QKIT_CPU_ISA in a fresh process) and every loop
of each (16-wide AVX-512, 8-wide F16C, the branch-free tail loop that is all of the
generic build), against torch's own conversions.

fp16 -> fp32 is read through asymmetric 8-bit ``quantize`` with one element per group:
the group's offset is then its one value (0.5 h + 0.5 h), so ``params`` carries the
converted input. fp32 -> fp16 is read through ``dequantize`` with one group per
value, code 1 and step v, offset 0 (v * 1 + 0 = v), over every fp16 value, the
midpoints between neighbours (the ties) and the fp32 values either side of them.
Both are compared with tests/reference.py, which converts with torch."""

from __future__ import annotations

import pytest

from test_cpu_isa import ISAS, run_with_isa

SCRIPT = r"""
import torch, qkit
from reference import ref_dequantize, ref_quantize

def same_bits(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    ints = {torch.float16: torch.int16, torch.float32: torch.int32}[want.dtype]
    g, w = got[~nan].view(ints), want[~nan].view(ints)
    bad = (g != w).nonzero()
    if bad.numel():
        i = bad[0].item()
        first = f"{want[~nan][i].item()!r}: got {g[i].item():#x}, want {w[i].item():#x}"
        raise AssertionError(f"{what}: {bad.numel()} differ, first {first}")

def in_pieces(fn, values, width):
    # one call per `width` values: width 16 runs the AVX-512 loop only, 8 the F16C
    # loop only, 7 the tail loop only; the last piece may be shorter
    return torch.cat([fn(values[i : i + width]) for i in range(0, values.numel(), width)])

halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)

def offsets_of(x):  # fp16 -> fp32: the offset of a one-element group is the element
    return qkit.quantize(x, x.numel(), 8, False)[1]

want = ref_quantize(halves, halves.numel(), 8, False)[1]
for width in (halves.numel(), 16, 8, 7):
    same_bits(in_pieces(offsets_of, halves, width), want, f"fp16->fp32 params, pieces of {width}")

# fp32 -> fp16: every half value, the midpoints to the next half up in magnitude
# (ties, exact in fp32), and the floats just below and above each midpoint
finite = halves[torch.isfinite(halves)].double()
up = torch.nextafter(finite.half(), torch.tensor(float("inf"), dtype=torch.float16)).double()
up = torch.where(finite >= 0, up, -torch.nextafter(
    (-finite).half(), torch.tensor(float("inf"), dtype=torch.float16)).double())
up[finite.abs() == 65504] = 65536.0 * finite[finite.abs() == 65504].sign()  # the overflow threshold's neighbour
mid = ((finite + up) / 2).float()
extra = [3e38, 1e-40, 1.4e-45, 2.0**-25, 2.0**-24, 2.0**-14, 65519.996, 65520.0, 1e10]
extra = torch.tensor(extra, dtype=torch.float32)
values = torch.cat([halves.float(), mid, torch.nextafter(mid, torch.tensor(0.0)),
                    torch.nextafter(mid, torch.tensor(float("inf")) * mid.sign()), extra, -extra,
                    torch.tensor([float("inf"), -float("inf")]),
                    torch.tensor([0x7F800001, 0x7FC00000, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)])

def decoded(v, dtype=torch.float16):  # code 1, step v, offset 0 per one-element group
    params = torch.stack([v, torch.zeros_like(v)], 1)
    return qkit.dequantize(torch.ones(v.numel(), dtype=torch.int8), params, v.numel(), 8, False, dtype)

want = ref_dequantize(torch.ones(values.numel(), dtype=torch.int8), torch.stack([values, torch.zeros_like(values)], 1),
                      values.numel(), 8, False, torch.float16)
for width in (values.numel(), 16, 8, 7):
    same_bits(in_pieces(decoded, values, width), want, f"fp32->fp16 dequantize, pieces of {width}")
print("ok", values.numel())
"""


@pytest.mark.parametrize("isa", sorted(ISAS))
def test_every_fp16_pattern_converts_like_torch(isa: str) -> None:
    assert run_with_isa(isa, SCRIPT, 600).strip().startswith("ok")
