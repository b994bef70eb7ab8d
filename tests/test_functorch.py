"""torch.func transforms and forward-mode AD over qkit's ops (issue 16, item 2).

fake_quantize differentiates with the straight-through estimator in every mode: the
backward passes the output gradient through, the forward mode passes the input tangent
through. Ops without a derivative refuse a tangent, as they refuse requires_grad, with
an error naming the op and the argument - never a silent zero or None tangent.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import func

import qkit
from helpers import FLOAT_DTYPES, assert_same, make_input
from reference import ref_fake_quantize

ops = torch.ops.qkit
DTYPE = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])

GROUPS, BITS = 6, 3

FAKE_QUANTIZE = {
    "wrapper": lambda x, symmetric=True: qkit.fake_quantize(x, groups=GROUPS, bits=BITS, symmetric=symmetric),
    "op": lambda x, symmetric=True: ops.fake_quantize(x, GROUPS, BITS, symmetric, False),
}
ENTRY = pytest.mark.parametrize("entry", FAKE_QUANTIZE)


def _ref(x: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    return ref_fake_quantize(x.cpu(), GROUPS, BITS, symmetric)


# ------------------------------------------------------------------ forward mode: the STE tangent


@DTYPE
@SYM
@ENTRY
def test_func_jvp_passes_the_tangent_through(device, dtype, symmetric, entry):
    x = make_input((4, 9), dtype, seed=1).to(device)
    tangent = make_input((4, 9), dtype, seed=2).to(device)
    fq = FAKE_QUANTIZE[entry]
    primal, tangent_out = func.jvp(lambda a: fq(a, symmetric), (x,), (tangent,))
    assert_same(primal, _ref(x, symmetric), "jvp primal")
    assert_same(tangent_out, tangent, "jvp tangent (straight-through)")


@DTYPE
@SYM
@ENTRY
def test_forward_ad_passes_the_tangent_through(device, dtype, symmetric, entry):
    x = make_input((4, 9), dtype, seed=3).to(device)
    tangent = make_input((4, 9), dtype, seed=4).to(device)
    with fwAD.dual_level():
        out = FAKE_QUANTIZE[entry](fwAD.make_dual(x, tangent), symmetric)
        primal, tangent_out = fwAD.unpack_dual(out)
        assert tangent_out is not None, "forward AD dropped the tangent"
        assert_same(primal, _ref(x, symmetric), "forward_ad primal")
        assert_same(tangent_out, tangent, "forward_ad tangent (straight-through)")


def test_forward_ad_tangent_of_a_strided_input(device):
    base = make_input((9, 4), torch.float32, seed=5).to(device)
    tangent = make_input((9, 4), torch.float32, seed=6).to(device).t()
    with fwAD.dual_level():
        out = qkit.fake_quantize(fwAD.make_dual(base.t(), tangent), groups=GROUPS, bits=BITS)
        assert_same(fwAD.unpack_dual(out).tangent, tangent)
    assert_same(out, _ref(base.t()))


def test_jacfwd_and_jacrev_are_the_identity(device):
    x = make_input((12,), torch.float32, seed=7).to(device)
    fq = FAKE_QUANTIZE["wrapper"]
    eye = torch.eye(12, device=device)
    assert_same(func.jacfwd(fq)(x), eye, "jacfwd")
    assert_same(func.jacrev(fq)(x), eye, "jacrev")


# ------------------------------------------------------------------ reverse mode through torch.func


@DTYPE
@SYM
@ENTRY
def test_func_grad_and_vjp_pass_the_gradient_through(device, dtype, symmetric, entry):
    x = make_input((4, 9), dtype, seed=8).to(device)
    w = make_input((4, 9), dtype, seed=9).to(device)
    fq = FAKE_QUANTIZE[entry]
    assert_same(func.grad(lambda a: (fq(a, symmetric) * w).sum())(x), w, "func.grad")
    primal, vjp_fn = func.vjp(lambda a: fq(a, symmetric), x)
    assert_same(primal, _ref(x, symmetric), "vjp primal")
    (grad,) = vjp_fn(w)
    assert_same(grad, w, "vjp")


def test_nested_transforms_see_the_estimator_at_every_level(device):
    """Second derivatives of sum(fq(x)^2): 2 fq(x) is the gradient, and its derivative is
    2 (the estimator again, at the outer level), as torch.autograd's double backward gives."""
    x = make_input((4, 9), torch.float32, seed=10).to(device)
    fq = FAKE_QUANTIZE["wrapper"]

    def loss(a):
        return (fq(a) ** 2).sum()

    twos = torch.full_like(x, 2.0)
    assert_same(func.grad(loss)(x), 2 * _ref(x).to(device), "grad")
    assert_same(func.grad(lambda a: func.grad(loss)(a).sum())(x), twos, "grad of grad")
    assert_same(func.jvp(func.grad(loss), (x,), (torch.ones_like(x),))[1], twos, "jvp of grad")
    assert_same(func.hessian(loss)(x.reshape(-1)[:12]), 2 * torch.eye(12, device=device), "hessian")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(xr), xr, create_graph=True)
    assert_same(torch.autograd.grad(g.sum(), xr)[0], twos, "autograd double backward")


