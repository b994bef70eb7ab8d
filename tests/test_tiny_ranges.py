"""Tiny-range groups keep the one-step error bound.

A group whose half range is below about 2^(b-1)/FLT_MAX (3.7e-37 at 8 bits: still
normal floats) has a scale 2^(b-1)/half_range that overflows fp32. qkit used to cap it
at FLT_MAX, which made the step 1/FLT_MAX: up to 10x the documented error for such
groups and all-zero output for deep subnormals. Now the step is range/2^b rounded up to
a float (a subnormal) and the codes divide by it, identically on every device and CPU
instruction set; groups whose scale is finite are untouched.
"""

from __future__ import annotations

import pytest
import torch

import qkit
from helpers import assert_same, check_quantize
from qkit import QuantSpec
from reference import ref_fake_quantize, ref_params, ref_stochastic_fake_quantize

TINY = 2.0**-149  # the smallest fp32 subnormal
FLT_MAX = torch.finfo(torch.float32).max
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
# fp16 has no values small enough (its smallest subnormal is 2^-24).
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Group magnitudes: two ordinary ones, then from about the old cap's reach at 8 bits down to the
# smallest subnormal.
MAGNITUDES = [1.0, 1e-30, 4e-37, 1e-37, 1e-38, 1e-40, 1e-42, 3e-44, 3 * TINY, TINY]


