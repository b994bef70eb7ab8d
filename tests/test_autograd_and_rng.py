"""Straight-through gradients, and stochastic rounding (unbiased, two neighbours, seeded)."""

from __future__ import annotations

import math

import pytest
import torch

import qkit
from helpers import FLOAT_DTYPES, assert_same, make_input
from reference import code_range, dequant_codes, ref_code_units, ref_params, ref_stochastic_fake_quantize

ops = torch.ops.qkit
DTYPE = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])


# ------------------------------------------------------------------ straight-through estimator


def _ste_loss(fq, x, w):
    return (fq(x) * w).sum()


@DTYPE
@SYM
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("entry", ["wrapper", "op"])
def test_straight_through_gradient(device, dtype, symmetric, stochastic, entry):
    x = make_input((6, 20), dtype, seed=1).to(device).requires_grad_(True)
    w = make_input((6, 20), dtype, seed=2).to(device)
    if entry == "wrapper":
        y = qkit.fake_quantize(x, groups=12, bits=3, symmetric=symmetric, stochastic=stochastic)
    else:
        y = ops.fake_quantize(x, 12, 3, symmetric, stochastic)
    (y * w).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert_same(x.grad, w, "d sum(fake_quantize(x) * w) / dx")


@DTYPE
def test_straight_through_gradient_compiled(device, fresh_dynamo, dtype):
    def loss(x, w):
        y = qkit.fake_quantize(x, groups=4, bits=4)
        return (y * w).sum(), y

    x = make_input((4, 32), dtype, seed=3).to(device).requires_grad_(True)
    w = make_input((4, 32), dtype, seed=4).to(device)
    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    out, y = compiled(x, w)
    out.backward()
    assert_same(x.grad, w, "compiled STE gradient")
    # the forward value is the eager one
    assert_same(y, loss(x.detach(), w)[1])


def test_gradient_flows_to_other_operands(device):
    # d/dw sum(fq(x) * w) = fq(x): the op's output is an ordinary autograd node
    x = make_input((4, 8), torch.float32, seed=5).to(device)
    w = torch.ones(4, 8, device=device, requires_grad=True)
    (qkit.fake_quantize(x, groups=4, bits=5) * w).sum().backward()
    assert_same(w.grad, qkit.fake_quantize(x, groups=4, bits=5))


# ------------------------------------------------------------------ stochastic rounding


def neighbours(x: torch.Tensor, groups: int, bits: int, symmetric: bool):
    """(v, low, high): v = (x - offset) * scale (ref_code_units), and the outputs of codes floor(v), floor(v) + 1
    (clamped to the code range), in x's dtype, all flat."""
    _, step, offset = ref_params(x, groups, bits, symmetric)
    v = ref_code_units(x.cpu(), groups, bits, symmetric)
    qmin, qmax = code_range(bits)
    lo = torch.clamp(torch.floor(v), qmin, qmax)
    hi = torch.clamp(torch.floor(v) + 1, qmin, qmax)
    return (
        v.reshape(-1),
        dequant_codes(lo, step, offset, x.dtype).reshape(-1),
        dequant_codes(hi, step, offset, x.dtype).reshape(-1),
    )