def test_vmap_composes_with_grad_and_jvp(device):
    x = make_input((5, 12), torch.float32, seed=11).to(device)
    w = make_input((5, 12), torch.float32, seed=12).to(device)
    fq = FAKE_QUANTIZE["wrapper"]
    per_sample = func.vmap(func.grad(lambda a, b: (fq(a) * b).sum()))(x, w)
    assert_same(per_sample, w, "vmap(grad)")
    assert_same(func.grad(lambda a: (func.vmap(fq)(a) * w).sum())(x), w, "grad(vmap)")
    tangents = func.vmap(lambda a, t: func.jvp(fq, (a,), (t,))[1])(x, w)
    assert_same(tangents, w, "vmap(jvp)")
    assert_same(func.jvp(func.vmap(fq), (x,), (w,))[1], w, "jvp(vmap)")


def test_compiled_func_grad(device, fresh_dynamo):
    x = make_input((4, 9), torch.float32, seed=13).to(device)
    grad = torch.compile(func.grad(lambda a: (qkit.fake_quantize(a, groups=GROUPS, bits=BITS) * 3).sum()))
    assert_same(grad(x), torch.full_like(x, 3.0))


# ------------------------------------------------------------------ vmap


def _per_sample(fn, batch: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(sample) for sample in batch])


@DTYPE
@SYM
def test_vmap_matches_per_sample_calls(device, dtype, symmetric):
    batch = make_input((5, 4, 9), dtype, seed=14).to(device)

    def fq(a):
        return ops.fake_quantize(a, GROUPS, BITS, symmetric, False)

    want = _per_sample(lambda s: _ref(s, symmetric), batch)
    assert_same(func.vmap(fq)(batch), want, "vmap")
    assert_same(func.vmap(fq, in_dims=2)(batch.permute(1, 2, 0)), want, "vmap over a trailing dim")
    assert_same(func.vmap(func.vmap(fq))(batch.reshape(5, 1, 4, 9)), want.reshape(5, 1, 4, 9), "nested vmap")
    assert func.vmap(fq)(batch[:0]).shape == (0, 4, 9)


def test_vmap_of_the_writing_forms(device):
    batch = make_input((5, 4, 9), torch.float32, seed=15).to(device)
    want = _per_sample(_ref, batch)

    def in_place(a):
        return qkit.fake_quantize_(a.clone(), groups=GROUPS, bits=BITS)

    def with_out(a):
        return qkit.fake_quantize(a, groups=GROUPS, bits=BITS, out=torch.empty_like(a))

    def op_in_place(a):
        b = a.clone()
        ops.fake_quantize_(b, GROUPS, BITS, True, False)
        return b

    for fn in (in_place, with_out, op_in_place):
        assert_same(func.vmap(fn)(batch), want, fn.__name__)


def test_vmap_of_out_checks_the_per_sample_out():
    """The unbatched call's checks: no broadcasting into a smaller out, no silent cast."""

    def into(a, out):
        return qkit.fake_quantize(a, groups=1, bits=BITS, out=out)

    batch = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"qkit\.fake_quantize: `out` must have shape \[8\], got \[1, 8\]"):
        func.vmap(into)(batch, torch.empty(3, 1, 8))
    with pytest.raises(TypeError, match=r"qkit\.fake_quantize: `out` must be float32, got float64"):
        func.vmap(into)(batch, torch.empty(3, 8, dtype=torch.float64))


def test_vmap_checks_the_per_sample_groups():
    with pytest.raises(ValueError, match=r"qkit\.fake_quantize: `groups` \(4\) must divide .* \(9\)"):
        func.vmap(lambda a: qkit.fake_quantize(a, groups=4, bits=BITS))(torch.randn(3, 9))


