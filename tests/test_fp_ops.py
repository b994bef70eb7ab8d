"""The floating-point format ops (docs/ops.md §10) against tests/reference.py, torch's own
FP8 casts and torchao's MX / NVFP4 reference, on every device the ``device`` fixture
gives ("emu" runs the CUDA kernels through HIP-CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses import FakeTensorMode
from torch.library import opcheck

import qkit
from helpers import assert_same
from reference import (
    FP_FORMATS,
    fp_bits,
    ref_fake_quantize_fp,
    ref_fp_decode,
    ref_fp_max,
    ref_fp_round,
    ref_fp_table,
    ref_fp_tensor_scale,
    ref_pack_fp,
    ref_philox_uniforms,
    ref_quantize_fp,
    ref_unpack_fp,
)

ops = torch.ops.qkit
FORMATS = list(FP_FORMATS)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALED = [(f, "absmax") for f in FORMATS] + [(f, "mx") for f in FORMATS] + [("e2m1", "nvfp4")]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _id(v: object) -> str:
    return str(v).removeprefix("torch.")


def groups_for(numel: int, scaling: str, groups: int = 1) -> int:
    return numel // {"mx": 32, "nvfp4": 16}[scaling] if scaling != "absmax" else groups


def make(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0, spread: float = 4.0
) -> torch.Tensor:
    """Normal data times log-uniform magnitudes (exercises every binade and the subnormals)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2((torch.rand(shape, generator=g) - 0.5) * 2 * spread)
    return (torch.randn(shape, generator=g) * mag).to(dtype)


# ------------------------------------------------------------------ the formats themselves

