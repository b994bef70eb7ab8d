"""MoQ format schedules (``MoQConfig.format_schedule``): the drops of the bit schedule, each
stage quantized to its floating-point format. Values come from the independent FP model
of tests/reference.py bit for bit; the config and checkpoint checks refuse what cannot run."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from qkit.moq import GroupConfig, MoQ, MoQConfig, MoQConfigError
from qkit.moq.state import MoQStateError
from qkit.quant_spec import QuantSpec
from reference import fp_bits, ref_fake_quantize_fp, ref_philox_uniforms

SCHEDULE = ("e4m3", "e3m2", "e2m1")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


NAMES = ["0.weight", "2.weight"]


def drop_steps(stages: int, period: int) -> list[int]:
    """Quantized steps on which the format changes, in closed form: ``P·2^k``."""
    return [period * 2**k for k in range(stages - 1)]


def expected_format(q: int, schedule: tuple[str, ...], period: int) -> str:
    return schedule[sum(1 for s in drop_steps(len(schedule), period) if s <= q)]


@pytest.mark.parametrize(
    ("schedule", "scaling", "groups"),
    [(SCHEDULE, "absmax", 2), (("e5m2", "e4m3", "e2m3", "e2m1"), "mx", 1), (("e2m1",), "nvfp4", 1)],
)
def test_format_schedule_drops_and_values(schedule: tuple[str, ...], scaling: str, groups: int) -> None:
    """Without master weights each step quantizes the weight in place: w_q = Q_f(w_{q-1}),
    f the stage's format on the closed-form schedule."""
    m = model()
    period = 2
    cfg = MoQConfig(
        format_schedule=list(schedule),
        format_scaling=scaling,
        groups=groups,
        quantize_period=period,
        master_weights=False,
    )
    moq = MoQ(m, cfg)
    params = dict(m.named_parameters())
    want = {n: params[n].detach().clone() for n in NAMES}
    assert moq.current_formats() == dict.fromkeys(NAMES, schedule[0])
    for q in range(1, 12):
        drops = moq.step()
        fmt = expected_format(q, schedule, period)
        assert [d.name for d in drops] == (NAMES if q in drop_steps(len(schedule), period) else [])
        for d in drops:
            assert (d.old_format, d.new_format) == (expected_format(q - 1, schedule, period), fmt)
            assert (d.old_bits, d.new_bits) == (fp_bits(d.old_format), fp_bits(fmt))
        for n in NAMES:
            g = want[n].numel() // 32 if scaling == "mx" else want[n].numel() // 16 if scaling == "nvfp4" else groups
            want[n] = ref_fake_quantize_fp(want[n], g, fmt, scaling)
            assert torch.equal(params[n].detach(), want[n]), (n, q, fmt)
            assert params[n].q_format == fmt
        assert moq.current_formats() == dict.fromkeys(NAMES, fmt)
        assert moq.current_bits() == dict.fromkeys(NAMES, fp_bits(fmt))


def test_stochastic_format_schedule_draws_from_torch() -> None:
    """rounding="stochastic": each weight's op draws its Philox seed from torch's generator, in order."""
    m = model()
    moq = MoQ(m, MoQConfig(format_schedule=SCHEDULE, rounding="stochastic", quantize_period=1, master_weights=False))
    params = dict(m.named_parameters())
    before = {n: params[n].detach().clone() for n in NAMES}
    torch.manual_seed(7)
    seeds = [torch.empty(1, dtype=torch.int64).random_().item() for _ in NAMES]
    torch.manual_seed(7)
    moq.step()  # step 1 drops e4m3 -> e3m2 first
    for n, seed in zip(NAMES, seeds, strict=True):
        u = ref_philox_uniforms(seed, before[n].numel())
        assert torch.equal(params[n].detach(), ref_fake_quantize_fp(before[n], 1, "e3m2", "absmax", u))


