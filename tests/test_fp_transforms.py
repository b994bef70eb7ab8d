"""The floating-point format ops under torch.func transforms, forward-mode AD, and on the
wrappers' straight call (docs/ops.md §10), the bar the integer ops set in test_functorch.py
and test_straight_calls.py.

vmap equals the per-sample calls bit for bit (tests/reference.py for the values), with
every scaling: absmax and mx batch as one call of ``B * G`` groups, nvfp4 (one tensor scale
per call) runs once per sample. fake_quantize_fp differentiates straight through in every
mode; the codec and the writing forms refuse a tangent as they refuse requires_grad.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import func

import qkit
import qkit.fp_ops
from helpers import FLOAT_DTYPES, assert_same, count_straight_calls
from reference import FP_FORMATS, ref_fake_quantize_fp, ref_philox_uniforms, ref_quantize_fp
from test_straight_calls import RecordingDispatchMode

ops = torch.ops.qkit
SCALED = [(f, "absmax") for f in FP_FORMATS] + [(f, "mx") for f in FP_FORMATS] + [("e2m1", "nvfp4")]
SCALINGS = pytest.mark.parametrize(("fmt", "scaling"), SCALED, ids=lambda v: str(v))
# One format per scaling, and per packing (FP8, FP6 four in three bytes, FP4 two per byte).
SOME = [("e4m3", "absmax"), ("e3m2", "mx"), ("e2m1", "nvfp4"), ("e2m1", "absmax")]
SOME_SCALINGS = pytest.mark.parametrize(("fmt", "scaling"), SOME, ids=lambda v: str(v))
DTYPE = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))

SAMPLE = (4, 64)  # every scaling's blocks, every packing unit
ABSMAX_GROUPS = 8


def groups_of(scaling: str, numel: int = SAMPLE[0] * SAMPLE[1]) -> int:
    return {"absmax": ABSMAX_GROUPS, "mx": numel // 32, "nvfp4": numel // 16}[scaling]


def make(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Normal data whose magnitude changes by sample and by group (distinct scales, and a
    distinct nvfp4 tensor scale per sample)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-6, 7, shape, generator=g).float())
    rows = torch.exp2(torch.arange(shape[0]).float() * 3 - 4).reshape(-1, *([1] * (len(shape) - 1)))
    return (torch.randn(shape, generator=g) * mag * rows).to(dtype)


def per_sample(fn, *batches: torch.Tensor):
    """``fn`` on each sample, stacked (tuples part by part): the loop vmap must equal."""
    results = [fn(*samples) for samples in zip(*batches, strict=True)]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results, strict=True))
    return torch.stack(results)


def assert_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-exact equality of any dtype (torch lacks == on the 8/4-bit floats)."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)}"
    assert torch.equal(got.cpu().view(torch.uint8), want.cpu().view(torch.uint8)), what


def moved(batch: torch.Tensor, in_dim: int) -> torch.Tensor:
    """``batch`` (batch first) with its batch dimension at ``in_dim``, a strided view."""
    return batch.movedim(0, in_dim)


# ------------------------------------------------------------------ vmap


@SCALINGS
@DTYPE
@pytest.mark.parametrize("in_dim", [0, 1, 2])
def test_vmap_of_fake_quantize_fp_matches_per_sample_calls(device, fmt, scaling, dtype, in_dim):
    batch = make((3, *SAMPLE), dtype, seed=1)
    groups = groups_of(scaling)

    def fq(a):
        return qkit.fake_quantize_fp(a, groups, fmt, scaling)

    want = per_sample(lambda s: ref_fake_quantize_fp(s, groups, fmt, scaling), batch)
    assert_same(func.vmap(fq, in_dims=in_dim)(moved(batch, in_dim).to(device)), want, "vmap")
    assert_same(per_sample(fq, batch.to(device)), want, "the per-sample loop")


@SCALINGS
@pytest.mark.parametrize("in_dim", [0, 1, 2])
def test_vmap_of_quantize_fp_and_dequantize_fp_match_per_sample_calls(device, fmt, scaling, in_dim):
    batch = make((3, *SAMPLE), seed=2)
    groups = groups_of(scaling)
    want_codes, want_scales = per_sample(lambda s: ref_quantize_fp(s, groups, fmt, scaling), batch)

    codes, scales = func.vmap(lambda a: qkit.quantize_fp(a, groups, fmt, scaling), in_dims=in_dim)(
        moved(batch, in_dim).to(device)
    )
    assert_bytes(codes, want_codes, "codes")
    assert_bytes(scales, want_scales, "scales")

    def dq(c, s):
        return qkit.dequantize_fp(c, s, groups, fmt, scaling, torch.bfloat16)

    want = per_sample(lambda s: ref_fake_quantize_fp(s, groups, fmt, scaling).to(torch.bfloat16), batch)
    assert_same(func.vmap(dq)(codes, scales), want, "dequantize_fp")
    assert_same(func.vmap(dq, in_dims=(in_dim, 0))(moved(codes, in_dim), scales), want, "codes' batch dim moved")


@SOME_SCALINGS
def test_vmap_of_dequantize_fp_with_shared_codes_or_scales(device, fmt, scaling):
    """An unbatched argument is every sample's: the per-sample loop with it repeated."""
    batch = make((3, *SAMPLE), seed=3).to(device)
    groups = groups_of(scaling)
    codes, scales = func.vmap(lambda a: qkit.quantize_fp(a, groups, fmt, scaling))(batch)

    def dq(c, s):
        return qkit.dequantize_fp(c, s, groups, fmt, scaling)

    shared_scales = func.vmap(dq, in_dims=(0, None))(codes, scales[1])
    assert_same(shared_scales, per_sample(lambda c: dq(c, scales[1]), codes), "one scales, batched codes")
    shared_codes = func.vmap(dq, in_dims=(None, 0))(codes[2], scales)
    assert_same(shared_codes, per_sample(lambda s: dq(codes[2], s), scales), "one codes, batched scales")


