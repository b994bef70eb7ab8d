"""qkit.QuantSpec with a floating-point ``format``: validation, and its ops against the
independent FP model of tests/reference.py (bit for bit)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from helpers import assert_same, make_input
from qkit import QuantSpec
from qkit.moq import GroupConfig, MoQConfigError
from reference import ref_fake_quantize_fp, ref_fp_scales, ref_philox_uniforms, ref_quantize_fp


def test_format_fills_in_bits_and_blocks() -> None:
    assert [QuantSpec(format=f).bits for f in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1")] == [8, 8, 6, 6, 4]
    assert QuantSpec(format="e4m3", bits=8) == QuantSpec(format="e4m3")  # a consistent width is accepted
    mx = QuantSpec(format="e2m1", scaling="mx")
    assert (mx.group_size, mx.granularity) == (32, "per_group")
    assert QuantSpec(format="e2m1", scaling="nvfp4").group_size == 16
    assert QuantSpec(format="e4m3").granularity == "per_channel" and QuantSpec(format="e4m3").storable
    assert dataclasses.replace(mx, rounding="stochastic").stochastic  # replace re-validates the filled-in fields
    assert {mx: 1}[QuantSpec(format="e2m1", scaling="mx", group_size=32)] == 1
    assert QuantSpec().bits == 8 and QuantSpec().format is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "fp8"}, "`format` must be one of"),
        ({"format": ["e4m3"]}, "`format` must be one of"),
        ({"format": "e4m3", "bits": 4}, "give either `bits` (an integer scheme) or `format`"),
        ({"scaling": "mx"}, "`scaling` 'mx' needs a floating-point `format`"),
        ({"format": "e4m3", "scaling": "block"}, "`scaling` must be one of"),
        ({"format": "e4m3", "scaling": "nvfp4"}, "`scaling` nvfp4 needs `format` e2m1"),
        ({"format": "e4m3", "symmetric": False}, "`symmetric` must be True with a `format`"),
        ({"format": "e2m1", "scaling": "mx", "group_size": 16}, "`group_size` must be None or 32"),
    ],
)
def test_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantSpec(**kwargs)


def test_integer_only_methods_refuse_a_format() -> None:
    spec, x = QuantSpec(format="e4m3"), torch.randn(4, 8)
    for method in (spec.steps, spec.qparams, spec.codes):
        with pytest.raises(ValueError, match=r"for integer schemes; use scales\(\)"):
            method(x)
    with pytest.raises(ValueError, match="for floating-point schemes"):
        QuantSpec(4).scales(x)
    with pytest.raises(ValueError, match="e4m3 has 8 bits"):
        spec.with_bits(4)


def _groups(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Groups counted independently of QuantSpec.num_groups."""
    numel = torch.Size(shape).numel()
    if spec.group_size is not None:
        return numel // spec.group_size
    return 1 if spec.ch_axis is None else shape[spec.ch_axis]


SPECS = [
    QuantSpec(format="e4m3"),
    QuantSpec(format="e5m2", ch_axis=None),
    QuantSpec(format="e3m2", ch_axis=1),
    QuantSpec(format="e2m3", group_size=8),
    QuantSpec(format="e2m1", scaling="mx"),
    QuantSpec(format="e4m3", scaling="mx"),
    QuantSpec(format="e2m1", scaling="nvfp4"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.scaling}-{s.granularity}-{s.ch_axis}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ops_equal_the_reference(spec: QuantSpec, dtype: torch.dtype) -> None:
    x = make_input((8, 64), dtype, seed=5)
    x[1] = 0  # an all-zero row
    op_x = x.movedim(spec.ch_axis, 0) if spec.moves_axis else x  # groups are contiguous runs there
    groups = _groups(spec, tuple(x.shape))
    want = ref_fake_quantize_fp(op_x, groups, spec.format, spec.scaling)
    if spec.moves_axis:
        want = want.movedim(0, spec.ch_axis)
    got = spec.fake_quantize(x)
    assert got.is_contiguous()
    assert_same(got, want, "fake_quantize")
    codes, scales = spec.quantize(x)
    want_codes, want_scales = ref_quantize_fp(op_x, groups, spec.format, spec.scaling)
    assert codes.dtype == want_codes.dtype and scales.dtype == want_scales.dtype
    assert_same(codes.view(torch.uint8), want_codes.view(torch.uint8), "codes")
    assert_same(scales.view(torch.uint8), want_scales.view(torch.uint8), "scales")
    assert_same(spec.dequantize(codes, scales, dtype), want, "dequantize")
    assert_same(spec.scales(x), ref_fp_scales(op_x, groups, spec.format, spec.scaling)[1].reshape(-1), "scales()")


def test_stochastic_rounding_is_seeded_philox() -> None:
    spec = QuantSpec(format="e2m1", scaling="mx", rounding="stochastic")
    x = make_input((4, 64), torch.float32, seed=6)
    torch.manual_seed(99)
    seed = torch.empty(1, dtype=torch.int64).random_().item()
    torch.manual_seed(99)
    got = spec.fake_quantize(x)
    assert_same(got, ref_fake_quantize_fp(x, 8, "e2m1", "mx", ref_philox_uniforms(seed, x.numel())), "stochastic")


def test_moq_groups_take_integer_schemes_only() -> None:
    with pytest.raises(MoQConfigError, match="floating-point scheme") as info:
        GroupConfig("g", scheme=QuantSpec(format="e4m3"))
    assert info.value.key == "different_groups.g.scheme"
