"""The MoQ schedule and weight quantizer, DeepSpeed-compatible (``deepspeed.runtime.quantize.Quantizer``).

:class:`Quantizer` keeps DeepSpeed's constructor, its ``quantize(parameter_group,
overflow, eigenvalue_enabled, block_eigenvalue)`` entry point and its per-parameter
attributes: a parameter takes part when it has more than one dimension and a truthy
``start_bits`` attribute; ``start_bits`` is its *current* width, ``target_bits`` the
final one and ``q_period`` the quantizer step at which the next drop is due.

Schedule, per call of :meth:`Quantizer.quantize` that is not skipped: the step counter
``qsteps`` increases by one; ``r`` (mixed precision) falls by ``q_change_ratio``; then
for each parameter, if ``start_bits != target_bits`` and ``qsteps >= q_period``, the
width drops by one, ``q_period`` doubles (times ``factor = 1 + floor(4·eig)`` when the
parameter's block has an eigenvalue) and ``r`` is reset to 1. The parameter is then
replaced by its quantized value at its width (mixed: ``r·w + (1 - r)·q(w)``).

Values on the pure-PyTorch path (``use_quantizer_kernel=False``) are DeepSpeed's own
formulas, computed in the parameter's dtype in DeepSpeed's order, so they match its
runtime quantizer bit for bit (see :func:`quantize_highbit`, :func:`quantize_ternary`,
:func:`quantize_binary`). With ``use_quantizer_kernel=True`` the values come from
``qkit.fake_quantize`` (docs/ops.md §1) on any device, 2..16 bits.

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
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from qkit import ops
from qkit.moq.state import parse_quantizer_state

logger = logging.getLogger("qkit.moq")

__all__ = ["Quantizer", "quantize_binary", "quantize_highbit", "quantize_ternary", "quantize_weight"]

# deviation: moq-quantizer-fixes (the module docstring lists them)
_SCHEDULE_ATTRS = ("start_bits", "target_bits", "q_period")


def parse_q_type(q_type: object) -> bool:
    """DeepSpeed's ``q_type`` (``'symmetric'``/``'asymmetric'`` or its old 0/1) as ``symmetric``."""
    if q_type in ("symmetric", 0) and not isinstance(q_type, bool):
        return True
    if q_type in ("asymmetric", 1) and not isinstance(q_type, bool):
        return False
    raise ValueError(f"Quantizer: `q_type` must be 'symmetric' or 'asymmetric' (or 0/1), got {q_type!r}")


def parse_rounding(q_rounding: object) -> bool:
    """DeepSpeed's ``q_rounding`` (``'nearest'``/``'stochastic'`` or 0/1) as ``stochastic``."""
    if q_rounding in ("nearest", "nearest_neighbor", 0) and not isinstance(q_rounding, bool):
        return False
    if q_rounding in ("stochastic", 1) and not isinstance(q_rounding, bool):
        return True
    raise ValueError(f"Quantizer: `q_rounding` must be 'nearest' or 'stochastic' (or 0/1), got {q_rounding!r}")


# ---------------------------------------------------------------- the value functions


def quantize_highbit(x: Tensor, bits: int, groups: int, symmetric: bool, stochastic: bool) -> Tensor:
    """DeepSpeed's uniform MoQ quantizer (3+ bits), group-wise, in ``x``'s dtype.

    With ``n = 2^bits`` and per group ``lo, hi = min, max``:

    - symmetric: ``s = 2·max(|lo|, |hi|) / n``; ``q = clamp(round(x/s + u), -n/2, n/2 - 1)·s``;
    - asymmetric: ``s = (hi - lo) / n``, ``z = round(lo/s)·s``;
      ``q = clamp(round((x - z)/s + u), 0, n - 1)·s + z``;

    ``round`` is half-to-even; ``u = 0`` (nearest) or ``u ~ U[-0.5, 0.5)`` drawn from
    torch's generator for ``x``'s device (stochastic). A group with ``s = 0`` is
    returned unchanged.

    Args:
        x: float tensor of any shape, ``M`` elements.
        bits: >= 1 (MoQ uses it for 3+).
        groups: ``G`` dividing ``M``; group ``g`` is a contiguous run of the flattened tensor.
        symmetric: symmetric or asymmetric ranges.
        stochastic: stochastic instead of nearest rounding.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype.
    """
    q_range = 2**bits
    if not symmetric and x.is_floating_point() and q_range - 1 > torch.finfo(x.dtype).max:
        # fp16 cannot hold the top code of 16-bit asymmetric (65535): DeepSpeed raised
        # there; compute in fp32 and round once.
        return quantize_highbit(x.float(), bits, groups, symmetric, stochastic).to(x.dtype)
    flat = x.reshape(groups, -1)
    g_min = flat.amin(dim=-1, keepdim=True)
    g_max = flat.amax(dim=-1, keepdim=True)
    # The draw happens whatever the range, so the generator advances as DeepSpeed's did.
    noise: Tensor | float = torch.empty_like(flat).uniform_(-0.5, 0.5) if stochastic else 0.0
    if symmetric:
        scale = 2 * torch.max(torch.abs(g_min), torch.abs(g_max)) / q_range
        out = (flat / scale + noise).round().clamp(-(q_range >> 1), (q_range >> 1) - 1) * scale
    else:
        scale = (g_max - g_min) / q_range
        zero_point = (g_min / scale).round() * scale
        out = ((flat - zero_point) / scale + noise).round().clamp(0, q_range - 1) * scale + zero_point
    out = torch.where(scale == 0, flat, out)  # DeepSpeed: 0/0 = NaN for a zero-range group
    return out.reshape(x.shape).contiguous()