@SOME_SCALINGS
def test_nested_vmap_and_empty_batches(device, fmt, scaling):
    batch = make((2, 3, *SAMPLE), seed=4)
    groups = groups_of(scaling)

    def fq(a):
        return qkit.fake_quantize_fp(a, groups, fmt, scaling)

    want = per_sample(lambda row: per_sample(lambda s: ref_fake_quantize_fp(s, groups, fmt, scaling), row), batch)
    assert_same(func.vmap(func.vmap(fq))(batch.to(device)), want, "nested vmap")
    empty = batch[0, :0].to(device)
    assert func.vmap(fq)(empty).shape == (0, *SAMPLE)
    codes, scales = func.vmap(lambda a: qkit.quantize_fp(a, groups, fmt, scaling))(empty)
    one_codes, one_scales = qkit.quantize_fp(batch[0, 0].to(device), groups, fmt, scaling)
    assert (codes.shape, codes.dtype) == ((0, *one_codes.shape), one_codes.dtype)
    assert (scales.shape, scales.dtype) == ((0, *one_scales.shape), one_scales.dtype)
    deq = func.vmap(lambda c, s: qkit.dequantize_fp(c, s, groups, fmt, scaling, torch.float16))(codes, scales)
    assert (deq.shape, deq.dtype) == ((0, *SAMPLE), torch.float16)


