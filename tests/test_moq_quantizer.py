"""qkit.moq.Quantizer: DeepSpeed's MoQ values and schedule, step for step, and its defects fixed.

Expected values are hand-computed tables, plus outputs recorded from DeepSpeed 0.17.0's
``deepspeed.runtime.quantize.Quantizer`` on literal inputs (facts, for bit-exactness in
fp16/bf16 arithmetic).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import qkit
from qkit.moq import Quantizer, quantize_binary, quantize_highbit, quantize_ternary, quantize_weight


def param(values, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] | None = None) -> nn.Parameter:
    t = torch.tensor(values, dtype=dtype)
    return nn.Parameter(t.reshape(shape) if shape else t.reshape(1, -1))


def schedule(p: nn.Parameter, start: int, target: int, period: int) -> nn.Parameter:
    p.start_bits, p.target_bits, p.q_period = start, target, period
    return p


def values(t: Tensor) -> list[float]:
    return [float(v) for v in t.detach().flatten().tolist()]


# ---------------------------------------------------------------- values, hand-computed


def test_symmetric_4bit_worked_example() -> None:
    # s = 2·2/16 = 0.25; x/s = 4,-2,1,-8,0,3,8,-6; clamp to [-8, 7]
    x = torch.tensor([1, -0.5, 0.25, -2, 0, 0.75, 2, -1.5])
    assert values(quantize_highbit(x, 4, 1, True, False)) == [1, -0.5, 0.25, -2, 0, 0.75, 1.75, -1.5]


def test_asymmetric_3bit_zero_point() -> None:
    # lo=-3, hi=5: s = 8/8 = 1, z = round(-3)·1 = -3; (x+3) = 0,2,3,5,8 -> clamp [0, 7]
    x = torch.tensor([-3.0, -1.0, 0.0, 2.0, 5.0])
    assert values(quantize_highbit(x, 3, 1, False, False)) == [-3, -1, 0, 2, 4]
    # lo=-0.6, hi=1.4: s = 0.25, z = round(-2.4)·0.25 = -0.5; (x-z)/s = -0.4, 2.8, 7.6 -> 0, 3, 7
    y = torch.tensor([-0.6, 0.2, 1.4])
    assert values(quantize_highbit(y, 3, 1, False, False)) == [-0.5, 0.25, 1.25]


def test_groups_are_contiguous_runs() -> None:
    # two groups of 4: m = 2 (s = 0.5 at 3 bits) and m = 0.5 (s = 0.125)
    x = torch.tensor([[2.0, -1.0, 0.6, 0.0], [0.5, -0.25, 0.3, 0.05]])
    got = quantize_highbit(x, 3, 2, True, False)
    assert values(got) == [1.5, -1.0, 0.5, 0.0, 0.375, -0.25, 0.25, 0.0]
    assert got.shape == x.shape


def test_ternary_and_binary() -> None:
    # mean|x| = 2.5/4 = 0.625, threshold 0.4375; kept 0.9 and -1.2, alpha = 1.05
    x = torch.tensor([0.9, -0.1, -1.2, 0.3])
    torch.testing.assert_close(quantize_ternary(x, 1), torch.tensor([1.05, 0.0, -1.05, 0.0]))
    assert values(quantize_binary(x, 1)) == [0.625, -0.625, -0.625, 0.625]


# Outputs of DeepSpeed 0.17.0 (quantize_highbit / quantize_tenary / quantize_binary, nearest)
# on X reshaped to [3, 4]: (dtype, q_type, bits, groups) -> flattened output.
X = [0.731, -1.412, 0.052, 2.205, -0.337, 0.918, -2.61, 1.499, -0.004, 0.4, -0.777, 1.033]
DEEPSPEED_0_17 = {
    ("float16", "symmetric", 4, 2): [
        0.8271484375, -1.3779296875, 0.0, 1.9296875, -0.275634765625, 0.8271484375,
        -2.609375, 1.630859375, -0.0, 0.326171875, -0.65234375, 0.978515625,
    ],
    ("float16", "asymmetric", 3, 3): [
        0.9052734375, -1.3564453125, 0.0, 1.8076171875, -0.513671875, 1.02734375,
        -2.568359375, 1.02734375, 0.0, 0.453125, -0.6787109375, 0.9052734375,
    ],
    ("bfloat16", "symmetric", 5, 1): [
        0.65234375, -1.46875, 0.0, 2.28125, -0.326171875, 0.9765625,
        -2.609375, 1.46875, -0.0, 0.326171875, -0.81640625, 0.9765625,
    ],
    ("float32", "asymmetric", 6, 4): [
        0.7031717300415039, -1.406343698501587, 0.06696867942810059, 2.1845312118530273,
        -0.3177499771118164, 0.9135311841964722, -2.6323280334472656, 1.412468433380127,
        0.0, 0.3959375023841858, -0.7635937333106995, 1.018125057220459,
    ],
    ("float32", "symmetric", 2, 2): [
        1.316499948501587, -1.316499948501587, 0.0, 1.316499948501587, 0.0, 1.316499948501587,
        -1.4797500371932983, 1.4797500371932983, 0.0, 0.0, -1.4797500371932983, 1.4797500371932983,
    ],
    ("float32", "symmetric", 1, 3): [
        1.0999999046325684, -1.0999999046325684, 1.0999999046325684, 1.0999999046325684,
        -1.340999960899353, 1.340999960899353, -1.340999960899353, 1.340999960899353,
        -0.5534999966621399, 0.5534999966621399, -0.5534999966621399, 0.5534999966621399,
    ],
    ("float16", "symmetric", 2, 1): [
        1.3984375, -1.3984375, 0.0, 1.3984375, 0.0, 1.3984375,
        -1.3984375, 1.3984375, 0.0, 0.0, -1.3984375, 1.3984375,
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(DEEPSPEED_0_17), ids=lambda c: "-".join(map(str, c)))
def test_bit_exact_with_deepspeed(case: tuple[str, str, int, int]) -> None:
    dtype_name, q_type, bits, groups = case
    x = torch.tensor(X, dtype=getattr(torch, dtype_name)).reshape(3, 4)
    got = quantize_weight(x, bits, groups, symmetric=q_type == "symmetric")
    assert got.dtype == x.dtype
    want = torch.tensor(DEEPSPEED_0_17[case], dtype=x.dtype).reshape(3, 4)
    assert torch.equal(got, want), (values(got), values(want))
    assert torch.equal(got.signbit(), want.signbit())  # -0.0 where DeepSpeed had it


# Inputs where DeepSpeed's x / s and x · (1/s) round differently in fp16, so the operation
# order is pinned bit for bit. (dtype, q_type, bits) -> (input [2, 4], output).
DEEPSPEED_0_17_ORDER = {
    ("float16", "asymmetric", 4): (
        [2.71484375, -0.308837890625, -1.6484375, -0.83203125, 1.5986328125, -4.1953125, 1.455078125, 1.5078125],
        [2.15625, -0.43359375, -1.728515625, -0.865234375, 1.7265625, -4.3203125, 1.29296875, 1.29296875],
    ),
    ("float16", "symmetric", 8): (
        [3.599609375, -0.74462890625, 5.69140625, -0.2371826171875, 0.1854248046875, -0.64501953125,
         -1.4892578125, 0.1688232421875],
        [3.6015625, -0.755859375, 5.6484375, -0.2222900390625, 0.1778564453125, -0.6669921875,
         -1.51171875, 0.1778564453125],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DEEPSPEED_0_17_ORDER), ids=lambda c: "-".join(map(str, c)))
def test_bit_exact_with_deepspeed_operation_order(case: tuple[str, str, int]) -> None:
    dtype_name, q_type, bits = case
    x, want = (torch.tensor(v, dtype=getattr(torch, dtype_name)).reshape(2, 4) for v in DEEPSPEED_0_17_ORDER[case])
    assert torch.equal(quantize_highbit(x, bits, 1, q_type == "symmetric", False), want)


# ---------------------------------------------------------------- DeepSpeed defects, fixed


def test_zero_range_groups_stay_finite() -> None:
    """DeepSpeed divided by a zero scale: an all-zero (or constant, asymmetric) group became NaN."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.25]])
    assert values(quantize_highbit(x, 4, 2, True, False))[:4] == [0, 0, 0, 0]
    const = torch.tensor([[3.0, 3.0], [1.0, 2.0]])
    assert values(quantize_highbit(const, 4, 2, False, False))[:2] == [3, 3]
    assert values(quantize_ternary(x, 2))[:4] == [0, 0, 0, 0]
    assert values(quantize_binary(x, 2))[:4] == [0, 0, 0, 0]


