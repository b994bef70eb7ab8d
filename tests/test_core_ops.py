"""Core ops against the reference, bit for bit (docs/ops.md §1-3)."""

from __future__ import annotations

import pytest
import torch

import qkit
from helpers import FLOAT_DTYPES, assert_same, check_quantize, make_input
from reference import (
    codes_of_storage,
    ref_codes,
    ref_dequantize,
    ref_fake_quantize,
    ref_params,
    ref_quantize,
)

ops = torch.ops.qkit

FAKE_BITS = (2, 3, 4, 5, 8, 12, 16)
STORAGE_BITS = tuple(range(2, 9))  # one int8 per code; 4 bits packed in pairs by default
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
DTYPE = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))

# (shape, groups): E = 1, 3, 7, 129, 100003 (> the fused-group limit) and many groups.
# Every last dimension is even, so the same cases serve 4-bit storage.
LAYOUTS = [
    ((64,), 64),  # E = 1: every 4-bit byte straddles two groups
    ((5, 6), 10),  # E = 3
    ((3, 14), 6),  # E = 7
    ((2, 258), 4),  # E = 129
    ((100003, 2), 2),  # E = 100003: the chunked large-group path, odd E
    ((4096, 64), 4096),  # many groups
]
LAYOUT = pytest.mark.parametrize(("shape", "groups"), LAYOUTS, ids=lambda v: str(v).replace(" ", ""))


# ------------------------------------------------------------------ worked examples (docs/ops.md §9)

EXAMPLE = [1, -0.5, 0.25, -2, 0, 0.75, 2, -1.5]


def as_bytes(q: torch.Tensor) -> list[int]:
    return [b & 0xFF for b in q.cpu().tolist()]


@DTYPE
def test_worked_example_symmetric(device, dtype):
    x = torch.tensor(EXAMPLE, dtype=dtype, device=device)
    q, p = ops.quantize(x, 1, 8, True)
    assert q.tolist() == [64, -32, 16, -128, 0, 48, 127, -96]
    assert p.dtype == torch.float32 and p.shape == (1, 1) and p.item() == 0.015625
    deq = [1, -0.5, 0.25, -2, 0, 0.75, 1.984375, -1.5]
    assert ops.dequantize(q, p, 1, 8, True, None).tolist() == deq
    assert ops.fake_quantize(x, 1, 8, True, False).tolist() == deq

    q4, p4 = ops.quantize(x, 1, 4, True)
    assert as_bytes(q4) == [0x4E, 0x18, 0x03, 0x7A]
    assert q4.shape == (4,) and p4.tolist() == [[0.25]]
    deq4 = [1, -0.5, 0.25, -2, 0, 0.75, 1.75, -1.5]
    assert ops.dequantize(q4, p4, 1, 4, True, None).tolist() == deq4
    assert ops.fake_quantize(x, 1, 4, True, False).tolist() == deq4


@DTYPE
def test_worked_example_asymmetric(device, dtype):
    x = torch.arange(8, dtype=dtype, device=device)
    step = torch.tensor(1.0) / torch.tensor(256.0 / 7)  # 1 / (256/7), each in fp32
    q, p = ops.quantize(x, 1, 8, False)
    assert q.tolist() == [-128, -91, -55, -18, 18, 55, 91, 127]
    assert p.shape == (1, 2)
    assert p[0, 0].item() == pytest.approx(0.02734375, rel=1e-6)
    assert p[0, 0].item() == step.item()
    assert p[0, 1].item() == 3.5
    q4, p4 = ops.quantize(x, 1, 4, False)
    assert as_bytes(q4) == [0x8A, 0xDF, 0x13, 0x67]
    assert p4[0, 1].item() == 3.5


@pytest.mark.parametrize("bits", [b for b in STORAGE_BITS if b >= 4])  # the ties below need codes up to 4
def test_round_half_to_even(device, bits):
    # max|x| = 1: scale = 2^(b-1), so x = t / scale for t = k + 0.5 are exact ties
    s = 2.0 ** (bits - 1)
    x = torch.tensor([1.0, *(t / s for t in (0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5))], device=device)
    want = [s - 1, 0, 2, 2, 0, -2, -2, 4]  # 1.0 lands on 2^(b-1) and is clamped to Qmax
    assert (ops.fake_quantize(x, 1, bits, True, False).cpu() * s).tolist() == want
    q, _ = ops.quantize(x, 1, bits, True)
    assert codes_of_storage(q, bits).tolist() == want