@SOME_SCALINGS
def test_vmap_of_the_writing_forms(device, fmt, scaling):
    batch = make((3, *SAMPLE), seed=5)
    groups = groups_of(scaling)
    want = per_sample(lambda s: ref_fake_quantize_fp(s, groups, fmt, scaling), batch)
    want_codes, want_scales = per_sample(lambda s: ref_quantize_fp(s, groups, fmt, scaling), batch)
    batch = batch.to(device)

    def in_place(a):
        return qkit.fake_quantize_fp_(a.clone(), groups, fmt, scaling)

    def op_in_place(a):
        b = a.clone()
        ops.fake_quantize_fp_(b, groups, fmt, scaling, False)
        return b

    def with_out(a):
        return qkit.fake_quantize_fp(a, groups, fmt, scaling, out=torch.empty_like(a))

    for fn in (in_place, op_in_place, with_out):
        assert_same(func.vmap(fn)(batch), want, fn.__name__)

    def quantize_out(a):
        codes, scales = qkit.quantize_fp(a, groups, fmt, scaling)  # batched buffers of the right kind
        return qkit.quantize_fp(a, groups, fmt, scaling, out=(torch.empty_like(codes), torch.empty_like(scales)))

    codes, scales = func.vmap(quantize_out)(batch)
    assert_bytes(codes, want_codes, "quantize_fp out=")
    assert_bytes(scales, want_scales, "quantize_fp scales out=")

    def dequantize_out(c, s, like):
        return qkit.dequantize_fp(c, s, groups, fmt, scaling, out=torch.empty_like(like, dtype=torch.float16))

    assert_same(func.vmap(dequantize_out)(codes, scales, batch), want.to(torch.float16), "dequantize_fp out=")