# The OCP spec's tables (OCP MX v1.0 §5.3, OCP 8-bit FP v1.0): the definition, not qkit's output.
SPEC_VALUES = {
    "e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
    "e2m3": [i / 8 for i in range(8)]
    + [1 + i / 8 for i in range(8)]
    + [2 + i / 4 for i in range(8)]
    + [4 + i / 2 for i in range(8)],
}
SPEC_LIMITS = {  # format -> (max, smallest subnormal, smallest normal)
    "e4m3": (448.0, 2.0**-9, 2.0**-6),
    "e5m2": (57344.0, 2.0**-16, 2.0**-14),
    "e3m2": (28.0, 2.0**-4, 2.0**-2),
    "e2m3": (7.5, 0.125, 1.0),
    "e2m1": (6.0, 0.5, 1.0),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_tables_match_the_spec(fmt):
    table = ref_fp_table(fmt)
    top, sub, normal = SPEC_LIMITS[fmt]
    assert table[-1] == top and table[1] == sub and normal in table.tolist()
    if fmt in SPEC_VALUES:
        assert table.tolist() == SPEC_VALUES[fmt]


def all_codes(fmt: str) -> torch.Tensor:
    return torch.arange(2 ** fp_bits(fmt), dtype=torch.int64)


def unit_scales(groups: int) -> torch.Tensor:
    return torch.ones(groups, dtype=torch.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_code_decodes_to_its_value(device, fmt):
    codes = all_codes(fmt)
    n = codes.numel()
    storage = ref_pack_fp(codes, fmt, torch.Size([n]))
    got = qkit.dequantize_fp(storage.to(device), unit_scales(1).to(device), 1, fmt)
    assert_same(got, ref_fp_decode(codes, fmt), f"{fmt} decode")
    if fmt == "e4m3":  # torch's own decoding of the same bytes
        assert_same(got, storage.to(torch.float32), "torch float8_e4m3fn")
    if fmt == "e5m2":
        assert_same(got, storage.to(torch.float32), "torch float8_e5m2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_finite_code_round_trips(device, fmt):
    """The format's own values, with max among them (so the absmax step is exactly 1),
    quantize to their own codes, -0 and every subnormal included."""
    codes = all_codes(fmt)
    values = ref_fp_decode(codes, fmt)
    keep = torch.isfinite(values)
    codes, values = codes[keep], values[keep]
    n = codes.numel() - codes.numel() % 4
    codes, values = codes[:n], values[:n]
    assert values.abs().max() == ref_fp_max(fmt)
    q, s = qkit.quantize_fp(values.to(device), 1, fmt)
    assert_same(s, unit_scales(1), "step")
    assert torch.equal(ref_unpack_fp(q, fmt), codes), f"{fmt}: codes differ"
    assert_same(qkit.fake_quantize_fp(values.to(device), 1, fmt), values, "fake")


def ties_and_neighbours(fmt: str) -> torch.Tensor:
    """Every midpoint between neighbouring values (RNE ties), and points just off them."""
    table = ref_fp_table(fmt).to(torch.float32)
    mid = (table[:-1] + table[1:]) / 2  # exact in fp32: few mantissa bits
    off = torch.cat([torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    v = torch.cat([mid, off, table])
    v = torch.cat([v, -v])
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))]
    v = torch.cat([torch.tensor([ref_fp_max(fmt)]), v])
    return v[: v.numel() - v.numel() % 4]


@pytest.mark.parametrize("fmt", FORMATS)
def test_ties_round_to_even_and_subnormals(device, fmt):
    v = ties_and_neighbours(fmt)
    q, _ = qkit.quantize_fp(v.to(device), 1, fmt)
    got = ref_unpack_fp(q, fmt)
    assert torch.equal(got, ref_fp_round(v, fmt)), f"{fmt}: codes differ from the reference"
    # The rule itself: an exact midpoint takes the code with an even mantissa.
    table = ref_fp_table(fmt).to(torch.float32)
    mid = (table[:-1] + table[1:]) / 2
    qm, _ = qkit.quantize_fp(
        torch.cat([mid, torch.tensor([ref_fp_max(fmt)] * (4 - mid.numel() % 4))]).to(device), 1, fmt
    )
    mags = ref_unpack_fp(qm, fmt)[: mid.numel()] & (2 ** (fp_bits(fmt) - 1) - 1)
    assert bool((mags % 2 == 0).all()), f"{fmt}: a tie rounded to an odd code"


@pytest.mark.parametrize("fmt", FORMATS)
def test_saturation_inf_and_nan(device, fmt):
    mx = ref_fp_max(fmt)
    inf, nan = float("inf"), float("nan")
    # mx scaling: floor(log2) leaves scaled values up to ~2^(max_pow2+1) > max: they saturate.
    big = 2.0 ** math.floor(math.log2(mx)) * 1.99
    x = torch.tensor([big, -big, mx, 0.5] * 8)
    q, s = qkit.quantize_fp(x.to(device), 1, fmt, "mx")
    codes = ref_unpack_fp(q, fmt)
    top = 2 ** (fp_bits(fmt) - 1)
    max_code = int((ref_fp_table(fmt) == mx).nonzero()[0])
    assert s.view(torch.uint8).item() == 127, "floor(log2(big)) - max_pow2 = 0"
    assert codes[0] == max_code and codes[1] == top | max_code, "finite overflow saturates"
    # absmax: +-Inf saturate to +-max * step (the finite absmax); NaN poisons its group only.
    x = torch.tensor([1.0, inf, -inf, 0.25, 2.0, nan, 1.0, -1.0, 3.0, 1.0, 0.5, -0.5])
    y = qkit.fake_quantize_fp(x.to(device), 3, fmt)
    assert y[1] == 1.0 and y[2] == -1.0, "Inf saturates to the group's finite absmax"
    assert bool(torch.isnan(y[4:8]).all()), "a NaN makes its whole group NaN"
    assert_same(y[8:], ref_fake_quantize_fp(x[8:], 1, fmt), "the group after the NaN group")
    assert_same(y, ref_fake_quantize_fp(x, 3, fmt), "reference")
    q, s = qkit.quantize_fp(x.to(device), 3, fmt)
    assert math.isnan(s[1].item()) and not math.isnan(s[2].item())
    assert torch.equal(ref_unpack_fp(q, fmt), ref_unpack_fp(ref_quantize_fp(x, 3, fmt)[0], fmt))


# ------------------------------------------------------------------ against the reference


SHAPES = [(64,), (4, 96), (3, 5, 32), (2, 1024 + 64)]


@pytest.mark.parametrize(("fmt", "scaling"), SCALED, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, fmt, scaling, dtype, shape):
    x = make(shape, dtype, seed=len(shape) + fp_bits(fmt))
    if dtype == torch.float32:
        x.view(-1)[::37] *= 2.0**-120  # deep subnormal scaled values and tiny blocks
    groups = groups_for(x.numel(), scaling, groups=2 if x.numel() % 2 == 0 else 1)
    q, s = qkit.quantize_fp(x.to(device), groups, fmt, scaling)
    want_q, want_s = ref_quantize_fp(x, groups, fmt, scaling)
    assert_same(s, want_s, "scales")
    assert q.dtype == want_q.dtype and q.shape == want_q.shape
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8)), "codes differ"
    want = ref_fake_quantize_fp(x, groups, fmt, scaling)
    assert_same(qkit.fake_quantize_fp(x.to(device), groups, fmt, scaling), want, "fake_quantize_fp")
    deq = qkit.dequantize_fp(q, s, groups, fmt, scaling, dtype=dtype)
    assert_same(deq, want, "dequantize_fp(quantize_fp(x)) == fake_quantize_fp(x)")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1,), (3, 37), (1025,), (2, 16385)], ids=str)