@pytest.mark.parametrize(
    ("numel", "groups"),
    [(3073, 7), (3073, 1), (4096, 64), (70001, 1)],
    ids=["odd-groups", "tiles", "blocks", "chunked"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stochastic_codes_follow_the_philox_stream(device, numel, groups, dtype):
    """Bit for bit the reference: element e rounds with word e % 4 of Philox block e // 4,
    keyed by the int64 the op draws from torch's generator, whatever the group layout and
    the kernel's tiling (groups misaligned to blocks of four, tiles, chunks of a huge group)."""
    x = make_input((numel,), dtype, seed=31).to(device)
    torch.manual_seed(1234)
    seed = torch.empty(1, dtype=torch.int64, device=device).random_().item()
    torch.manual_seed(1234)
    got = qkit.fake_quantize(x, groups=groups, bits=4, symmetric=False, stochastic=True)
    assert_same(got, ref_stochastic_fake_quantize(x, groups, 4, False, seed))


def assert_unbiased(out: torch.Tensor, x: torch.Tensor, groups: int, bits: int, symmetric: bool, mask=None):
    """Every output is one of its two neighbouring codes, and the fraction rounded up
    matches frac(v) within 5 binomial standard deviations."""
    v, lo, hi = neighbours(x, groups, bits, symmetric)
    out = out.detach().cpu().reshape(-1)
    up = out == hi
    assert bool((up | (out == lo)).all()), "a stochastic code other than floor(v) or floor(v) + 1"
    if mask is None:
        mask = torch.ones_like(up)
    mask = mask & (lo != hi)  # clamped at Qmax (v >= Qmax): no choice, no statistics
    frac = (v - torch.floor(v))[mask].to(torch.float64)
    n = frac.numel()
    expected = frac.sum().item()
    std = math.sqrt((frac * (1 - frac)).sum().item())
    got = up[mask].sum().item()
    assert abs(got - expected) <= 5 * std + 1, f"{got} of {n} rounded up, expected {expected:.1f} ± {std:.1f}"


@DTYPE
@SYM
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("fraction", [0.4, 0.125, 0.9])
def test_stochastic_rounding_is_unbiased(device, dtype, symmetric, bits, fraction):
    """One fixed value halfway-ish between two codes, 4096 draws: the mean is the value."""
    torch.manual_seed(0)
    n = 4097
    scale = 2.0 ** (bits - 1)  # symmetric: m = 1 -> scale 2^(b-1)
    value = (3 % scale + fraction) / scale if bits > 2 else fraction / scale
    x = torch.full((n,), value, dtype=torch.float32)
    x[0] = 1.0
    if not symmetric:
        x[1] = -1.0  # asymmetric: mx = 1, mn = -1 -> offset 0, same scale
    x = x.to(dtype)
    out = ops.fake_quantize(x.to(device), 1, bits, symmetric, True)
    mask = torch.arange(n) >= 2
    assert_unbiased(out, x, 1, bits, symmetric, mask)
    # and the mean of the dequantized values is the value (up to the rounding of the two
    # neighbours to `dtype`): E[out] = lo + frac(v) * (hi - lo)
    v, lo, hi = neighbours(x, 1, bits, symmetric)
    p = (v - torch.floor(v))[2].item()
    lo, hi = lo[2].item(), hi[2].item()
    mean = out.cpu()[mask].to(torch.float64).mean().item()
    tol = 5 * (hi - lo) * math.sqrt(p * (1 - p) / mask.sum().item())
    assert abs(mean - (lo + p * (hi - lo))) <= tol
    if dtype == torch.float32:
        assert mean == pytest.approx(x[2].item(), abs=tol + 1e-6 * abs(x[2].item()))


@pytest.mark.parametrize("threads", [1, 2])
def test_stochastic_unbiased_per_element_over_calls(device, set_threads, threads):
    """The same element over 512 calls, for 16 elements at different fractions."""
    set_threads(threads)
    torch.manual_seed(1)
    x = torch.cat([torch.tensor([1.0]), (torch.arange(1, 16) / 16 + 5) / 128])  # 8-bit sym: v = 5 + k/16
    calls = torch.stack([ops.fake_quantize(x.to(device), 1, 8, True, True).cpu() for _ in range(512)])
    v, lo, hi = neighbours(x, 1, 8, True)
    assert bool(((calls == lo) | (calls == hi)).all())
    up = (calls == hi)[:, 1:].to(torch.float64).mean(dim=0)
    frac = (v - torch.floor(v))[1:].to(torch.float64)
    std = torch.sqrt(frac * (1 - frac) / 512)
    assert bool(((up - frac).abs() <= 5 * std + 1e-9).all()), (up, frac)


@DTYPE
@SYM
@pytest.mark.parametrize("bits", [2, 3, 5, 8, 12, 16])
@pytest.mark.parametrize(("shape", "groups"), [((64, 48), 64), ((3, 7), 3), ((2**17 + 2,), 1)], ids=str)
def test_stochastic_only_two_neighbours(device, dtype, symmetric, bits, shape, groups):
    torch.manual_seed(2)
    x = make_input(shape, dtype, seed=bits)
    out = ops.fake_quantize(x.to(device), groups, bits, symmetric, True)
    assert out.dtype == dtype and out.shape == x.shape
    # every element one of its two neighbours, and overall unbiased
    assert_unbiased(out, x, groups, bits, symmetric)


def _inplace_op(x):
    t = x.clone()
    assert ops.fake_quantize_(t, 4, 4, True, True) is None
    return t


STOCHASTIC_CALLS = {
    "op": lambda x: ops.fake_quantize(x, 4, 4, True, True),
    "wrapper": lambda x: qkit.fake_quantize(x, groups=4, bits=4, stochastic=True),
    "inplace-wrapper": lambda x: qkit.fake_quantize_(x.clone(), groups=4, bits=4, stochastic=True),
    "inplace-op": _inplace_op,
    "asym-op": lambda x: ops.fake_quantize(x, 4, 4, False, True),
}


@pytest.mark.parametrize("call", STOCHASTIC_CALLS)
def test_stochastic_seeded_and_fresh(device, call):
    call = STOCHASTIC_CALLS[call]
    x = make_input((4, 1024), torch.float32, seed=6).to(device)
    torch.manual_seed(42)
    a = call(x)
    b = call(x)
    assert not torch.equal(a, b), "successive calls must draw afresh"
    torch.manual_seed(42)
    assert_same(call(x), a, "the same seed reproduces the draws")
    assert_same(call(x), b)
    torch.manual_seed(43)
    assert not torch.equal(call(x), a), "another seed, other draws"


def test_stochastic_op_and_wrapper_share_the_generator(device):
    x = make_input((4, 256), torch.bfloat16, seed=7).to(device)
    torch.manual_seed(5)
    a = ops.fake_quantize(x, 4, 4, True, True)
    torch.manual_seed(5)
    b = qkit.fake_quantize(x, groups=4, bits=4, stochastic=True)
    t = x.clone()
    torch.manual_seed(5)
    qkit.fake_quantize_(t, groups=4, bits=4, stochastic=True)
    assert_same(a, b)
    assert_same(t, a)


def test_stochastic_draws_differ_across_groups_and_chunks(device):
    """Identical groups (and identical 16384-element chunks of one big group) must not
    get identical draws: the uniforms are indexed by the element, not reused."""
    torch.manual_seed(3)
    pattern = (torch.arange(64) % 13 + 0.5) / 13
    x = pattern.repeat(512)  # 512 identical groups of 64
    out = ops.fake_quantize(x.to(device), 512, 4, True, True).cpu().reshape(512, 64)
    assert len({tuple(r.tolist()) for r in out}) > 400
    big = ((torch.arange(16384) % 97 + 0.5) / 97).repeat(9)  # one group of 9 identical chunks
    out = ops.fake_quantize(big.to(device), 1, 4, True, True).cpu().reshape(9, 16384)
    for i in range(1, 9):
        assert not torch.equal(out[0], out[i])


@pytest.mark.parametrize("numel", [4096, 2**17 + 6])
def test_stochastic_independent_of_thread_count(set_threads, numel):
    x = make_input((numel,), torch.float32, seed=8)
    results = []
    for threads in (1, 2, 3):
        set_threads(threads)
        torch.manual_seed(9)
        results.append(ops.fake_quantize(x, 2, 4, False, True))
    assert_same(results[1], results[0])
    assert_same(results[2], results[0])


def test_stochastic_nonfinite_isolated(device):
    torch.manual_seed(4)
    x = make_input((4, 64), torch.float32, seed=9)
    x[2, 5] = float("nan")
    out = ops.fake_quantize(x.to(device), 4, 4, True, True).cpu()
    assert bool(torch.isnan(out[2]).all())
    keep = torch.tensor([0, 1, 3])
    assert_unbiased(out[keep], x[keep], 3, 4, True)


@pytest.mark.parametrize("view", ["transposed", "step-sliced"])
def test_stochastic_layout_does_not_matter(device, view):
    """Draws follow the logical (row-major) element order: with the same seed a
    non-contiguous input gives the result of its .contiguous() copy, in place too."""
    base = make_input((48, 64), torch.float32, seed=11).to(device)
    x = base.t() if view == "transposed" else base[::2, ::3]
    assert not x.is_contiguous()
    groups = x.shape[0]
    torch.manual_seed(21)
    want = ops.fake_quantize(x.contiguous(), groups, 4, False, True)
    torch.manual_seed(21)
    assert_same(ops.fake_quantize(x, groups, 4, False, True), want)
    work = base.clone()
    t = work.t() if view == "transposed" else work[::2, ::3]
    torch.manual_seed(21)
    ops.fake_quantize_(t, groups, 4, False, True)
    assert_same(t, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stochastic_cuda_graph_replay():
    """Each replay of a captured CUDA graph draws afresh (docs/ops.md §7)."""
    x = make_input((8, 1024), torch.float32, seed=12).cuda()
    torch.manual_seed(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture
            ops.fake_quantize(x, 8, 4, True, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fake_quantize(x, 8, 4, True, True)
    graph.replay()
    a = out.clone()
    graph.replay()
    b = out.clone()
    assert not torch.equal(a, b), "replays must draw afresh"
    assert_unbiased(a, x.cpu(), 8, 4, True)
    assert_unbiased(b, x.cpu(), 8, 4, True)


def test_quantize_outputs_carry_no_gradient_and_no_warning(device):
    """quantize is not differentiable: its outputs are plain tensors (no autograd graph,
    no 'autograd kernel was not registered' warning)."""
    import warnings

    x = torch.randn(4, 8, device=device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, p = torch.ops.qkit.quantize(x, 4, 8, True)
    assert not q.requires_grad and not p.requires_grad and p.grad_fn is None


def test_dequantize_refuses_params_that_require_grad(device):
    """A gradient w.r.t. params would silently be missing: say so instead."""
    q, p = torch.ops.qkit.quantize(torch.randn(4, 8, device=device), 4, 8, True)
    p.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"qkit\.dequantize: `params` requires grad"):
        torch.ops.qkit.dequantize(q, p, 4, 8, True, torch.float32)
    with torch.no_grad():
        torch.ops.qkit.dequantize(q, p, 4, 8, True, torch.float32)
    torch.ops.qkit.dequantize(q, p.detach(), 4, 8, True, torch.float32)
