"""DeepSpeed's MoQ quantizer (``deepspeed.runtime.quantize.Quantizer``): an adapter over the schedule engine.

:class:`Quantizer` keeps DeepSpeed's constructor, its ``quantize(parameter_group,
overflow, eigenvalue_enabled, block_eigenvalue)`` entry point and its per-parameter
attributes: a parameter takes part when it has more than one dimension and a truthy
``start_bits`` attribute; ``start_bits`` is its *current* width, ``target_bits`` the
final one and ``q_period`` the quantizer step at which the next drop is due.

The schedule is :class:`qkit.moq.schedule.ScheduleEngine`'s (its module docstring gives
it), one engine step per call of :meth:`Quantizer.quantize` that is not skipped. This
class holds no schedule of its own: each call reads every parameter's attributes into a
:class:`qkit.moq.schedule.ParamSchedule`, runs the engine, and writes them back, so code
that reads or sets the attributes between calls sees and steers the schedule as in DeepSpeed.

Values on the pure-PyTorch path (``use_quantizer_kernel=False``) are DeepSpeed's own
formulas, computed in the parameter's dtype in DeepSpeed's order, so they match its
runtime quantizer bit for bit (:mod:`qkit.moq.values`). With ``use_quantizer_kernel=True``
the values come from ``qkit.fake_quantize`` (docs/ops.md §1) on any device, 2..16 bits.

Where DeepSpeed's quantizer was broken, this one is not (the schedule is otherwise the same):

1. With eigenvalues it passed ``p.data`` (no schedule attributes) and crashed; here the
   parameter itself is scheduled and its period multiplied by the factor.
2. ``any_precision_switch`` and the kernel path's mixed-precision blend read attributes
   that were never set; both now use the parameters' own schedules.
3. The kernel path compared the rounding mode with ``'nearest_neighbor'`` and so rounded
   stochastically when asked for ``'nearest'``.
4. ``q_type=0`` and ``q_rounding=0`` (its constructor defaults) matched no branch, so
   nothing was quantized; 0/1 now mean symmetric/asymmetric and nearest/stochastic, and
   anything else is an error.
5. A group whose range is zero (all zeros, or constant for asymmetric) became NaN
   (``0/0``); it is now left as it is. A ternary group with nothing above its threshold
   (all zeros) likewise became NaN and is now zero.
6. An overflowed step was still counted when ``eigenvalue_enabled`` was set; every
   overflowed step is now skipped.
7. ``r`` could overshoot below zero for one step (``1, .7, .4, .1, -.2, 0`` for a ratio
   of 0.3), extrapolating past the quantized value; it now stops at 0.
8. The schedule lived only in parameter attributes that checkpoints never saved, so a
   resumed run restarted it; :meth:`Quantizer.state_dict` saves it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from qkit.moq.deepspeed_config import Q_TYPES, ROUNDINGS, deepspeed_choice
from qkit.moq.schedule import (
    DEEPSPEED_ATTRIBUTES,
    ParamSchedule,
    QuantizerSettings,
    ScheduleEngine,
    eigenvalue_factor,
)
from qkit.moq.state import parse_quantizer_state
from qkit.moq.values import quantize_binary, quantize_highbit, quantize_ternary, quantize_weight

logger = logging.getLogger("qkit.moq")

__all__ = ["Quantizer", "quantize_binary", "quantize_highbit", "quantize_ternary", "quantize_weight"]


def parse_q_type(q_type: object) -> bool:
    """DeepSpeed's ``q_type`` (``'symmetric'``/``'asymmetric'`` or its old 0/1) as ``symmetric``."""
    symmetric = deepspeed_choice(Q_TYPES, q_type)
    if symmetric is None:
        raise ValueError(f"Quantizer: `q_type` must be 'symmetric' or 'asymmetric' (or 0/1), got {q_type!r}")
    return symmetric


