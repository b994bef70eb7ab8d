"""ZeRO++ op registration: opcheck (the two LoCo ops mutate `error_feedback`), fake and
meta implementations, torch.compile without graph breaks, and every bad argument named,
eagerly and under FakeTensorMode / meta (docs/ops.md §3; issue 3)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch.library import opcheck

import qkit
from helpers import FLOAT_DTYPES, assert_same, make_input
from qkit import zeropp_ops
from reference import ref_loco_swizzle_quantize, ref_quantized_reduction, ref_swizzle_quantize
from test_errors import ERRORS, Case, make

ops = torch.ops.qkit
SYM = pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
BITS = pytest.mark.parametrize("bits", [4, 8])
DTYPE = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
ZEROPP_OPS = [
    "swizzle_quantize",
    "loco_swizzle_quantize",
    "quantized_reduction",
    "loco_quantized_reduction",
    "dequantize_unsigned",
]


def reduction_inputs(device: str, bits: int, symmetric: bool, devices: int = 2, groups: int = 8):
    """(q, params) as the qgZ chain hands them to the reduction: a swizzled 2x`devices` layout."""
    x = make_input((groups, 6), torch.float32, seed=bits).to(device)
    return ops.swizzle_quantize(x, groups, bits, symmetric, 1, 2, devices)


# ------------------------------------------------------------------ opcheck


@DTYPE
@SYM
@BITS
def test_opcheck_swizzle(device, dtype, symmetric, bits):
    x = make_input((8, 12), dtype, seed=1).to(device)
    opcheck(ops.swizzle_quantize.default, (x, 16, bits, symmetric, 2, 2, 2))
    e = make_input((96,), dtype, seed=2).to(device) * 0.01
    opcheck(ops.loco_swizzle_quantize.default, (x, e, 0.5, 16, bits, symmetric, 2, 2, 2))


@SYM
def test_opcheck_swizzle_odd_groups_and_strided_error(device, symmetric):
    x = make_input((12, 6), torch.bfloat16, seed=3).to(device).t()  # non-contiguous input
    opcheck(ops.swizzle_quantize.default, (x, 24, 8, symmetric, 1, 3, 2))  # E = 3
    e = (make_input((72, 2), torch.bfloat16, seed=4).to(device) * 0.01)[:, 1]  # stride 2
    opcheck(ops.loco_swizzle_quantize.default, (x, e, 0.25, 24, 8, symmetric, 1, 3, 2))


@SYM
@BITS
@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16], ids=["e-f32", "e-bf16"])
def test_opcheck_reduction(device, symmetric, bits, e_dtype):
    q, p = reduction_inputs(device, bits, symmetric)
    opcheck(ops.quantized_reduction.default, (q, p, 8, 4, bits, symmetric, 2))
    opcheck(ops.quantized_reduction.default, (q, p, 8, 3, bits, symmetric, 2))  # out groups across in groups
    e = make_input((24,), e_dtype, seed=5).to(device) * 0.01
    opcheck(ops.loco_quantized_reduction.default, (q, p, e, 0.5, 8, 4, bits, symmetric, 2))


@BITS
@pytest.mark.parametrize("pdtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_opcheck_dequantize_unsigned(device, bits, pdtype):
    data = torch.randint(0, 256, (3 * 10 * bits // 8,), dtype=torch.uint8, device=device)
    scale = (torch.rand(3, device=device) + 1).to(pdtype)
    minv = torch.randn(3, device=device).to(pdtype)
    opcheck(ops.dequantize_unsigned.default, (data, scale, minv, 3, 10, bits))
    opcheck(ops.dequantize_unsigned.default, (data.view(torch.int8), scale, minv, 3, 10, bits))


# ------------------------------------------------------------------ fake / meta implementations


def run_all(x, e_swz, q, p, e_red, data, scale, minv, layout, bits, symmetric):
    """Every ZeRO++ op once; returns their outputs flat."""
    groups, pipeline, nodes, devices = layout
    in_groups = q_groups = p.shape[0]
    out = [
        *ops.swizzle_quantize(x, groups, bits, symmetric, pipeline, nodes, devices),
        *ops.loco_swizzle_quantize(x, e_swz, 0.5, groups, bits, symmetric, pipeline, nodes, devices),
        *ops.quantized_reduction(q, p, in_groups, q_groups // 2, bits, symmetric, 2),
        *ops.loco_quantized_reduction(q, p, e_red, 0.5, in_groups, q_groups // 2, bits, symmetric, 2),
        ops.dequantize_unsigned(data, scale, minv, scale.numel(), data.numel() * 8 // bits // scale.numel(), bits),
    ]
    return out


# (input shape, dtype, (groups, pipeline, nodes, devices)); the reduction gets the swizzle's output
META_CASES = [
    ((8, 12), torch.float32, (8, 1, 2, 2)),
    ((4, 6, 10), torch.bfloat16, (24, 2, 3, 2)),
    ((96,), torch.float16, (16, 2, 2, 4)),
    ((0, 8), torch.float32, (8, 1, 2, 2)),
    ((0,), torch.bfloat16, (4, 2, 1, 2)),
]


@pytest.mark.parametrize("mode", ["fake", "meta"])
@SYM
@BITS
@pytest.mark.parametrize(("shape", "dtype", "layout"), META_CASES, ids=str)
def test_fake_impls_match_real_metadata(device, mode, symmetric, bits, shape, dtype, layout):
    groups = layout[0]
    x = make_input(shape, dtype, seed=6).to(device)
    e_swz = torch.zeros(x.numel(), dtype=dtype, device=device)
    q, p = ops.swizzle_quantize(x, groups, bits, symmetric, *layout[1:])
    e_red = torch.zeros(x.numel() // 2, dtype=torch.float16, device=device)
    data = q.view(torch.uint8)
    scale = torch.ones(2 if x.numel() else 1, dtype=dtype, device=device)
    minv = torch.zeros_like(scale)
    if x.numel() == 0:
        data = torch.zeros(8 * bits // 8, dtype=torch.uint8, device=device)
    inputs = [x, e_swz, q, p, e_red, data, scale, minv]
    real = run_all(*[t.clone() for t in inputs], layout, bits, symmetric)
    if mode == "fake":
        with FakeTensorMode() as fake_mode:
            got = run_all(*[fake_mode.from_tensor(t) for t in inputs], layout, bits, symmetric)
    else:
        got = run_all(*[t.to("meta") for t in inputs], layout, bits, symmetric)
    assert len(got) == len(real) == 9
    for i, (r, g) in enumerate(zip(real, got, strict=True)):
        assert (g.shape, g.dtype, g.stride()) == (r.shape, r.dtype, r.stride()), i
        assert g.device.type == ("meta" if mode == "meta" else r.device.type)


def test_meta_shapes_and_dtypes():
    x = torch.empty(6, 16, dtype=torch.bfloat16, device="meta")
    q, p = ops.swizzle_quantize(x, 12, 4, False, 1, 3, 2)
    assert (q.shape, q.dtype, p.shape, p.dtype) == ((48,), torch.int8, (12, 2), torch.float32)
    q8, p8 = ops.swizzle_quantize(x, 12, 8, True, 2, 3, 2)
    assert (q8.shape, p8.shape) == ((96,), (12, 1))
    e = torch.empty(96, dtype=torch.bfloat16, device="meta")
    assert [t.shape for t in ops.loco_swizzle_quantize(x, e, 0.5, 12, 4, False, 1, 3, 2)] == [(48,), (12, 2)]
    # reduction: q [3, 16] of L=2 tensors -> [3, 8]; params [out_groups, 1|2]
    qr = torch.empty(3, 16, dtype=torch.int8, device="meta")
    pr = torch.empty(6, 2, device="meta")
    rq, rp = ops.quantized_reduction(qr, pr, 6, 4, 4, False, 2)
    assert (rq.shape, rq.dtype, rp.shape, rp.dtype) == ((3, 8), torch.int8, (4, 2), torch.float32)
    er = torch.empty(48, dtype=torch.float16, device="meta")  # V = 48 4-bit values
    assert [t.shape for t in ops.loco_quantized_reduction(qr, pr, er, 0.5, 6, 4, 4, False, 2)] == [(3, 8), (4, 2)]
    d = torch.empty(15, dtype=torch.uint8, device="meta")
    s = torch.empty(3, dtype=torch.float32, device="meta")
    y = ops.dequantize_unsigned(d, s, s, 3, 10, 4)
    assert (y.shape, y.dtype) == ((3, 10), torch.float16)
    assert ops.dequantize_unsigned(d[:0], s[:0], s[:0], 0, 10, 8).shape == (0, 10)


# ------------------------------------------------------------------ torch.compile

GROUPS, NODES, DEVICES = 16, 2, 4


def zeropp_chain(x, e_swz, e_red):
    """The qgZ building blocks in one graph: both LoCo buffers are graph inputs mutated in
    place, and a third is created (and mutated) inside the graph."""
    q, p = ops.swizzle_quantize(x, GROUPS, 4, True, 1, NODES, DEVICES)
    lq, lp = ops.loco_swizzle_quantize(x, e_swz, 0.5, GROUPS, 8, False, 2, NODES, DEVICES)
    rq, rp = ops.quantized_reduction(q, p, GROUPS, GROUPS // DEVICES, 4, True, DEVICES)
    lrq, lrp = ops.loco_quantized_reduction(q, p, e_red, 0.5, GROUPS, GROUPS // DEVICES, 4, True, DEVICES)
    y = ops.dequantize(rq, rp, GROUPS // DEVICES, 4, True, torch.float32)
    inner = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    ops.loco_swizzle_quantize(x * 2, inner, 0.0, GROUPS, 4, True, 1, NODES, DEVICES)
    u = ops.dequantize_unsigned(lq, lp[:, 0] + 1, lp[:, 1], GROUPS, x.numel() // GROUPS, 8)
    return q, p, lq, lp, rq, rp, lrq, lrp, y, inner * 1, u


def wrapped_chain(x, e_swz, e_red):
    """The typed wrappers with their defaults (4-bit, symmetric, one node, one device)."""
    q, p = zeropp_ops.swizzle_quantize(x, 8)
    lq, lp = zeropp_ops.loco_swizzle_quantize(x, e_swz, 0.5, 8)
    rq, rp = zeropp_ops.quantized_reduction(q, p, 8, 4)
    lrq, lrp = zeropp_ops.loco_quantized_reduction(q, p, e_red[: x.numel()], 0.5, 8, 2)
    u = zeropp_ops.dequantize_unsigned(q, lp.half()[:, 0] + 1, lp.half()[:, 0], 8, x.numel() // 8, 4)
    return q, p, lq, lp, rq, rp, lrq, lrp, u


@DTYPE
def test_compile_matches_eager_with_in_place_updates(device, fresh_dynamo, dtype):
    x = make_input((16, 24), dtype, seed=7).to(device)
    e_swz = make_input((384,), dtype, seed=8).to(device) * 0.01
    e_red = make_input((96,), torch.float32, seed=9).to(device) * 0.01  # V = 384 / DEVICES values
    compiled = torch.compile(zeropp_chain, fullgraph=True, backend="inductor")
    eager_bufs = (e_swz.clone(), e_red.clone())
    compiled_bufs = (e_swz.clone(), e_red.clone())
    for step in range(2):  # the second call starts from the updated buffers
        want = zeropp_chain(x, *eager_bufs)
        got = compiled(x, *compiled_bufs)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"step {step} output {i}")
        assert_same(compiled_bufs[0], eager_bufs[0], f"step {step}: e_swz updated in place")
        assert_same(compiled_bufs[1], eager_bufs[1], f"step {step}: e_red updated in place")
    # and against the reference (first step, from the initial buffers)
    ref_q, ref_p = ref_swizzle_quantize(x.cpu(), GROUPS, 4, True, 1, NODES, DEVICES)
    e = e_swz.cpu().clone()
    got = compiled(x, e_swz.clone(), e_red.clone())
    assert_same(got[0], ref_q)
    assert_same(got[1], ref_p)
    assert_same(got[4], ref_quantized_reduction(ref_q, ref_p, GROUPS, GROUPS // DEVICES, 4, True, DEVICES)[0])
    want_lq = ref_loco_swizzle_quantize(x.cpu(), e, 0.5, GROUPS, 8, False, 2, NODES, DEVICES)[0]
    assert_same(got[2], want_lq)


def test_compile_wrappers_and_no_graph_break(fresh_dynamo):
    x = make_input((8, 10), torch.bfloat16, seed=10)
    e_swz = torch.zeros(80, dtype=torch.bfloat16)
    e_red = torch.zeros(80, dtype=torch.float16)
    explanation = torch._dynamo.explain(wrapped_chain)(x, e_swz.clone(), e_red.clone())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    eager_bufs = (e_swz.clone(), e_red.clone())
    compiled_bufs = (e_swz.clone(), e_red.clone())
    want = wrapped_chain(x, *eager_bufs)
    got = torch.compile(wrapped_chain, fullgraph=True, backend="inductor")(x, *compiled_bufs)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    assert_same(compiled_bufs[0], eager_bufs[0])
    assert_same(compiled_bufs[1], eager_bufs[1])
    assert not torch.equal(eager_bufs[0], e_swz), "the error buffer was updated"


def test_wrappers_defaults_equal_ops():
    x = make_input((8, 10), torch.float32, seed=11)
    q, p = zeropp_ops.swizzle_quantize(x, 8)
    assert_same(q, ops.swizzle_quantize(x, 8, 4, True, 1, 1, 1)[0])
    e1, e2 = torch.zeros(80), torch.zeros(80)
    zeropp_ops.loco_swizzle_quantize(x, e1, 0.5, 8)
    ops.loco_swizzle_quantize(x, e2, 0.5, 8, 4, True, 1, 1, 1)
    assert_same(e1, e2)
    assert_same(zeropp_ops.quantized_reduction(q, p, 8, 2)[0], ops.quantized_reduction(q, p, 8, 2, 4, True, 1)[0])
    d = torch.arange(10, dtype=torch.uint8)
    s = torch.ones(2)
    assert_same(zeropp_ops.dequantize_unsigned(d, s, s, 2, 5), ops.dequantize_unsigned(d, s, s, 2, 5, 8))
    assert set(zeropp_ops.__all__) == set(ZEROPP_OPS)


# ------------------------------------------------------------------ bad arguments


F32, F16, BF16, I8, U8 = torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8
VALUE, TYPE = qkit.QkitValueError, qkit.QkitTypeError
CASES: dict[str, tuple[Case, type]] = {}


def case(name: str, op: str, arg: str, inputs, call, kind: type = VALUE) -> None:
    """`kind`: the Python-side error class (fake/meta); eagerly any RuntimeError."""
    assert name not in CASES, name
    CASES[name] = (Case(op, arg, inputs, call), kind)


X = ((8, 12), F32)  # 96 elements
E = ((96,), F32)


def swz(op: str, x, *args, e=None, beta=0.5):
    """swizzle_quantize(x, *args) or loco_swizzle_quantize(x, e, beta, *args)."""
    if op == "swizzle_quantize":
        return ops.swizzle_quantize(x, *args)
    return ops.loco_swizzle_quantize(x, e, beta, *args)


for op in ("swizzle_quantize", "loco_swizzle_quantize"):
    ins = [X] if op == "swizzle_quantize" else [X, E]

    def add(name, arg, args, inputs=None, kind=VALUE, op=op, ins=ins):
        case(f"{op}-{name}", op, arg, inputs or ins, lambda x, e=None, a=args: swz(op, x, *a, e=e), kind)

    for bits in (3, 16, 0):
        add(f"bits{bits}", "bits", (8, bits, True, 1, 2, 2))
    add("groups0", "groups", (0, 8, True, 1, 1, 1))
    add("groups-neg", "groups", (-2, 8, True, 1, 1, 1))
    add("groups-not-dividing", "groups", (5, 8, True, 1, 1, 1))
    add("layout-3-nodes", "groups", (8, 8, True, 1, 3, 1))  # 8 % 3
    add("layout-pipeline", "groups", (8, 8, False, 4, 2, 2))  # 8 % 16
    add("layout-2x4-of-12", "groups", (12, 4, True, 1, 2, 4))  # 12 % 8
    add("layout-3x2x5-of-48", "groups", (48, 8, True, 5, 3, 2))  # 48 % 30
    add("pipeline0", "pipeline", (8, 8, True, 0, 2, 2))
    add("nodes0", "nodes", (8, 8, True, 1, 0, 2))
    add("devices0", "devices_per_node", (8, 8, True, 1, 2, 0))
    add("devices-neg", "devices_per_node", (8, 8, True, 1, 2, -2))
    for dtype in (torch.int32, torch.float64, I8):
        add(f"input-{dtype}", "input", (8, 8, True, 1, 2, 2), [((8, 12), dtype), ((96,), dtype)][: len(ins)], TYPE)
    # 4-bit moves whole bytes: E = 96/32 = 3 is odd. The message must name an argument.
    add("4bit-odd-group-size", "(input|groups)", (32, 4, True, 1, 2, 2))

for name, shape, dtype, kind in [
    ("numel-95", (95,), F32, VALUE),
    ("numel-192", (2, 96), F32, VALUE),
    ("dtype-f16", (96,), F16, TYPE),  # must be the input's dtype
    ("dtype-bf16", (96,), BF16, TYPE),
    ("dtype-f64", (96,), torch.float64, TYPE),
    ("dtype-int32", (96,), torch.int32, TYPE),
]:
    case(
        f"loco_swizzle_quantize-error-{name}",
        "loco_swizzle_quantize",
        "error_feedback",
        [X, (shape, dtype)],
        lambda x, e: ops.loco_swizzle_quantize(x, e, 0.5, 8, 8, True, 1, 2, 2),
        kind,
    )
for beta in (-0.1, 1.5, math.nan, math.inf):
    case(
        f"loco_swizzle_quantize-beta{beta}",
        "loco_swizzle_quantize",
        "err_beta",
        [X, E],
        lambda x, e, b=beta: ops.loco_swizzle_quantize(x, e, b, 8, 8, True, 1, 2, 2),
    )

# reduction: q [2, 24] int8 = L=2 tensors of 24 (8-bit) values; params [4, 1|2]
Q = ((2, 24), I8)
P = ((4, 1), F32)
PA = ((4, 2), F32)
ER = ((24,), F32)


def red(op: str, q, p, *args, e=None, beta=0.5):
    if op == "quantized_reduction":
        return ops.quantized_reduction(q, p, *args)
    return ops.loco_quantized_reduction(q, p, e, beta, *args)


for op in ("quantized_reduction", "loco_quantized_reduction"):
    extra = [] if op == "quantized_reduction" else [ER]

    def add(name, arg, args, inputs=None, kind=VALUE, op=op, extra=extra):
        ins = [*(inputs or [Q, P]), *extra]
        case(f"{op}-{name}", op, arg, ins, lambda q, p, e=None, a=args: red(op, q, p, *a, e=e), kind)

    for dtype in (U8, F32, torch.int32):
        add(f"q-{dtype}", "q", (4, 2, 8, True, 2), [((2, 24), dtype), P], TYPE)
    for dtype in (F16, torch.float64, BF16):
        add(f"params-{dtype}", "params", (4, 2, 8, True, 2), [Q, ((4, 1), dtype)], TYPE)
    for name, pshape, sym in [
        ("sym-2-columns", (4, 2), True),
        ("asym-1-column", (4, 1), False),
        ("wrong-rows", (2, 1), True),
        ("wrong-rows-asym", (8, 2), False),
        ("1d", (4,), True),
        ("transposed", (1, 4), True),
        ("3d", (4, 1, 1), True),
    ]:
        add(f"params-shape-{name}", "params", (4, 2, 8, sym, 2), [Q, (pshape, F32)])
    add("q-last-dim-5-devices", "q", (5, 1, 8, True, 5), [Q, ((5, 1), F32)])
    add("q-last-dim-odd", "q", (2, 1, 8, True, 2), [((4, 7), I8), ((2, 1), F32)])
    add("q-0dim", "q", (2, 1, 8, True, 2), [((), I8), ((2, 1), F32)])
    add("in_groups-not-multiple-of-L", "in_groups", (3, 1, 8, True, 2), [Q, ((3, 1), F32)])
    add("in_groups0", "in_groups", (0, 1, 8, True, 2), [Q, ((0, 1), F32)])
    add("in_groups-not-dividing-V", "in_groups", (10, 2, 8, True, 2), [Q, ((10, 1), F32)])  # 24 % 5
    add("out_groups-not-dividing-V", "out_groups", (4, 5, 8, True, 2))  # 24 % 5
    add("out_groups-more-than-V", "out_groups", (4, 48, 8, True, 2))
    add("out_groups0", "out_groups", (4, 0, 8, True, 2))
    add("bits3", "bits", (4, 2, 3, True, 2))
    add("bits16", "bits", (4, 2, 16, True, 2))
    add("devices0", "devices_per_node", (4, 2, 8, True, 0))

for name, shape, dtype, kind in [
    ("numel-48", (48,), F32, VALUE),  # 8-bit V is 24, not the total 48
    ("numel-23", (23,), F16, VALUE),
    ("dtype-f64", (24,), torch.float64, TYPE),
    ("dtype-int32", (24,), torch.int32, TYPE),
    ("dtype-int8", (24,), I8, TYPE),
]:
    case(
        f"loco_quantized_reduction-error-{name}",
        "loco_quantized_reduction",
        "error_feedback",
        [Q, P, (shape, dtype)],
        lambda q, p, e: ops.loco_quantized_reduction(q, p, e, 0.5, 4, 2, 8, True, 2),
        kind,
    )
case(  # 4-bit: V = 48 values per tensor, so 24 elements are too few
    "loco_quantized_reduction-error-numel-4bit",
    "loco_quantized_reduction",
    "error_feedback",
    [Q, P, ER],
    lambda q, p, e: ops.loco_quantized_reduction(q, p, e, 0.5, 4, 2, 4, True, 2),
)
for beta in (-1e-9, 2.0, math.nan):
    case(
        f"loco_quantized_reduction-beta{beta}",
        "loco_quantized_reduction",
        "err_beta",
        [Q, P, ER],
        lambda q, p, e, b=beta: ops.loco_quantized_reduction(q, p, e, b, 4, 2, 8, True, 2),
    )

# dequantize_unsigned: data [24] uint8 = 3 groups of 8 8-bit codes; scale/minv [3] fp16
D = ((24,), U8)
S = ((3,), F16)


def du(*args):
    return lambda d, s, m: ops.dequantize_unsigned(d, s, m, *args)


def add_du(name: str, arg: str, inputs, call, kind: type = VALUE) -> None:
    case(f"dequantize_unsigned-{name}", "dequantize_unsigned", arg, inputs, call, kind)


for dtype in (F32, torch.int32, torch.bool):
    add_du(f"data-{dtype}", "data", [((24,), dtype), S, S], du(3, 8, 8), TYPE)
add_du("data-23-bytes", "data", [((23,), U8), S, S], du(3, 8, 8))
add_du("data-4bit-needs-12-bytes", "data", [D, S, S], du(3, 8, 4))
add_du("data-too-few-groups", "data", [D, ((2,), F16), ((2,), F16)], du(2, 8, 8))
add_du("bits3", "bits", [D, S, S], du(3, 8, 3))
add_du("bits16", "bits", [D, S, S], du(3, 8, 16))
add_du("num_groups-neg", "num_groups", [D, S, S], du(-1, 8, 8))
add_du("group_size0", "group_size", [D, S, S], du(3, 0, 8))
add_du("group_size-neg", "group_size", [D, S, S], du(3, -8, 8))
# 3 groups of 3 4-bit codes: 9 nibbles cannot be whole bytes. The message must name an argument.
add_du("4bit-odd-count", "(num_groups|group_size)", [((5,), U8), S, S], du(3, 3, 4))
add_du("scale-numel-2", "scale", [D, ((2,), F16), S], du(3, 8, 8))
add_du("scale-numel-6", "scale", [D, ((3, 2), F16), S], du(3, 8, 8))
add_du("minv-numel-4", "minv", [D, S, ((4,), F16)], du(3, 8, 8))
add_du("minv-dtype-differs", "minv", [D, S, ((3,), F32)], du(3, 8, 8), TYPE)
add_du("minv-bf16-vs-f16", "minv", [D, S, ((3,), BF16)], du(3, 8, 8), TYPE)
for dtype in (torch.int32, torch.float64, U8):
    add_du(f"scale-{dtype}", "scale", [D, ((3,), dtype), ((3,), dtype)], du(3, 8, 8), TYPE)


def _match(c: Case) -> str:
    # `arg` may be a regex alternative "(a|b)" for messages where either name is right
    arg = c.arg if c.arg.startswith("(") else re.escape(c.arg)
    return re.escape(f"qkit.{c.op}:") + ".*`" + arg + "`"


@pytest.mark.parametrize("mode", ["eager", "fake", "meta"])
@pytest.mark.parametrize("name", CASES)
def test_bad_argument(device, mode, name):
    c, kind = CASES[name]
    tensors = [make(shape, dtype, device) for shape, dtype in c.inputs]
    with pytest.raises(ERRORS, match=_match(c)) as info:
        if mode == "eager":
            c.call(*tensors)
        elif mode == "fake":
            with FakeTensorMode() as fake_mode:
                c.call(*[fake_mode.from_tensor(t) for t in tensors])
        else:
            c.call(*[t.to("meta") for t in tensors])
    assert isinstance(info.value, RuntimeError)
    if mode != "eager":  # the Python-side checks say what kind of problem it is
        assert isinstance(info.value, kind), f"{type(info.value).__name__} is not a {kind.__name__}"
        assert isinstance(info.value, ValueError if kind is VALUE else TypeError)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("loco_")])
def test_bad_argument_leaves_error_feedback_untouched(name):
    c, _ = CASES[name]
    tensors = [make(shape, dtype, "cpu") for shape, dtype in c.inputs]
    before = [t.clone() for t in tensors]
    with pytest.raises(ERRORS):
        c.call(*tensors)
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b) or (t.is_floating_point() and torch.equal(t.isnan(), b.isnan()))


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize(
    ("op", "arg"),
    [
        ("loco_swizzle_quantize", "error_feedback"),
        ("loco_quantized_reduction", "error_feedback"),
        ("quantized_reduction", "params"),
        ("dequantize_unsigned", "scale"),
        ("dequantize_unsigned", "minv"),
    ],
)
def test_devices_differ(mode, op, arg):
    """One tensor on another device: named. Under FakeTensorMode a fake CUDA tensor needs no GPU."""
    if mode == "eager" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def call():
        def dev(name: str) -> str:
            return "cuda" if name == arg else "cpu"

        if op == "loco_swizzle_quantize":
            x = torch.randn(8, 12)
            return ops.loco_swizzle_quantize(x, torch.zeros(96, device=dev(arg)), 0.5, 8, 8, True, 1, 2, 2)
        q = torch.zeros(2, 24, dtype=torch.int8)
        p = torch.ones(4, 1, device=dev("params"))
        if op == "quantized_reduction":
            return ops.quantized_reduction(q, p, 4, 2, 8, True, 2)
        if op == "loco_quantized_reduction":
            return ops.loco_quantized_reduction(q, p, torch.zeros(24, device=dev(arg)), 0.5, 4, 2, 8, True, 2)
        data = torch.zeros(24, dtype=torch.uint8)
        s = torch.ones(3, dtype=torch.float16, device=dev("scale"))
        m = torch.ones(3, dtype=torch.float16, device=dev("minv"))
        return ops.dequantize_unsigned(data, s, m, 3, 8, 8)

    with pytest.raises(ERRORS, match=re.escape(f"qkit.{op}:") + f".*`{arg}`"):
        if mode == "fake":
            with FakeTensorMode():
                call()
        else:
            call()


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("op", ["loco_swizzle_quantize", "loco_quantized_reduction"])
def test_expanded_error_feedback_refused(mode, op):
    """An expanded (self-overlapping) error buffer cannot be updated element by element:
    a clear error naming `error_feedback`, as fake_quantize_ does for its `input`."""
    q, p = torch.zeros(2, 24, dtype=torch.int8), torch.ones(4, 1)

    x = torch.randn(8, 12)

    def call(convert):
        e96, e24 = convert(torch.zeros(1).expand(96)), convert(torch.zeros(1).expand(24))
        if op == "loco_swizzle_quantize":
            return ops.loco_swizzle_quantize(convert(x), e96, 0.5, 8, 8, True, 1, 2, 2)
        return ops.loco_quantized_reduction(convert(q), convert(p), e24, 0.5, 4, 2, 8, True, 2)

    with pytest.raises(ERRORS, match=re.escape(f"qkit.{op}:") + ".*`error_feedback`"):
        if mode == "fake":
            with FakeTensorMode() as fake_mode:
                call(fake_mode.from_tensor)
        else:
            call(lambda t: t)
