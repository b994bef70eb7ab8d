"""Bad arguments: a clear error that names the op and the argument, in every mode.

Modes: "eager" (the C++ bindings' checks), "fake" (FakeTensorMode) and "meta" (the
Python fake impls), "compile" (the fake impls again, while torch.compile traces).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch._subclasses import FakeTensorMode

import qkit

ops = torch.ops.qkit
ERRORS = (ValueError, RuntimeError, TypeError)
MODES = ["eager", "fake", "meta", "compile"]


@dataclass
class Case:
    op: str  # the name the message must carry: "qkit.<op>:"
    arg: str  # the backquoted argument it must name
    inputs: list[tuple[tuple[int, ...], torch.dtype]]  # tensors to make, (shape, dtype)
    call: Callable  # call(*tensors)

    def match(self) -> str:
        return re.escape(f"qkit.{self.op}:") + ".*" + re.escape(f"`{self.arg}`")


F32, F16, BF16, I8 = torch.float32, torch.float16, torch.bfloat16, torch.int8
CASES: dict[str, Case] = {}


def case(name: str, op: str, arg: str, inputs, call) -> None:
    CASES[name] = Case(op, arg, inputs, call)


# fake_quantize and fake_quantize_ (in place) share every check
for fq in ("fake_quantize", "fake_quantize_"):
    f = getattr(ops, fq)
    for bits in (1, 17, 0, -3):
        case(f"{fq}-bits{bits}", fq, "bits", [((4, 8), F32)], lambda x, f=f, b=bits: f(x, 1, b, True, False))
    case(f"{fq}-bits17-stochastic", fq, "bits", [((4, 8), F32)], lambda x, f=f: f(x, 1, 17, True, True))
    for groups in (0, -4):
        case(f"{fq}-groups{groups}", fq, "groups", [((4, 8), F32)], lambda x, f=f, g=groups: f(x, g, 8, True, False))
    case(f"{fq}-groups-not-dividing", fq, "groups", [((4, 8), BF16)], lambda x, f=f: f(x, 3, 8, False, False))
    case(f"{fq}-groups-more-than-numel", fq, "groups", [((4, 8), F16)], lambda x, f=f: f(x, 64, 8, True, False))
    for dtype in (torch.int32, torch.float64, torch.int8, torch.bool):
        case(f"{fq}-input-{dtype}", fq, "input", [((4, 8), dtype)], lambda x, f=f: f(x, 1, 8, True, False))

case("wrapper-fake_quantize-bits", "fake_quantize", "bits", [((8,), F32)], lambda x: qkit.fake_quantize(x, bits=17))
case("wrapper-fake_quantize_-groups", "fake_quantize_", "groups", [((8,), F32)], lambda x: qkit.fake_quantize_(x, 3))

# quantize
for bits in (9, 16, 1, 17, 0):  # 2..8 are stored (one int8 per code)
    case(f"quantize-bits{bits}", "quantize", "bits", [((4, 8), F32)], lambda x, b=bits: ops.quantize(x, 1, b, True))
case("quantize-groups0", "quantize", "groups", [((4, 8), F32)], lambda x: ops.quantize(x, 0, 8, True))
case("quantize-groups-neg", "quantize", "groups", [((4, 8), F32)], lambda x: ops.quantize(x, -1, 4, False))
case("quantize-groups-not-dividing", "quantize", "groups", [((4, 8), F32)], lambda x: ops.quantize(x, 5, 8, False))
for dtype in (torch.int32, torch.float64, torch.uint8):
    case(f"quantize-input-{dtype}", "quantize", "input", [((4, 8), dtype)], lambda x: ops.quantize(x, 1, 8, True))
case("quantize-4bit-odd-last-dim", "quantize", "input", [((4, 7), F32)], lambda x: ops.quantize(x, 1, 4, True))
case("quantize-4bit-odd-1d", "quantize", "input", [((9,), BF16)], lambda x: ops.quantize(x, 3, 4, False))
case("quantize-4bit-0dim", "quantize", "input", [((), F32)], lambda x: ops.quantize(x, 1, 4, True))
case("wrapper-quantize-bits", "quantize", "bits", [((8,), F32)], lambda x: qkit.quantize(x, bits=9))

# dequantize: q [4, 8] int8 and params [G, 1|2] float32 unless a case says otherwise
Q = ((4, 8), I8)
SYM_P = ((4, 1), F32)
ASYM_P = ((4, 2), F32)
for bits in (9, 16, 1, 0):
    case(f"dequantize-bits{bits}", "dequantize", "bits", [Q, SYM_P], lambda q, p, b=bits: ops.dequantize(q, p, 4, b))
for dtype in (torch.uint8, torch.int32, torch.float32, torch.float16):
    case(f"dequantize-q-{dtype}", "dequantize", "q", [((4, 8), dtype), SYM_P], lambda q, p: ops.dequantize(q, p, 4, 8))
for dtype in (torch.float16, torch.float64, torch.bfloat16, torch.int32):
    case(
        f"dequantize-params-{dtype}",
        "dequantize",
        "params",
        [Q, ((4, 1), dtype)],
        lambda q, p: ops.dequantize(q, p, 4, 8, True),
    )
for name, pshape, sym in [
    ("1d", (4,), True),
    ("sym-with-2-columns", (4, 2), True),
    ("asym-with-1-column", (4, 1), False),
    ("wrong-G", (2, 1), True),
    ("wrong-G-asym", (8, 2), False),
    ("3d", (4, 1, 1), True),
    ("transposed", (1, 4), True),
]:
    case(
        f"dequantize-params-shape-{name}",
        "dequantize",
        "params",
        [Q, (pshape, F32)],
        lambda q, p, s=sym: ops.dequantize(q, p, 4, 8, s),
    )
    case(
        f"dequantize-params-shape-{name}-4bit",
        "dequantize",
        "params",
        [Q, (pshape, F32)],
        lambda q, p, s=sym: ops.dequantize(q, p, 4, 4, s),
    )
for dtype in (torch.int32, torch.int8, torch.float64, torch.bool):
    case(
        f"dequantize-dtype-{dtype}",
        "dequantize",
        "dtype",
        [Q, SYM_P],
        lambda q, p, d=dtype: ops.dequantize(q, p, 4, 8, True, d),
    )
case("dequantize-groups0", "dequantize", "groups", [Q, SYM_P], lambda q, p: ops.dequantize(q, p, 0, 8))
case(
    "dequantize-groups-not-dividing",
    "dequantize",
    "groups",
    [Q, ((5, 1), F32)],
    lambda q, p: ops.dequantize(q, p, 5, 8),
)
case("dequantize-4bit-0dim", "dequantize", "q", [((), I8), ((1, 1), F32)], lambda q, p: ops.dequantize(q, p, 1, 4))
case(
    "wrapper-dequantize-params-1d",
    "dequantize",
    "params",
    [Q, ((4,), F32)],
    lambda q, p: qkit.dequantize(q, p),  # groups defaults to params.shape[0]
)
case(
    "wrapper-dequantize-dtype",
    "dequantize",
    "dtype",
    [Q, ASYM_P],
    lambda q, p: qkit.dequantize(q, p, symmetric=False, dtype=torch.int16),
)


def make(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.randint(-8, 8, shape, device=device).to(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_bad_argument(device, fresh_dynamo, mode, name):
    c = CASES[name]
    tensors = [make(shape, dtype, device) for shape, dtype in c.inputs]
    with pytest.raises(ERRORS, match=c.match()):
        if mode == "eager":
            c.call(*tensors)
        elif mode == "fake":
            with FakeTensorMode() as fake_mode:
                c.call(*[fake_mode.from_tensor(t) for t in tensors])
        elif mode == "meta":
            c.call(*[t.to("meta") for t in tensors])
        else:
            torch.compile(c.call, fullgraph=True, backend="inductor")(*tensors)


def test_error_types():
    """Value problems are ValueErrors, dtype problems TypeErrors (both also RuntimeError)."""
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="`bits`"):
        ops.fake_quantize(x.to("meta"), 1, 17, True, False)
    with pytest.raises(TypeError, match="`input`"):
        ops.quantize(x.to("meta").to(torch.float64), 1, 8, True)
    with pytest.raises(RuntimeError, match="`bits`"):
        ops.fake_quantize(x, 1, 17, True, False)


def test_inplace_error_leaves_input_untouched(device):
    x = torch.randn(4, 8, device=device)
    before = x.clone()
    with pytest.raises(ERRORS, match="`groups`"):
        ops.fake_quantize_(x, 3, 8, True, False)
    assert torch.equal(x, before)


@pytest.mark.parametrize("mode", ["eager", "fake"])
@pytest.mark.parametrize("where", ["q-on-cuda", "params-on-cuda"])
def test_dequantize_devices_differ(mode, where):
    """q and params on different devices: `params` named. Under FakeTensorMode a fake CUDA
    tensor needs no GPU, so that half runs everywhere."""
    if mode == "eager" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    qdev, pdev = ("cuda", "cpu") if where == "q-on-cuda" else ("cpu", "cuda")
    if mode == "fake":
        with FakeTensorMode(), pytest.raises(ERRORS, match=r"qkit\.dequantize:.*`params`"):
            q = torch.zeros(4, 8, dtype=torch.int8, device=qdev)
            p = torch.ones(4, 1, device=pdev)
            ops.dequantize(q, p, 4, 8, True, None)
        return
    q = torch.zeros(4, 8, dtype=torch.int8, device=qdev)
    p = torch.ones(4, 1, device=pdev)
    with pytest.raises(ERRORS, match=r"qkit\.dequantize:.*`params`"):
        ops.dequantize(q, p, 4, 8, True, None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dequantize_devices_differ_wrapper():
    q, p = qkit.quantize(torch.randn(4, 8, device="cuda"), groups=4)
    with pytest.raises(ERRORS, match="`params`"):
        qkit.dequantize(q, p.cpu())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("problem", ["requires-grad", "expanded"])
def test_inplace_refuses_unsafe_inputs(device, fresh_dynamo, mode, problem):
    """fake_quantize_ has no gradient and cannot write to self-overlapping views."""
    if problem == "requires-grad":
        x = torch.randn(4, 8, device=device, requires_grad=True)
        match = r"qkit\.fake_quantize_:.*`input` requires grad"
    else:
        x = torch.randn(1, 8, device=device).expand(4, 8)
        match = r"qkit\.fake_quantize_:.*`input`"

    def call(t):
        torch.ops.qkit.fake_quantize_(t, 4, 8, True, False)
        return t

    with pytest.raises(ERRORS, match=match):
        if mode == "eager":
            call(x)
        elif mode == "fake":
            with FakeTensorMode() as fake_mode:
                call(fake_mode.from_tensor(x))
        elif mode == "meta":
            call(_meta_like(x))
        else:
            torch.compile(call, fullgraph=True, backend="inductor")(x)


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    """x on the meta device with the same strides (an expanded view stays expanded)."""
    m = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return m.requires_grad_(x.requires_grad)


def test_inplace_under_no_grad_and_version_counter(device):
    x = torch.randn(4, 8, device=device, requires_grad=True)
    with torch.no_grad():
        v = x._version
        assert qkit.fake_quantize_(x, groups=4) is x
        assert x._version > v, "in-place writes must bump the version counter"
