"""MoQ's schedule engine: one typed state for the bit-width schedule, keyed by parameter name.

Both fronts run this code. :class:`qkit.moq.MoQ` uses a :class:`ScheduleEngine` directly,
its schedules keyed by the model's parameter names. :class:`qkit.moq.Quantizer`
(DeepSpeed's API) keeps the schedule in DeepSpeed's parameter attributes; it reads them
into a :class:`ParamSchedule` (:meth:`ParamSchedule.from_attributes`), runs the same
:meth:`ScheduleEngine.update`, and writes them back.

One quantizer step (:meth:`ScheduleEngine.step`):

1. the step counter ``qsteps`` increases by one, and the mixed-precision ratio ``r``
   falls by ``change_ratio`` (mixed precision only), stopping at 0;
2. then, parameter by parameter in order: if ``bits != target_bits`` and
   ``qsteps >= next_drop`` the width drops by one, ``next_drop`` doubles (times the
   eigenvalue factor, :func:`eigenvalue_factor`) and ``r`` is reset to 1; the parameter
   becomes its quantized value at its width (mixed: ``r·w + (1 - r)·q(w)`` with ``r`` as
   it stands at that parameter, so a reset applies to the parameters after it).

DeepSpeed's names for the per-parameter fields, which are also the checkpoint keys, are
``start_bits`` (the *current* width, :attr:`ParamSchedule.bits`), ``target_bits`` and
``q_period`` (:attr:`ParamSchedule.next_drop`); :data:`DEEPSPEED_ATTRIBUTES` maps them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qkit.moq.values import quantize_weight
from qkit.quant_spec import QuantSpec

if TYPE_CHECKING:
    from qkit.moq.config import MoQConfig

__all__ = [
    "DEEPSPEED_ATTRIBUTES",
    "ParamSchedule",
    "QuantizerSettings",
    "ScheduleEngine",
    "eigenvalue_factor",
]

#: :class:`ParamSchedule` field -> DeepSpeed's parameter attribute (and checkpoint key).
DEEPSPEED_ATTRIBUTES = {"bits": "start_bits", "target_bits": "target_bits", "next_drop": "q_period"}


def eigenvalue_factor(eigenvalue: float, block: int) -> int:
    """``1 + floor(4·eigenvalue)``: how much longer a block's next period gets on a drop.

    Args:
        eigenvalue: the block's normalized top Hessian eigenvalue, in [0, 1].
        block: the block's index (for the error).

    Raises:
        ValueError: ``eigenvalue`` is NaN or infinite.
    """
    if not math.isfinite(eigenvalue):
        raise ValueError(f"Quantizer: block {block} has a non-finite eigenvalue ({eigenvalue})")
    return 1 + math.floor(eigenvalue * 4)


@dataclass
class ParamSchedule:
    """One parameter's schedule.

    Attributes:
        bits: its current width (DeepSpeed's ``start_bits``).
        target_bits: the width it stops at.
        next_drop: the quantizer step at which its next drop is due (DeepSpeed's ``q_period``).
        groups: quantization groups for this parameter (``None``: the engine's).
        scheme: a :class:`qkit.QuantSpec` quantizing it instead (groups and scheme).
    """

    bits: int
    target_bits: int
    next_drop: int
    groups: int | None = None
    scheme: QuantSpec | None = None

    def drop_due(self, qstep: int) -> bool:
        """Whether quantizer step ``qstep`` drops a bit (the width is above its target)."""
        return self.bits != self.target_bits and qstep >= self.next_drop

    def drop(self, factor: int = 1) -> None:
        """Lose one bit; the next drop is due ``2·factor`` times as far from step 0."""
        self.next_drop = (self.next_drop << 1) * factor
        self.bits -= 1

    # ------------------------------------------------------------ DeepSpeed's spelling

    def checkpoint(self) -> dict[str, int]:
        """The checkpoint entry: ``{"start_bits", "target_bits", "q_period"}`` as ints."""
        return {ds: int(getattr(self, field)) for field, ds in DEEPSPEED_ATTRIBUTES.items()}

    def restored(self, saved: Mapping[str, int]) -> ParamSchedule:
        """A copy with the widths and period of a checked checkpoint entry (:meth:`checkpoint`)."""
        return dataclasses.replace(self, **{field: saved[ds] for field, ds in DEEPSPEED_ATTRIBUTES.items()})

    @classmethod
    def from_attributes(cls, p: Tensor) -> ParamSchedule:
        """The schedule DeepSpeed keeps on ``p``: ``start_bits``, ``target_bits``, ``q_period``,
        and qkit's optional ``q_groups`` (a falsy one means the quantizer's) and ``q_spec``."""
        fields = {field: getattr(p, ds) for field, ds in DEEPSPEED_ATTRIBUTES.items()}
        return cls(**fields, groups=getattr(p, "q_groups", None) or None, scheme=getattr(p, "q_spec", None))

    def to_attributes(self, p: Tensor, *, widths_only: bool = False) -> None:
        """Write this schedule onto ``p`` as DeepSpeed's attributes (``widths_only``: not
        ``q_groups``/``q_spec``, which are set only when not ``None``)."""
        for field, ds in DEEPSPEED_ATTRIBUTES.items():
            setattr(p, ds, getattr(self, field))
        if widths_only:
            return
        if self.groups is not None:
            p.q_groups = self.groups
        if self.scheme is not None:
            p.q_spec = self.scheme


@dataclass(frozen=True)
class QuantizerSettings:
    """How an engine quantizes (the same for every parameter unless its schedule overrides).

    Attributes:
        groups: quantization groups per weight (contiguous runs of the flattened weight).
        symmetric: symmetric (``True``) or asymmetric ranges.
        stochastic: stochastic instead of nearest rounding.
        mixed: blend ``r·w + (1 - r)·q(w)`` (DeepSpeed's ``fp16_mixed_quantize``).
        change_ratio: how much ``r`` falls per quantizer step, in (0, 1].
        use_kernel: quantize with ``qkit.fake_quantize`` (2..16 bits) instead of
            DeepSpeed's pure-PyTorch formulas (:func:`qkit.moq.quantize_weight`).
    """

    groups: int = 1
    symmetric: bool = True
    stochastic: bool = False
    mixed: bool = False
    change_ratio: float = 0.001
    use_kernel: bool = False

    @classmethod
    def from_config(cls, config: MoQConfig) -> QuantizerSettings:
        """The settings of a (validated) :class:`qkit.moq.MoQConfig`."""
        return cls(
            groups=config.groups,
            symmetric=config.symmetric,
            stochastic=config.rounding == "stochastic",
            mixed=config.fp16_mixed_quantize,
            change_ratio=config.quantize_change_ratio,
            use_kernel=config.use_quantizer_kernel,
        )


class ScheduleEngine:
    """The MoQ schedule: step counter, mixed-precision ratio, per-parameter schedules by name.

    Args:
        settings: how weights are quantized.
        schedules: ``{name: ParamSchedule}``, in the order :meth:`step` visits them.

    Attributes:
        settings: :class:`QuantizerSettings`.
        schedules: ``{name: ParamSchedule}``.
        qsteps: quantizer steps taken.
        quantize_real_ratio: ``r``, in [0, 1] (1 until mixed precision lowers it).
    """

    def __init__(self, settings: QuantizerSettings, schedules: Mapping[str, ParamSchedule] | None = None) -> None:
        self.settings = settings
        self.schedules: dict[str, ParamSchedule] = dict(schedules or {})
        self.qsteps = 0
        self.quantize_real_ratio = 1.0

    # ------------------------------------------------------------ the parts of a step

    def count_step(self) -> None:
        """Advance the quantizer step counter by one."""
        # deviation: moq-ds06-counter (once per step, as DeepSpeed 0.17)
        self.qsteps += 1

    def lower_ratio(self) -> None:
        """Lower ``r`` by ``change_ratio`` (mixed precision only), stopping at 0."""
        if self.settings.mixed:
            self.quantize_real_ratio = max(self.quantize_real_ratio - self.settings.change_ratio, 0.0)

    def any_drop_next(self, schedules: Iterable[ParamSchedule] | None = None) -> bool:
        """Whether the next step drops a bit of one of ``schedules`` (default: all of this engine's)."""
        scheds = self.schedules.values() if schedules is None else schedules
        return any(s.drop_due(self.qsteps + 1) for s in scheds)

    def blend(self, weight: Tensor, quantized: Tensor) -> Tensor:
        """``r·weight + (1 - r)·quantized`` with mixed precision, else ``quantized``."""
        if self.settings.mixed:
            r = self.quantize_real_ratio
            return r * weight + (1 - r) * quantized
        return quantized

    def update(self, schedule: ParamSchedule, weight: Tensor, factor: int = 1) -> tuple[Tensor, bool]:
        """Advance ``schedule`` at the current step and return the weight's new value.

        Args:
            schedule: the parameter's schedule (a drop due now is applied to it, and resets ``r``).
            weight: its value, float32/float16/bfloat16, not requiring grad.
            factor: the next period's multiplier if it drops a bit now (:func:`eigenvalue_factor`).

        Returns:
            ``(value, dropped)``: the quantized (or blended) value, a new tensor of
            ``weight``'s shape and dtype, and whether a bit was dropped.
        """
        dropped = schedule.drop_due(self.qsteps)
        if dropped:
            self.quantize_real_ratio = 1.0
            schedule.drop(factor)
        if schedule.bits < schedule.target_bits:
            raise ValueError(
                f"Quantizer: a parameter is at {schedule.bits} bits, below its target_bits ({schedule.target_bits})"
            )
        s = self.settings
        groups = schedule.groups or s.groups
        quantized = quantize_weight(
            weight, schedule.bits, groups, s.symmetric, s.stochastic, s.use_kernel, schedule.scheme
        )
        return self.blend(weight, quantized), dropped

    # ------------------------------------------------------------ a whole step

    def step(self, weights: Mapping[str, Tensor], factors: Mapping[str, int] | None = None) -> list[str]:
        """One quantizer step over ``weights`` (``{name: parameter}``, visited in that order), in place.

        Every name must have a schedule here; each parameter's storage is kept (its
        ``.data`` is overwritten), so tied and viewed weights stay shared.

        Args:
            weights: the parameters to quantize, by schedule name.
            factors: ``{name: period multiplier}`` for the drops of this step (default 1).

        Returns:
            The names whose width dropped, in order.
        """
        self.count_step()
        self.lower_ratio()
        factors = factors or {}
        dropped = []
        for name, p in weights.items():
            new, did = self.update(self.schedules[name], p.data, factors.get(name, 1))
            with torch.no_grad():
                p.data.copy_(new)
            if did:
                dropped.append(name)
        return dropped