def test_fp16_asymmetric_16bit_does_not_overflow() -> None:
    """DeepSpeed raised: the top code 65535 does not fit in fp16."""
    x = torch.linspace(-1, 1, 64).half()
    got = quantize_highbit(x, 16, 1, False, False)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got, x, atol=1e-3, rtol=0)


def test_integer_q_type_and_rounding_quantize() -> None:
    """DeepSpeed's constructor defaults (q_type=0, q_rounding=0) matched no branch and quantized nothing."""
    q = Quantizer()
    assert (q.q_type, q.q_rounding) == ("symmetric", "nearest")
    assert Quantizer(q_type=1, q_rounding=1).q_type == "asymmetric"
    p = schedule(param([1.0, -0.5, 0.3, -2.0]), 3, 3, 10)
    q.quantize([[p]], False, False)
    assert values(p) == [1.0, -0.5, 0.5, -2.0]  # s = 0.5


@pytest.mark.parametrize(("kwargs", "key"), [({"q_type": "sym"}, "q_type"), ({"q_rounding": 2}, "q_rounding")])
def test_bad_constructor_arguments_name_the_argument(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        Quantizer(**kwargs)


def test_overflow_skips_even_with_eigenvalues() -> None:
    """DeepSpeed still counted (and quantized) an overflowed step when eigenvalues were enabled."""
    p = schedule(param([0.31, -0.77, 0.12, 0.5]), 8, 4, 1)
    before = p.detach().clone()
    q = Quantizer()
    for eigen in (False, True):
        q.quantize([[p]], True, eigen)
    assert q.qsteps == 0 and p.start_bits == 8 and torch.equal(p.detach(), before)


def test_eigenvalue_path_schedules_the_parameter() -> None:
    """DeepSpeed passed ``p.data`` (no schedule attributes) and crashed; the factor must apply."""
    p = schedule(param([0.3, -0.2, 0.1, 0.9]), 8, 4, 1)
    q = Quantizer(q_eigenvalue=True, layer_num=1)
    q.quantize([[p]], False, True, {id(p): (0.5, 0)})
    assert (p.start_bits, p.q_period) == (7, (1 << 1) * 3)  # 1 + floor(4·0.5) = 3


@pytest.mark.parametrize(("eigenvalue", "factor"), [(0.0, 1), (0.24, 1), (0.25, 2), (0.5, 3), (0.74, 3), (1.0, 5)])
def test_eigenvalue_factor(eigenvalue: float, factor: int) -> None:
    p = schedule(param([0.3, -0.2, 0.1, 0.9]), 8, 4, 3)
    q = Quantizer()
    for _ in range(3):
        q.quantize([[p]], False, True, {id(p): (eigenvalue, 0)})
    assert (p.start_bits, p.q_period) == (7, 6 * factor)


def test_nonfinite_eigenvalue_is_an_error() -> None:
    p = schedule(param([0.3, -0.2]), 8, 4, 1)
    with pytest.raises(ValueError, match="eigenvalue"):
        Quantizer().quantize([[p]], False, True, {id(p): (math.nan, 2)})


# ---------------------------------------------------------------- the schedule


def run_bits(p: nn.Parameter, steps: int, q: Quantizer | None = None, **kwargs) -> list[tuple[int, int]]:
    q = q or Quantizer(**kwargs)
    out = []
    for _ in range(steps):
        q.quantize([[p]], False, False)
        out.append((p.start_bits, p.q_period))
    return out


def test_period_doubling_table() -> None:
    # Drop when qsteps >= q_period; q_period doubles: drops at 2, 4, 8, 16; target 4 stops it.
    p = schedule(param([0.3, -0.2, 0.1, 0.9]), 8, 4, 2)
    got = run_bits(p, 18)
    bits = [b for b, _ in got]
    assert bits == [8, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4]
    assert [t for _, t in got][:9] == [2, 4, 4, 8, 8, 8, 8, 16, 16]
    assert got[-1] == (4, 32)


def test_eigenvalue_schedule_table() -> None:
    # Period P=2, factor 3 at every drop: drops at 2, 2·2·3 = 12, 12·2·3 = 72.
    p = schedule(param([0.3, -0.2, 0.1, 0.9]), 8, 5, 2)
    q = Quantizer()
    drops = []
    for step in range(1, 80):
        before = p.start_bits
        q.quantize([[p]], False, True, {id(p): (0.5, 0)})
        if p.start_bits != before:
            drops.append((step, p.start_bits, p.q_period))
    assert drops == [(2, 7, 12), (12, 6, 72), (72, 5, 432)]


def test_per_parameter_schedules_and_skips() -> None:
    a = schedule(param([0.3, -0.2, 0.1, 0.9]), 6, 4, 1)
    b = schedule(param([0.3, -0.2, 0.1, 0.9]), 8, 8, 1)  # already at target: never drops
    vec = nn.Parameter(torch.tensor([0.123, 0.456]))  # 1-D: never quantized
    vec.start_bits, vec.target_bits, vec.q_period = 4, 2, 1
    plain = nn.Parameter(torch.tensor([[0.123, 0.456]]))  # no schedule: never quantized
    q = Quantizer()
    for _ in range(3):
        q.quantize([[a, vec], [b, plain]], False, False)
    assert (a.start_bits, b.start_bits, vec.start_bits) == (4, 8, 4)
    assert values(vec) == pytest.approx([0.123, 0.456]) and values(plain) == pytest.approx([0.123, 0.456])


def test_mixed_ratio_table_and_values() -> None:
    # r falls by 0.25 per step and resets to 1 at the drops (steps 2, 4, 8).
    w = [0.37, -1.0, 0.55, 0.0]
    p = schedule(param(w), 8, 5, 2)
    q = Quantizer(q_mixed_fp16=True, q_change_ratio=0.25)
    ratios = []
    for _ in range(13):
        with torch.no_grad():
            p.copy_(torch.tensor([w]))  # the optimizer restores the master weight (fp16 optimizer)
        q.quantize([[p]], False, False)
        ratios.append(q.quantize_real_ratio)
    assert ratios == [0.75, 1.0, 0.75, 1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    # last step: r = 0, 5 bits: s = 2/32 -> q(w) exactly
    assert values(p) == values(quantize_highbit(torch.tensor([w]), 5, 1, True, False))
    # a step with r = 0.5 at 5 bits: 0.5·w + 0.5·q(w)
    p2 = schedule(param(w), 5, 5, 100)
    q2 = Quantizer(q_mixed_fp16=True, q_change_ratio=0.5)
    q2.quantize([[p2]], False, False)
    qw = quantize_highbit(torch.tensor([w]), 5, 1, True, False)
    assert torch.equal(p2.detach(), 0.5 * torch.tensor([w]) + 0.5 * qw)


def test_mixed_ratio_stops_at_zero() -> None:
    """DeepSpeed went 1, .7, .4, .1, -.2, 0 for a ratio of 0.3 (extrapolating past q(w))."""
    q = Quantizer(q_mixed_fp16=True, q_change_ratio=0.3)
    seq = []
    for _ in range(6):
        q.update_fp16_ratio()
        seq.append(round(q.quantize_real_ratio, 12))
    assert seq == [0.7, 0.4, 0.1, 0.0, 0.0, 0.0]


def test_any_precision_switch() -> None:
    p = schedule(param([0.3, -0.2, 0.1, 0.9]), 8, 6, 3)
    q = Quantizer()
    assert q.any_precision_switch() is True  # nothing seen yet: never miss an eigenvalue computation
    switches = []
    for _ in range(8):
        switches.append(q.any_precision_switch([[p]]))
        q.quantize([[p]], False, False)
    # drops at steps 3 and 6 (then at target): due before the calls for those steps
    assert switches == [False, False, True, False, False, True, False, False]
    assert q.any_precision_switch() is False  # remembers the last call's parameters


# ---------------------------------------------------------------- kernel path


@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_path_is_qkit_fake_quantize_with_nearest_rounding(symmetric: bool) -> None:
    """DeepSpeed's kernel path compared against 'nearest_neighbor', so 'nearest' rounded stochastically."""
    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        p = schedule(nn.Parameter(w.clone()), 5, 5, 10)
        q = Quantizer(q_groups=4, q_type="symmetric" if symmetric else "asymmetric", use_quantizer_kernel=True)
        q.quantize([[p]], False, False)
        outs.append(p.detach().clone())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], qkit.fake_quantize(w, 4, 5, symmetric, False))