def test_group_periods_and_master_weights() -> None:
    """A group's own period; with master weights (the default) every step quantizes the master."""
    m = model()
    cfg = MoQConfig(
        format_schedule=SCHEDULE,
        quantize_period=4,
        different_groups=(GroupConfig("last", (r"^2$",), quantize_period=1, groups=4),),
    )
    moq = MoQ(m, cfg)
    masters = {n: p.detach().clone() for n, p in m.named_parameters() if n in NAMES}
    for q in range(1, 6):
        moq.step()
        assert moq.current_formats() == {
            "0.weight": expected_format(q, SCHEDULE, 4),
            "2.weight": expected_format(q, SCHEDULE, 1),
        }
    params = dict(m.named_parameters())
    assert torch.equal(params["0.weight"].detach(), ref_fake_quantize_fp(masters["0.weight"], 1, "e3m2"))
    assert torch.equal(params["2.weight"].detach(), ref_fake_quantize_fp(masters["2.weight"], 4, "e2m1"))


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("changes", "key", "message"),
    [
        ({"format_schedule": []}, "format_schedule", "at least one format"),
        ({"format_schedule": "e4m3"}, "format_schedule", "must be a list of formats"),
        ({"format_schedule": ["e4m3", "fp8"]}, "format_schedule[1]", "must be one of"),
        ({"format_schedule": ["e4m3", "e4m3"]}, "format_schedule[1]", "repeats 'e4m3'"),
        ({"format_schedule": ["e2m1", "e3m2"]}, "format_schedule[1]", "never gains bits"),
        ({"format_schedule": SCHEDULE, "format_scaling": "fp"}, "format_scaling", "must be one of"),
        ({"format_scaling": "mx"}, "format_scaling", "`format_schedule` is not set"),
        ({"format_schedule": SCHEDULE, "format_scaling": "nvfp4"}, "format_scaling", "e2m1 only"),
        ({"format_schedule": SCHEDULE, "start_bits": 8, "target_bits": 4}, "start_bits", "replaces the bit"),
        ({"format_schedule": SCHEDULE, "target_bits": 4}, "target_bits", "replaces the bit"),
        ({"format_schedule": SCHEDULE, "use_quantizer_kernel": True}, "use_quantizer_kernel", "fake_quantize_fp"),
        ({"format_schedule": SCHEDULE, "symmetric": False}, "symmetric", "symmetric"),
        ({"format_schedule": SCHEDULE, "format_scaling": "mx", "groups": 2}, "groups", "32-element blocks"),
        (
            {"format_schedule": SCHEDULE, "different_groups": (GroupConfig("g", start_bits=8, target_bits=4),)},
            "different_groups.g.start_bits",
            "replaces the bit schedule",
        ),
        (
            {"format_schedule": SCHEDULE, "different_groups": (GroupConfig("g", scheme=QuantSpec(bits=4)),)},
            "different_groups.g.scheme",
            "replaces the bit schedule",
        ),
        (
            {"format_schedule": SCHEDULE, "format_scaling": "mx", "different_groups": (GroupConfig("g", groups=2),)},
            "different_groups.g.groups",
            "blocks set the groups",
        ),
    ],
)
def test_config_errors(changes: dict, key: str, message: str) -> None:
    with pytest.raises(MoQConfigError, match=re.escape(message)) as info:
        MoQConfig(**changes)
    assert info.value.key == key


def test_config_accepts_same_width_trades_and_keeps_a_tuple() -> None:
    cfg = MoQConfig(format_schedule=["e5m2", "e4m3", "e2m3", "e3m2", "e2m1"], rounding="stochastic")
    assert cfg.format_schedule == ("e5m2", "e4m3", "e2m3", "e3m2", "e2m1")


def test_block_scaling_needs_whole_blocks() -> None:
    m = nn.Sequential(nn.Linear(5, 3))  # 15 elements: no 32-element block
    with pytest.raises(MoQConfigError, match="blocks of 32 elements") as info:
        MoQ(m, MoQConfig(format_schedule=SCHEDULE, format_scaling="mx"))
    assert info.value.key == "format_scaling"


# ---------------------------------------------------------------- checkpoints