# ------------------------------------------------------------------ against the reference


@DTYPE
@pytest.mark.parametrize("bits", FAKE_BITS)
@SYM
@LAYOUT
def test_fake_quantize_matches_reference(device, dtype, bits, symmetric, shape, groups):
    x = make_input(shape, dtype, seed=bits)
    got = ops.fake_quantize(x.to(device), groups, bits, symmetric, False)
    assert got.device.type == torch.device(device).type
    assert_same(got, ref_fake_quantize(x, groups, bits, symmetric), "fake_quantize")


@DTYPE
@pytest.mark.parametrize("bits", STORAGE_BITS)
@SYM
@LAYOUT
def test_quantize_dequantize_match_reference(device, dtype, bits, symmetric, shape, groups):
    check_quantize(make_input(shape, dtype, seed=bits + 1), groups, bits, symmetric, device)


@DTYPE
@SYM
@pytest.mark.parametrize(("shape", "groups"), [*LAYOUTS, ((3, 7), 3), ((5,), 1)], ids=str)
def test_unpacked_4bit_codes(device, dtype, symmetric, shape, groups):
    """``packed=False``: 4-bit codes one per int8, any last dimension; the same codes as packed storage."""
    x = make_input(shape, dtype, seed=5)
    check_quantize(x, groups, 4, symmetric, device, packed=False)
    if shape[-1] % 2 == 0:
        loose, _ = ops.quantize(x.to(device), groups, 4, symmetric, False)
        tight, _ = ops.quantize(x.to(device), groups, 4, symmetric)
        assert torch.equal(codes_of_storage(loose, 4, packed=False), codes_of_storage(tight, 4))


@DTYPE
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@SYM
@pytest.mark.parametrize("kind", ["ties", "ints"])
def test_ties_and_repeated_values(device, dtype, bits, symmetric, kind):
    x = make_input((16, 24), dtype, seed=3, kind=kind)
    for groups in (1, 8, 48):
        got = ops.fake_quantize(x.to(device), groups, bits, symmetric, False)
        assert_same(got, ref_fake_quantize(x, groups, bits, symmetric), f"fake_quantize groups={groups}")
        if bits in STORAGE_BITS:
            check_quantize(x, groups, bits, symmetric, device)


@pytest.mark.parametrize("bits", STORAGE_BITS)
@SYM
def test_dequantize_arbitrary_codes(device, bits, symmetric):
    """Every code value, random params (not produced by quantize)."""
    gen = torch.Generator().manual_seed(7)
    groups = 6
    q = torch.randint(-128, 128, (groups * 10, 256), generator=gen, dtype=torch.int8)
    q[0] = torch.arange(-128, 128, dtype=torch.int8)
    params = (
        torch.randn(groups, 1 if symmetric else 2, generator=gen)
        * torch.tensor([1e-3, 1.0, 3.0, 1e4, 1e-30, 7.0])[:, None]
    )
    for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        got = ops.dequantize(q.to(device), params.to(device), groups, bits, symmetric, dtype)
        want = ref_dequantize(q, params, groups, bits, symmetric, dtype)
        assert_same(got, want, f"dequantize -> {dtype}")


@DTYPE
@pytest.mark.parametrize("bits", STORAGE_BITS)
@SYM
@pytest.mark.parametrize("groups", [1, 16, 96])
def test_fake_equals_dequantize_of_quantize(device, dtype, bits, symmetric, groups):
    x = make_input((12, 32), dtype, seed=11).to(device)
    q, p = ops.quantize(x, groups, bits, symmetric)
    assert_same(
        ops.fake_quantize(x, groups, bits, symmetric, False), ops.dequantize(q, p, groups, bits, symmetric, dtype)
    )


# ------------------------------------------------------------------ the large-group path


@pytest.fixture(scope="module")
def big_input() -> torch.Tensor:
    x = make_input((2**20 + 6,), torch.float32, seed=5)
    x[-1] = 1000.0  # the extremes sit in the last and a middle chunk
    x[700001] = -1500.0
    return x


@DTYPE
@SYM
@pytest.mark.parametrize("op", ["fake8", "quantize8", "quantize4"])
def test_single_big_group(device, big_input, dtype, symmetric, op):
    x = big_input.to(dtype)
    if op == "fake8":
        got = ops.fake_quantize(x.to(device), 1, 8, symmetric, False)
        assert_same(got, ref_fake_quantize(x, 1, 8, symmetric), "fake_quantize")
    else:
        check_quantize(x, 1, int(op[-1]), symmetric, device)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("numel", [2 * 65539, 2**20 + 6])