def test_kernel_path_stochastic_uses_torch_generator() -> None:
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    p = schedule(nn.Parameter(w.clone()), 3, 3, 10)
    torch.manual_seed(7)
    Quantizer(q_rounding="stochastic", use_quantizer_kernel=True).quantize([[p]], False, False)
    torch.manual_seed(7)
    assert torch.equal(p.detach(), qkit.fake_quantize(w, 1, 3, True, True))


def test_kernel_path_mixed_uses_the_parameter_schedule() -> None:
    """DeepSpeed's kernel-path blend read q_start_bits/q_target_bits, which were never set."""
    w = torch.tensor([[0.37, -1.0, 0.55, 0.1]])
    p = schedule(nn.Parameter(w.clone()), 4, 4, 10)
    Quantizer(q_mixed_fp16=True, q_change_ratio=0.25, use_quantizer_kernel=True).quantize([[p]], False, False)
    assert torch.equal(p.detach(), 0.75 * w + 0.25 * qkit.fake_quantize(w, 1, 4))


def test_kernel_path_bit_range() -> None:
    w = torch.tensor([[0.37, -1.0, 0.55, 0.1]])
    assert torch.equal(quantize_weight(w, 2, 1, use_kernel=True), qkit.fake_quantize(w, 1, 2))
    with pytest.raises(ValueError, match=r"2\.\.16"):
        quantize_weight(w, 1, 1, use_kernel=True)


