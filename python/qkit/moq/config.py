"""MoQ configuration: typed and validated.

:class:`MoQConfig` is the one description of a MoQ run (:class:`GroupConfig` per module
pattern, :class:`EigenvalueConfig` for eigenvalue scheduling). Every field is checked when
the dataclass is built: a wrong type, a value out of range, or two fields that contradict
each other raise :class:`MoQConfigError` naming the field. DeepSpeed's JSON/hjson configs
are read by :mod:`qkit.moq.deepspeed_config` (:meth:`MoQConfig.from_deepspeed`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qkit.fp_ops import BLOCK, FORMATS, SCALINGS, fp_format_bits
from qkit.ops import MAX_BITS, MIN_BITS, ROUNDING_MODES
from qkit.quant_spec import QuantSpec

# MoQ starts at MAX_BITS at most (docs/ops.md §3); fake_quantize has no 1-bit mode, so
# MIN_KERNEL_BITS is the lowest target its kernel path reaches.
MIN_KERNEL_BITS = MIN_BITS

__all__ = [
    "EigenvalueConfig",
    "GroupConfig",
    "MoQConfig",
    "MoQConfigError",
    "compile_pattern",
    "pattern_matches",
]


class MoQConfigError(ValueError):
    """A MoQ configuration is invalid; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"MoQ config: `{key}`: {message}")


# ---------------------------------------------------------------- field checks


