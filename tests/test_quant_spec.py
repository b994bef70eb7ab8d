"""qkit.QuantSpec: validation, derived values, and its ops against the raw qkit ops and torch's affine fake quant."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qkit
from helpers import assert_same, make_input
from qkit import QuantSpec
from reference import codes_of_storage, ref_params


def test_defaults_and_derived_values() -> None:
    spec = QuantSpec()
    assert (spec.bits, spec.symmetric, spec.group_size, spec.ch_axis, spec.rounding) == (8, True, None, 0, "nearest")
    assert (spec.quant_min, spec.quant_max) == (-128, 127)
    assert [(QuantSpec(b).quant_min, QuantSpec(b).quant_max) for b in (2, 3, 4, 16)] == [
        (-2, 1),
        (-4, 3),
        (-8, 7),
        (-32768, 32767),
    ]
    assert spec.granularity == "per_channel"
    assert QuantSpec(ch_axis=None).granularity == "per_tensor"
    assert QuantSpec(group_size=32, ch_axis=None).granularity == "per_group"
    assert QuantSpec(rounding="stochastic").stochastic and not spec.stochastic
    # frozen and hashable: one scheme can key a dict of configs
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4  # type: ignore[misc]
    assert {QuantSpec(4): 1}[QuantSpec(4)] == 1
    assert spec.with_bits(4) == QuantSpec(4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"symmetric": 1}, "symmetric"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -64}, "group_size"),
        ({"group_size": 32.0}, "group_size"),
        ({"ch_axis": -1}, "ch_axis"),
        ({"ch_axis": "0"}, "ch_axis"),
        ({"rounding": "up"}, "rounding"),
    ],
)
def test_validation_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        QuantSpec(**kwargs)


def test_with_bits_validates() -> None:
    with pytest.raises(ValueError, match="`bits`"):
        QuantSpec(4).with_bits(20)


def test_shape_errors_name_the_field() -> None:
    x = torch.randn(6, 10)
    with pytest.raises(ValueError, match=r"`group_size` \(4\) must divide the last dimension"):
        QuantSpec(group_size=4).fake_quantize(x)
    with pytest.raises(ValueError, match=r"`ch_axis` \(2\) is out of range"):
        QuantSpec(ch_axis=2).fake_quantize(x)
    # quantize() stores 2..8 bits (one int8 per code); wider schemes are fake-only
    with pytest.raises(ValueError, match=r"quantize\(\) stores one int8 per code, `bits` must be in \[2, 8\], got 12"):
        QuantSpec(12).quantize(x)


def _by_hand(spec: QuantSpec, x: torch.Tensor) -> torch.Tensor:
    """What ``spec.fake_quantize`` must equal, built from the raw op one slice at a time."""
    kw = {"bits": spec.bits, "symmetric": spec.symmetric}
    if spec.group_size is not None:
        return qkit.fake_quantize(x, x.numel() // spec.group_size, **kw)
    if spec.ch_axis is None:
        return qkit.fake_quantize(x, 1, **kw)
    slices = [qkit.fake_quantize(s.contiguous(), 1, **kw) for s in x.unbind(spec.ch_axis)]
    return torch.stack(slices, dim=spec.ch_axis)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(8),
        QuantSpec(4, ch_axis=1),
        QuantSpec(3, symmetric=False, ch_axis=2),
        QuantSpec(4, ch_axis=None),
        QuantSpec(8, symmetric=False, group_size=5),
        QuantSpec(2, group_size=10),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_follow_the_scheme(spec: QuantSpec, dtype: torch.dtype) -> None:
    x = make_input((6, 4, 10), dtype, seed=spec.bits)
    y = spec.fake_quantize(x)
    assert_same(y, _by_hand(spec, x), f"fake_quantize {spec}")
    assert y.is_contiguous()

    # codes()/qparams(): step * q + offset rebuilds fake_quantize exactly
    q, params = spec.codes(x)
    steps, offsets = spec.qparams(x)
    assert torch.equal(params[:, 0], steps) and torch.equal(spec.steps(x), steps)
    assert q.dtype == torch.int8 and int(q.min()) >= spec.quant_min and int(q.max()) <= spec.quant_max
    rebuilt = (q.float().reshape(len(steps), -1) * steps[:, None] + offsets[:, None]).reshape(q.shape)
    assert_same(spec.from_op_layout(rebuilt).to(dtype), y, f"codes {spec}")

    if spec.storable:  # real storage: the op's codes and params, and back
        stored, stored_params = spec.quantize(x)
        assert torch.equal(stored_params, params)
        assert torch.equal(codes_of_storage(stored, spec.bits).reshape(q.shape), q)
        assert_same(spec.dequantize(stored, stored_params, dtype), y, f"dequantize {spec}")


def test_stochastic_rounding_is_the_ops() -> None:
    x = make_input((8, 16), torch.float32, seed=3)
    spec = QuantSpec(3, rounding="stochastic")
    torch.manual_seed(7)
    got = spec.fake_quantize(x)
    torch.manual_seed(7)
    want = qkit.fake_quantize(x, 8, 3, True, True)
    assert_same(got, want, "stochastic")
    assert not torch.equal(got, QuantSpec(3).fake_quantize(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("ch_axis", [0, 1])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_equals_torch_per_channel_fake_quant(bits: int, ch_axis: int, kind: str) -> None:
    """Symmetric qkit == torch.fake_quantize_per_channel_affine(scale = qkit's step, zero point 0), bit for bit.

    Holds because torch's ``1/scale`` recovers qkit's fp32 scale exactly (see qkit.pt2e.quantizer).
    """
    spec = QuantSpec(bits, ch_axis=ch_axis)
    w = make_input((48, 40), torch.float32, seed=bits, kind=kind)
    steps = spec.steps(w)
    scales = ref_params(spec.to_op_layout(w).contiguous(), w.shape[ch_axis], bits, True)[0].flatten()
    assert torch.equal(1.0 / steps, scales)  # the reciprocal round trip recovers the kernels' scale
    zero = torch.zeros(w.shape[ch_axis], dtype=torch.int32)
    want = torch.fake_quantize_per_channel_affine(w, steps, zero, ch_axis, spec.quant_min, spec.quant_max)
    assert_same(spec.fake_quantize(w), want, f"{bits} bits, axis {ch_axis}")