def parse_rounding(q_rounding: object) -> bool:
    """DeepSpeed's ``q_rounding`` (``'nearest'``/``'stochastic'`` or 0/1, and the
    ``'nearest_neighbor'`` its kernel path tested for) as ``stochastic``."""
    stochastic = deepspeed_choice({**ROUNDINGS, "nearest_neighbor": False}, q_rounding)
    if stochastic is None:
        raise ValueError(f"Quantizer: `q_rounding` must be 'nearest' or 'stochastic' (or 0/1), got {q_rounding!r}")
    return stochastic


def _scheduled(p: Tensor) -> bool:
    # deviation: moq-quantizer-fixes (the module docstring lists them)
    return p.dim() > 1 and bool(getattr(p, "start_bits", None))


def _schedule_of(p: Tensor) -> dict[str, int] | None:
    """``p``'s checkpoint entry, or ``None`` when it lacks a schedule attribute."""
    if not all(getattr(p, attr, None) is not None for attr in DEEPSPEED_ATTRIBUTES.values()):
        return None
    return ParamSchedule.from_attributes(p).checkpoint()


class Quantizer:
    """DeepSpeed's MoQ quantizer (``deepspeed.runtime.quantize.Quantizer``), repaired and checkpointable.

    Args:
        q_groups: quantization groups per parameter (a parameter's ``q_groups``
            attribute overrides it; a ``q_spec`` attribute, a :class:`qkit.QuantSpec`,
            replaces groups and scheme).
        q_mixed_fp16: blend ``r·w + (1 - r)·q(w)``.
        q_change_ratio: how much ``r`` falls per step.
        q_type: ``'symmetric'``/``'asymmetric'`` (or 0/1).
        q_rounding: ``'nearest'``/``'stochastic'`` (or 0/1).
        q_verbose: log every bit drop (``logging`` logger ``qkit.moq``).
        q_eigenvalue: eigenvalue scheduling is on (informational, as in DeepSpeed).
        use_quantizer_kernel: quantize with ``qkit.fake_quantize`` (2..16 bits).
        layer_num: number of eigenvalue blocks (informational, as in DeepSpeed).

    Attributes:
        engine: the :class:`qkit.moq.schedule.ScheduleEngine` it drives (no schedules of
            its own: they live on the parameters).
        qsteps: quantizer steps taken (skipped steps excluded).
        quantize_real_ratio: ``r``.
        q_groups, q_mixed_fp16, q_change_ratio, q_type, q_rounding, symmetric, stochastic,
            use_quantizer_kernel: the settings, read-only.
    """

    def __init__(
        self,
        q_groups: int = 1,
        q_mixed_fp16: bool = False,
        q_change_ratio: float = 0.01,
        q_type: str | int = 0,
        q_rounding: str | int = 0,
        q_verbose: bool = False,
        q_eigenvalue: bool = False,
        use_quantizer_kernel: bool = False,
        layer_num: int = 0,
    ) -> None:
        if isinstance(q_groups, bool) or not isinstance(q_groups, int) or q_groups < 1:
            raise ValueError(f"Quantizer: `q_groups` must be a positive integer, got {q_groups!r}")
        if not 0 < q_change_ratio <= 1:
            raise ValueError(f"Quantizer: `q_change_ratio` must be in (0, 1], got {q_change_ratio!r}")
        settings = QuantizerSettings(
            groups=q_groups,
            symmetric=parse_q_type(q_type),
            stochastic=parse_rounding(q_rounding),
            mixed=bool(q_mixed_fp16),
            change_ratio=float(q_change_ratio),
            use_kernel=bool(use_quantizer_kernel),
        )
        self.engine = ScheduleEngine(settings)
        self.q_verbose = bool(q_verbose)
        self.q_eigenvalue = bool(q_eigenvalue)
        self.layer_num = layer_num
        self._groups_seen: list[list[Tensor]] = []
        self._pending: list[list[dict[str, int] | None]] | None = None

    # ------------------------------------------------------------ DeepSpeed's attributes

    @property
    def qsteps(self) -> int:
        return self.engine.qsteps

    @qsteps.setter
    def qsteps(self, value: int) -> None:
        self.engine.qsteps = value

    @property
    def quantize_real_ratio(self) -> float:
        return self.engine.quantize_real_ratio

    @quantize_real_ratio.setter
    def quantize_real_ratio(self, value: float) -> None:
        self.engine.quantize_real_ratio = value

    @property
    def q_groups(self) -> int:
        return self.engine.settings.groups

    @property
    def q_mixed_fp16(self) -> bool:
        return self.engine.settings.mixed

    @property
    def q_change_ratio(self) -> float:
        return self.engine.settings.change_ratio

    @property
    def symmetric(self) -> bool:
        return self.engine.settings.symmetric

    @property
    def stochastic(self) -> bool:
        return self.engine.settings.stochastic

    @property
    def q_type(self) -> str:
        return "symmetric" if self.symmetric else "asymmetric"

    @property
    def q_rounding(self) -> str:
        return "stochastic" if self.stochastic else "nearest"

    @property
    def use_quantizer_kernel(self) -> bool:
        return self.engine.settings.use_kernel

    # ------------------------------------------------------------ DeepSpeed's entry points

    def any_precision_switch(self, parameter_group: Iterable[Iterable[Tensor]] | None = None) -> bool:
        """Whether the next :meth:`quantize` call drops some parameter's width.

        Checks ``parameter_group`` (a list of parameter lists), or the parameters of
        the last :meth:`quantize` call; with neither, ``True`` (so an eigenvalue
        computation is never missed).
        """
        groups = self._groups_seen if parameter_group is None else [list(g) for g in parameter_group]
        params = [p for g in groups for p in g if _scheduled(p)]
        if not params:
            return True
        # deviation: moq-ds06-counter (DeepSpeed 0.17 looked 6 * layer_num steps ahead)
        return self.engine.any_drop_next(ParamSchedule.from_attributes(p) for p in params)

    def quantize(
        self,
        parameter_group: Sequence[Iterable[Tensor]],
        overflow: bool,
        eigenvalue_enabled: bool,
        block_eigenvalue: Mapping[int, tuple[float | None, int]] | None = None,
    ) -> None:
        """One MoQ step over ``parameter_group`` (a list of parameter lists), in place.

        Args:
            parameter_group: e.g. an optimizer's ``[g["params"] for g in param_groups]``.
            overflow: the optimizer step overflowed (fp16 loss scaling): skip this step.
            eigenvalue_enabled: as DeepSpeed's engine passes it (informational).
            block_eigenvalue: ``{id(param): (eigenvalue in [0, 1] or None, block index)}``;
                a parameter found here with an eigenvalue has its next period
                multiplied by ``1 + floor(4·eigenvalue)`` when it drops a bit.
        """
        del eigenvalue_enabled  # DeepSpeed used it only to (wrongly) not skip overflowed steps
        groups = [list(g) for g in parameter_group]
        if self._pending is not None:
            self._apply_schedules(groups, self._pending)
            self._pending = None
        self._groups_seen = groups
        if overflow:
            return
        self.step()
        self.update_fp16_ratio()
        eigen = block_eigenvalue or {}
        for group in groups:
            for p in group:
                if not _scheduled(p):
                    continue
                eigenvalue, layer_id = eigen.get(id(p), (None, 0))
                factor = 1 if eigenvalue is None else eigenvalue_factor(eigenvalue, layer_id)
                new = self.compute_quantization(p, layer_id, factor)
                p.data.copy_(new)  # keep the parameter's storage (tied and viewed weights stay shared)

    def step(self) -> None:
        """Advance the quantizer step counter."""
        self.engine.count_step()

    def quantize_highbit(self, inputs: Tensor, num_bits: int) -> Tensor:
        """:func:`quantize_highbit` with this quantizer's groups, type and rounding."""
        return quantize_highbit(inputs, num_bits, self.q_groups, self.symmetric, self.stochastic)

    def quantize_ternary(self, inputs: Tensor) -> Tensor:
        """:func:`quantize_ternary` with this quantizer's groups."""
        return quantize_ternary(inputs, self.q_groups)

    quantize_tenary = quantize_ternary  # DeepSpeed's spelling

    def quantize_binary(self, inputs: Tensor) -> Tensor:
        """:func:`quantize_binary` with this quantizer's groups."""
        return quantize_binary(inputs, self.q_groups)

    def mixed_fp16_quantize(self, input: Tensor, input_q: Tensor, index: int = 0) -> Tensor:
        """``r·input + (1 - r)·input_q`` when mixed precision is on, else ``input_q``."""
        del index
        return self.engine.blend(input, input_q)

    def compute_quantization(self, input: Tensor, index: int = 0, factor: int = 1) -> Tensor:
        """Advance ``input``'s schedule (a parameter with schedule attributes) and return its new value.

        Args:
            input: the parameter (its ``start_bits``/``target_bits``/``q_period`` are updated).
            index: its eigenvalue block (for the log).
            factor: period multiplier applied if it drops a bit now.

        Returns:
            The quantized (or blended) value, a new tensor of ``input``'s shape and dtype.
        """
        schedule = ParamSchedule.from_attributes(input)
        new, dropped = self.engine.update(schedule, input.data, factor)
        if dropped:
            schedule.to_attributes(input, widths_only=True)
            if self.q_verbose:
                logger.info(
                    "MoQ: %d bits at quantizer step %d, next drop at step %d (block %d)",
                    schedule.bits,
                    self.qsteps,
                    schedule.next_drop,
                    index,
                )
        return new

    def update_fp16_ratio(self) -> None:
        """Lower ``r`` by ``q_change_ratio`` (mixed precision only), stopping at 0."""
        self.engine.lower_ratio()

    # ------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The quantizer's state: step counter, ``r``, and the schedules of the parameters
        of the last :meth:`quantize` call by position (``None`` for unscheduled ones).

        Between a :meth:`load_state_dict` without parameters and the next :meth:`quantize`,
        the schedules are the loaded ones, not yet on any parameter: they are saved as loaded.
        """
        if self._pending is not None:
            params = [[None if s is None else dict(s) for s in group] for group in self._pending]
        else:
            params = [[_schedule_of(p) for p in group] for group in self._groups_seen]
        return {"qsteps": self.qsteps, "quantize_real_ratio": self.quantize_real_ratio, "params": params}

    def load_state_dict(
        self, state: Mapping[str, Any], parameter_group: Sequence[Iterable[Tensor]] | None = None
    ) -> None:
        """Restore :meth:`state_dict`. Parameter schedules go onto ``parameter_group``
        now, or onto the parameters of the next :meth:`quantize` call (same layout).

        The state is checked first (:func:`qkit.moq.state.parse_quantizer_state`) and only
        then applied: a bad one raises a ``ValueError`` naming the key, changing nothing.
        """
        groups = None if parameter_group is None else [list(g) for g in parameter_group]
        layout = None if groups is None else [len(g) for g in groups]
        parsed = parse_quantizer_state(state, layout)
        self.qsteps = parsed.qsteps
        self.quantize_real_ratio = parsed.quantize_real_ratio
        if groups is None:
            self._pending = parsed.params
        else:
            self._apply_schedules(groups, parsed.params)
            self._groups_seen = groups
            self._pending = None

    @staticmethod
    def _apply_schedules(groups: list[list[Tensor]], schedules: list[list[dict[str, int] | None]]) -> None:
        layout = [len(g) for g in groups]
        saved = [len(g) for g in schedules]
        if layout != saved:
            raise ValueError(
                f"Quantizer.load_state_dict: the checkpoint's parameter layout {saved} (parameters per group) "
                f"does not match this one's {layout}"
            )
        for group, group_state in zip(groups, schedules, strict=True):
            for p, sched in zip(group, group_state, strict=True):
                if sched is not None:
                    for attr in DEEPSPEED_ATTRIBUTES.values():
                        setattr(p, attr, sched[attr])