def test_vmap_of_stochastic_rounding_follows_the_randomness_flag(device):
    row = make_input((64,), torch.float32, seed=16).to(device)
    batch = row.expand(4, 64).contiguous()

    def fq(a):
        return qkit.fake_quantize(a, groups=2, bits=2, stochastic=True)

    with pytest.raises(RuntimeError, match=r"qkit\.fake_quantize: stochastic rounding .*vmap\(randomness='error'\)"):
        func.vmap(fq)(batch)

    torch.manual_seed(5)
    same = func.vmap(fq, randomness="same")(batch)
    torch.manual_seed(5)
    assert_same(same, fq(row).expand(4, 64), "randomness='same': one draw, every sample")

    torch.manual_seed(5)
    different = func.vmap(fq, randomness="different")(batch)
    assert not all(torch.equal(different[0], different[i]) for i in range(1, 4)), "samples drew alike"
    torch.manual_seed(5)
    assert_same(func.vmap(fq, randomness="different")(batch), different, "seeded")


# ------------------------------------------------------------------ no derivative: refused, never silent

_NO_DERIVATIVE = r"carries a forward-mode tangent, but {} has no derivative"


def _dual(t: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(t, torch.ones_like(t))


def test_writing_forms_refuse_a_tangent(device):
    x = make_input((4, 9), torch.float32, seed=17).to(device)
    out_refused = _NO_DERIVATIVE.format("fake_quantize.out")
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"qkit\.fake_quantize: `input` " + out_refused):
            qkit.fake_quantize(_dual(x), groups=GROUPS, bits=BITS, out=torch.empty_like(x))
        with pytest.raises(ValueError, match=r"qkit\.fake_quantize: `out` " + out_refused):
            qkit.fake_quantize(x, groups=GROUPS, bits=BITS, out=_dual(torch.empty_like(x)))
        dual = _dual(x.clone())
        in_place_refused = r"qkit\.fake_quantize_: `input` " + _NO_DERIVATIVE.format("fake_quantize_")
        with pytest.raises(ValueError, match=in_place_refused):
            qkit.fake_quantize_(dual, groups=GROUPS, bits=BITS)
        assert_same(fwAD.unpack_dual(dual).primal, x, "a refused in-place call leaves its input alone")
    with pytest.raises(ValueError, match=r"`input` " + out_refused):
        func.jvp(lambda a: ops.fake_quantize.out(a, GROUPS, BITS, True, False, out=torch.empty_like(a)), (x,), (x,))


def test_dequantize_refuses_a_tangent_on_params(device):
    q, params = qkit.quantize(make_input((4, 8), torch.float32, seed=18).to(device), 4, 8)
    with fwAD.dual_level():
        with pytest.raises(ValueError, match=r"qkit\.dequantize: `params` " + _NO_DERIVATIVE.format("dequantize")):
            qkit.dequantize(q, _dual(params), 4, 8)
        with pytest.raises(ValueError, match=r"`params` " + _NO_DERIVATIVE.format("dequantize.out")):
            qkit.dequantize(q, _dual(params), 4, 8, out=torch.empty(4, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"`params` " + _NO_DERIVATIVE.format("dequantize")):
        func.jvp(lambda p: qkit.dequantize(q, p, 4, 8), (params,), (torch.ones_like(params),))
    with pytest.raises(ValueError, match=r"qkit\.dequantize: `params` requires grad"):
        func.grad(lambda p: qkit.dequantize(q, p, 4, 8).float().sum())(params)


def test_primals_pass_where_only_other_tensors_are_dual(device):
    """An open dual level alone changes nothing: plain tensors still get the op's result,
    and a dual operand of an ordinary torch op next to a qkit op keeps its tangent."""
    x = make_input((4, 9), torch.float32, seed=19).to(device)
    with fwAD.dual_level():
        y = _dual(x) * 2
        out = qkit.fake_quantize(x, groups=GROUPS, bits=BITS) + y
        assert_same(fwAD.unpack_dual(out).tangent, torch.full_like(x, 2.0))
        assert fwAD.unpack_dual(qkit.fake_quantize(x, groups=GROUPS, bits=BITS)).tangent is None
        q, params = qkit.quantize(x, 4, 8)
        assert_same(qkit.dequantize(q, params, 4, 8), ops.dequantize(q, params, 4, 8, True, None))