def test_pure_path_ternary_needs_symmetric_nearest() -> None:
    w = torch.tensor([[0.37, -1.0, 0.55, 0.1]])
    with pytest.raises(ValueError, match="symmetric"):
        quantize_weight(w, 2, 1, symmetric=False)


def test_per_parameter_groups_and_scheme() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    a = schedule(nn.Parameter(w.clone()), 4, 4, 10)
    a.q_groups = 4
    b = schedule(nn.Parameter(w.clone()), 4, 4, 10)
    b.q_spec = qkit.QuantSpec(bits=4, symmetric=False, group_size=3)
    Quantizer(q_groups=1).quantize([[a, b]], False, False)
    assert torch.equal(a.detach(), quantize_highbit(w, 4, 4, True, False))
    assert torch.equal(b.detach(), qkit.QuantSpec(bits=4, symmetric=False, group_size=3).fake_quantize(w))


def test_stochastic_pure_path_picks_a_neighbour_and_is_seeded() -> None:
    x = torch.linspace(-1, 1, 101).reshape(1, -1)
    torch.manual_seed(11)
    a = quantize_highbit(x, 4, 1, True, True)
    torch.manual_seed(11)
    b = quantize_highbit(x, 4, 1, True, True)
    assert torch.equal(a, b)
    step = 2 / 16
    lo = torch.floor(x / step) * step
    hit = torch.isclose(a, lo) | torch.isclose(a, lo + step) | torch.isclose(a, torch.full_like(a, 7 * step))
    assert hit.all()