def tiny_groups(magnitudes: list[float], size: int = 64, seed: int = 0) -> torch.Tensor:
    """One group per magnitude m: values spread over [-m, m], m itself included (fp32, flat)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m in magnitudes:
        row = (torch.rand(size, generator=gen, dtype=torch.float64) * 2 - 1) * m
        row[0] = m
        rows.append(row.to(torch.float32))
    return torch.cat(rows)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """fp32 spacing at |x| (the subnormal spacing below 2^-126), float64."""
    x = x.to(torch.float32).abs()
    return (torch.nextafter(x, torch.full_like(x, torch.inf)) - x).to(torch.float64)


def one_step_excess(x: torch.Tensor, y: torch.Tensor, groups: int, bits: int, symmetric: bool) -> float:
    """Largest |y - x| beyond the bound, in steps (<= 0 when the bound holds).

    Bound: one step range/2^b, plus the fp32 roundings no step can avoid: the step's own
    rounding to a float (its relative 2^-23 times up to 2^(b-1) codes; for a subnormal step,
    one subnormal spacing), the offset's and the result's rounding (an fp32 spacing at x).
    """
    xs = x.to(torch.float64).reshape(groups, -1)
    ys = y.to(torch.float64).reshape(groups, -1)
    spread = 2 * xs.abs().amax(dim=1, keepdim=True) if symmetric else xs.amax(1, True) - xs.amin(1, True)
    step = spread / 2**bits
    bound = step * (1 + 2.0 ** (bits - 22)) + 2 * TINY + ulp(xs)
    return ((ys - xs).abs() - bound).div(step).max().item()


@DTYPES
@SYM
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_fake_quantize_keeps_the_one_step_bound(device, dtype, symmetric, bits):
    x = tiny_groups(MAGNITUDES).to(dtype)
    groups = len(MAGNITUDES)
    # fp32 output: no rounding to a 16-bit dtype on top of the quantization error
    y = qkit.fake_quantize(x.float().to(device), groups, bits, symmetric)
    assert one_step_excess(x, y.cpu(), groups, bits, symmetric) <= 0
    want = ref_fake_quantize(x, groups, bits, symmetric)
    assert_same(qkit.fake_quantize(x.to(device), groups, bits, symmetric), want)


@DTYPES
@SYM
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_dequantize_keeps_the_one_step_bound(device, dtype, symmetric, bits):
    x = tiny_groups(MAGNITUDES).to(dtype)
    groups = len(MAGNITUDES)
    q, params = qkit.quantize(x.to(device), groups, bits, symmetric)
    y = qkit.dequantize(q, params, groups, bits, symmetric, torch.float32)
    assert one_step_excess(x, y.cpu(), groups, bits, symmetric) <= 0
    check_quantize(x, groups, bits, symmetric, device)  # codes, params and dequantized bits == reference


@SYM
def test_deep_subnormals_are_exact_not_zero(device, symmetric):
    """A group of a few subnormal spacings: the step is the smallest subnormal, every value
    is a whole number of steps, so 8-bit codes reproduce the group exactly."""
    x = torch.tensor([k * TINY for k in (-5, -3, -1, 0, 1, 2, 4, 5)], dtype=torch.float32)
    assert bool((x != 0).sum() == 7)
    assert torch.equal(qkit.fake_quantize(x.to(device), 1, 8, symmetric).cpu(), x)
    params = qkit.quantize(x.to(device), 1, 8, symmetric)[1]
    assert params[0, 0].item() == TINY


@SYM
@pytest.mark.parametrize("bits", [4, 8])
def test_the_step_is_the_range_rounded_up(device, symmetric, bits):
    """Tiny groups: step = range/2^b rounded up to a float (never 0, never below range/2^b,
    less than one subnormal spacing above it); scale is finite everywhere else."""
    x = tiny_groups(MAGNITUDES, size=16)
    groups = len(MAGNITUDES)
    y = qkit.quantize(x.to(device), groups, bits, symmetric)[1][:, 0].cpu().to(torch.float64)
    xs = x.to(torch.float64).reshape(groups, -1)
    spread = 2 * xs.abs().amax(1) if symmetric else xs.amax(1) - xs.amin(1)
    exact = spread / 2**bits
    tiny = exact < 1 / FLT_MAX
    assert bool(tiny.any()) and bool((~tiny).any())
    assert bool((y[tiny] >= exact[tiny]).all()) and bool((y[tiny] < exact[tiny] + TINY).all())
    scale, _, _ = ref_params(x, groups, bits, symmetric)
    assert bool(torch.isinf(scale).any()), "some groups must take the divide-by-step path"


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@SYM
def test_boundary_of_the_tiny_path(device, bits, symmetric):
    """Half ranges one float either side of 2^(b-1)/FLT_MAX, where the scale starts to
    overflow: reference bits on both sides, and the bound."""
    edge = torch.tensor(2.0 ** (bits - 1), dtype=torch.float32) / FLT_MAX
    below = torch.nextafter(edge, torch.tensor(0.0))
    above = torch.nextafter(edge, torch.tensor(1.0))
    mags = [m.item() for m in (below, edge, above, torch.nextafter(above, torch.tensor(1.0)))]
    x = tiny_groups(mags, size=32, seed=3)
    groups = len(mags)
    got = qkit.fake_quantize(x.to(device), groups, bits, symmetric).cpu()
    assert_same(got, ref_fake_quantize(x, groups, bits, symmetric))
    assert one_step_excess(x, got, groups, bits, symmetric) <= 0


@SYM
@pytest.mark.parametrize("bits", [3, 8])
def test_stochastic_rounding_of_tiny_groups(device, symmetric, bits):
    """Stochastic codes of tiny groups: reference bits (the same Philox stream), and each
    value within one step."""
    x = tiny_groups(MAGNITUDES, size=16, seed=5)
    groups = len(MAGNITUDES)
    torch.manual_seed(99)
    seed = torch.empty(1, dtype=torch.int64, device=device).random_().item()
    torch.manual_seed(99)
    got = qkit.fake_quantize(x.to(device), groups, bits, symmetric, stochastic=True).cpu()
    assert_same(got, ref_stochastic_fake_quantize(x, groups, bits, symmetric, seed))
    assert one_step_excess(x, got, groups, bits, symmetric) <= 0


@SYM
@pytest.mark.parametrize("bits", [3, 8])
def test_quant_spec_mirrors_the_kernels_on_tiny_groups(symmetric, bits):
    """QuantSpec's own fp32 arithmetic (codes, steps) gives the kernels' numbers for tiny groups too."""
    spec = QuantSpec(bits, symmetric=symmetric, ch_axis=None, group_size=16)
    x = tiny_groups(MAGNITUDES, size=16, seed=7).reshape(len(MAGNITUDES), 16)
    q, params = spec.codes(x)
    steps, offsets = spec.qparams(x)
    assert torch.equal(params[:, 0], steps) and bool((steps > 0).all())
    rebuilt = (q.float() * steps[:, None] + offsets[:, None]).reshape(x.shape)
    assert_same(rebuilt, spec.fake_quantize(x))
    if spec.storable:
        stored_q, stored_params = spec.quantize(x)
        assert torch.equal(stored_q, q) and torch.equal(stored_params[:, 0], steps)
