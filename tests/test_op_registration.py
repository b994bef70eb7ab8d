"""Op registration: opcheck, fake (meta) impls, torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch.library import opcheck

import qkit
from helpers import FLOAT_DTYPES, assert_same, make_input
from reference import ref_fake_quantize, ref_quantize

ops = torch.ops.qkit
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", None: "None"}


def _id(v) -> str:
    return DTYPE_IDS.get(v, str(v))


# ------------------------------------------------------------------ opcheck

# opcheck runs test_schema, test_autograd_registration, test_faketensor and
# test_aot_dispatch_dynamic. The last compares eager and AOT-compiled outputs after
# re-seeding torch's generator (wrapper_set_seed), so it holds for stochastic=True as
# well: the draws come from torch's generator, which is exactly what the spec requires.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_fake_quantize(device, dtype, bits, symmetric, stochastic, requires_grad):
    x = make_input((6, 10), dtype, seed=1).to(device).requires_grad_(requires_grad)
    opcheck(ops.fake_quantize.default, (x, 3, bits, symmetric, stochastic))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_fake_quantize_inplace(device, dtype, symmetric, stochastic, layout):
    x = make_input((6, 10), dtype, seed=2).to(device)
    if layout == "transposed":
        x = x.t()
    opcheck(ops.fake_quantize_.default, (x, 5, 4, symmetric, stochastic))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_opcheck_quantize(device, dtype, bits, symmetric):
    x = make_input((6, 10), dtype, seed=3).to(device)
    opcheck(ops.quantize.default, (x, 4, bits, symmetric))
    opcheck(ops.quantize.default, (x, 15, bits, symmetric))  # odd E: 4-bit pairs straddle groups


@pytest.mark.parametrize("out_dtype", [None, *FLOAT_DTYPES], ids=_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_opcheck_dequantize(device, out_dtype, bits, symmetric):
    x = make_input((6, 10), torch.float32, seed=4).to(device)
    q, p = ops.quantize(x, 4, bits, symmetric)
    opcheck(ops.dequantize.default, (q, p, 4, bits, symmetric, out_dtype))


# ------------------------------------------------------------------ fake / meta implementations


def _shape_cases():
    # (input shape, groups, bits, symmetric)
    return [
        ((8,), 1, 8, True),
        ((4, 6), 3, 4, False),
        ((2, 3, 10), 6, 4, True),
        ((0, 8), 2, 4, False),
        ((0,), 1, 8, True),
        ((), 1, 8, False),
    ]


@pytest.mark.parametrize("mode", ["fake", "meta"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
@pytest.mark.parametrize(("shape", "groups", "bits", "symmetric"), _shape_cases(), ids=str)
def test_fake_impls_match_real_metadata(device, mode, dtype, shape, groups, bits, symmetric):
    real_x = make_input(shape, dtype, seed=5).to(device)
    real = {
        "fake": ops.fake_quantize(real_x, groups, bits, symmetric, False),
        "quantize": ops.quantize(real_x, groups, bits, symmetric),
    }
    q, p = real["quantize"]
    real["dequantize"] = [ops.dequantize(q, p, groups, bits, symmetric, dt) for dt in (None, *FLOAT_DTYPES)]

    def run(x, qq, pp):
        ops.fake_quantize_(x, groups, bits, symmetric, True)
        return {
            "fake": ops.fake_quantize(x, groups, bits, symmetric, True),
            "quantize": ops.quantize(x, groups, bits, symmetric),
            "dequantize": [ops.dequantize(qq, pp, groups, bits, symmetric, dt) for dt in (None, *FLOAT_DTYPES)],
        }

    if mode == "fake":
        with FakeTensorMode() as fake_mode:
            got = run(fake_mode.from_tensor(real_x), fake_mode.from_tensor(q), fake_mode.from_tensor(p))
    else:
        got = run(real_x.to("meta"), q.to("meta"), p.to("meta"))

    flat_real = [real["fake"], *real["quantize"], *real["dequantize"]]
    flat_got = [got["fake"], *got["quantize"], *got["dequantize"]]
    for r, g in zip(flat_real, flat_got, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride()
        if mode == "meta":
            assert g.device.type == "meta"
        else:
            assert g.device == r.device
    assert got["dequantize"][0].dtype == torch.float16  # dtype=None -> float16


def test_meta_shapes_and_dtypes():
    x = torch.empty(4, 16, dtype=torch.bfloat16, device="meta")
    y = ops.fake_quantize(x, 8, 5, False, False)
    assert y.shape == (4, 16) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    q, p = ops.quantize(x, 8, 4, False)
    assert q.shape == (4, 8) and q.dtype == torch.int8
    assert p.shape == (8, 2) and p.dtype == torch.float32
    q8, p8 = ops.quantize(x, 2, 8, True)
    assert q8.shape == (4, 16) and p8.shape == (2, 1)
    assert ops.dequantize(q, p, 8, 4, False, None).shape == (4, 16)
    assert ops.dequantize(q, p, 8, 4, False, None).dtype == torch.float16
    assert ops.dequantize(q8, p8, 2, 8, True, torch.float32).dtype == torch.float32
    assert ops.fake_quantize_(x, 8, 5, False, False) is None
    assert qkit.dequantize(q, p, bits=4, symmetric=False, dtype=torch.bfloat16).shape == (4, 16)


# ------------------------------------------------------------------ torch.compile


def all_ops(x: torch.Tensor):
    groups = x.shape[0]
    y = qkit.fake_quantize(x, groups=groups, bits=3, symmetric=False)
    q, p = torch.ops.qkit.quantize(x, groups, 4, True)
    d = torch.ops.qkit.dequantize(q, p, groups, 4, True, torch.float32)
    z = d * 2
    torch.ops.qkit.fake_quantize_(z, groups, 8, False, False)
    q8, p8 = qkit.quantize(x, groups=groups, bits=8, symmetric=False)
    d8 = qkit.dequantize(q8, p8, bits=8, symmetric=False)  # float16
    return y, q, p, d, z, q8, p8, d8


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
def test_compile_all_ops_matches_eager(device, fresh_dynamo, dtype):
    x = make_input((32, 64), dtype, seed=6).to(device)
    compiled = torch.compile(all_ops, fullgraph=True, backend="inductor")
    got = compiled(x)
    want = all_ops(x)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    assert_same(got[0], ref_fake_quantize(x.cpu(), 32, 3, False))
    q_ref, p_ref = ref_quantize(x.cpu(), 32, 4, True)
    assert_same(got[1], q_ref)
    assert_same(got[2], p_ref)
    # a second call (new data, same shapes) reuses the graph and is still right
    x2 = make_input((32, 64), dtype, seed=7).to(device)
    for g, w in zip(compiled(x2), all_ops(x2), strict=True):
        assert_same(g, w)


def test_no_graph_break(fresh_dynamo):
    x = make_input((32, 64), torch.bfloat16, seed=8)

    def with_stochastic(x):
        return *all_ops(x), torch.ops.qkit.fake_quantize(x, 32, 4, True, True)

    explanation = torch._dynamo.explain(with_stochastic)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_inplace_on_graph_input(device, fresh_dynamo):
    def f(x):
        qkit.fake_quantize_(x, groups=4, bits=4, symmetric=True)
        return x + 0

    x = make_input((4, 12), torch.float32, seed=9).to(device)
    want = ref_fake_quantize(x.cpu(), 4, 4, True)
    xc = x.clone()
    out = torch.compile(f, fullgraph=True, backend="inductor")(xc)
    assert_same(xc, want, "the input is mutated in place")
    assert_same(out, want)


def test_compile_stochastic(device, fresh_dynamo):
    """Inside a compiled graph, stochastic rounding draws afresh on every call and
    torch.manual_seed reproduces the draws (docs/ops.md §7)."""

    def f(x):
        a = torch.ops.qkit.fake_quantize(x, 8, 4, True, True)
        b = qkit.fake_quantize(x, groups=8, bits=4, stochastic=True)  # a second, independent draw
        return a, b

    x = make_input((8, 512), torch.float32, seed=10).to(device)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.manual_seed(1234)
    a1, b1 = compiled(x)
    a2, _ = compiled(x)
    assert not torch.equal(a1, a2), "successive compiled calls must draw afresh"
    assert not torch.equal(a1, b1), "two stochastic calls in one graph must not share draws"
    torch.manual_seed(1234)
    a3, b3 = compiled(x)
    assert_same(a3, a1)
    assert_same(b3, b1)
    # both are stochastic roundings of x: each value within one step of x
    step = ref_quantize(x.cpu(), 8, 8, True)[1] * 16  # 4-bit step = 16 * 8-bit step
    err = (a1.cpu() - x.cpu()).abs().reshape(8, -1)
    assert bool((err <= step * 1.001).all())
    # and eager with the same seed draws the same numbers
    torch.manual_seed(1234)
    ae, be = f(x)
    assert_same(ae, a1)
    assert_same(be, b1)