def run(moq: MoQ, m: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(moq.steps)
    for _ in range(steps):
        x = torch.randn(4, 16, generator=gen)
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        moq.step()


def test_checkpoint_round_trip_mid_schedule_is_bit_exact() -> None:
    cfg = MoQConfig(format_schedule=SCHEDULE, quantize_period=2, groups=2)
    m1 = model()
    moq1 = MoQ(m1, cfg)
    run(moq1, m1, 3)  # in e3m2, next drop at 4
    state = moq1.state_dict()
    assert state["format_schedule"] == list(SCHEDULE)
    m2 = model()
    m2.load_state_dict(m1.state_dict())
    moq2 = MoQ(m2, cfg)
    moq2.load_state_dict(state)
    assert moq2.current_formats() == moq1.current_formats() == dict.fromkeys(NAMES, "e3m2")
    assert moq2.history == moq1.history and moq1.history[0].new_format == "e3m2"
    run(moq1, m1, 4)
    run(moq2, m2, 4)
    assert moq2.current_formats() == dict.fromkeys(NAMES, "e2m1")
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert moq1.history == moq2.history


def _state_after_a_drop() -> tuple[MoQ, dict]:
    m = model()
    moq = MoQ(m, MoQConfig(format_schedule=SCHEDULE, quantize_period=1))
    run(moq, m, 2)
    return moq, moq.state_dict()


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda s: s.update(format_schedule=["e4m3", "e2m3", "e2m1"]), "`format_schedule` is ['e4m3', 'e2m3'"),
        (lambda s: s.update(format_schedule=None), "`format_schedule` is None"),
        (lambda s: s.pop("format_schedule"), "`format_schedule` is None"),
        (lambda s: s["params"]["0.weight"].update(start_bits=4), "`params.0.weight.start_bits` is 4"),
        (lambda s: s["params"]["0.weight"].update(target_bits=2, start_bits=3), "counts down to stage 1"),
        (lambda s: s["history"][0].update(new_format="e2m1"), "`history[0].new_format` is 'e2m1'"),
        (lambda s: s["history"][0].update(old_format="e2m1"), "`history[0].old_format` is 'e2m1'"),
        (lambda s: s["history"][0].update(new_bits=5), "`history[0].new_bits` is 5, but e3m2 has 6 bits"),
        (lambda s: s["history"][0].pop("old_format"), "must have exactly the keys"),
    ],
)
def test_corrupt_format_state_is_refused_and_changes_nothing(edit, error: str) -> None:
    moq, state = _state_after_a_drop()
    before = (moq.schedules(), moq.current_formats(), list(moq.history), moq.steps)
    bad = {**state, "params": {k: dict(v) for k, v in state["params"].items()}}
    bad["history"] = [dict(d) for d in state["history"]]
    edit(bad)
    with pytest.raises(MoQStateError, match=re.escape(error)):
        moq.load_state_dict(bad)
    assert (moq.schedules(), moq.current_formats(), list(moq.history), moq.steps) == before
    moq.load_state_dict(state)  # the unedited state still loads


def test_bit_schedule_state_and_format_state_do_not_mix() -> None:
    m = model()
    bit_moq = MoQ(m, MoQConfig(start_bits=3, target_bits=1, quantize_period=1))
    run(bit_moq, m, 1)
    fmt_moq = MoQ(model(), MoQConfig(format_schedule=SCHEDULE, quantize_period=1))
    with pytest.raises(MoQStateError, match=re.escape("`format_schedule` is None")):
        fmt_moq.load_state_dict(bit_moq.state_dict())
    run(fmt_moq, fmt_moq.model, 1)
    with pytest.raises(MoQStateError, match=re.escape("`format_schedule` is ['e4m3'")):
        bit_moq.load_state_dict(fmt_moq.state_dict())


def test_mixed_precision_blends_with_the_format_and_resets_on_a_change() -> None:
    """fp16_mixed_quantize: r·w + (1 - r)·Q_f(w), r falling by the ratio, back to 1 when the format changes."""
    m = model()
    change = 0.25  # exact in binary
    cfg = MoQConfig(
        format_schedule=("e4m3", "e2m1"),
        quantize_period=3,
        fp16_mixed_quantize=True,
        quantize_change_ratio=change,
        master_weights=False,
    )
    moq = MoQ(m, cfg)
    params = dict(m.named_parameters())
    r = 1.0
    for q in range(1, 6):
        before = {n: params[n].detach().clone() for n in NAMES}
        moq.step()
        r = 1.0 if q == 3 else max(r - change, 0.0)
        fmt = "e4m3" if q < 3 else "e2m1"
        for n in NAMES:
            want = r * before[n] + (1 - r) * ref_fake_quantize_fp(before[n], 1, fmt)
            assert torch.equal(params[n].detach(), want), (n, q)