def test_storage_is_kept() -> None:
    """Quantization writes into the parameter (tied weights and views stay shared)."""
    p = schedule(param([0.3, -0.2, 0.1, 0.9]), 4, 4, 10)
    ptr = p.data_ptr()
    Quantizer().quantize([[p]], False, False)
    assert p.data_ptr() == ptr


# ---------------------------------------------------------------- checkpointing


def _drive(q: Quantizer, ps: list[nn.Parameter], steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        q.quantize([ps[:1], ps[1:]], False, False)


def test_state_dict_round_trip_bit_for_bit() -> None:
    def fresh() -> list[nn.Parameter]:
        g = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(4, 6, generator=g)), nn.Parameter(torch.randn(3, 8, generator=g))]
        schedule(ps[0], 8, 3, 2)
        schedule(ps[1], 7, 4, 3)
        return ps

    kwargs = {"q_groups": 2, "q_mixed_fp16": True, "q_change_ratio": 0.1, "q_type": "asymmetric"}
    ref = fresh()
    gen = torch.Generator().manual_seed(1)
    q_ref = Quantizer(**kwargs)
    _drive(q_ref, ref, 20, gen)

    first = fresh()
    gen = torch.Generator().manual_seed(1)
    q1 = Quantizer(**kwargs)
    _drive(q1, first, 9, gen)
    state = q1.state_dict()
    saved = [p.detach().clone() for p in first]

    resumed = [nn.Parameter(t) for t in saved]  # no schedule attributes until load_state_dict
    q2 = Quantizer(**kwargs)
    q2.load_state_dict(state)  # applied to the next quantize() call's parameters
    _drive(q2, resumed, 11, gen)
    for a, b in zip(ref, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())
        assert (a.start_bits, a.target_bits, a.q_period) == (b.start_bits, b.target_bits, b.q_period)
    assert q2.qsteps == q_ref.qsteps == 20
    assert q2.quantize_real_ratio == q_ref.quantize_real_ratio
    assert ref[0].start_bits < 8  # the run crossed bit drops before and after the checkpoint


