"""Eager (the C++ bindings) and fake (the Python fake impls) word every refusal the same.

tests/test_errors.py checks that each mode names the op and the argument; this module
runs every one of its cases, plus the out= forms and the ZeRO++ ops, through the CPU
kernel, under FakeTensorMode and on the meta device, and compares the whole message.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._subclasses import FakeTensorMode

from test_errors import CASES as ARGUMENT_CASES
from test_errors import make

ops = torch.ops.qkit
F32, F16, BF16, I8, U8 = torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8
Inputs = list[tuple[tuple[int, ...], torch.dtype]]

#: name -> (tensors to make, call(*tensors)); the call must raise in every mode.
CASES: dict[str, tuple[Inputs, Callable]] = {name: (c.inputs, c.call) for name, c in ARGUMENT_CASES.items()}


def case(name: str, inputs: Inputs, call: Callable) -> None:
    assert name not in CASES, name
    CASES[name] = (inputs, call)


X = ((4, 8), F32)
Q, SYM_P, ASYM_P = ((4, 8), I8), ((4, 1), F32), ((4, 2), F32)

# dtype names beyond the float and int8 families, which the eager side once called "an unsupported dtype"
for dtype in (torch.int16, torch.complex64, torch.uint16):
    case(f"dequantize-dtype-{dtype}", [Q, SYM_P], lambda q, p, d=dtype: ops.dequantize(q, p, 4, 8, True, d))
case("quantize-input-int16", [((4, 8), torch.int16)], lambda x: ops.quantize(x, 1, 8, True))

# out= forms
case("fake_quantize.out-dtype", [X, ((4, 8), F16)], lambda x, o: ops.fake_quantize.out(x, 1, 8, True, False, out=o))
case("fake_quantize.out-shape", [X, ((8, 4), F32)], lambda x, o: ops.fake_quantize.out(x, 1, 8, True, False, out=o))
case("fake_quantize.out-bits", [X, X], lambda x, o: ops.fake_quantize.out(x, 1, 1, True, False, out=o))
case("fake_quantize_-expanded", [((1, 8), F32)], lambda x: ops.fake_quantize_(x.expand(4, 8), 4, 8, True, False))
case("quantize.out-q-dtype", [X, ((4, 8), U8), SYM_P], lambda x, q, p: ops.quantize.out(x, 4, 8, True, q=q, params=p))
case("quantize.out-q-shape", [X, ((4, 4), I8), SYM_P], lambda x, q, p: ops.quantize.out(x, 4, 8, True, q=q, params=p))
case("quantize.out-params-shape", [X, Q, SYM_P], lambda x, q, p: ops.quantize.out(x, 4, 8, False, q=q, params=p))
case("quantize.out-params-dtype", [X, Q, ((4, 1), F16)], lambda x, q, p: ops.quantize.out(x, 4, 8, True, q=q, params=p))
case("dequantize.out-dtype", [Q, SYM_P, ((4, 8), I8)], lambda q, p, o: ops.dequantize.out(q, p, 4, 8, True, out=o))
case("dequantize.out-shape", [Q, SYM_P, ((4, 4), F32)], lambda q, p, o: ops.dequantize.out(q, p, 4, 8, True, out=o))
case("dequantize.out-params", [Q, ((2, 1), F32), X], lambda q, p, o: ops.dequantize.out(q, p, 4, 8, True, out=o))

# swizzle_quantize and its LoCo and out= forms: x has 64 elements
S = ((64,), F32)


def swizzle(groups: int = 8, bits: int = 8, pipeline: int = 1, nodes: int = 2, devices: int = 2) -> Callable:
    return lambda x: ops.swizzle_quantize(x, groups, bits, True, pipeline, nodes, devices)


case("swizzle-input-dtype", [((64,), torch.float64)], swizzle())
case("swizzle-bits", [S], swizzle(bits=3))
case("swizzle-groups0", [S], swizzle(groups=0))
case("swizzle-groups-not-dividing", [S], swizzle(groups=7))
case("swizzle-4bit-odd-group", [S], swizzle(groups=64, bits=4))
case("swizzle-pipeline0", [S], swizzle(pipeline=0))
case("swizzle-nodes0", [S], swizzle(nodes=0))
case("swizzle-devices0", [S], swizzle(devices=0))
case("swizzle-groups-not-multiple", [S], swizzle(groups=4, pipeline=2))
case("swizzle.out-q-shape", [S, ((32,), I8), ((8, 1), F32)], lambda x, q, p: ops.swizzle_quantize.out(
    x, 8, 8, True, 1, 2, 2, q=q, params=p))  # fmt: skip
case("swizzle.out-params-dtype", [S, ((64,), I8), ((8, 1), F16)], lambda x, q, p: ops.swizzle_quantize.out(
    x, 8, 8, True, 1, 2, 2, q=q, params=p))  # fmt: skip


def loco_swizzle(beta: float = 0.5, groups: int = 8) -> Callable:
    return lambda x, e: ops.loco_swizzle_quantize(x, e, beta, groups, 8, True, 1, 2, 2)


case("loco_swizzle-error-int", [S, ((64,), torch.int32)], loco_swizzle())
case("loco_swizzle-error-numel", [S, ((32,), F32)], loco_swizzle())
case("loco_swizzle-error-dtype", [S, ((64,), F16)], loco_swizzle())
case("loco_swizzle-beta", [S, S], loco_swizzle(beta=1.5))
case("loco_swizzle-groups", [S, S], loco_swizzle(groups=6))
case("loco_swizzle-expanded", [S, ((1,), F32)], lambda x, e: ops.loco_swizzle_quantize(
    x, e.expand(64), 0.5, 8, 8, True, 1, 2, 2))  # fmt: skip

# quantized_reduction: q holds 2 tensors of 32 codes, params [4, 1] (2 groups per tensor)
R, RP = ((64,), I8), ((4, 1), F32)


def reduction(in_groups: int = 4, out_groups: int = 2, bits: int = 8, symmetric: bool = True, devices: int = 2):
    return lambda q, p: ops.quantized_reduction(q, p, in_groups, out_groups, bits, symmetric, devices)


case("reduction-q-dtype", [((64,), U8), RP], reduction())
case("reduction-params-dtype", [R, ((4, 1), F16)], reduction())
case("reduction-bits", [R, RP], reduction(bits=2))
case("reduction-devices0", [R, RP], reduction(devices=0))
case("reduction-q-0dim", [((), I8), RP], reduction())
case("reduction-q-split", [((63,), I8), RP], reduction())
case("reduction-in_groups", [R, RP], reduction(in_groups=3))
case("reduction-in_groups-values", [R, ((12, 1), F32)], reduction(in_groups=12))
case("reduction-out_groups", [R, RP], reduction(out_groups=5))
case("reduction-out_groups0", [R, RP], reduction(out_groups=0))
case("reduction-params-shape", [R, RP], reduction(symmetric=False))


def loco_reduction(beta: float = 0.5) -> Callable:
    return lambda q, p, e: ops.loco_quantized_reduction(q, p, e, beta, 4, 2, 8, True, 2)


case("loco_reduction-error-dtype", [R, RP, ((32,), I8)], loco_reduction())
case("loco_reduction-error-numel", [R, RP, ((64,), F32)], loco_reduction())
case("loco_reduction-beta", [R, RP, ((32,), F16)], loco_reduction(beta=-0.1))

# dequantize_unsigned: 4 groups of 8 codes


def unsigned(num_groups: int = 4, group_size: int = 8, bits: int = 8) -> Callable:
    return lambda d, s, m: ops.dequantize_unsigned(d, s, m, num_groups, group_size, bits)


D, DS = ((32,), U8), ((4,), F32)
case("unsigned-data-dtype", [((32,), F16), DS, DS], unsigned())
case("unsigned-bits", [D, DS, DS], unsigned(bits=6))
case("unsigned-num_groups", [D, DS, DS], unsigned(num_groups=-1))
case("unsigned-group_size", [D, DS, DS], unsigned(group_size=0))
case("unsigned-odd-4bit", [((8,), U8), ((3,), F32), ((3,), F32)], unsigned(num_groups=3, group_size=5, bits=4))
case("unsigned-data-bytes", [((31,), I8), DS, DS], unsigned())
case("unsigned-scale-dtype", [D, ((4,), I8), ((4,), I8)], unsigned())
case("unsigned-minv-dtype", [D, DS, ((4,), F16)], unsigned())
case("unsigned-scale-numel", [D, ((3,), F32), DS], unsigned())
case("unsigned-minv-numel", [D, DS, ((5,), F32)], unsigned())


def message(call: Callable[[], object]) -> str:
    try:
        call()
    except (RuntimeError, ValueError, TypeError) as error:
        return str(error)
    raise AssertionError("the call did not raise")


def fake_call(call: Callable, tensors: list[torch.Tensor]) -> object:
    with FakeTensorMode() as fake_mode:
        return call(*[fake_mode.from_tensor(t) for t in tensors])


@pytest.mark.parametrize("name", CASES)
def test_eager_and_fake_say_the_same(name):
    inputs, call = CASES[name]
    tensors = [make(shape, dtype, "cpu") for shape, dtype in inputs]
    eager = message(lambda: call(*tensors))
    assert eager.startswith("qkit."), eager  # a qkit check, not torch's or a crash
    assert message(lambda: fake_call(call, tensors)) == eager
    assert message(lambda: call(*[t.to("meta") for t in tensors])) == eager


@pytest.mark.parametrize("mode", ["fake", pytest.param("eager", marks=pytest.mark.cuda)])
def test_loco_reduction_blames_q_for_the_device(mode):
    """loco_quantized_reduction has no `input`: a misplaced error buffer is measured against `q`.
    Under FakeTensorMode a fake CUDA tensor needs no GPU."""
    if mode == "eager" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    want = "qkit.loco_quantized_reduction: `error_feedback` must be on the same device as `q`"

    def call() -> object:
        q, p = torch.zeros(64, dtype=I8), torch.ones(4, 1)
        return loco_reduction()(q, p, torch.zeros(32, device="cuda"))

    assert message(call if mode == "eager" else lambda: fake_call(lambda: call(), [])) == want