def _is_int(value: object) -> bool:
    # bool is an int subclass; `true` for a bit width is a typo, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(key: str, value: object, low: int, high: int | None = None) -> int:
    if not _is_int(value):
        raise MoQConfigError(key, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise MoQConfigError(key, f"must be {bound}, got {value}")
    return value


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise MoQConfigError(key, f"must be true or false, got {value!r}")
    return value


def _check_float(key: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MoQConfigError(key, f"must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        left = "(" if low_open else "["
        raise MoQConfigError(key, f"must be in {left}{low}, {high}], got {value}")
    return float(value)


def compile_pattern(key: str, pattern: object) -> re.Pattern[str] | None:
    """Compile a module-name pattern: ``"*"`` matches every module, anything else is a
    regular expression searched in the module's dotted name (DeepSpeed's rule).

    Returns ``None`` for ``"*"``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise MoQConfigError(key, f"module patterns must be non-empty strings, got {pattern!r}")
    if pattern == "*":
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise MoQConfigError(key, f"{pattern!r} is not a valid regular expression ({exc})") from None


def pattern_matches(pattern: str, module_name: str) -> bool:
    """Whether ``pattern`` (see :func:`compile_pattern`) selects ``module_name``."""
    return pattern == "*" or re.search(pattern, module_name) is not None


def _pattern_tuple(key: str, value: object) -> tuple[str, ...]:
    # A bare string is one pattern (DeepSpeed iterated it character by character).
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise MoQConfigError(key, f"must be a list of module-name patterns, got {value!r}")
    for i, item in enumerate(items):
        compile_pattern(f"{key}[{i}]", item)
    return tuple(items)


# ---------------------------------------------------------------- the dataclasses


@dataclass(frozen=True)
class EigenvalueConfig:
    """Hessian-eigenvalue scheduling (DeepSpeed's ``eigenvalue`` block).

    When enabled, each bit drop multiplies a parameter's next period by
    ``1 + floor(4·eig)``, ``eig`` being its block's top Hessian eigenvalue
    normalized to [0, 1] across blocks, so sensitive blocks descend more slowly.

    Attributes:
        enabled: turn eigenvalue scheduling on.
        verbose: log every block's eigenvalue when computed.
        max_iter: power-iteration limit per block.
        tol: stop when the relative change of the estimate falls below ``tol``.
        stability: added to the vector norm before normalizing (avoids 0/0).
        gas_boundary_resolution: compute eigenvalues only on steps divisible by this.
        layer_name: dotted path to a container of blocks (e.g. ``"bert.encoder.layer"``);
            ``None``: every module that owns a quantized weight is its own block.
        layer_num: how many blocks of ``layer_name`` to use (0: all of them).
        seed: seed of the random start vectors (the global RNG is never touched).
    """

    enabled: bool = False
    verbose: bool = False
    max_iter: int = 100
    tol: float = 1e-2
    stability: float = 1e-6
    gas_boundary_resolution: int = 1
    layer_name: str | None = None
    layer_num: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        p = "eigenvalue."
        _check_bool(p + "enabled", self.enabled)
        _check_bool(p + "verbose", self.verbose)
        _check_int(p + "max_iter", self.max_iter, 1)
        _check_float(p + "tol", self.tol, 0.0, math.inf)
        _check_float(p + "stability", self.stability, 0.0, math.inf)
        _check_int(p + "gas_boundary_resolution", self.gas_boundary_resolution, 1)
        if self.layer_name is not None and (not isinstance(self.layer_name, str) or not self.layer_name):
            raise MoQConfigError(p + "layer_name", f"must be a dotted module path or null, got {self.layer_name!r}")
        _check_int(p + "layer_num", self.layer_num, 0)
        if self.layer_num > 0 and self.layer_name is None:
            raise MoQConfigError(p + "layer_num", "is set but `eigenvalue.layer_name` is not")
        _check_int(p + "seed", self.seed, 0)


@dataclass(frozen=True)
class GroupConfig:
    """Per-pattern settings (DeepSpeed's ``different_groups`` entry).

    A selected weight whose module name matches one of ``modules`` takes this
    group's settings; ``None`` fields inherit :class:`MoQConfig`'s. A weight may
    match at most one group.

    Attributes:
        name: the group's name (used in errors and logs).
        modules: module-name patterns (regex search; ``"*"`` matches all).
        start_bits: bit width at the first quantized step.
        target_bits: final bit width.
        quantize_period: steps until the first bit drop (doubles on every drop).
        groups: quantization groups per weight (contiguous runs of the flattened
            weight; must divide its number of elements).
        scheme: a :class:`qkit.QuantSpec` giving symmetry, granularity
            (per tensor / channel / group) and rounding for this group. The weight is
            then quantized by ``scheme.with_bits(bits).fake_quantize`` (qkit's op); its
            ``bits`` is the target unless ``target_bits`` is set (then they must agree).
    """

    name: str
    modules: tuple[str, ...] = ("*",)
    start_bits: int | None = None
    target_bits: int | None = None
    quantize_period: int | None = None
    groups: int | None = None
    scheme: QuantSpec | None = None

    def __post_init__(self) -> None:
        key = f"different_groups.{self.name}"
        if not isinstance(self.name, str) or not self.name:
            raise MoQConfigError("different_groups", f"group names must be non-empty strings, got {self.name!r}")
        object.__setattr__(self, "modules", _pattern_tuple(f"{key}.modules", self.modules))
        if not self.modules:
            raise MoQConfigError(f"{key}.modules", "must name at least one module pattern")
        if self.start_bits is not None:
            _check_int(f"{key}.start_bits", self.start_bits, 1, MAX_BITS)
        if self.target_bits is not None:
            _check_int(f"{key}.target_bits", self.target_bits, 1, MAX_BITS)
        if self.quantize_period is not None:
            _check_int(f"{key}.quantize_period", self.quantize_period, 1)
        if self.groups is not None:
            _check_int(f"{key}.groups", self.groups, 1)
        if self.scheme is not None:
            if not isinstance(self.scheme, QuantSpec):
                raise MoQConfigError(f"{key}.scheme", f"must be a qkit.QuantSpec, got {type(self.scheme).__name__}")
            if self.scheme.format is not None:
                raise MoQConfigError(
                    f"{key}.scheme",
                    f"is a floating-point scheme ({self.scheme.format}); MoQ descends through formats with "
                    "`format_schedule`, and through bit widths with integer schemes",
                )
            if self.groups is not None:
                raise MoQConfigError(
                    f"{key}.groups", "contradicts `scheme`, which already sets the granularity; give one of them"
                )
            if self.target_bits is None:
                object.__setattr__(self, "target_bits", self.scheme.bits)
            elif self.target_bits != self.scheme.bits:
                raise MoQConfigError(
                    f"{key}.target_bits",
                    f"is {self.target_bits} but `scheme.bits` is {self.scheme.bits}; they must agree",
                )


@dataclass(frozen=True)
class MoQConfig:
    """A MoQ run: which weights, which schedule, which quantizer.

    Schedule: the first ``schedule_offset`` optimizer steps train unquantized. From
    then on MoQ's step counter ``q`` counts quantized steps from 1; after every step
    each selected weight is replaced by its quantized value at its current bit width.
    The width starts at ``start_bits`` and drops by one on the step where ``q``
    reaches the weight's period; the period starts at ``quantize_period`` and on each
    drop doubles (times ``1 + floor(4·eig)`` with eigenvalue scheduling), until
    ``target_bits``.

    Attributes:
        enabled: ``False`` makes MoQ a no-op (an explicitly disabled DeepSpeed block).
        start_bits, target_bits: 1..16, ``start_bits >= target_bits``. Below 3 bits the
            DeepSpeed quantizer is ternary (2) or binary (1); those need symmetric,
            nearest rounding, and no quantizer kernel for 1 bit.
        quantize_period: steps to the first drop (>= 1).
        schedule_offset: unquantized warm-up steps (>= 0).
        groups: quantization groups per weight (must divide each weight's size).
        symmetric: symmetric (``True``) or asymmetric ranges.
        rounding: ``"nearest"`` or ``"stochastic"``.
        fp16_mixed_quantize: store ``r·w + (1 - r)·q(w)``, ``r`` falling from 1 by
            ``quantize_change_ratio`` per step and reset to 1 on every bit drop.
        quantize_change_ratio: in (0, 1].
        use_quantizer_kernel: quantize with qkit's ``fake_quantize`` op (any device,
            2..16 bits) instead of DeepSpeed's pure-PyTorch formulas.
        verbose: log eigenvalues and per-step details (bit drops are always logged).
        master_weights: keep a full-precision master copy of every selected weight
            (as DeepSpeed's fp16 optimizer did, the only setting its MoQ ran under):
            the optimizer's update of the quantized weight is applied to the master,
            and the master is what gets quantized. Without it the weights are
            quantized in place and updates smaller than half a quantization step are
            rounded away, which stalls training at low widths.
        eigenvalue: :class:`EigenvalueConfig`.
        include: module-name patterns to select (empty: every module); only
            parameters with more than one dimension are ever selected.
        exclude: module-name patterns to leave alone (wins over ``include``).
        different_groups: per-pattern overrides (:class:`GroupConfig`).
        format_schedule: floating-point formats to descend through instead of bit widths,
            e.g. ``("e4m3", "e3m2", "e2m1")``: a weight starts in the first and moves to
            the next on the steps a bit drop would happen (same periods, doubling,
            eigenvalue factors, mixed-precision resets), quantized by
            ``qkit.fake_quantize_fp``. Rules: formats from ``e4m3``, ``e5m2``, ``e3m2``,
            ``e2m3``, ``e2m1``, each at most once, never more bits than the one before
            (``e5m2`` -> ``e4m3`` is allowed, ``e2m1`` -> ``e3m2`` is not); the bit schedule
            is then unused, so ``start_bits``/``target_bits`` (also per group) must keep
            their defaults, no group may have a ``scheme``, ``use_quantizer_kernel`` must be
            off and ``symmetric`` on (FP formats are symmetric). ``rounding="stochastic"``
            rounds stochastically; ``groups`` are the absmax scale groups.
        format_scaling: ``"absmax"`` (``groups`` fp32 scales per weight), ``"mx"`` (E8M0
            scale per 32 elements) or ``"nvfp4"`` (``e2m1`` only, E4M3 scale per 16); mx and
            nvfp4 fix the groups (``groups`` must stay 1) and need weights of whole blocks.
            Only with ``format_schedule``.
    """

    enabled: bool = True
    start_bits: int = 16
    target_bits: int = 8
    quantize_period: int = 1000
    schedule_offset: int = 0
    groups: int = 1
    symmetric: bool = True
    rounding: str = "nearest"
    fp16_mixed_quantize: bool = False
    quantize_change_ratio: float = 0.001
    use_quantizer_kernel: bool = False
    verbose: bool = False
    master_weights: bool = True
    eigenvalue: EigenvalueConfig = field(default_factory=EigenvalueConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    different_groups: tuple[GroupConfig, ...] = ()
    format_schedule: tuple[str, ...] | None = None
    format_scaling: str = "absmax"

    def __post_init__(self) -> None:
        _check_bool("enabled", self.enabled)
        _check_int("start_bits", self.start_bits, 1, MAX_BITS)
        _check_int("target_bits", self.target_bits, 1, MAX_BITS)
        _check_int("quantize_period", self.quantize_period, 1)
        _check_int("schedule_offset", self.schedule_offset, 0)
        _check_int("groups", self.groups, 1)
        _check_bool("symmetric", self.symmetric)
        if self.rounding not in ROUNDING_MODES:
            raise MoQConfigError("rounding", f"must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        _check_bool("fp16_mixed_quantize", self.fp16_mixed_quantize)
        _check_float("quantize_change_ratio", self.quantize_change_ratio, 0.0, 1.0, low_open=True)
        _check_bool("use_quantizer_kernel", self.use_quantizer_kernel)
        _check_bool("verbose", self.verbose)
        _check_bool("master_weights", self.master_weights)
        if isinstance(self.eigenvalue, Mapping):
            object.__setattr__(self, "eigenvalue", EigenvalueConfig(**self.eigenvalue))
        if not isinstance(self.eigenvalue, EigenvalueConfig):
            raise MoQConfigError("eigenvalue", f"must be an EigenvalueConfig, got {type(self.eigenvalue).__name__}")
        object.__setattr__(self, "include", _pattern_tuple("include", self.include))
        object.__setattr__(self, "exclude", _pattern_tuple("exclude", self.exclude))
        groups = tuple(self.different_groups)
        for g in groups:
            if not isinstance(g, GroupConfig):
                raise MoQConfigError("different_groups", f"entries must be GroupConfig, got {type(g).__name__}")
        names = [g.name for g in groups]
        for name in names:
            if names.count(name) > 1:
                raise MoQConfigError(f"different_groups.{name}", "is defined twice")
        object.__setattr__(self, "different_groups", groups)
        self._check_format_schedule()
        # The schedule of every group (and of the defaults) must be reachable.
        for g in groups:
            self._check_schedule(f"different_groups.{g.name}.", *self.bits_of(g), g.scheme)
        self._check_schedule("", self.start_bits, self.target_bits, None)

    def _check_format_schedule(self) -> None:
        fs, scaling = self.format_schedule, self.format_scaling
        if scaling not in SCALINGS:
            raise MoQConfigError("format_scaling", f"must be one of {SCALINGS}, got {scaling!r}")
        if fs is None:
            if scaling != "absmax":
                raise MoQConfigError("format_scaling", f"is {scaling!r}, but `format_schedule` is not set")
            return
        if isinstance(fs, str) or not isinstance(fs, (list, tuple)):
            raise MoQConfigError("format_schedule", f"must be a list of formats such as ['e4m3', 'e2m1'], got {fs!r}")
        if not fs:
            raise MoQConfigError("format_schedule", "must name at least one format")
        for i, fmt in enumerate(fs):
            if fmt not in FORMATS:
                raise MoQConfigError(f"format_schedule[{i}]", f"must be one of {list(FORMATS)}, got {fmt!r}")
            if fmt in fs[:i]:
                raise MoQConfigError(f"format_schedule[{i}]", f"repeats {fmt!r}; each format may appear once")
            if i and fp_format_bits(fmt) > fp_format_bits(fs[i - 1]):
                raise MoQConfigError(
                    f"format_schedule[{i}]",
                    f"{fmt!r} ({fp_format_bits(fmt)} bits) follows {fs[i - 1]!r} ({fp_format_bits(fs[i - 1])} bits); "
                    "a schedule never gains bits",
                )
        object.__setattr__(self, "format_schedule", tuple(fs))
        if scaling == "nvfp4" and any(fmt != "e2m1" for fmt in fs):
            raise MoQConfigError(
                "format_scaling", f"nvfp4 scaling takes e2m1 only, but `format_schedule` is {list(fs)}"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in ("start_bits", "target_bits"):
            if getattr(self, key) != defaults[key]:
                raise MoQConfigError(
                    key, "contradicts `format_schedule`, which replaces the bit schedule; give one of them"
                )
        if self.use_quantizer_kernel:
            raise MoQConfigError(
                "use_quantizer_kernel",
                "contradicts `format_schedule`: formats are always quantized by qkit.fake_quantize_fp",
            )
        if not self.symmetric:
            raise MoQConfigError(
                "symmetric", "must be true with `format_schedule`: floating-point formats are symmetric"
            )
        if scaling in BLOCK and self.groups != 1:
            raise MoQConfigError(
                "groups", f"must be 1 with {scaling} scaling, whose {BLOCK[scaling]}-element blocks set the groups"
            )
        for g in self.different_groups:
            for key in ("scheme", "start_bits", "target_bits"):
                if getattr(g, key) is not None:
                    raise MoQConfigError(
                        f"different_groups.{g.name}.{key}",
                        "contradicts `format_schedule`, which replaces the bit schedule of every group",
                    )
            if scaling in BLOCK and g.groups is not None:
                raise MoQConfigError(
                    f"different_groups.{g.name}.groups", f"is set, but {scaling} scaling's blocks set the groups"
                )

    def bits_of(self, group: GroupConfig | None) -> tuple[int, int]:
        """``(start_bits, target_bits)`` of ``group`` (``None``: the defaults), inherited fields filled in."""
        if group is None:
            return self.start_bits, self.target_bits
        start = self.start_bits if group.start_bits is None else group.start_bits
        target = self.target_bits if group.target_bits is None else group.target_bits
        return start, target

    def _check_schedule(self, prefix: str, start: int, target: int, scheme: QuantSpec | None) -> None:
        if start < target:
            raise MoQConfigError(f"{prefix}start_bits", f"({start}) must be >= `{prefix}target_bits` ({target})")
        if scheme is not None:
            return  # the scheme's op takes 2..16 bits; QuantSpec already checked its own bits
        if self.use_quantizer_kernel and target < MIN_KERNEL_BITS:
            raise MoQConfigError(
                f"{prefix}target_bits",
                f"is {target}, but `use_quantizer_kernel` runs qkit.fake_quantize, which needs >= "
                f"{MIN_KERNEL_BITS} bits (1-bit binary MoQ is the pure-PyTorch path)",
            )
        if not self.use_quantizer_kernel and target <= 2:
            # DeepSpeed asserted this at the step the weights reached 2 bits; fail now instead.
            kind = "ternary" if target == 2 else "binary"
            if not self.symmetric:
                raise MoQConfigError(
                    "symmetric", f"asymmetric quantization has no {kind} ({target}-bit) form; `{prefix}target_bits`"
                )
            if self.rounding != "nearest":
                raise MoQConfigError(
                    "rounding", f"stochastic rounding has no {kind} ({target}-bit) form; `{prefix}target_bits`"
                )

    def replace(self, **changes: Any) -> MoQConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_deepspeed(cls, cfg: Mapping[str, Any] | str | os.PathLike[str]) -> MoQConfig:
        """Read a DeepSpeed config (a dict, or the path of a config file): see
        :func:`qkit.moq.deepspeed_config.read_deepspeed_config`."""
        from qkit.moq.deepspeed_config import read_deepspeed_config  # that module builds MoQConfigs

        return read_deepspeed_config(cfg)