def test_fake_quantize_any_shape(device, fmt, shape):
    """fake_quantize_fp packs nothing: odd sizes, one element, groups of more than a tile."""
    x = make(shape, seed=shape[-1])
    groups = shape[0]
    for stochastic in (False, True):
        torch.manual_seed(3)
        seed = torch.empty(1, dtype=torch.int64).random_().item()
        torch.manual_seed(3)
        got = qkit.fake_quantize_fp(x.to(device), groups, fmt, "absmax", stochastic)
        u = ref_philox_uniforms(seed, x.numel()) if stochastic and x.numel() < 5000 else None
        if stochastic and u is None:
            continue
        assert_same(got, ref_fake_quantize_fp(x, groups, fmt, "absmax", u), f"stochastic={stochastic}")


# Group sizes that take each of the CPU kernels' walks (kernels/cpu/fp_cpu_impl.h): many
# small groups per tile (runtime size, and mx/nvfp4's 16 and 32 as constants, here under
# absmax), one group per sweep with a tail tile, the two-pass walk for a group too large
# for a sweep and for one whose size is no whole number of FP6 packing units.
WALKS = {
    "small-5": (4100, 820),
    "small-16": (2048, 128),
    "small-32": (2048, 64),
    "mid-1300": (3900, 3),
    "fp6-unaligned-262": (1048, 4),
    "large-70000": (140000, 2),
}


@pytest.mark.parametrize("walk", list(WALKS))
def test_every_kernel_walk(device, walk):
    numel, groups = WALKS[walk]
    x = make((numel,), seed=numel)
    x[numel - 2] = float("-inf")  # saturates in its group
    if groups >= 3:
        x[numel // 3] = float("nan")  # one NaN group
    torch.manual_seed(5)
    seed = torch.empty(1, dtype=torch.int64).random_().item()
    u = ref_philox_uniforms(seed, numel)
    for fmt in FORMATS:
        q, s = qkit.quantize_fp(x.to(device), groups, fmt)
        want_q, want_s = ref_quantize_fp(x, groups, fmt)
        assert_same(s, want_s, f"{fmt} scales")
        assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8)), f"{fmt} codes"
        want = ref_fake_quantize_fp(x, groups, fmt)
        assert_same(qkit.fake_quantize_fp(x.to(device), groups, fmt), want, f"{fmt} fake")
        assert_same(qkit.dequantize_fp(q, s, groups, fmt), want, f"{fmt} dequantize")
        torch.manual_seed(5)
        got = qkit.fake_quantize_fp(x.to(device), groups, fmt, "absmax", True)
        assert_same(got, ref_fake_quantize_fp(x, groups, fmt, "absmax", u), f"{fmt} stochastic")


@pytest.mark.parametrize("groups", [1, 3, 7, 48])
def test_absmax_any_group_size(device, groups):
    """Group boundaries inside packed bytes (odd group sizes) for every packing."""
    x = make((336,), seed=groups)
    for fmt in FORMATS:
        q, s = qkit.quantize_fp(x.to(device), groups, fmt)
        want_q, want_s = ref_quantize_fp(x, groups, fmt)
        assert_same(s, want_s, f"{fmt} scales")
        assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8)), f"{fmt} codes"
        assert_same(qkit.dequantize_fp(q, s, groups, fmt), ref_fake_quantize_fp(x, groups, fmt), fmt)


def test_packing_order(device):
    """FP4: element 2j in the high nibble (qkit's int4 order); FP6: element 4j in the top bits."""
    x = torch.tensor([0.5, 6.0, -1.0, 0.0])  # e2m1 codes 1, 7, 0b1010, 0
    q, _ = qkit.quantize_fp(x.to(device), 1, "e2m1")
    assert q.view(torch.uint8).tolist() == [0x17, 0xA0]
    x = torch.tensor([0.125, 7.5, -1.0, 0.0])  # e2m3 codes 1, 31, 0b101000, 0
    q, _ = qkit.quantize_fp(x.to(device), 1, "e2m3")
    assert q.tolist() == [0b000001_01, 0b1111_1010, 0b00_000000]