def test_int4_large_group_any_thread_count(set_threads, threads, numel):
    """4-bit, one group of E > 65536 (even) elements: the packing must not depend on how
    the CPU work is split (a split at an odd element would pair the wrong nibbles)."""
    set_threads(threads)
    i = torch.arange(numel)
    x = ((i % 16) - 8).to(torch.float32) / 8  # symmetric: m = 1, scale 8, code(i) = i % 16 - 8
    q, p = ops.quantize(x, 1, 4, True)
    assert p.tolist() == [[0.125]]
    assert_same(q, ref_quantize(x, 1, 4, True)[0], f"4-bit codes with {threads} threads")
    assert_same(ops.dequantize(q, p, 1, 4, True, torch.float32), x)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((2 * 65539,), 1),  # one large even group
        ((2, 140000), 4),  # large even groups (E = 70000)
        ((100003, 2), 2),  # large odd groups: straddling pairs
        ((7, 40000), 7),  # fused path, several tasks
        ((2**17, 2), 2**17),  # many tiny groups
        ((3, 2 * 21845), 6),  # odd E = 21845 below the fused limit
    ],
    ids=str,
)
def test_any_thread_count(set_threads, threads, shape, groups):
    """Results never depend on how the CPU work is split over threads."""
    set_threads(threads)
    x = make_input(shape, torch.bfloat16, seed=threads)
    for symmetric in (True, False):
        assert_same(ops.fake_quantize(x, groups, 5, symmetric, False), ref_fake_quantize(x, groups, 5, symmetric))
        for bits in STORAGE_BITS:
            check_quantize(x, groups, bits, symmetric, "cpu")


