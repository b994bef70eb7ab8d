"""qkit.moq.schedule: the one MoQ schedule engine, against the schedule in closed form.

With period ``P`` and eigenvalue factor ``f``, a weight's ``k``-th drop (from 0) is due at
quantizer step ``P·(2f)^k`` (the periods grow strictly, so each drop happens on the step it
is due), and it stops at its target width. Values come from the independent reference
(tests/reference.py) through the kernel path, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qkit.moq import MoQ, MoQConfig, ParamSchedule, QuantizerSettings, ScheduleEngine
from qkit.moq.schedule import eigenvalue_factor
from reference import ref_fake_quantize


def drop_steps(start: int, target: int, period: int, factor: int) -> list[int]:
    """Quantizer steps at which a weight drops a bit, in closed form."""
    return [period * (2 * factor) ** k for k in range(start - target)]


# name -> (start, target, period, eigenvalue factor, groups or None for the engine's)
WEIGHTS = {
    "a": (8, 3, 2, 1, None),
    "b": (6, 4, 3, 2, 4),
    "c": (5, 5, 1, 1, 2),  # at its target from the start: never drops
    "d": (5, 2, 1, 3, None),
}


def make_engine(symmetric: bool, mixed: bool = False, change_ratio: float = 0.25) -> ScheduleEngine:
    settings = QuantizerSettings(groups=2, symmetric=symmetric, mixed=mixed, change_ratio=change_ratio, use_kernel=True)
    schedules = {
        name: ParamSchedule(bits=s, target_bits=t, next_drop=p, groups=g) for name, (s, t, p, _, g) in WEIGHTS.items()
    }
    return ScheduleEngine(settings, schedules)


@pytest.mark.parametrize("symmetric", [True, False])
def test_engine_follows_the_closed_form_schedule(symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    masters = {name: torch.randn(4, 6, generator=gen) for name in WEIGHTS}
    params = {name: nn.Parameter(w.clone()) for name, w in masters.items()}
    engine = make_engine(symmetric)
    factors = {name: f for name, (_, _, _, f, _) in WEIGHTS.items()}
    due = {name: drop_steps(s, t, p, f) for name, (s, t, p, f, _) in WEIGHTS.items()}
    for q in range(1, 200):
        assert engine.any_drop_next() == any(q in steps for steps in due.values())
        with torch.no_grad():  # the optimizer hands back the master weights (fp16 optimizer)
            for name, p in params.items():
                p.copy_(masters[name])
        dropped = engine.step(params, factors)
        assert engine.qsteps == q
        assert dropped == [name for name in WEIGHTS if q in due[name]]
        for name, (start, target, period, factor, groups) in WEIGHTS.items():
            done = sum(1 for step in due[name] if step <= q)
            sched = engine.schedules[name]
            assert (sched.bits, sched.target_bits) == (start - done, target)
            assert sched.next_drop == period * (2 * factor) ** done
            want = ref_fake_quantize(masters[name], groups or 2, start - done, symmetric)
            assert torch.equal(params[name].detach(), want), (name, q)
    assert [s.bits for s in engine.schedules.values()] == [t for _, t, _, _, _ in WEIGHTS.values()]


def test_engine_mixed_ratio_and_its_reset_order() -> None:
    """``r`` falls by the ratio each step and stops at 0; a drop resets it to 1 for the
    dropping weight and the weights after it in the step, not for those before."""
    gen = torch.Generator().manual_seed(1)
    masters = {name: torch.randn(4, 6, generator=gen) for name in WEIGHTS}
    params = {name: nn.Parameter(w.clone()) for name, w in masters.items()}
    change = 0.25  # exact in binary: the ratios are exact
    engine = make_engine(True, mixed=True, change_ratio=change)
    factors = {name: f for name, (_, _, _, f, _) in WEIGHTS.items()}
    due = {name: drop_steps(s, t, p, f) for name, (s, t, p, f, _) in WEIGHTS.items()}
    r = 1.0
    for q in range(1, 40):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(masters[name])
        engine.step(params, factors)
        r = max(r - change, 0.0)
        for name, (start, _, _, _, groups) in WEIGHTS.items():
            if q in due[name]:
                r = 1.0
            bits = start - sum(1 for step in due[name] if step <= q)
            w = masters[name]
            want = r * w + (1 - r) * ref_fake_quantize(w, groups or 2, bits, True)
            assert torch.equal(params[name].detach(), want), (name, q, r)
        assert engine.quantize_real_ratio == r


def test_moq_keeps_the_deepspeed_attributes_in_step_with_its_engine() -> None:
    """MoQ's schedules are keyed by name in its engine; the weights carry a copy as
    DeepSpeed's attributes, after every step and after a checkpoint is loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    cfg = MoQConfig(start_bits=8, target_bits=4, quantize_period=2, schedule_offset=1)
    moq = MoQ(model, cfg)
    named = dict(model.named_parameters())

    def attributes() -> dict[str, dict[str, int]]:
        return {
            name: {"bits": w.start_bits, "target_bits": w.target_bits, "next_drop": w.q_period}
            for name, w in ((n, named[n]) for n in moq.parameter_names)
        }

    seen = set()
    for step in range(1, 14):
        moq.step()
        assert attributes() == moq.schedules()
        seen.add(moq.current_bits()["0.weight"])
        q = max(step - cfg.schedule_offset, 0)
        drops = sum(1 for s in drop_steps(8, 4, 2, 1) if s <= q)
        assert moq.current_bits() == dict.fromkeys(moq.parameter_names, 8 - drops)
    assert len(seen) > 2  # the run crossed several drops
    state = moq.state_dict()
    other = MoQ(model, cfg)  # rewrites the start widths onto the weights
    assert {a["bits"] for a in attributes().values()} == {8}
    other.load_state_dict(state)
    assert attributes() == other.schedules() == moq.schedules()


def test_param_schedule_speaks_deepspeed() -> None:
    p = nn.Parameter(torch.zeros(2, 2))
    p.start_bits, p.target_bits, p.q_period, p.q_groups = 7, 3, 12, 0  # q_groups 0: the quantizer's
    sched = ParamSchedule.from_attributes(p)
    assert (sched.bits, sched.target_bits, sched.next_drop, sched.groups, sched.scheme) == (7, 3, 12, None, None)
    assert sched.checkpoint() == {"start_bits": 7, "target_bits": 3, "q_period": 12}
    sched.drop(3)
    sched.to_attributes(p, widths_only=True)
    assert (p.start_bits, p.target_bits, p.q_period) == (6, 3, 12 * 2 * 3)
    back = ParamSchedule(bits=1, target_bits=1, next_drop=1, groups=5).restored(sched.checkpoint())
    assert back == ParamSchedule(bits=6, target_bits=3, next_drop=72, groups=5)


@pytest.mark.parametrize("eigenvalue", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7499, 0.75, 0.99, 1.0])
def test_eigenvalue_factor_counts_quarters(eigenvalue: float) -> None:
    quarters = sum(1 for k in range(1, 5) if eigenvalue >= k / 4)
    assert eigenvalue_factor(eigenvalue, 0) == 1 + quarters
    with pytest.raises(ValueError, match="block 3 has a non-finite eigenvalue"):
        eigenvalue_factor(math.nan, 3)
