"""The ``out=`` overloads (``fake_quantize.out``, ``quantize.out``, ``dequantize.out``):
results bit-exact with the reference, written into the caller's buffer whatever its
layout, every bad buffer refused with the argument named and nothing written."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import qkit
from helpers import FLOAT_DTYPES, assert_same, make_input
from reference import ref_dequantize, ref_fake_quantize, ref_quantize

ops = torch.ops.qkit


def _id(v) -> str:
    return str(v).removeprefix("torch.")


def _buffer(shape, dtype, device, layout: str) -> torch.Tensor:
    """An uninitialised-looking buffer (sentinel-filled) of `shape`, contiguous or transposed."""
    fill = -7 if dtype == torch.int8 else float("nan")
    if layout == "contiguous" or len(shape) < 2:
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.full((*shape[:-2], shape[-1], shape[-2]), fill, dtype=dtype, device=device).transpose(-1, -2)


LAYOUTS = ["contiguous", "transposed"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_quantize_out_matches_reference(device, dtype, bits, symmetric, layout):
    x = make_input((6, 20), dtype, seed=11)
    out = _buffer((6, 20), dtype, device, layout)
    got = qkit.fake_quantize(x.to(device), 8, bits, symmetric, out=out)
    assert got is out
    assert_same(out, ref_fake_quantize(x, 8, bits, symmetric), "out")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_and_dequantize_out_match_reference(device, dtype, bits, symmetric, layout):
    x = make_input((6, 20), dtype, seed=12)
    want_q, want_params = ref_quantize(x, 5, bits, symmetric)
    q = _buffer(tuple(want_q.shape), torch.int8, device, layout)
    params = _buffer(tuple(want_params.shape), torch.float32, device, layout)
    got = qkit.quantize(x.to(device), 5, bits, symmetric, out=(q, params))
    assert got[0] is q and got[1] is params
    assert_same(q, want_q, "q")
    assert_same(params, want_params, "params")
    for out_dtype in FLOAT_DTYPES:
        out = _buffer((6, 20), out_dtype, device, layout)
        assert qkit.dequantize(q, params, 5, bits, symmetric, out=out) is out
        assert_same(
            out, ref_dequantize(want_q, want_params, 5, bits, symmetric, out_dtype), f"dequantize -> {out_dtype}"
        )


def test_fake_quantize_out_may_be_the_input(device):
    x = make_input((4, 32), torch.float32, seed=13)
    y = x.to(device)
    assert qkit.fake_quantize(y, 4, 4, out=y) is y
    assert_same(y, ref_fake_quantize(x, 4, 4), "in place through out=")


def test_stochastic_out_draws_like_the_functional_op(device):
    x = make_input((8, 64), torch.bfloat16, seed=14).to(device)
    out = torch.empty_like(x)
    torch.manual_seed(3)
    qkit.fake_quantize(x, 8, 4, stochastic=True, out=out)
    torch.manual_seed(3)
    assert_same(out, qkit.fake_quantize(x, 8, 4, stochastic=True), "stochastic out=")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
def test_out_reuse_in_a_loop_allocates_nothing_new(device, dtype):
    x = make_input((16, 128), dtype, seed=15).to(device)
    out = torch.empty_like(x)
    q = torch.empty(16, 128, dtype=torch.int8, device=device)
    params = torch.empty(16, 1, device=device)
    pointers = (out.data_ptr(), q.data_ptr(), params.data_ptr())
    for step in range(3):
        xs = x * (step + 1)
        qkit.fake_quantize(xs, 16, 8, out=out)
        qkit.quantize(xs, 16, 8, out=(q, params))
        assert_same(out, qkit.fake_quantize(xs, 16, 8), f"step {step}")
    assert (out.data_ptr(), q.data_ptr(), params.data_ptr()) == pointers


def test_empty_out(device):
    x = torch.empty(0, 8, device=device)
    out = torch.empty(0, 8, device=device)
    assert qkit.fake_quantize(x, 1, 8, out=out) is out
    q, params = torch.empty(0, 8, dtype=torch.int8, device=device), torch.empty(1, 1, device=device)
    qkit.quantize(x, 1, 8, out=(q, params))
    assert_same(params, ref_quantize(x.cpu(), 1, 8)[1], "params of an empty group")
    assert qkit.dequantize(q, params, out=torch.empty(0, 8, device=device)).shape == (0, 8)


def test_non_finite_input_with_out(device):
    x = make_input((4, 16), torch.float16, seed=16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    out = _buffer((4, 16), torch.float16, device, "contiguous")
    qkit.fake_quantize(x.to(device), 4, 8, out=out)
    assert_same(out, ref_fake_quantize(x, 4, 8), "non-finite groups")


# ------------------------------------------------------------------ bad buffers


def _refused(call, match: str, *untouched: torch.Tensor) -> None:
    before = [t.detach().clone() for t in untouched]
    with pytest.raises(RuntimeError, match=match):
        call()
    for t, saved in zip(untouched, before, strict=True):
        assert_same(t, saved, "a refused call wrote its buffer")


def test_bad_fake_quantize_out_is_refused_before_writing(device):
    x = make_input((4, 16), torch.float32, seed=17).to(device)
    wrong_shape = torch.zeros(4, 15, device=device)
    _refused(lambda: qkit.fake_quantize(x, 4, 8, out=wrong_shape), r"`out` must have shape \[4, 16\]", wrong_shape)
    wrong_dtype = torch.zeros(4, 16, dtype=torch.float16, device=device)
    _refused(lambda: qkit.fake_quantize(x, 4, 8, out=wrong_dtype), "`out` must be float32, got float16", wrong_dtype)
    expanded = torch.zeros(1, 16, device=device).expand(4, 16)
    _refused(lambda: qkit.fake_quantize(x, 4, 8, out=expanded), "`out` has elements that share memory", expanded)
    base = make_input((80,), torch.float32, seed=18).to(device)
    _refused(lambda: qkit.fake_quantize(base[:64], 4, 8, out=base[16:]), "`out` shares memory with `input`", base)


def test_bad_quantize_out_is_refused_before_writing(device):
    x = make_input((4, 16), torch.float32, seed=19).to(device)
    q = torch.zeros(4, 16, dtype=torch.int8, device=device)
    params = torch.zeros(4, 1, device=device)
    _refused(lambda: qkit.quantize(x, 4, 4, out=(q, params)), r"`q` must have shape \[4, 8\]", q, params)
    _refused(lambda: qkit.quantize(x, 4, 8, False, out=(q, params)), r"`params` must have shape \[4, 2\]", q, params)
    _refused(
        lambda: qkit.quantize(x, 4, 8, out=(q.view(torch.uint8), params)), "`q` must be int8, got uint8", q, params
    )
    _refused(lambda: qkit.quantize(x, 4, 8, out=(q, params.double())), "`params` must be float32", q, params)
    shared = torch.zeros(64, dtype=torch.int8, device=device)
    _refused(
        lambda: qkit.quantize(x, 4, 8, out=(shared.view(4, 16), shared[48:].view(torch.float32).view(4, 1))),
        "`params` shares memory with `q`",
        shared,
    )


def test_bad_dequantize_out_is_refused_before_writing(device):
    q, params = qkit.quantize(make_input((4, 16), torch.float32, seed=20).to(device), 4, 8)
    out = torch.zeros(4, 16, device=device)
    _refused(
        lambda: qkit.dequantize(q, params, out=torch.zeros(4, 16, dtype=torch.int32, device=device)),
        "`out` must be float32, float16 or bfloat16, got int32",
    )
    _refused(lambda: qkit.dequantize(q, params, out=out[:, :8]), r"`out` must have shape \[4, 16\]", out)
    _refused(lambda: qkit.dequantize(q, params, dtype=torch.float16, out=out), "`dtype` .* and `out` .* disagree", out)
    _refused(
        lambda: ops.dequantize.out(q, params, 4, 8, out=params.view(4, 1).expand(4, 16)),
        "`out` has elements that share memory",
        params,
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_out_on_another_device_is_refused():
    x = torch.randn(4, 16, device="cuda")
    out = torch.zeros(4, 16)
    _refused(lambda: qkit.fake_quantize(x, 4, 8, out=out), "`out` must be on the same device as `input`", out)
    _refused(lambda: qkit.dequantize(*qkit.quantize(x, 4, 8), out=out), "`out` must be on the same device as `q`", out)


# ------------------------------------------------------------------ autograd and registration


def test_out_has_no_gradient_and_says_so(device):
    x = torch.randn(4, 16, device=device, requires_grad=True)
    out = torch.empty(4, 16, device=device)
    with pytest.raises(RuntimeError, match=r"`input` requires grad, but fake_quantize\.out has no gradient"):
        qkit.fake_quantize(x, 4, 8, out=out)
    with torch.no_grad():
        qkit.fake_quantize(x, 4, 8, out=out)
    assert_same(out, qkit.fake_quantize(x.detach(), 4, 8), "under no_grad")
    q, params = qkit.quantize(x.detach(), 4, 8)
    with pytest.raises(RuntimeError, match="`params` requires grad"):
        qkit.dequantize(q, params.requires_grad_(), out=torch.empty(4, 16, device=device))
    leaf = torch.empty(4, 16, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="`out` requires grad"):
        qkit.fake_quantize(x.detach(), 4, 8, out=leaf)


def test_out_bumps_the_version_counter(device):
    x = torch.randn(4, 16, device=device)
    out, q, params = torch.empty(4, 16, device=device), torch.empty(4, 16, dtype=torch.int8, device=device), None
    params = torch.empty(4, 1, device=device)
    versions = (out._version, q._version, params._version)
    qkit.fake_quantize(x, 4, 8, out=out)
    qkit.quantize(x, 4, 8, out=(q, params))
    assert (out._version, q._version, params._version) == tuple(v + 1 for v in versions)


def test_functional_quantize_carries_no_gradient(device):
    q, params = qkit.quantize(torch.randn(4, 16, device=device, requires_grad=True), 4, 8)
    assert not q.requires_grad and not params.requires_grad and params.grad_fn is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_id)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_opcheck_out_overloads(device, dtype, bits, symmetric):
    x = make_input((6, 10), dtype, seed=21).to(device)
    opcheck(ops.fake_quantize.out, (x, 4, bits, symmetric, False), {"out": torch.empty_like(x)})
    opcheck(ops.fake_quantize.out, (x, 4, bits, symmetric, True), {"out": torch.empty_like(x)})
    q, params = ops.quantize(x, 4, bits, symmetric)
    opcheck(ops.quantize.out, (x, 4, bits, symmetric), {"q": torch.empty_like(q), "params": torch.empty_like(params)})
    opcheck(
        ops.dequantize.out, (q, params, 4, bits, symmetric), {"out": torch.empty(6, 10, dtype=dtype, device=device)}
    )


def test_compiled_out_calls_match_eager(device, fresh_dynamo):
    x = make_input((8, 64), torch.bfloat16, seed=22).to(device)

    def step(x, out, q, params, back):
        qkit.fake_quantize(x, 8, 4, out=out)
        qkit.quantize(x, 8, 8, out=(q, params))
        qkit.dequantize(q, params, out=back)
        return out.float().sum() + back.float().sum()

    def buffers():
        return (
            torch.empty_like(x),
            torch.empty(8, 64, dtype=torch.int8, device=device),
            torch.empty(8, 1, device=device),
            torch.empty(8, 64, dtype=torch.float32, device=device),
        )

    eager_bufs, compiled_bufs = buffers(), buffers()
    want = step(x, *eager_bufs)
    got = torch.compile(step, fullgraph=True)(x, *compiled_bufs)
    assert_same(got, want, "result")
    for g, w in zip(compiled_bufs, eager_bufs, strict=True):
        assert_same(g, w, "buffer written under compile")
