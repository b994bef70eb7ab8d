"""Checks of MoQ checkpoints (:meth:`MoQ.load_state_dict`, :meth:`Quantizer.load_state_dict`).

Every loader parses the whole state here first, into fresh plain values, and only then
assigns them: a state that fails any check raises :class:`MoQStateError` naming the
offending key (``params.fc.weight.start_bits``, ``residuals.fc.weight``, ...) and leaves
the loading object exactly as it was. The bounds are the ones the schedule can reach
from a valid :class:`qkit.moq.MoQConfig`, so nothing that loads can fail at a later step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qkit.moq.config import MAX_BITS, MIN_KERNEL_BITS, _is_int
from qkit.moq.schedule import DEEPSPEED_ATTRIBUTES

__all__ = [
    "MAX_COUNT",
    "STATE_FORMAT",
    "MoQStateError",
    "ParsedMoQState",
    "ParsedQuantizerState",
    "ScheduledParam",
    "check_bits_usable",
    "check_count",
    "check_mapping",
    "check_ratio",
    "check_residual",
    "check_schedule",
    "parse_moq_state",
    "parse_quantizer_state",
]

#: Step counters and periods are stored as int64 by every checkpoint format worth having.
MAX_COUNT = 2**63 - 1

SCHEDULE_KEYS = tuple(DEEPSPEED_ATTRIBUTES.values())  # a schedule's checkpoint keys


class MoQStateError(ValueError):
    """A MoQ checkpoint is invalid; ``key`` is the dotted path of the offending entry."""

    def __init__(self, where: str, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{where}: `{key}` {message}")


def check_mapping(where: str, key: str, value: object) -> Mapping[str, Any]:
    """``value`` as a mapping, or an error naming ``key``."""
    if not isinstance(value, Mapping):
        raise MoQStateError(where, key, f"must be a mapping, got {type(value).__name__}")
    return value


def check_count(where: str, key: str, value: object, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer in ``[low, high]`` (a step counter, a period, a bit width)."""
    if not _is_int(value):
        raise MoQStateError(where, key, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise MoQStateError(where, key, f"must be in [{low}, {high}], got {value}")
    return int(value)


def check_ratio(where: str, key: str, value: object) -> float:
    """A finite number in ``[0, 1]`` (MoQ's mixed-precision ratio ``r``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MoQStateError(where, key, f"must be a finite number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise MoQStateError(where, key, f"must be in [0, 1], got {value}")
    return float(value)


def check_schedule(where: str, key: str, value: object) -> dict[str, int]:
    """One parameter's schedule: exactly ``start_bits``, ``target_bits``, ``q_period``,
    with ``1 <= target_bits <= start_bits <= 16`` and ``q_period >= 1``."""
    sched = check_mapping(where, key, value)
    extra = sorted(str(k) for k in sched if k not in SCHEDULE_KEYS)
    if extra:
        raise MoQStateError(where, f"{key}.{extra[0]}", f"is not a schedule key (expected {list(SCHEDULE_KEYS)})")
    for name in SCHEDULE_KEYS:
        if name not in sched:
            raise MoQStateError(where, f"{key}.{name}", "is missing")
    start = check_count(where, f"{key}.start_bits", sched["start_bits"], 1, MAX_BITS)
    target = check_count(where, f"{key}.target_bits", sched["target_bits"], 1, MAX_BITS)
    if target > start:
        raise MoQStateError(where, f"{key}.target_bits", f"({target}) must be <= start_bits ({start})")
    period = check_count(where, f"{key}.q_period", sched["q_period"], 1)
    return {"start_bits": start, "target_bits": target, "q_period": period}


def check_bits_usable(
    where: str, key: str, sched: Mapping[str, int], *, kernel: bool, scheme: bool, symmetric: bool, stochastic: bool
) -> None:
    """The widths ``sched`` will pass through can be quantized the way this parameter is
    (see :func:`qkit.moq.quantize_weight`): 2+ bits for the kernel and for a QuantSpec,
    symmetric nearest rounding below 3 bits on the pure-PyTorch path."""
    target = sched["target_bits"]
    if (kernel or scheme) and target < MIN_KERNEL_BITS:
        path = "its QuantSpec" if scheme else "use_quantizer_kernel"
        raise MoQStateError(where, f"{key}.target_bits", f"is {target}, but {path} quantizes 2..16 bits")
    if not (kernel or scheme) and target <= 2 and (not symmetric or stochastic):
        raise MoQStateError(
            where, f"{key}.target_bits", f"is {target}, but below 3 bits MoQ quantizes symmetric and nearest only"
        )


def check_residual(where: str, key: str, value: object, shape: torch.Size, dtype: torch.dtype) -> Tensor | None:
    """``None``, or a finite tensor of exactly ``shape`` and ``dtype`` (any device)."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise MoQStateError(where, key, f"must be a tensor or None, got {type(value).__name__}")
    if value.shape != shape:
        raise MoQStateError(where, key, f"has shape {list(value.shape)}, but the parameter has {list(shape)}")
    if value.dtype != dtype:
        raise MoQStateError(where, key, f"has dtype {value.dtype}, but the parameter's master dtype is {dtype}")
    if value.layout != torch.strided or value.is_quantized:
        raise MoQStateError(where, key, "must be a plain dense tensor")
    if not bool(torch.isfinite(value).all()):
        raise MoQStateError(where, key, "holds NaN or infinite values")
    return value


@dataclass(frozen=True)
class ParsedQuantizerState:
    """A checked :meth:`Quantizer.state_dict`, in fresh plain values."""

    qsteps: int
    quantize_real_ratio: float
    params: list[list[dict[str, int] | None]]


def parse_quantizer_state(
    state: object, layout: Sequence[int] | None = None, where: str = "Quantizer.load_state_dict"
) -> ParsedQuantizerState:
    """Check a :meth:`Quantizer.state_dict`; with ``layout`` (parameters per group of the
    parameters it will go onto), also that its parameter layout is that one."""
    state = check_mapping(where, "state", state)
    for name in ("qsteps", "quantize_real_ratio"):
        if name not in state:
            raise MoQStateError(where, name, "is missing")
    qsteps = check_count(where, "qsteps", state["qsteps"])
    ratio = check_ratio(where, "quantize_real_ratio", state["quantize_real_ratio"])
    raw = state.get("params", [])
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise MoQStateError(where, "params", f"must be a list of parameter groups, got {type(raw).__name__}")
    params: list[list[dict[str, int] | None]] = []
    for g, group in enumerate(raw):
        if not isinstance(group, Sequence) or isinstance(group, (str, bytes)):
            raise MoQStateError(where, f"params[{g}]", f"must be a list of schedules, got {type(group).__name__}")
        params.append(
            [None if s is None else check_schedule(where, f"params[{g}][{i}]", s) for i, s in enumerate(group)]
        )
    if layout is not None and list(layout) != [len(g) for g in params]:
        raise MoQStateError(
            where,
            "params",
            f"has the parameter layout {[len(g) for g in params]} (parameters per group), "
            f"but the parameters given have {list(layout)}",
        )
    return ParsedQuantizerState(qsteps, ratio, params)


STATE_FORMAT = "qkit.moq/1"
_MOQ_KEYS = ("format", "steps", "qsteps", "quantize_real_ratio", "params", "history", "residuals")
_HISTORY_KEYS = ("step", "name", "old_bits", "new_bits", "next_drop", "eigenvalue")


@dataclass(frozen=True)
class ScheduledParam:
    """What a MoQ checkpoint entry is checked against: one scheduled parameter."""

    name: str
    shape: torch.Size
    master_dtype: torch.dtype
    device: torch.device
    kernel: bool  # quantized by qkit.fake_quantize (2..16 bits)
    scheme: bool  # quantized by a QuantSpec (2..16 bits)


@dataclass(frozen=True)
class ParsedMoQState:
    """A checked :meth:`MoQ.state_dict`, in fresh values ready to assign."""

    steps: int
    qsteps: int
    quantize_real_ratio: float
    schedules: dict[str, dict[str, int]]
    history: list[dict[str, Any]]
    residuals: dict[str, Tensor | None]


def _check_names(where: str, key: str, found: Mapping[str, Any], names: Sequence[str]) -> None:
    missing = sorted(set(names) - set(found))
    unexpected = sorted(str(k) for k in set(found) - set(names))
    if missing or unexpected:
        raise MoQStateError(
            where, key, f"names other parameters than the scheduled ones: missing {missing}, unexpected {unexpected}"
        )


def _check_history_entry(where: str, key: str, value: object, names: Sequence[str]) -> dict[str, Any]:
    entry = check_mapping(where, key, value)
    if sorted(entry) != sorted(_HISTORY_KEYS):
        raise MoQStateError(where, key, f"must have exactly the keys {list(_HISTORY_KEYS)}, got {sorted(entry)}")
    name = entry["name"]
    if name not in names:
        raise MoQStateError(where, f"{key}.name", f"is {name!r}, not a scheduled parameter")
    old = check_count(where, f"{key}.old_bits", entry["old_bits"], 2, MAX_BITS)
    new = check_count(where, f"{key}.new_bits", entry["new_bits"], 1, MAX_BITS)
    if new != old - 1:
        raise MoQStateError(where, f"{key}.new_bits", f"({new}) must be old_bits - 1 ({old - 1}): MoQ drops one bit")
    next_drop = entry["next_drop"]
    eigenvalue = entry["eigenvalue"]
    return {
        "step": check_count(where, f"{key}.step", entry["step"], 1),
        "name": name,
        "old_bits": old,
        "new_bits": new,
        "next_drop": None if next_drop is None else check_count(where, f"{key}.next_drop", next_drop, 1),
        "eigenvalue": None if eigenvalue is None else check_ratio(where, f"{key}.eigenvalue", eigenvalue),
    }


def parse_moq_state(
    state: object,
    params: Sequence[ScheduledParam],
    *,
    symmetric: bool,
    stochastic: bool,
    where: str = "MoQ.load_state_dict",
) -> ParsedMoQState:
    """Check a whole :meth:`MoQ.state_dict` against the scheduled ``params`` (names,
    schedules and the widths this MoQ can quantize at, residual shapes and dtypes,
    counters, ratio, history) and return it as fresh values (residuals copied onto
    their parameters' devices). Raises :class:`MoQStateError` at the first bad key."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise MoQStateError(where, "format", f"is {found!r}: not a MoQ state ({STATE_FORMAT!r})")
    unknown = sorted(str(k) for k in state if k not in _MOQ_KEYS)
    if unknown:
        raise MoQStateError(where, unknown[0], f"is not a MoQ state key (expected {list(_MOQ_KEYS)})")
    for name in ("steps", "qsteps", "quantize_real_ratio", "params"):
        if name not in state:
            raise MoQStateError(where, name, "is missing")
    steps = check_count(where, "steps", state["steps"])
    qsteps = check_count(where, "qsteps", state["qsteps"])
    if qsteps > steps:
        raise MoQStateError(where, "qsteps", f"({qsteps}) exceeds `steps` ({steps}): every quantizer step is a step")
    ratio = check_ratio(where, "quantize_real_ratio", state["quantize_real_ratio"])

    names = [p.name for p in params]
    saved = check_mapping(where, "params", state["params"])
    _check_names(where, "params", saved, names)
    schedules = {}
    for p in params:
        key = f"params.{p.name}"
        sched = check_schedule(where, key, saved[p.name])
        check_bits_usable(
            where, key, sched, kernel=p.kernel, scheme=p.scheme, symmetric=symmetric, stochastic=stochastic
        )
        schedules[p.name] = sched

    raw_history = state.get("history", [])
    if not isinstance(raw_history, Sequence) or isinstance(raw_history, (str, bytes)):
        raise MoQStateError(where, "history", f"must be a list of bit drops, got {type(raw_history).__name__}")
    history = [_check_history_entry(where, f"history[{i}]", d, names) for i, d in enumerate(raw_history)]
    for i, drop in enumerate(history):
        if drop["step"] > steps:
            raise MoQStateError(where, f"history[{i}].step", f"({drop['step']}) is after `steps` ({steps})")

    raw_residuals = check_mapping(where, "residuals", state.get("residuals", dict.fromkeys(names)))
    _check_names(where, "residuals", raw_residuals, names)
    checked = {
        p.name: check_residual(where, f"residuals.{p.name}", raw_residuals[p.name], p.shape, p.master_dtype)
        for p in params
    }
    # Copied last, once everything is known to be valid: the only step that allocates.
    residuals = {
        p.name: None if r is None else r.to(device=p.device, copy=True)
        for p, r in zip(params, checked.values(), strict=True)
    }
    return ParsedMoQState(steps, qsteps, ratio, schedules, history, residuals)