def test_vmap_of_the_writing_forms_checks_each_sample():
    """The unbatched call's checks on the per-sample views: no broadcast into a smaller
    buffer, no silent cast, no in-place write into an expanded input."""
    batch = make((3, 64))

    def into(a, out):
        return qkit.fake_quantize_fp(a, 2, "e4m3", out=out)

    with pytest.raises(ValueError, match=r"qkit\.fake_quantize_fp: `out` must have shape \[64\], got \[1, 64\]"):
        func.vmap(into)(batch, torch.empty(3, 1, 64))
    with pytest.raises(TypeError, match=r"qkit\.fake_quantize_fp: `out` must be float32, got float64"):
        func.vmap(into)(batch, torch.empty(3, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"qkit\.fake_quantize_fp_: `input` has elements that share memory"):
        func.vmap(lambda a: qkit.fake_quantize_fp_(a, 1, "e4m3"))(batch[:, :1].expand(3, 64))

    def quantize_into(a, codes, scales):
        return qkit.quantize_fp(a, 2, "e2m1", "mx", out=(codes, scales))

    codes = torch.empty(3, 32, dtype=torch.float4_e2m1fn_x2)
    with pytest.raises(ValueError, match=r"qkit\.quantize_fp: `scales` must have shape \[2\], got \[3\]"):
        func.vmap(quantize_into)(batch, codes, torch.empty(3, 3, dtype=torch.float8_e8m0fnu))
    with pytest.raises(TypeError, match=r"qkit\.quantize_fp: `codes` must be float4_e2m1fn_x2"):
        func.vmap(quantize_into)(batch, codes.view(torch.uint8), torch.empty(3, 2, dtype=torch.float8_e8m0fnu))
    q, s = qkit.quantize_fp(batch, 6, "e4m3")
    with pytest.raises(ValueError, match=r"qkit\.dequantize_fp: `out` must have shape \[64\], got \[32\]"):
        func.vmap(lambda c, sc: qkit.dequantize_fp(c, sc, 2, "e4m3", out=torch.empty(32)))(q, s.reshape(3, 2))


def test_vmap_checks_each_sample():
    """Per-sample groups and packing, in the unbatched call's words."""
    batch = make((3, 64))
    with pytest.raises(ValueError, match=r"qkit\.fake_quantize_fp: `groups` \(5\) must divide .* \(64\)"):
        func.vmap(lambda a: qkit.fake_quantize_fp(a, 5, "e4m3"))(batch)
    mx_groups = r"qkit\.fake_quantize_fp: `groups` must be the number of 32-element blocks of `input` \(2\)"
    with pytest.raises(ValueError, match=mx_groups):
        func.vmap(lambda a: ops.fake_quantize_fp(a, 6, "e4m3", "mx", False))(batch)  # the batch's count
    with pytest.raises(ValueError, match=r"qkit\.quantize_fp: 4-bit storage .*`input` needs a last dimension"):
        func.vmap(lambda a: qkit.quantize_fp(a, 1, "e2m1"))(make((64,)))  # 0-dim samples: nothing to pack along
    codes, scales = qkit.quantize_fp(batch, 3 * 4, "e2m1", "nvfp4")
    with pytest.raises(ValueError, match=r"qkit\.dequantize_fp: `scales` must have shape \[8\]"):
        func.vmap(lambda c, s: qkit.dequantize_fp(c, s, 4, "e2m1", "nvfp4"))(codes, scales[:15].reshape(3, 5))


def test_nvfp4_under_vmap_has_one_tensor_scale_per_sample():
    """The 4-byte header of a sample's nvfp4 scales is that sample's tensor scale: samples
    of different magnitudes get different headers, each the one its own call writes."""
    batch = make((3, 64), seed=6)
    _, scales = func.vmap(lambda a: qkit.quantize_fp(a, 4, "e2m1", "nvfp4"))(batch)
    heads = [qkit.fp_ops.nvfp4_scales(s)[0] for s in scales]
    assert len({float(h) for h in heads}) == 3
    for sample, head in zip(batch, heads, strict=True):
        assert_same(head, qkit.fp_ops.nvfp4_scales(ref_quantize_fp(sample, 4, "e2m1", "nvfp4")[1])[0])


@pytest.mark.parametrize(("fmt", "scaling"), [("e4m3", "absmax"), ("e2m1", "mx"), ("e2m1", "nvfp4")])
def test_vmap_of_stochastic_rounding_follows_the_randomness_flag(device, fmt, scaling):
    batch = make((3, 64), seed=7).to(device)
    groups = groups_of(scaling, 64)

    def fq(a):
        return qkit.fake_quantize_fp(a, groups, fmt, scaling, stochastic=True)

    refused = r"qkit\.fake_quantize_fp: stochastic rounding .*vmap\(randomness='error'\)"
    with pytest.raises(RuntimeError, match=refused):
        func.vmap(fq)(batch)

    def replayed(sample):
        torch.manual_seed(5)
        return fq(sample)

    torch.manual_seed(5)
    same = func.vmap(fq, randomness="same")(batch)
    assert_same(same, per_sample(replayed, batch), "randomness='same': one draw, every sample")

    torch.manual_seed(5)
    different = func.vmap(fq, randomness="different")(batch)
    if scaling == "nvfp4":  # one call per sample: the loop's draws
        torch.manual_seed(5)
        assert_same(different, per_sample(fq, batch), "randomness='different', per sample")
    else:  # one call over the batch: one Philox stream over its elements
        torch.manual_seed(5)
        seed = torch.empty(1, dtype=torch.int64).random_().item()
        uniforms = ref_philox_uniforms(seed, batch.numel())
        want = ref_fake_quantize_fp(batch.cpu(), 3 * groups, fmt, scaling, uniforms)
        assert_same(different, want, "randomness='different', one stream")
    torch.manual_seed(5)
    assert_same(func.vmap(fq, randomness="different")(batch), different, "seeded")
    assert not torch.equal(different, same)


# ------------------------------------------------------------------ forward mode: the STE tangent


@SCALINGS
@DTYPE
def test_func_jvp_and_forward_ad_pass_the_tangent_through(device, fmt, scaling, dtype):
    x = make(SAMPLE, dtype, seed=8)
    tangent = make(SAMPLE, dtype, seed=9).to(device)
    groups = groups_of(scaling)
    want = ref_fake_quantize_fp(x, groups, fmt, scaling)
    x = x.to(device)
    for name, fq in {
        "wrapper": lambda a: qkit.fake_quantize_fp(a, groups, fmt, scaling),
        "op": lambda a: ops.fake_quantize_fp(a, groups, fmt, scaling, False),
    }.items():
        primal, tangent_out = func.jvp(fq, (x,), (tangent,))
        assert_same(primal, want, f"{name}: jvp primal")
        assert_same(tangent_out, tangent, f"{name}: jvp tangent (straight-through)")
        with fwAD.dual_level():
            primal, tangent_out = fwAD.unpack_dual(fq(fwAD.make_dual(x, tangent)))
            assert tangent_out is not None, f"{name}: forward AD dropped the tangent"
            assert_same(primal, want, f"{name}: forward_ad primal")
            assert_same(tangent_out, tangent, f"{name}: forward_ad tangent")


def test_forward_ad_of_stochastic_rounding_and_a_strided_tangent(device):
    base = make((64, 4), seed=10).to(device)
    tangent = make((64, 4), seed=11).to(device).t()
    torch.manual_seed(3)
    want = qkit.fake_quantize_fp(base.t(), 8, "e2m1", "mx", True)
    torch.manual_seed(3)
    with fwAD.dual_level():
        out = qkit.fake_quantize_fp(fwAD.make_dual(base.t(), tangent), 8, "e2m1", "mx", True)
        assert_same(fwAD.unpack_dual(out).tangent, tangent)
    assert_same(out, want, "the same draw as without a tangent")


def test_jacfwd_and_jacrev_are_the_identity(device):
    x = make((32,), seed=12).to(device)
    eye = torch.eye(32, device=device)
    for fmt, scaling, groups in (("e3m2", "absmax", 2), ("e2m1", "mx", 1)):

        def fq(a, fmt=fmt, scaling=scaling, groups=groups):
            return qkit.fake_quantize_fp(a, groups, fmt, scaling)

        assert_same(func.jacfwd(fq)(x), eye, f"jacfwd {scaling}")
        assert_same(func.jacrev(fq)(x), eye, f"jacrev {scaling}")


# ------------------------------------------------------------------ reverse mode through torch.func


@SOME_SCALINGS
def test_func_grad_vjp_and_their_compositions_with_vmap_and_jvp(device, fmt, scaling):
    x = make((5, *SAMPLE), seed=13).to(device)
    w = make((5, *SAMPLE), seed=14).to(device)
    groups = groups_of(scaling)

    def fq(a):
        return qkit.fake_quantize_fp(a, groups, fmt, scaling)

    assert_same(func.grad(lambda a: (fq(a) * w[0]).sum())(x[0]), w[0], "func.grad")
    primal, vjp_fn = func.vjp(fq, x[0])
    assert_same(primal, ref_fake_quantize_fp(x[0].cpu(), groups, fmt, scaling), "vjp primal")
    assert_same(vjp_fn(w[0])[0], w[0], "vjp")
    assert_same(func.vmap(func.grad(lambda a, b: (fq(a) * b).sum()))(x, w), w, "vmap(grad)")
    assert_same(func.grad(lambda a: (func.vmap(fq)(a) * w).sum())(x), w, "grad(vmap)")
    assert_same(func.vmap(lambda a, t: func.jvp(fq, (a,), (t,))[1])(x, w), w, "vmap(jvp)")
    assert_same(func.jvp(func.vmap(fq), (x,), (w,))[1], w, "jvp(vmap)")


def test_second_derivatives_see_the_estimator_at_every_level(device):
    """sum(fq(x)^2): the gradient is 2 fq(x), its derivative 2 (the estimator again)."""
    x = make(SAMPLE, seed=15).to(device)

    def loss(a):
        return (qkit.fake_quantize_fp(a, 8, "e2m1", "mx") ** 2).sum()

    twos = torch.full_like(x, 2.0)
    assert_same(func.grad(loss)(x), 2 * ref_fake_quantize_fp(x.cpu(), 8, "e2m1", "mx"), "grad")
    assert_same(func.grad(lambda a: func.grad(loss)(a).sum())(x), twos, "grad of grad")
    assert_same(func.jvp(func.grad(loss), (x,), (torch.ones_like(x),))[1], twos, "jvp of grad")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(xr), xr, create_graph=True)
    assert_same(torch.autograd.grad(g.sum(), xr)[0], twos, "autograd double backward")