def quantize_ternary(x: Tensor, groups: int) -> Tensor:
    """DeepSpeed's 2-bit MoQ quantizer: ternary ``{-a, 0, +a}`` per group, in ``x``'s dtype.

    Per group of ``n`` elements: threshold ``t = 0.7·mean|x|``; ``a`` = mean of ``|x|``
    over the elements with ``|x| > t``; output ``+a`` where ``x > t``, ``-a`` where
    ``x < -t``, else 0 (an all-zero group stays zero).

    Args:
        x: float tensor, ``M`` elements.
        groups: ``G`` dividing ``M``.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype.
    """
    flat = x.reshape(groups, -1)
    n = flat.shape[1]
    mean_abs = flat.norm(p=1, dim=1).div(n)
    thres = (0.7 * mean_abs).view(-1, 1)
    pos = (flat > thres).to(x.dtype)
    neg = (flat < -thres).to(x.dtype)
    mask = (flat.abs() > thres).to(x.dtype)
    kept = mask.sum(dim=1)
    alpha = ((mask * flat).abs().sum(dim=1) / kept).view(-1, 1)
    alpha = torch.where(kept.view(-1, 1) == 0, torch.zeros_like(alpha), alpha)  # DeepSpeed: 0/0 = NaN
    out = alpha * pos - alpha * neg
    return out.reshape(x.shape).contiguous()


def quantize_binary(x: Tensor, groups: int) -> Tensor:
    """DeepSpeed's 1-bit MoQ quantizer: ``sign(x)·mean|x|`` per group, in ``x``'s dtype.

    Args:
        x: float tensor, ``M`` elements.
        groups: ``G`` dividing ``M``.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype (zeros stay zero).
    """
    flat = x.reshape(groups, -1)
    n = flat.shape[1]
    mean_abs = flat.norm(p=1, dim=1, keepdim=True).div(n)
    return flat.sign().mul(mean_abs).reshape(x.shape).contiguous()