def test_load_state_dict_checks_layout() -> None:
    q = Quantizer()
    p = schedule(param([0.3, -0.2]), 4, 4, 10)
    q.quantize([[p]], False, False)
    with pytest.raises(ValueError, match="layout"):
        Quantizer().load_state_dict(q.state_dict(), [[p, p]])


def test_state_saved_between_load_and_the_next_step_keeps_the_schedules() -> None:
    """load_state_dict without parameters defers the schedules to the next quantize(); a
    checkpoint taken in between must still hold them, and resume like the original."""

    def fresh() -> list[nn.Parameter]:
        g = torch.Generator().manual_seed(4)
        ps = [nn.Parameter(torch.randn(4, 6, generator=g)), nn.Parameter(torch.randn(3, 8, generator=g))]
        schedule(ps[0], 8, 3, 2)
        schedule(ps[1], 7, 4, 3)
        return ps

    ref = fresh()
    gen = torch.Generator().manual_seed(2)
    q_ref = Quantizer(q_groups=2)
    _drive(q_ref, ref, 16, gen)

    first = fresh()
    gen = torch.Generator().manual_seed(2)
    q1 = Quantizer(q_groups=2)
    _drive(q1, first, 7, gen)
    state = q1.state_dict()
    q2 = Quantizer(q_groups=2)
    q2.load_state_dict(state)
    again = q2.state_dict()
    assert again == state
    assert len(again["params"]) == 2 and all(again["params"])
    again["params"][0][0]["start_bits"] = 99  # the saved copy is the caller's, not the pending state
    assert q2.state_dict() == state

    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    q3 = Quantizer(q_groups=2)
    q3.load_state_dict(q2.state_dict())
    _drive(q3, resumed, 9, gen)
    for a, b in zip(ref, resumed, strict=True):
        assert torch.equal(a.detach(), b.detach())
        assert (a.start_bits, a.target_bits, a.q_period) == (b.start_bits, b.target_bits, b.q_period)
    assert q3.qsteps == q_ref.qsteps == 16


def _quantizer_state() -> tuple[Quantizer, dict, list[nn.Parameter]]:
    ps = [schedule(param([0.3, -0.2, 0.5, 0.1]), 8, 4, 2), schedule(param([0.7, -0.4, 0.2, 0.9]), 6, 4, 3)]
    q = Quantizer(q_mixed_fp16=True, q_change_ratio=0.25)
    for _ in range(5):
        q.quantize([ps[:1], ps[1:]], False, False)
    return q, q.state_dict(), ps


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"qsteps": -1}, r"`qsteps` must be in \[0, "),
        ({"qsteps": 2.5}, r"`qsteps` must be an integer"),
        ({"quantize_real_ratio": float("inf")}, r"`quantize_real_ratio` must be a finite number"),
        ({"quantize_real_ratio": 2.0}, r"`quantize_real_ratio` must be in \[0, 1\]"),
        (
            {"params": [[{"start_bits": 99, "target_bits": 4, "q_period": 8}], [None]]},
            r"`params\[0\]\[0\]\.start_bits`",
        ),
        ({"params": [[{"start_bits": 5, "target_bits": 4}], [None]]}, r"`params\[0\]\[0\]\.q_period` is missing"),
        ({"params": [[None, None], [None]]}, r"`params` has the parameter layout \[2, 1\]"),
        ({"params": "abc"}, r"`params` must be a list of parameter groups"),
    ],
)
def test_quantizer_refuses_a_corrupt_state_and_changes_nothing(change: dict, error: str) -> None:
    q, state, ps = _quantizer_state()
    q.quantize([ps[:1], ps[1:]], False, False)  # moved on from `state`
    before = (q.state_dict(), [(p.start_bits, p.target_bits, p.q_period) for p in ps])
    with pytest.raises(ValueError, match=error):
        q.load_state_dict({**state, **change}, [ps[:1], ps[1:]])
    assert (q.state_dict(), [(p.start_bits, p.target_bits, p.q_period) for p in ps]) == before
    if "layout" in error:
        return  # without parameters the layout is checked at the next quantize()
    with pytest.raises(ValueError, match=error):  # the deferred form checks as much, as early
        q.load_state_dict({**state, **change})
    assert q.state_dict() == before[0]