def test_compiled_func_grad(device, fresh_dynamo):
    x = make(SAMPLE, seed=16).to(device)
    grad = torch.compile(func.grad(lambda a: (qkit.fake_quantize_fp(a, 8, "e2m1", "mx") * 3).sum()))
    assert_same(grad(x), torch.full_like(x, 3.0))


# ------------------------------------------------------------------ no derivative: refused, never silent

_NO_DERIVATIVE = r"carries a forward-mode tangent, but {} has no derivative"


def _dual(t: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(t, torch.ones_like(t))


def test_the_codec_and_writing_forms_refuse_a_tangent(device):
    x = make(SAMPLE, seed=17).to(device)
    codes, scales = qkit.quantize_fp(x, 8, "e4m3")
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"`input` " + _NO_DERIVATIVE.format("fake_quantize_fp.out")):
            qkit.fake_quantize_fp(_dual(x), 8, "e4m3", out=torch.empty_like(x))
        dual = _dual(x.clone())
        with pytest.raises(ValueError, match=r"qkit\.fake_quantize_fp_: `input` " + _NO_DERIVATIVE.format("\\w+")):
            qkit.fake_quantize_fp_(dual, 8, "e4m3")
        assert_same(fwAD.unpack_dual(dual).primal, x, "a refused in-place call leaves its input alone")
        with pytest.raises(ValueError, match=r"`scales` " + _NO_DERIVATIVE.format("dequantize_fp")):
            qkit.dequantize_fp(codes, _dual(scales), 8, "e4m3")
    with pytest.raises(ValueError, match=r"`scales` requires grad"):
        func.grad(lambda s: qkit.dequantize_fp(codes, s, 8, "e4m3").sum())(scales)