@SYM
def test_two_big_odd_groups_int4(device, big_input, symmetric):
    # E = 2^19 + 3: odd and large, so 4-bit bytes straddle groups in the chunked path
    x = big_input.to(torch.bfloat16)
    x[: x.numel() // 2] *= 1e-3  # the two groups get very different params
    check_quantize(x, 2, 4, symmetric, device)
    assert_same(ops.fake_quantize(x.to(device), 2, 3, symmetric, False), ref_fake_quantize(x, 2, 3, symmetric))


# ------------------------------------------------------------------ shapes, layouts, dtypes


@DTYPE
@SYM
@pytest.mark.parametrize("shape", [(0,), (0, 8)])
@pytest.mark.parametrize("groups", [1, 4])
def test_empty(device, dtype, symmetric, shape, groups):
    x = torch.empty(shape, dtype=dtype, device=device)
    y = ops.fake_quantize(x, groups, 8, symmetric, False)
    assert y.shape == shape and y.dtype == dtype
    ops.fake_quantize_(x, groups, 3, symmetric, True)
    for bits in STORAGE_BITS:
        q, p = ops.quantize(x, groups, bits, symmetric)
        code_shape = (*shape[:-1], shape[-1] // 2) if bits == 4 else shape
        assert q.shape == code_shape and q.dtype == torch.int8
        assert p.shape == (groups, 1 if symmetric else 2) and p.dtype == torch.float32
        y = ops.dequantize(q, p, groups, bits, symmetric, None)
        assert y.shape == shape and y.dtype == torch.float16


@SYM
@pytest.mark.parametrize("bits", STORAGE_BITS)
def test_empty_quantize_params_are_defined(device, symmetric, bits):
    """An empty tensor's groups have no elements: their params must still be defined values.

    The reference takes `m == 0` (`mx == mn`) for an empty group: step 1, offset 0. At the
    very least they must be finite and the same on every call (not uninitialized memory).
    """
    x = torch.empty(0, 8, device=device)
    for groups in (1, 3):
        _, p = ops.quantize(x, groups, bits, symmetric)
        assert_same(p, ref_quantize(x.cpu(), groups, bits, symmetric)[1], f"params of an empty tensor, G={groups}")


@DTYPE
def test_zero_dim(device, dtype):
    x = torch.tensor(-2.0, dtype=dtype)
    for bits in (3, 8):
        for sym in (True, False):
            got = ops.fake_quantize(x.to(device), 1, bits, sym, False)
            assert got.shape == () and got.dtype == dtype
            assert_same(got, ref_fake_quantize(x, 1, bits, sym))
    assert ops.fake_quantize(x.to(device), 1, 8, True, False).item() == -2.0
    assert ops.fake_quantize(-x.to(device), 1, 8, True, False).item() == 1.984375
    q, p = ops.quantize(x.to(device), 1, 8, True)
    assert q.shape == () and q.item() == -128 and p.shape == (1, 1)
    y = ops.dequantize(q, p, 1, 8, True, dtype)
    assert y.shape == () and y.item() == -2.0


def noncontiguous_views(dtype):
    base = make_input((24, 40), dtype, seed=21)
    return {
        "transposed": base.t(),
        "step-sliced": base[1::2, ::2],
        "expanded": make_input((1, 40), dtype, seed=22).expand(6, 40),
        "3d-permuted": make_input((4, 6, 10), dtype, seed=23).permute(2, 0, 1),
    }


@DTYPE
@SYM
@pytest.mark.parametrize("view", ["transposed", "step-sliced", "expanded", "3d-permuted"])
def test_noncontiguous_input(device, dtype, symmetric, view):
    x = noncontiguous_views(dtype)[view].to(device)
    assert not x.is_contiguous()
    xc = x.contiguous()
    groups = x.shape[0]
    for bits in (3, 8):
        got = ops.fake_quantize(x, groups, bits, symmetric, False)
        assert_same(got, ops.fake_quantize(xc, groups, bits, symmetric, False))
        assert_same(got, ref_fake_quantize(x.cpu(), groups, bits, symmetric))
    for bits in STORAGE_BITS:
        q, p = ops.quantize(x, groups, bits, symmetric)
        qc, pc = ops.quantize(xc, groups, bits, symmetric)
        assert_same(q, qc)
        assert_same(p, pc)
        check_quantize(x.cpu(), groups, bits, symmetric, device)


@SYM
def test_dequantize_noncontiguous_q_and_params(device, symmetric):
    x = make_input((16, 32), torch.float32, seed=4)
    q, p = ops.quantize(x, 16, 8, symmetric)
    qt, pt = q.t().contiguous().t(), p.t().contiguous().t()  # same values, transposed layout
    assert not qt.is_contiguous() and (symmetric or not pt.is_contiguous())
    got = ops.dequantize(qt.to(device), pt.to(device), 16, 8, symmetric, torch.float32)
    assert_same(got, ref_dequantize(q, p, 16, 8, symmetric, torch.float32))


@SYM
def test_storage_offset(device, symmetric):
    """Contiguous views that do not start at their storage's beginning."""
    base = make_input((1000,), torch.float16, seed=12).to(device)
    x = base[3:]  # contiguous, storage offset 3 (an odd element)
    assert x.is_contiguous() and x.storage_offset() == 3
    groups = 997
    assert_same(ops.fake_quantize(x, groups, 4, symmetric, False), ref_fake_quantize(x.cpu(), groups, 4, symmetric))
    xe = base[4:]  # even length for 4-bit storage
    check_quantize(xe.cpu(), 4, 4, symmetric, device)
    q, p = ops.quantize(xe, 4, 4, symmetric)
    q_big = torch.cat([q.new_zeros(5), q])  # q and params at storage offsets too
    p_big = torch.cat([p.new_full((3, p.shape[1]), float("nan")), p])
    got = ops.dequantize(q_big[5:], p_big[3:], 4, 4, symmetric, torch.float32)
    assert_same(got, ref_dequantize(q, p, 4, 4, symmetric, torch.float32))
    # in place on an offset view writes only the view
    work = base.clone()
    ops.fake_quantize_(work[3:], groups, 4, symmetric, False)
    assert_same(work[:3], base[:3])
    assert_same(work[3:], ref_fake_quantize(x.cpu(), groups, 4, symmetric))


# ------------------------------------------------------------------ in place


@DTYPE
@SYM
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_fake_quantize_inplace_contiguous(device, dtype, symmetric, bits):
    x = make_input((8, 30), dtype, seed=bits)
    want = ref_fake_quantize(x, 12, bits, symmetric)
    t = x.clone().to(device)
    ptr = t.data_ptr()
    assert ops.fake_quantize_(t, 12, bits, symmetric, False) is None
    assert t.data_ptr() == ptr
    assert_same(t, want)
    t2 = x.clone().to(device)
    assert qkit.fake_quantize_(t2, groups=12, bits=bits, symmetric=symmetric) is t2
    assert_same(t2, want)


@DTYPE
@SYM
@pytest.mark.parametrize("view", ["transposed", "step-sliced", "3d-permuted"])
def test_fake_quantize_inplace_noncontiguous(device, dtype, symmetric, view):
    x = noncontiguous_views(dtype)[view]
    groups = x.shape[0]
    want = ref_fake_quantize(x, groups, 4, symmetric)
    root = x._base if x._base is not None else x
    pristine = root.clone()
    base = pristine.clone().to(device)
    t = base.as_strided(x.shape, x.stride(), x.storage_offset())
    before = base.clone()
    assert ops.fake_quantize_(t, groups, 4, symmetric, False) is None
    assert_same(t, want, "in-place result")
    # elements of the base outside the view are untouched
    mask = torch.ones_like(base, dtype=torch.bool)
    mask.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(False)
    assert_same(base[mask], before[mask], "outside the view")
    t2 = pristine.clone().to(device).as_strided(x.shape, x.stride(), x.storage_offset())
    assert qkit.fake_quantize_(t2, groups, 4, symmetric) is t2
    assert_same(t2, want)


# ------------------------------------------------------------------ output dtypes and shapes


@SYM
def test_dequantize_dtype(device, symmetric):
    x = make_input((4, 16), torch.float32, seed=1).to(device)
    for bits in STORAGE_BITS:
        q, p = ops.quantize(x, 4, bits, symmetric)
        assert ops.dequantize(q, p, 4, bits, symmetric, None).dtype == torch.float16
        assert qkit.dequantize(q, p, bits=bits, symmetric=symmetric).dtype == torch.float16
        for dtype in FLOAT_DTYPES:
            y = ops.dequantize(q, p, 4, bits, symmetric, dtype)
            assert y.dtype == dtype and y.shape == x.shape
            assert_same(qkit.dequantize(q, p, bits=bits, symmetric=symmetric, dtype=dtype), y)


@pytest.mark.parametrize("shape", [(8,), (3, 4), (2, 3, 6), (2, 1, 1, 10)])
@SYM
def test_output_shapes(device, shape, symmetric):
    x = make_input(shape, torch.bfloat16, seed=2).to(device)
    groups = shape[0]
    q8, p8 = qkit.quantize(x, groups=groups, bits=8, symmetric=symmetric)
    assert q8.shape == shape and p8.shape == (groups, 1 if symmetric else 2)
    q4, p4 = qkit.quantize(x, groups=groups, bits=4, symmetric=symmetric)
    assert q4.shape == (*shape[:-1], shape[-1] // 2) and p4.shape == p8.shape
    assert qkit.dequantize(q4, p4, bits=4, symmetric=symmetric).shape == shape
    assert qkit.dequantize(q8, p8, bits=8, symmetric=symmetric).shape == shape
    assert qkit.fake_quantize(x, groups=groups, bits=5, symmetric=symmetric).shape == shape
    assert ops.fake_quantize(x, groups, 5, symmetric, False).is_contiguous()


@DTYPE
@SYM
@pytest.mark.parametrize(("shape", "groups"), [((6, 10), 4), ((2, 30), 20), ((10,), 10), ((3, 42), 18)])
def test_int4_odd_group_size(device, dtype, symmetric, shape, groups):
    """Odd E: pairs straddle groups, each element uses its own group's params."""
    x = make_input(shape, torch.float32, seed=9)
    scales = torch.logspace(-3, 3, groups).repeat_interleave(x.numel() // groups).reshape(shape)
    x = (x * scales).to(dtype)
    check_quantize(x, groups, 4, symmetric, device)
    # spot-check one straddling byte by hand (E = 15: byte 7 = elements 14 and 15)
    if shape == (6, 10):
        q, _ = ops.quantize(x.to(device), groups, 4, symmetric)
        want = ref_quantize(x, groups, 4, symmetric)[0]
        assert q.reshape(-1)[7].item() == want.reshape(-1)[7].item()


@DTYPE
@SYM
def test_special_groups(device, dtype, symmetric):
    """Zero, constant, tiny (subnormal range), huge and sign-mixed groups."""
    finfo = torch.finfo(dtype)
    rows = [
        [0.0] * 8,
        [-0.0] * 8,
        [3.0] * 8,
        [-7.5] * 8,
        [0.0, -0.0] * 4,
        [finfo.tiny / 4, -finfo.tiny / 8, finfo.tiny / 2, 0.0, finfo.tiny / 16, 0.0, 0.0, finfo.tiny / 4],
        [finfo.max, -finfo.max, finfo.max / 3, 0.0, 1.0, -1.0, finfo.max / 2, -finfo.max / 5],
        [finfo.max] * 8,
        [finfo.smallest_normal, -finfo.smallest_normal, 0.0, 1e-30, 0, 0, 0, 0],
        [1.0, 1.0 + finfo.eps, 1.0, 1.0, 1.0 + 2 * finfo.eps, 1.0, 1.0, 1.0],
        [-1e4, 1e-4, 0, 0, 0, 0, 0, 1e4],
    ]
    x = torch.tensor(rows, dtype=torch.float32).to(dtype)
    groups = len(rows)
    for bits in FAKE_BITS:
        got = ops.fake_quantize(x.to(device), groups, bits, symmetric, False)
        assert_same(got, ref_fake_quantize(x, groups, bits, symmetric), f"fake_quantize bits={bits}")
        # Only fp32 groups reaching -FLT_MAX may overflow: step = 1/scale rounds up, so
        # step * Qmin = -inf (bit-exactly what the spec's arithmetic gives; see the report).
        finite_rows = [i for i, r in enumerate(rows) if not (dtype == torch.float32 and -finfo.max in r)]
        assert bool(torch.isfinite(got[finite_rows]).all())
    for bits in STORAGE_BITS:
        check_quantize(x, groups, bits, symmetric, device)


# ------------------------------------------------------------------ non-finite input


@DTYPE
@SYM
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("shape", "groups"), [((4, 32), 4), ((6, 10), 4), ((100003, 2), 2)])
def test_nonfinite_isolated_to_its_group(device, dtype, symmetric, bad, shape, groups):
    x = make_input(shape, dtype, seed=13)
    flat = x.view(-1)
    e = x.numel() // groups
    flat[e + e // 2] = bad  # poison group 1 only
    clean = torch.ones(groups, dtype=torch.bool)
    clean[1] = False
    per_elem = clean.repeat_interleave(e)

    def check_fake(got, bits):
        got = got.cpu().reshape(-1)
        assert bool(torch.isnan(got[~per_elem]).all()), "the poisoned group must be NaN"
        assert bool(torch.isfinite(got[per_elem]).all())
        # other groups: bit-exact to the reference computed on the finite groups alone
        want = ref_fake_quantize(flat[per_elem], groups - 1, bits, symmetric)
        assert_same(got[per_elem], want, "finite groups")

    for bits in (3, 8, 16):
        check_fake(ops.fake_quantize(x.to(device), groups, bits, symmetric, False), bits)
        t = x.clone().to(device)
        ops.fake_quantize_(t, groups, bits, symmetric, False)
        check_fake(t, bits)
    for bits in STORAGE_BITS:
        q, p = ops.quantize(x.to(device), groups, bits, symmetric)
        p = p.cpu()
        assert bool(torch.isnan(p[1]).all()), "the poisoned group's params must be NaN"
        _, want_step, want_offset = ref_params(flat[per_elem], groups - 1, bits, symmetric)
        want_p = want_step if symmetric else torch.cat([want_step, want_offset], dim=1)
        assert_same(p[clean], want_p, "params of finite groups")
        want_codes = ref_codes(flat[per_elem], groups - 1, bits, symmetric).reshape(-1).to(torch.int32)
        assert_same(codes_of_storage(q, bits)[per_elem], want_codes, "codes of finite groups")
        check_fake(ops.dequantize(q, p.to(device), groups, bits, symmetric, dtype), bits)
        check_quantize(x, groups, bits, symmetric, device)


# ------------------------------------------------------------------ the issue's example, compiled


def test_issue_example_compiled(device, fresh_dynamo):
    w = make_input((4096, 1024), torch.bfloat16, seed=17).to(device)

    def fn(w):
        wq = qkit.fake_quantize(w, bits=4, groups=4096)
        q, params = torch.ops.qkit.quantize(w, 4096, 8, True)
        w2 = torch.ops.qkit.dequantize(q, params, 4096, 8, True, torch.bfloat16)
        return wq, q, params, w2

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got = compiled(w)
    eager = fn(w)
    for g, e in zip(got, eager, strict=True):
        assert_same(g, e)
    wq, q, params, w2 = got
    assert wq.dtype == w2.dtype == torch.bfloat16 and wq.shape == w2.shape == w.shape
    wc = w.cpu()
    assert_same(wq, ref_fake_quantize(wc, 4096, 4, True))
    want_q, want_p = ref_quantize(wc, 4096, 8, True)
    assert_same(q, want_q)
    assert_same(params, want_p)
    assert_same(w2, ref_fake_quantize(wc, 4096, 8, True))