# ------------------------------------------------------------------ torch's FP8 casts


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("groups", [1, 8])
def test_fp8_absmax_equals_torch_cast(device, fmt, groups):
    x = make((8, 256), seed=groups)
    q, s = qkit.quantize_fp(x.to(device), groups, fmt)
    scaled = x.reshape(groups, -1) / s.cpu().reshape(groups, 1)
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    want = scaled.to(dtype).reshape(x.shape)
    assert torch.equal(q.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_special_values_against_torch(device, fmt):
    """qkit's saturating rounding vs torch's cast (docs/ops.md §10): the same for every
    value up to max and for NaN (S.1111111); torch 2.13 saturates e4m3 (Inf included) as
    qkit does, but its e5m2 cast overflows to Inf from 61440 on and keeps Inf, where qkit
    saturates to 57344."""
    mx = ref_fp_max(fmt)
    inf = float("inf")
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    # absmax = max, so the step is 1 and the scaled values are the values themselves
    x = torch.tensor([mx, -mx, inf, -inf, 1.0, -0.0, 2.0**-20, -3.0])
    q, s = qkit.quantize_fp(x.to(device), 1, fmt)
    assert s.item() == 1.0
    got = q.cpu().view(torch.uint8)
    want = x.to(dtype).view(torch.uint8)
    finite = torch.isfinite(x)
    assert torch.equal(got[finite], want[finite])
    if fmt == "e4m3":
        assert torch.equal(got, want), "torch 2.13 saturates e4m3 Inf like qkit"
    else:
        assert want[2:4].tolist() == [0x7C, 0xFC] and got[2:4].tolist() == [0x7B, 0xFB]
        assert float(torch.tensor(61440.0).to(dtype).float()) == inf, "torch: overflow to Inf"
    assert ref_fp_round(torch.tensor([float("nan")]), fmt).item() == 0x7F
    assert torch.tensor([float("nan")]).to(dtype).view(torch.uint8).item() == 0x7F
    assert torch.equal(
        ref_fp_round(ties_and_neighbours(fmt), fmt).to(torch.uint8),
        ties_and_neighbours(fmt).to(dtype).view(torch.uint8),
    )


# ------------------------------------------------------------------ torchao's MX and NVFP4 reference


def _torchao():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    return mx, nv


AO_ELEM = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "e3m2": "fp6_e3m2",
    "e2m3": "fp6_e2m3",
    "e2m1": torch.float4_e2m1fn_x2,
}


def _ao_codes(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """torchao's element codes, flattened (its fp4 packs element 2j in the LOW nibble)."""
    b = data.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
    if fmt == "e2m1":
        return torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)
    return b


@pytest.mark.parametrize("fmt", FORMATS)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 5), spread=st.floats(0.0, 30.0), seed=st.integers(0, 2**16))
@SETTINGS
def test_mx_equals_torchao(device, fmt, rows, blocks, spread, seed):
    mx_mod, _ = _torchao()
    x = make((rows, 32 * blocks), seed=seed, spread=spread) * 2.0 ** (seed % 41 - 20)
    ao_scale, ao_data = mx_mod.to_mx(x, AO_ELEM[fmt], 32)
    q, s = qkit.quantize_fp(x.to(device), None, fmt, "mx")
    assert torch.equal(s.cpu().view(torch.uint8), ao_scale.view(torch.uint8).reshape(-1)), "E8M0 scales"
    assert torch.equal(ref_unpack_fp(q, fmt), _ao_codes(ao_data, fmt)), "element codes"
    ao = mx_mod.to_dtype(ao_data, ao_scale, AO_ELEM[fmt], 32, torch.float32)
    assert_same(qkit.dequantize_fp(q, s, None, fmt, "mx"), ao.reshape(x.shape), "dequantized")