# ------------------------------------------------------------------ the wrappers' straight call

FP_KERNELS = (
    "fake_quantize_fp",
    "fake_quantize_fp_out",
    "fake_quantize_fp_in_place",
    "quantize_fp",
    "quantize_fp_out",
    "dequantize_fp",
    "dequantize_fp_out",
)


@pytest.fixture
def straight_calls(monkeypatch) -> list[str]:
    return count_straight_calls(monkeypatch, qkit.fp_ops, FP_KERNELS)


def _normal_and_straight(x: torch.Tensor, fmt: str, scaling: str) -> None:
    groups = groups_of(scaling)
    want = ops.fake_quantize_fp(x, groups, fmt, scaling, False)
    want_codes, want_scales = ops.quantize_fp(x, groups, fmt, scaling)
    want_deq = ops.dequantize_fp(want_codes, want_scales, groups, fmt, scaling, torch.bfloat16)
    assert_same(qkit.fake_quantize_fp(x, groups, fmt, scaling), want, "fake_quantize_fp")
    codes, scales = qkit.quantize_fp(x, groups, fmt, scaling)
    assert_bytes(codes, want_codes, "codes")
    assert_bytes(scales, want_scales, "scales")
    assert_same(qkit.dequantize_fp(codes, scales, groups, fmt, scaling, torch.bfloat16), want_deq, "dequantize_fp")

    out, in_place = torch.empty_like(x), x.clone()
    codes, scales, deq = torch.empty_like(want_codes), torch.empty_like(want_scales), torch.empty_like(want_deq)
    written = (out, codes, scales, deq, in_place)
    versions = [t._version for t in written]
    assert qkit.fake_quantize_fp(x, groups, fmt, scaling, out=out) is out
    assert qkit.quantize_fp(x, groups, fmt, scaling, out=(codes, scales)) == (codes, scales)
    assert qkit.dequantize_fp(codes, scales, groups, fmt, scaling, out=deq) is deq
    assert qkit.fake_quantize_fp_(in_place, groups, fmt, scaling) is in_place
    assert_same(out, want, "out=")
    assert_bytes(codes, want_codes, "codes out=")
    assert_bytes(scales, want_scales, "scales out=")
    assert_same(deq, want_deq, "dequantize_fp out=")
    assert_same(in_place, want, "in place")
    # One version bump per written tensor, as the normal call's Autograd kernel gives.
    normal = [t.clone() for t in written]
    normal_versions = [t._version for t in normal]
    ops.fake_quantize_fp.out(x, groups, fmt, scaling, False, out=normal[0])
    ops.quantize_fp.out(x, groups, fmt, scaling, codes=normal[1], scales=normal[2])
    ops.dequantize_fp.out(normal[1], normal[2], groups, fmt, scaling, out=normal[3])
    ops.fake_quantize_fp_(normal[4], groups, fmt, scaling, False)
    bumps = [t._version - v for t, v in zip(written, versions, strict=True)]
    assert bumps == [t._version - v for t, v in zip(normal, normal_versions, strict=True)]
    assert min(bumps) >= 1