def quantize_weight(
    x: Tensor,
    bits: int,
    groups: int,
    symmetric: bool = True,
    stochastic: bool = False,
    use_kernel: bool = False,
    scheme: Any = None,
) -> Tensor:
    """One MoQ quantization of ``x`` at ``bits`` (no schedule, no blending).

    Args:
        x: float32/float16/bfloat16 tensor (not requiring grad), ``M`` elements.
        bits: current width; the pure path takes 1..16, the kernel and scheme paths 2..16.
        groups: ``G`` dividing ``M`` (ignored with ``scheme``).
        symmetric, stochastic: the scheme (ignored with ``scheme``).
        use_kernel: ``qkit.fake_quantize`` (docs/ops.md §1) instead of DeepSpeed's formulas.
        scheme: a :class:`qkit.QuantSpec`; quantize with ``scheme.with_bits(bits)``.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    if scheme is not None:
        return scheme.with_bits(bits).fake_quantize(x)
    if use_kernel:
        if bits < 2:
            raise ValueError(
                f"Quantizer: {bits}-bit quantization has no kernel (qkit.fake_quantize takes 2..16 bits); "
                "use the pure-PyTorch path (use_quantizer_kernel=False) for binary weights"
            )
        return ops.fake_quantize(x, groups, bits, symmetric, stochastic)
    if bits >= 3:
        return quantize_highbit(x, bits, groups, symmetric, stochastic)
    if not symmetric or stochastic:
        kind = "ternary" if bits == 2 else "binary"
        raise ValueError(f"Quantizer: {kind} ({bits}-bit) quantization needs q_type='symmetric' and 'nearest' rounding")
    if bits == 2:
        return quantize_ternary(x, groups)
    if bits == 1:
        return quantize_binary(x, groups)
    raise ValueError(f"Quantizer: bits must be >= 1, got {bits}")


# ---------------------------------------------------------------- the quantizer


def _scheduled(p: Tensor) -> bool:
    return p.dim() > 1 and bool(getattr(p, "start_bits", None))


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
        qsteps: quantizer steps taken (skipped steps excluded).
        quantize_real_ratio: ``r``.
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
        self.symmetric = parse_q_type(q_type)
        self.stochastic = parse_rounding(q_rounding)
        self.q_groups = q_groups
        self.q_mixed_fp16 = bool(q_mixed_fp16)
        self.q_change_ratio = float(q_change_ratio)
        self.q_type = "symmetric" if self.symmetric else "asymmetric"
        self.q_rounding = "stochastic" if self.stochastic else "nearest"
        self.q_verbose = bool(q_verbose)
        self.q_eigenvalue = bool(q_eigenvalue)
        self.use_quantizer_kernel = bool(use_quantizer_kernel)
        self.layer_num = layer_num
        self.qsteps = 0
        self.quantize_real_ratio = 1.000
        self._groups_seen: list[list[Tensor]] = []
        self._pending: list[list[dict[str, int] | None]] | None = None

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
        next_step = self.qsteps + 1
        return any(p.start_bits != p.target_bits and next_step >= p.q_period for p in params)

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
                factor = 1
                if eigenvalue is not None:
                    if not math.isfinite(eigenvalue):
                        raise ValueError(f"Quantizer: block {layer_id} has a non-finite eigenvalue ({eigenvalue})")
                    factor = 1 + math.floor(eigenvalue * 4)
                new = self.compute_quantization(p, layer_id, factor)
                with torch.no_grad():
                    p.data.copy_(new)  # keep the parameter's storage (tied and viewed weights stay shared)

    def step(self) -> None:
        """Advance the quantizer step counter."""
        # deviation: moq-ds06-counter (once per step, as DeepSpeed 0.17)
        self.qsteps += 1

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
        if self.q_mixed_fp16:
            return self.quantize_real_ratio * input + (1 - self.quantize_real_ratio) * input_q
        return input_q

    def compute_quantization(self, input: Tensor, index: int = 0, factor: int = 1) -> Tensor:
        """Advance ``input``'s schedule (a parameter with schedule attributes) and return its new value.

        Args:
            input: the parameter (its ``start_bits``/``target_bits``/``q_period`` are updated).
            index: its eigenvalue block (for the log).
            factor: period multiplier applied if it drops a bit now.

        Returns:
            The quantized (or blended) value, a new tensor of ``input``'s shape and dtype.
        """
        if input.start_bits != input.target_bits and self.qsteps >= input.q_period:
            self.quantize_real_ratio = 1.0
            input.q_period <<= 1
            input.q_period *= factor
            input.start_bits -= 1
            if self.q_verbose:
                logger.info(
                    "MoQ: %d bits at quantizer step %d, next drop at step %d (block %d)",
                    input.start_bits,
                    self.qsteps,
                    input.q_period,
                    index,
                )
        if input.start_bits < input.target_bits:
            raise ValueError(
                f"Quantizer: a parameter is at {input.start_bits} bits, below its target_bits ({input.target_bits})"
            )
        data = input.data
        groups = getattr(input, "q_groups", None) or self.q_groups
        quantized = quantize_weight(
            data,
            input.start_bits,
            groups,
            self.symmetric,
            self.stochastic,
            self.use_quantizer_kernel,
            getattr(input, "q_spec", None),
        )
        return self.mixed_fp16_quantize(data, quantized, index)

    def update_fp16_ratio(self) -> None:
        """Lower ``r`` by ``q_change_ratio`` (mixed precision only), stopping at 0."""
        if self.q_mixed_fp16:
            if self.quantize_real_ratio > 0:
                self.quantize_real_ratio = max(self.quantize_real_ratio - self.q_change_ratio, 0.0)
            else:
                self.quantize_real_ratio = 0.000

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
                    for attr in _SCHEDULE_ATTRS:
                        setattr(p, attr, sched[attr])


def _schedule_of(p: Tensor) -> dict[str, int] | None:
    if not all(getattr(p, attr, None) is not None for attr in _SCHEDULE_ATTRS):
        return None
    return {attr: int(getattr(p, attr)) for attr in _SCHEDULE_ATTRS}