@given(rows=st.integers(1, 4), blocks=st.integers(1, 6), spread=st.floats(0.0, 30.0), seed=st.integers(0, 2**16))
@SETTINGS
def test_nvfp4_equals_torchao(device, rows, blocks, spread, seed):
    _, nv = _torchao()
    x = make((rows, 16 * blocks), seed=seed, spread=spread) * 2.0 ** (seed % 41 - 20)
    ts = ref_fp_tensor_scale(x)
    ao_scale, ao_data = nv.nvfp4_quantize(x, 16, ts)
    q, s = qkit.quantize_fp(x.to(device), None, "e2m1", "nvfp4")
    tensor_scale, block_scales = qkit.fp_ops.nvfp4_scales(s.cpu())
    assert_same(tensor_scale, ts, "tensor scale")
    assert torch.equal(block_scales.view(torch.uint8), ao_scale.view(torch.uint8).reshape(-1)), "E4M3 block scales"
    assert torch.equal(ref_unpack_fp(q, "e2m1"), _ao_codes(ao_data, "e2m1")), "element codes"
    ao = nv.NVFP4Tensor(ao_data, ao_scale, 16, torch.float32, per_tensor_scale=ts).dequantize(torch.float32)
    assert_same(qkit.dequantize_fp(q, s, None, "e2m1", "nvfp4"), ao.reshape(x.shape), "dequantized")


# ------------------------------------------------------------------ stochastic rounding


@pytest.mark.parametrize(
    ("fmt", "scaling"), [("e4m3", "absmax"), ("e2m1", "mx"), ("e3m2", "absmax"), ("e2m1", "nvfp4")]
)
def test_stochastic_matches_reference_stream(device, fmt, scaling):
    x = make((4, 64), seed=3)
    groups = groups_for(x.numel(), scaling, 4)
    torch.manual_seed(1234)
    seed = torch.empty(1, dtype=torch.int64).random_().item()
    torch.manual_seed(1234)
    got = qkit.fake_quantize_fp(x.to(device), groups, fmt, scaling, True)
    want = ref_fake_quantize_fp(x, groups, fmt, scaling, ref_philox_uniforms(seed, x.numel()))
    assert_same(got, want, "stochastic rounding, Philox stream")
    torch.manual_seed(1234)
    assert_same(qkit.fake_quantize_fp(x.to(device), groups, fmt, scaling, True), got, "seeded")
    assert not torch.equal(qkit.fake_quantize_fp(x.to(device), groups, fmt, scaling, True), got), "fresh per call"


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_is_unbiased(device, fmt):
    """Values between grid points (normal and subnormal), each repeated: the mean of the
    rounded values is the value, within a loose bound (8 standard errors)."""
    table = ref_fp_table(fmt).to(torch.float32)
    points = torch.tensor([0.3, 0.5, 0.77]) * table[1]
    points = torch.cat([points, table[-3] + (table[-2] - table[-3]) * torch.tensor([0.1, 0.5, 0.9])])
    reps = 4096
    x = torch.cat([torch.tensor([float(table[-1])]), points.repeat_interleave(reps)])  # max first: step 1
    torch.manual_seed(7)
    y = qkit.fake_quantize_fp(x.to(device), 1, fmt, "absmax", True).cpu()
    y, x = y[1:].reshape(6, -1), x[1:].reshape(6, -1)
    spacing = torch.tensor([table[1]] * 3 + [float(table[-2] - table[-3])] * 3)
    err = (y.double().mean(1) - x.double().mean(1)).abs()
    assert bool((err < 8 * 0.5 * spacing.double() / math.sqrt(x.shape[1])).all()), err
    assert bool(((y - x).abs() < spacing.reshape(6, 1)).all()), "one of the two neighbours"


# ------------------------------------------------------------------ ops: out=, in place, autograd, opcheck, compile


@pytest.mark.parametrize(("fmt", "scaling"), SCALED, ids=lambda v: str(v))
def test_out_and_in_place_forms(device, fmt, scaling):
    x = make((4, 64), seed=5).to(device)
    groups = groups_for(x.numel(), scaling, 4)
    want = qkit.fake_quantize_fp(x, groups, fmt, scaling)
    out = torch.empty_like(x)
    assert qkit.fake_quantize_fp(x, groups, fmt, scaling, out=out) is out
    assert_same(out, want, "out=")
    y = x.t().contiguous().t()  # non-contiguous in place
    qkit.fake_quantize_fp_(y, groups, fmt, scaling)
    assert_same(y, want, "in place")
    q, s = qkit.quantize_fp(x, groups, fmt, scaling)
    q2, s2 = torch.empty_like(q), torch.empty_like(s)
    qkit.quantize_fp(x, groups, fmt, scaling, out=(q2, s2))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(
        s2.view(torch.uint8), s.view(torch.uint8)
    )
    d = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    qkit.dequantize_fp(q, s, groups, fmt, scaling, out=d)
    assert_same(d, want.to(torch.bfloat16), "dequantize out=")


