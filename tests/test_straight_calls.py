"""The wrappers' straight call to qkit's kernel (``ops.kernel_keys``): taken only where nothing
between the Python call and the kernel could act, and bit for bit the op's result."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import qkit
import qkit.ops
from helpers import assert_same, count_straight_calls, make_input

ops = torch.ops.qkit


class RecordingDispatchMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def straight_calls(monkeypatch) -> list[str]:
    """Counts the wrappers' straight calls, by op."""
    names = ("fake_quantize", "fake_quantize_out", "fake_quantize_in_place", "quantize", "quantize_out")
    return count_straight_calls(monkeypatch, qkit.ops, (*names, "dequantize", "dequantize_out"))


def call_all(x: torch.Tensor) -> list[torch.Tensor]:
    q, p = qkit.quantize(x, 8, 8)
    return [q, p, qkit.fake_quantize(x, groups=8, bits=5), qkit.dequantize(q, p, 8, 8, dtype=torch.float32)]


def expected_all(x: torch.Tensor) -> list[torch.Tensor]:
    q, p = ops.quantize(x, 8, 8, True)
    return [q, p, ops.fake_quantize(x, 8, 5, True, False), ops.dequantize(q, p, 8, 8, True, torch.float32)]


def test_plain_calls_go_straight_and_agree_with_the_op(device, straight_calls):
    x = make_input((8, 40), torch.bfloat16, seed=21).to(device)
    for got, want in zip(call_all(x), expected_all(x), strict=True):
        assert_same(got, want)
    assert straight_calls == ["quantize", "fake_quantize", "dequantize"]
    assert qkit.ops.kernel_keys(x, x) is not None


