"""Hypothesis: random shapes, groups, bits, modes, dtypes and values against the reference, bit for bit."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FLOAT_DTYPES, assert_same, check_quantize
from reference import ref_dequantize, ref_fake_quantize

ops = torch.ops.qkit

# QKIT_HYPOTHESIS_EXAMPLES=5000 for a deeper hunt; the default keeps the suite quick.
SETTINGS = settings(
    max_examples=int(os.environ.get("QKIT_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Values: anything fp32 can hold (subnormals, FLT_MAX, -0.0) and ordinary numbers; tensors()
# now and then plants a NaN or an infinity, which must only poison its own group.
VALUES = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(-8, 8, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0**-20]),
)


@st.composite
def tensors(draw, max_dims: int = 3, max_side: int = 9):
    """(x on CPU, groups): a tensor of random shape/dtype/values and a divisor of its size."""
    # (empty tensors are test_core_ops' business: here they would shadow everything else)
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims)))
    numel = math.prod(shape)
    groups = draw(st.sampled_from([d for d in range(1, numel + 1) if numel % d == 0]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    if draw(st.booleans()):
        values = draw(st.lists(VALUES, min_size=numel, max_size=numel))
        x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    else:  # structured data: a few groups at very different scales
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        x = torch.randn(shape, generator=gen) * 10.0 ** draw(st.integers(-30, 30))
    if draw(st.integers(0, 4)) == 0:
        x.view(-1)[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x.to(dtype), groups


def packable(x: torch.Tensor) -> bool:
    return x.dim() >= 1 and x.shape[-1] % 2 == 0


@SETTINGS
@given(case=tensors(), bits=st.integers(2, 16), symmetric=st.booleans())
def test_fake_quantize(device, case, bits, symmetric):
    x, groups = case
    got = ops.fake_quantize(x.to(device), groups, bits, symmetric, False)
    assert_same(got, ref_fake_quantize(x, groups, bits, symmetric), "fake_quantize")


@SETTINGS
@given(case=tensors(), bits=st.sampled_from([4, 8]), symmetric=st.booleans())
def test_quantize_dequantize(device, case, bits, symmetric):
    x, groups = case
    if bits == 4 and not packable(x):
        with pytest.raises((ValueError, RuntimeError), match="`input`"):
            ops.quantize(x.to(device), groups, bits, symmetric)
        return
    check_quantize(x, groups, bits, symmetric, device)


@SETTINGS
@given(case=tensors(max_dims=4, max_side=6), data=st.data(), bits=st.sampled_from([3, 4, 8]), symmetric=st.booleans())
def test_layout_does_not_matter(device, case, data, bits, symmetric):
    """Permuted / sliced views give the results of their .contiguous() copies, in place too."""
    x, groups = case
    perm = data.draw(st.permutations(range(x.dim())))
    sliced = x.dim() >= 1 and x.shape[perm[0]] > 1 and data.draw(st.booleans())

    def make_view(t: torch.Tensor) -> torch.Tensor:
        v = t.to(device).permute(*perm) if t.dim() else t.to(device)
        return v[::2] if sliced else v

    view = make_view(x)
    groups = groups if view.numel() % groups == 0 else 1
    want = ref_fake_quantize(view.cpu(), groups, bits, symmetric)
    assert_same(ops.fake_quantize(view, groups, bits, symmetric, False), want, "fake_quantize")
    inplace = make_view(x.clone())
    ops.fake_quantize_(inplace, groups, bits, symmetric, False)
    assert_same(inplace, want, "fake_quantize_")
    if bits in (4, 8) and packable(view):
        check_quantize(view.cpu(), groups, bits, symmetric, device)


@SETTINGS
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 8),
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    dtype=st.sampled_from([None, *FLOAT_DTYPES]),
    data=st.data(),
)
def test_dequantize_any_codes_and_params(device, rows, cols, bits, symmetric, dtype, data):
    """Arbitrary int8 codes and fp32 params (not made by quantize), NaN/Inf included."""
    groups = rows
    q = torch.tensor(
        data.draw(st.lists(st.integers(-128, 127), min_size=rows * cols * 2, max_size=rows * cols * 2)),
        dtype=torch.int8,
    ).reshape(rows, cols * 2)
    per_group = 1 if symmetric else 2
    n = groups * per_group
    params = torch.tensor(data.draw(st.lists(st.floats(width=32), min_size=n, max_size=n)), dtype=torch.float32)
    params = params.reshape(groups, per_group)
    got = ops.dequantize(q.to(device), params.to(device), groups, bits, symmetric, dtype)
    assert_same(got, ref_dequantize(q, params, groups, bits, symmetric, dtype), "dequantize")