def test_straight_through_gradient(device):
    x = make((4, 64), seed=6).to(device).requires_grad_()
    y = qkit.fake_quantize_fp(x, 8, "e4m3", "mx")
    g = torch.randn_like(y)
    y.backward(g)
    assert_same(x.grad, g, "STE")
    with pytest.raises(RuntimeError, match=r"fake_quantize_fp_.*requires grad"):
        qkit.fake_quantize_fp_(x, 8, "e4m3", "mx")


@pytest.mark.parametrize(
    ("fmt", "scaling"), [("e4m3", "absmax"), ("e3m2", "mx"), ("e2m1", "nvfp4"), ("e2m3", "absmax")]
)
@pytest.mark.parametrize("stochastic", [False, True])
def test_opcheck(device, fmt, scaling, stochastic):
    x = make((4, 64), torch.bfloat16, seed=8).to(device)
    groups = groups_for(x.numel(), scaling, 4)
    opcheck(ops.fake_quantize_fp.default, (x, groups, fmt, scaling, stochastic))
    opcheck(ops.fake_quantize_fp_.default, (x.clone(), groups, fmt, scaling, stochastic))
    opcheck(ops.fake_quantize_fp.default, (x.float().requires_grad_(), groups, fmt, scaling, stochastic))
    # test_schema does arithmetic on the outputs (and inputs), which torch lacks for the
    # 8/4-bit float dtypes; the schema's mutation claims are covered by the other forms.
    no_schema = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    opcheck(ops.quantize_fp.default, (x, groups, fmt, scaling), test_utils=no_schema)
    q, s = ops.quantize_fp(x, groups, fmt, scaling)
    opcheck(ops.dequantize_fp.default, (q, s, groups, fmt, scaling, torch.float16), test_utils=no_schema)


def test_compile_fullgraph(device, fresh_dynamo):
    def f(x: torch.Tensor) -> torch.Tensor:
        q, s = qkit.quantize_fp(x, 8, "e2m1", "mx")
        return qkit.dequantize_fp(q, s, 8, "e2m1", "mx") + qkit.fake_quantize_fp(x, 2, "e5m2")

    x = make((4, 64), seed=9).to(device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), f(x), "compiled")


# ------------------------------------------------------------------ errors (eager and fake say the same)

X = ((4, 64), torch.float32)
ERROR_CASES = {
    "format": ([X], lambda x: ops.fake_quantize_fp(x, 1, "e4m4"), "`format` must be"),
    "scaling": ([X], lambda x: ops.quantize_fp(x, 1, "e4m3", "max"), "`scaling` must be"),
    "nvfp4-format": ([X], lambda x: ops.quantize_fp(x, 16, "e4m3", "nvfp4"), "needs `format` e2m1"),
    "mx-groups": ([X], lambda x: ops.fake_quantize_fp(x, 1, "e4m3", "mx"), "`groups` must be the number of 32"),
    "mx-numel": ([((4, 10), torch.float32)], lambda x: ops.fake_quantize_fp(x, 1, "e4m3", "mx"), "multiple of 32"),
    "groups": ([X], lambda x: ops.fake_quantize_fp(x, 3, "e4m3"), "`groups` (3) must divide"),
    "groups-zero": ([X], lambda x: ops.fake_quantize_fp_(x, 0, "e4m3"), "`groups` must be >= 1"),
    "groups-overflow": ([((0,), torch.float32)], lambda x: ops.quantize_fp(x, 2**62, "e4m3"), "overflows int64"),
    "input-dtype": ([((4, 64), torch.int8)], lambda x: ops.quantize_fp(x, 1, "e4m3"), "`input` must be float32"),
    "pack-fp4": ([((4, 7), torch.float32)], lambda x: ops.quantize_fp(x, 1, "e2m1"), "divisible by 2"),
    "pack-fp6": ([((4, 6), torch.float32)], lambda x: ops.quantize_fp(x, 1, "e3m2"), "divisible by 4"),
    "codes-dtype": (
        [((4, 64), torch.uint8), ((1,), torch.float32)],
        lambda q, s: ops.dequantize_fp(q, s, 1, "e4m3"),
        "`codes` must be float8_e4m3fn",
    ),
    "scales-dtype": (
        [((4, 64), torch.float8_e5m2), ((8,), torch.float32)],
        lambda q, s: ops.dequantize_fp(q, s, 8, "e5m2", "mx"),
        "`scales` must be float8_e8m0fnu",
    ),
    "scales-shape": (
        [((4, 64), torch.float8_e5m2), ((2,), torch.float32)],
        lambda q, s: ops.dequantize_fp(q, s, 1, "e5m2"),
        "`scales` must have shape [1]",
    ),
    "fp6-codes": (
        [((4, 8), torch.uint8), ((1,), torch.float32)],
        lambda q, s: ops.dequantize_fp(q, s, 1, "e2m3"),
        "divisible by 3",
    ),
    "out-dtype": (
        [((4, 64), torch.float8_e4m3fn), ((1,), torch.float32)],
        lambda q, s: ops.dequantize_fp(q, s, 1, "e4m3", "absmax", torch.int32),
        "`dtype` must be",
    ),
    "out-shape": (
        [X, ((4, 32), torch.float32)],
        lambda x, o: ops.fake_quantize_fp.out(x, 1, "e4m3", out=o),
        "`out` must have shape",
    ),
    "codes-out": (
        [X, ((4, 64), torch.uint8), ((1,), torch.float32)],
        lambda x, q, s: ops.quantize_fp.out(x, 1, "e4m3", codes=q, scales=s),
        "`codes` must be float8_e4m3fn",
    ),
    "scales-out": (
        [X, ((4, 32), torch.uint8), ((9,), torch.uint8)],
        lambda x, q, s: ops.quantize_fp.out(
            x, 16, "e2m1", "nvfp4", codes=q.view(torch.float4_e2m1fn_x2), scales=s.view(torch.float8_e4m3fn)
        ),
        "`scales` must have shape [20]",
    ),
}