def test_writing_calls_go_straight_bump_versions_and_agree_with_the_op(device, straight_calls):
    """out= and in-place calls: the op's bytes, and one version bump per written tensor as the
    normal call gives, so autograd still catches a saved tensor overwritten."""
    x = make_input((8, 40), torch.float16, seed=26).to(device)
    q_want, p_want = ops.quantize(x, 8, 4, False)
    fake_want = ops.fake_quantize(x, 8, 5, False, False)
    deq_want = ops.dequantize(q_want, p_want, 8, 4, False, torch.float32)

    out, q, p = torch.empty_like(x), torch.empty_like(q_want), torch.empty_like(p_want)
    deq, in_place = torch.empty_like(deq_want), x.clone()
    versions = [t._version for t in (out, q, p, deq, in_place)]
    assert qkit.fake_quantize(x, groups=8, bits=5, symmetric=False, out=out) is out
    assert qkit.quantize(x, 8, 4, symmetric=False, out=(q, p)) == (q, p)
    assert qkit.dequantize(q, p, 8, 4, symmetric=False, out=deq) is deq
    assert qkit.fake_quantize_(in_place, groups=8, bits=5, symmetric=False) is in_place
    for got, want in zip((out, q, p, deq, in_place), (fake_want, q_want, p_want, deq_want, fake_want), strict=True):
        assert_same(got, want)
    assert straight_calls == ["fake_quantize_out", "quantize_out", "dequantize_out", "fake_quantize_in_place"]

    normal = [t.clone() for t in (out, q, p, deq, in_place)]
    normal_versions = [t._version for t in normal]
    ops.fake_quantize.out(x, 8, 5, False, False, out=normal[0])
    ops.quantize.out(x, 8, 4, False, q=normal[1], params=normal[2])
    ops.dequantize.out(normal[1], normal[2], 8, 4, False, out=normal[3])
    ops.fake_quantize_(normal[4], 8, 5, False, False)
    bumps = [t._version - v for t, v in zip((out, q, p, deq, in_place), versions, strict=True)]
    assert bumps == [t._version - v for t, v in zip(normal, normal_versions, strict=True)]
    assert min(bumps) >= 1

    w = torch.ones_like(out, requires_grad=True)
    loss = (w * out).sum()  # saves out for the gradient of w
    qkit.fake_quantize(x, groups=8, bits=5, out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_writes_into_tensors_that_require_grad_are_refused_on_the_normal_call(device, straight_calls):
    x = make_input((8, 40), torch.float32, seed=27).to(device)
    with pytest.raises(RuntimeError, match=r"`out` requires grad"):
        qkit.fake_quantize(x, groups=8, bits=5, out=torch.empty_like(x, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"`input` requires grad"):
        qkit.fake_quantize_(x.clone().requires_grad_(True), groups=8, bits=5)
    weight = x.clone().requires_grad_(True)
    with torch.no_grad():  # the optimizer's way: allowed, straight
        assert_same(qkit.fake_quantize_(weight, groups=8, bits=5), ops.fake_quantize(x, 8, 5, True, False))
    assert straight_calls == ["fake_quantize_in_place"]


def test_view_bits_are_resolved_on_the_straight_call(device, straight_calls):
    """A negative view's bit (and a zero tensor's) is resolved by torch's fallbacks, which
    stay on the straight call's key set: no raw read of the negated memory."""
    base = make_input((8, 40), torch.float32, seed=22).to(device)
    negative = torch._neg_view(base)
    assert negative.is_neg()
    for got, want in zip(call_all(negative), expected_all(-base), strict=True):
        assert_same(got, want)
    zeros = torch._efficientzerotensor(8, 40, device=device)
    assert_same(qkit.fake_quantize(zeros, groups=8, bits=5), torch.zeros(8, 40, device=device))
    assert straight_calls.count("fake_quantize") == 2


def _gradient_wanted(x):
    return x.clone().requires_grad_(True)


CONTEXTS = ["grad", "forward_ad", "dispatch_mode", "function_mode", "profiler", "jit_trace", "vmap", "fake_tensor"]


@pytest.mark.parametrize("context", [*CONTEXTS, "subclass"])
def test_no_straight_call_where_something_else_acts(device, straight_calls, context):
    """Each context that must see (or record, or differentiate) the op gets the normal call,
    and sees it; results stay the op's."""
    x = make_input((8, 40), torch.float32, seed=23).to(device)
    want = ops.fake_quantize(x, 8, 5, True, False)
    if context == "grad":
        xr = _gradient_wanted(x)
        y = qkit.fake_quantize(xr, groups=8, bits=5)
        assert y.grad_fn is not None
        with pytest.raises(RuntimeError, match=r"qkit\.dequantize: `params` requires grad"):
            q, p = ops.quantize(x, 8, 8, True)
            qkit.dequantize(q, _gradient_wanted(p), 8, 8)
        assert_same(y.detach(), want)
    elif context == "forward_ad":
        with fwAD.dual_level():  # a straight call would drop the tangent
            y = qkit.fake_quantize(fwAD.make_dual(x, torch.ones_like(x)), groups=8, bits=5)
            primal, tangent = fwAD.unpack_dual(y)
            assert_same(primal, want)
            assert_same(tangent, torch.ones_like(x))
    elif context == "dispatch_mode":
        with RecordingDispatchMode() as mode:
            assert_same(qkit.fake_quantize(x, groups=8, bits=5), want)
            call_all(x)
        assert {"qkit.fake_quantize.default", "qkit.quantize.default", "qkit.dequantize.default"} <= set(mode.seen)
    elif context == "function_mode":
        with PassThroughFunctionMode():
            assert qkit.ops.kernel_keys(x) is None
            assert_same(qkit.fake_quantize(x, groups=8, bits=5), want)
    elif context == "profiler":
        with torch.profiler.profile() as profile:
            assert_same(qkit.fake_quantize(x, groups=8, bits=5), want)
        assert "qkit::fake_quantize" in {event.key for event in profile.key_averages()}
    elif context == "jit_trace":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: deprecated, still used
            # check_trace=False: the check would rerun the function untraced.
            traced = torch.jit.trace(lambda t: qkit.fake_quantize(t, groups=8, bits=5), x, check_trace=False)
        assert "qkit::fake_quantize" in str(traced.graph)
        assert_same(traced(x), want)
    elif context == "vmap":
        rows = torch.vmap(lambda row: qkit.fake_quantize(row, groups=1, bits=5))(x)
        assert_same(rows, torch.stack([ops.fake_quantize(row, 1, 5, True, False) for row in x]))
    elif context == "fake_tensor":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fake = mode.from_tensor(x)
            assert qkit.ops.kernel_keys(fake) is None
            assert qkit.fake_quantize(fake, groups=8, bits=5).shape == x.shape
    else:
        parameter = torch.nn.Parameter(x.clone(), requires_grad=False)
        assert qkit.ops.kernel_keys(parameter) is None
        assert_same(qkit.fake_quantize(parameter, groups=8, bits=5), want)
    assert straight_calls == []


def test_unusual_layouts_get_the_normal_call(straight_calls):
    x = make_input((8, 40), torch.float32, seed=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the strided nested layout is a prototype
        nested = torch.nested.nested_tensor([x[0], x[1, :8]])
    for odd in (x.to_sparse(), nested, torch.nested.nested_tensor([x[0], x[1, :8]], layout=torch.jagged)):
        assert qkit.ops.kernel_keys(odd) is None and qkit.ops.kernel_keys(x, odd) is None
        with pytest.raises(RuntimeError):  # NotImplementedError included
            qkit.fake_quantize(odd, groups=1, bits=5)
    assert straight_calls == []


def test_quantized_tensors_are_refused_on_either_call():
    x = make_input((8, 40), torch.float32, seed=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's quantized tensors are deprecated
        quantized = torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)
    with pytest.raises(RuntimeError):
        ops.fake_quantize(quantized, 8, 5, True, False)
    with pytest.raises(RuntimeError):
        qkit.fake_quantize(quantized, groups=8, bits=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_get_the_normal_call():
    q, p = ops.quantize(make_input((8, 40), torch.float32, seed=25), 8, 8, True)
    assert qkit.ops.kernel_keys(q.cuda(), p) is None
    with pytest.raises(RuntimeError, match="same device"):
        qkit.dequantize(q.cuda(), p, 8, 8)


def test_wrappers_without_grad_compile_without_graph_break(device, fresh_dynamo):
    def fn(x):
        q, p = qkit.quantize(x, 8, 8)
        return qkit.fake_quantize(x, groups=8, bits=4), qkit.dequantize(q, p, 8, 8, dtype=torch.float32)

    x = make_input((8, 16), torch.float32, seed=12).to(device)
    got = torch.compile(fn, fullgraph=True, backend="eager")(x)
    for g, e in zip(got, fn(x), strict=True):
        assert_same(g, e)