@SOME_SCALINGS
def test_plain_calls_go_straight_and_agree_with_the_op(device, straight_calls, fmt, scaling):
    _normal_and_straight(make(SAMPLE, torch.bfloat16, seed=18).to(device), fmt, scaling)
    taken = ["fake_quantize_fp", "quantize_fp", "dequantize_fp"]
    written = ["fake_quantize_fp_out", "quantize_fp_out", "dequantize_fp_out", "fake_quantize_fp_in_place"]
    assert straight_calls == [*taken, *written]


def test_a_straight_out_write_is_seen_by_autograd(straight_calls):
    x = make(SAMPLE, seed=19)
    out = qkit.fake_quantize_fp(x, 8, "e4m3")
    w = torch.ones_like(out, requires_grad=True)
    loss = (w * out).sum()  # saves out for the gradient of w
    qkit.fake_quantize_fp(x, 8, "e4m3", out=out)
    assert straight_calls == ["fake_quantize_fp", "fake_quantize_fp_out"]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("context", ["grad", "forward_ad", "vmap", "dispatch_mode", "compile"])
def test_no_straight_call_where_something_else_acts(device, straight_calls, fresh_dynamo, context):
    x = make(SAMPLE, seed=20).to(device)
    want = ops.fake_quantize_fp(x, 8, "e2m1", "mx", False)

    def fq(a):
        return qkit.fake_quantize_fp(a, 8, "e2m1", "mx")

    if context == "grad":
        y = fq(x.clone().requires_grad_(True))
        assert y.grad_fn is not None
        assert_same(y.detach(), want)
    elif context == "forward_ad":
        with fwAD.dual_level():  # a straight call would drop the tangent
            primal, tangent = fwAD.unpack_dual(fq(_dual(x)))
            assert_same(primal, want)
            assert_same(tangent, torch.ones_like(x))
    elif context == "vmap":
        rows = func.vmap(lambda row: qkit.fake_quantize_fp(row, 2, "e2m1", "mx"))(x)
        assert_same(rows, torch.stack([ops.fake_quantize_fp(row, 2, "e2m1", "mx", False) for row in x]))
    elif context == "dispatch_mode":
        with RecordingDispatchMode() as mode:
            assert_same(fq(x), want)
            codes, scales = qkit.quantize_fp(x, 8, "e2m1", "mx")
            qkit.dequantize_fp(codes, scales, 8, "e2m1", "mx")
        wanted = {"qkit.fake_quantize_fp.default", "qkit.quantize_fp.default", "qkit.dequantize_fp.default"}
        assert wanted <= set(mode.seen)
    else:

        def fn(a):
            codes, scales = qkit.quantize_fp(a, 8, "e2m1", "mx")
            return fq(a), qkit.dequantize_fp(codes, scales, 8, "e2m1", "mx")

        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        assert_same(got[0], want)
        assert_same(got[1], want)
    assert straight_calls == []