def _make_case(inputs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Zero-filled tensors (one-byte float dtypes made as uint8 bytes, then viewed)."""
    tensors = []
    for shape, dtype in inputs:
        one_byte_float = dtype.is_floating_point and dtype.itemsize == 1
        t = torch.zeros(shape, dtype=torch.uint8).view(dtype) if one_byte_float else torch.zeros(shape, dtype=dtype)
        tensors.append(t)
    return tensors


def _message(call) -> str:
    with pytest.raises(RuntimeError) as info:
        call()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_errors_name_op_and_argument_in_every_mode(name):
    inputs, call, words = ERROR_CASES[name]
    tensors = _make_case(inputs)
    before = [t.clone() for t in tensors]
    eager = _message(lambda: call(*tensors))
    assert eager.startswith("qkit.") and words in eager, eager
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8)), "inputs untouched"
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in tensors]
        assert _message(lambda: call(*fakes)) == eager
    assert _message(lambda: call(*[t.to("meta") for t in tensors])) == eager


@pytest.mark.parametrize("fmt", ["e2m1"])
def test_nvfp4_small_and_zero_blocks(device, fmt):
    """Blocks far below the tensor's largest (their E4M3 scale clamps to 2^-6), an all-zero
    block and a block of one Inf, against the reference and torchao."""
    x = make((4, 64), seed=11)
    x[0, :16] *= 1e-6  # (m / 6) / t < 2^-6: the block scale clamps up
    x[1, 16:32] = 0.0
    x[2, 32:48] *= 2.0**-20
    q, s = qkit.quantize_fp(x.to(device), None, fmt, "nvfp4")
    want_q, want_s = ref_quantize_fp(x, x.numel() // 16, fmt, "nvfp4")
    assert torch.equal(s.cpu().view(torch.uint8), want_s.view(torch.uint8)), "scales"
    assert s.cpu().view(torch.uint8)[4].item() == 0x08, "2^-6 in E4M3 (the clamp)"
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8)), "codes"
    assert_same(
        qkit.fake_quantize_fp(x.to(device), None, fmt, "nvfp4"), ref_fake_quantize_fp(x, 16, fmt, "nvfp4"), "fake"
    )
    _, nv = _torchao()
    ao_scale, ao_data = nv.nvfp4_quantize(x, 16, ref_fp_tensor_scale(x))
    assert torch.equal(s.cpu()[4:].view(torch.uint8), ao_scale.view(torch.uint8).reshape(-1)), "torchao scales"
    assert torch.equal(ref_unpack_fp(q, fmt), _ao_codes(ao_data, fmt)), "torchao codes"
