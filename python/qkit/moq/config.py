"""MoQ configuration: typed, validated, and readable from DeepSpeed config files (JSON/hjson).

:class:`MoQConfig` is the one description of a MoQ run. :meth:`MoQConfig.from_deepspeed`
reads either of DeepSpeed's two spellings of it:

- the ``quantize_training`` block of the MoQ tutorial (``quantize_bits``,
  ``quantize_schedule``, ``quantize_groups``, ``quantize_algo``/``quantize-algo``,
  ``fp16_mixed_quantize``, ``quantizer_kernel``, ``quantize_verbose``, ``eigenvalue``);
- the ``compression_training.weight_quantization`` block (``shared_parameters`` and
  ``different_groups``).

DeepSpeed read these with ``dict.get`` and defaults, so a misspelt key (the tutorial's
own ``quantize-algo``, for one) silently fell back to a default, and a config whose
``enabled`` flag was missing trained unquantized. Here every key is checked: an unknown
key, a value of the wrong type, or two keys that contradict each other raise
:class:`MoQConfigError` naming the key by its full path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "read_deepspeed_file",
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
        # The schedule of every group (and of the defaults) must be reachable.
        for g in groups:
            self._check_schedule(f"different_groups.{g.name}.", *self.bits_of(g), g.scheme)
        self._check_schedule("", self.start_bits, self.target_bits, None)

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

    # ------------------------------------------------------------ DeepSpeed JSON

    @classmethod
    def from_deepspeed(cls, cfg: Mapping[str, Any] | str | os.PathLike[str]) -> MoQConfig:
        """Read a DeepSpeed config (a dict, or the path of a config file).

        A file is parsed as DeepSpeed parses it: hjson, a superset of JSON (comments, trailing
        commas, unquoted keys), with duplicate keys refused (see :func:`read_deepspeed_file`).

        Only the MoQ parts are read: ``quantize_training`` or
        ``compression_training.weight_quantization``; the rest of the file (optimizer,
        fp16, ...) is ignored. Missing MoQ keys take DeepSpeed's defaults. A config with
        neither block, with both enabled, with an unknown key inside them, or with
        keys that contradict each other raises :class:`MoQConfigError`.
        """
        if isinstance(cfg, (str, os.PathLike)):
            cfg = read_deepspeed_file(cfg)
        if not isinstance(cfg, Mapping):
            raise MoQConfigError("<config>", f"must be a JSON object, got {type(cfg).__name__}")
        legacy = cfg.get("quantize_training")
        compression = cfg.get("compression_training")
        wq = None
        if compression is not None:
            _require_mapping("compression_training", compression)
            _warn_other_techniques(compression)
            wq = compression.get("weight_quantization")
        if legacy is None and wq is None:
            raise MoQConfigError(
                "quantize_training",
                "not found: the config has neither `quantize_training` nor `compression_training.weight_quantization`",
            )
        if legacy is not None and wq is not None:
            legacy_on = _require_mapping("quantize_training", legacy).get("enabled") is True
            shared = _require_mapping("compression_training.weight_quantization", wq).get("shared_parameters", {})
            wq_on = isinstance(shared, Mapping) and shared.get("enabled") is True
            if legacy_on and wq_on:
                raise MoQConfigError(
                    "compression_training.weight_quantization",
                    "and `quantize_training` are both enabled; DeepSpeed used only one of them - keep one",
                )
            return _from_quantize_training(legacy) if legacy_on else _from_weight_quantization(wq)
        if legacy is not None:
            return _from_quantize_training(legacy)
        return _from_weight_quantization(wq)


# ---------------------------------------------------------------- DeepSpeed files


def read_deepspeed_file(path: str | os.PathLike[str]) -> Any:
    """Parse a DeepSpeed config file the way DeepSpeed does: hjson (JSON plus comments, trailing
    commas and unquoted keys), refusing duplicate keys.

    hjson is a dependency of qkit (DeepSpeed's own parser; pure Python). Where it is missing
    (qkit installed with ``--no-deps``) the file is read as plain JSON, and a file that needs
    hjson raises an error saying to install it.

    Raises:
        MoQConfigError: the file does not parse, or an object repeats a key (a later value
            would silently replace the earlier one).
    """
    path = Path(path)
    text = path.read_text()
    try:
        import hjson
    except ImportError:
        try:
            return json.loads(text, object_pairs_hook=_refuse_duplicates(path))
        except json.JSONDecodeError as exc:
            raise MoQConfigError(
                str(path),
                f"is not valid JSON ({exc}); DeepSpeed configs may use hjson syntax (comments, trailing "
                "commas), which needs the `hjson` package: pip install hjson",
            ) from None
    try:
        return hjson.loads(text, object_pairs_hook=_refuse_duplicates(path))
    except hjson.HjsonDecodeError as exc:
        raise MoQConfigError(str(path), f"is not valid JSON or hjson, DeepSpeed's config syntax ({exc})") from None


def _refuse_duplicates(path: Path) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                # DeepSpeed refuses these too; the last value winning would hide a typo.
                raise MoQConfigError(str(key), f"appears twice in one object of {path}")
            out[key] = value
        return out

    return hook


# ---------------------------------------------------------------- DeepSpeed readers

# DeepSpeed's defaults for the `quantize_training` block (runtime constants).
_QT_DEFAULTS = {
    "start_bits": 16,
    "target_bits": 8,
    "quantize_period": 1000,
    "schedule_offset": 1000,
    "quantize_groups": 1,
    "quantize_change_ratio": 0.001,
}
# ... and for `compression_training.weight_quantization`.
_WQ_DEFAULTS = {"schedule_offset": 0, "quantize_groups": 1, "quantization_period": 1, "quantize_change_ratio": 0.001}

# deviation: moq-config-strict (DeepSpeed read every key with .get and a default)
_MISSING_ENABLED = "is missing; DeepSpeed treated that as disabled and trained unquantized - set it explicitly"


def _required_enabled(path: str, block: dict) -> bool:
    """``block["enabled"]``, which must be given (DeepSpeed's silent default was off)."""
    if "enabled" not in block:
        raise MoQConfigError(f"{path}.enabled", _MISSING_ENABLED)
    return _check_bool(f"{path}.enabled", block["enabled"])


_EIGENVALUE_KEYS = (
    "enabled",
    "verbose",
    "max_iter",
    "tol",
    "stability",
    "gas_boundary_resolution",
    "layer_name",
    "layer_num",
)


def _require_mapping(key: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MoQConfigError(key, f"must be an object, got {value!r}")
    return value


def _check_keys(key: str, block: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for k in block:
        if k not in allowed:
            hint = ", ".join(allowed)
            raise MoQConfigError(f"{key}.{k}", f"is not a known key here (known: {hint})")


def _q_type(key: str, value: object) -> bool:
    # DeepSpeed spelled it as a string or as 0/1 (its old constants); returns `symmetric`.
    if value in ("symmetric", 0) and not isinstance(value, bool):
        return True
    if value in ("asymmetric", 1) and not isinstance(value, bool):
        return False
    raise MoQConfigError(key, f"must be 'symmetric' or 'asymmetric', got {value!r}")


def _rounding(key: str, value: object) -> str:
    if value in ("nearest", 0) and not isinstance(value, bool):
        return "nearest"
    if value in ("stochastic", 1) and not isinstance(value, bool):
        return "stochastic"
    raise MoQConfigError(key, f"must be 'nearest' or 'stochastic', got {value!r}")


def _mixed(key: str, block: object, default_ratio: float) -> tuple[bool, float]:
    if block is None:
        return False, default_ratio
    block = _require_mapping(key, block)
    _check_keys(key, block, ("enabled", "quantize_change_ratio"))
    enabled = _check_bool(f"{key}.enabled", block.get("enabled", False))
    ratio = block.get("quantize_change_ratio", default_ratio)
    _check_float(f"{key}.quantize_change_ratio", ratio, 0.0, 1.0, low_open=True)
    return enabled, float(ratio)


def _rekey(error: MoQConfigError, prefix: str, mapping: Mapping[str, str]) -> MoQConfigError:
    """A dataclass validation error re-keyed to the DeepSpeed key the value came from."""
    key = mapping.get(error.key)
    return error if key is None else MoQConfigError(f"{prefix}.{key}", error.message)


_QT_FIELD_KEYS = {
    "start_bits": "quantize_bits.start_bits",
    "target_bits": "quantize_bits.target_bits",
    "quantize_period": "quantize_schedule.quantize_period",
    "schedule_offset": "quantize_schedule.schedule_offset",
    "groups": "quantize_groups",
    "symmetric": "quantize_algo.q_type",
    "rounding": "quantize_algo.rounding",
    "use_quantizer_kernel": "quantizer_kernel",
}


def _from_quantize_training(block: object) -> MoQConfig:
    p = "quantize_training"
    block = _require_mapping(p, block)
    _check_keys(
        p,
        block,
        (
            "enabled",
            "quantize_verbose",
            "quantizer_kernel",
            "quantize_type",
            "quantize_algo",
            "quantize-algo",
            "quantize_bits",
            "quantize_schedule",
            "quantize_groups",
            "fp16_mixed_quantize",
            "eigenvalue",
        ),
    )
    enabled = _required_enabled(p, block)

    if "quantize_algo" in block and "quantize-algo" in block:
        raise MoQConfigError(f"{p}.quantize-algo", "and `quantize_algo` are both given; keep one spelling")
    algo_key = "quantize-algo" if "quantize-algo" in block else "quantize_algo"
    algo = _require_mapping(f"{p}.{algo_key}", block.get(algo_key, {}))
    _check_keys(f"{p}.{algo_key}", algo, ("q_type", "rounding"))
    symmetric = _q_type(f"{p}.{algo_key}.q_type", algo.get("q_type", "symmetric"))
    if "quantize_type" in block:  # the tutorial's other spelling of q_type
        alias = _q_type(f"{p}.quantize_type", block["quantize_type"])
        if "q_type" in algo and alias != symmetric:
            raise MoQConfigError(f"{p}.quantize_type", f"contradicts `{p}.{algo_key}.q_type`")
        symmetric = alias
    rounding = _rounding(f"{p}.{algo_key}.rounding", algo.get("rounding", "nearest"))

    bits = _require_mapping(f"{p}.quantize_bits", block.get("quantize_bits", {}))
    _check_keys(f"{p}.quantize_bits", bits, ("start_bits", "target_bits"))
    schedule = _require_mapping(f"{p}.quantize_schedule", block.get("quantize_schedule", {}))
    _check_keys(f"{p}.quantize_schedule", schedule, ("quantize_period", "schedule_offset"))
    mixed, ratio = _mixed(f"{p}.fp16_mixed_quantize", block.get("fp16_mixed_quantize"), 0.001)

    eig = _require_mapping(f"{p}.eigenvalue", block.get("eigenvalue", {}))
    _check_keys(f"{p}.eigenvalue", eig, _EIGENVALUE_KEYS)
    eig_kwargs = dict(eig)
    if eig_kwargs.get("layer_num", 0) and "layer_name" not in eig_kwargs:
        eig_kwargs["layer_name"] = "bert.encoder.layer"  # DeepSpeed's default container
    try:
        eigenvalue = EigenvalueConfig(**eig_kwargs)
    except MoQConfigError as exc:
        raise MoQConfigError(f"{p}.{exc.key}", exc.message) from None

    kwargs = {
        "enabled": enabled,
        "start_bits": bits.get("start_bits", _QT_DEFAULTS["start_bits"]),
        "target_bits": bits.get("target_bits", _QT_DEFAULTS["target_bits"]),
        "quantize_period": schedule.get("quantize_period", _QT_DEFAULTS["quantize_period"]),
        "schedule_offset": schedule.get("schedule_offset", _QT_DEFAULTS["schedule_offset"]),
        "groups": block.get("quantize_groups", _QT_DEFAULTS["quantize_groups"]),
        "symmetric": symmetric,
        "rounding": rounding,
        "fp16_mixed_quantize": mixed,
        "quantize_change_ratio": ratio,
        "use_quantizer_kernel": block.get("quantizer_kernel", False),
        "verbose": block.get("quantize_verbose", False),
        "eigenvalue": eigenvalue,
    }
    mapping = dict(_QT_FIELD_KEYS, verbose="quantize_verbose")
    if algo_key != "quantize_algo":
        mapping["symmetric"] = f"{algo_key}.q_type"
        mapping["rounding"] = f"{algo_key}.rounding"
    try:
        return MoQConfig(**kwargs)
    except MoQConfigError as exc:
        raise _rekey(exc, p, mapping) from None


def _from_weight_quantization(wq: object) -> MoQConfig:
    p = "compression_training.weight_quantization"
    wq = _require_mapping(p, wq)
    _check_keys(p, wq, ("shared_parameters", "different_groups"))
    shared = _require_mapping(f"{p}.shared_parameters", wq.get("shared_parameters", {}))
    sp = f"{p}.shared_parameters"
    _check_keys(
        sp,
        shared,
        (
            "enabled",
            "quantizer_kernel",
            "schedule_offset",
            "quantize_groups",
            "quantize_verbose",
            "quantization_type",
            "quantize_weight_in_forward",
            "rounding",
            "fp16_mixed_quantize",
        ),
    )
    enabled = _required_enabled(sp, shared)
    if _check_bool(f"{sp}.quantize_weight_in_forward", shared.get("quantize_weight_in_forward", False)):
        raise MoQConfigError(
            f"{sp}.quantize_weight_in_forward",
            "is true, which selects DeepSpeed's forward-pass QAT, not MoQ; qkit.moq implements MoQ "
            "(quantize after each optimizer step) - set it to false, or fake-quantize in forward with qkit.QuantSpec",
        )
    symmetric = _q_type(f"{sp}.quantization_type", shared.get("quantization_type", "symmetric"))
    rounding = _rounding(f"{sp}.rounding", shared.get("rounding", "nearest"))
    mixed, ratio = _mixed(f"{sp}.fp16_mixed_quantize", shared.get("fp16_mixed_quantize"), 0.001)

    raw_groups = _require_mapping(f"{p}.different_groups", wq.get("different_groups", {}))
    if enabled and not raw_groups:
        raise MoQConfigError(f"{p}.different_groups", "is empty; with weight quantization enabled it must name modules")
    groups = []
    for name, entry in raw_groups.items():
        gk = f"{p}.different_groups.{name}"
        entry = _require_mapping(gk, entry)
        _check_keys(gk, entry, ("params", "modules", "related_modules"))
        if entry.get("related_modules") is not None:
            raise MoQConfigError(
                f"{gk}.related_modules", "only applies to pruning; weight quantization has no related modules"
            )
        if "modules" not in entry:
            raise MoQConfigError(f"{gk}.modules", "is missing (DeepSpeed's default '*' matched nothing)")
        params = _require_mapping(f"{gk}.params", entry.get("params"))
        _check_keys(f"{gk}.params", params, ("start_bits", "target_bits", "quantization_period", "quantize_groups"))
        for required in ("start_bits", "target_bits"):
            if required not in params:
                raise MoQConfigError(f"{gk}.params.{required}", "is missing")
        modules = _pattern_tuple(f"{gk}.modules", entry["modules"])
        try:
            groups.append(
                GroupConfig(
                    name=name,
                    modules=modules,
                    start_bits=params["start_bits"],
                    target_bits=params["target_bits"],
                    quantize_period=params.get("quantization_period", _WQ_DEFAULTS["quantization_period"]),
                    groups=params.get("quantize_groups"),
                )
            )
        except MoQConfigError as exc:
            leaf = exc.key.split(".")[-1]
            leaf = {"quantize_period": "quantization_period", "groups": "quantize_groups"}.get(leaf, leaf)
            raise MoQConfigError(f"{gk}.params.{leaf}", exc.message) from None
    # Only the modules the groups name are quantized (DeepSpeed's rule).
    include = tuple(dict.fromkeys(pattern for g in groups for pattern in g.modules))
    first = groups[0] if groups else None
    kwargs = {
        "enabled": enabled,
        "start_bits": first.start_bits if first else 16,
        "target_bits": first.target_bits if first else 8,
        "quantize_period": first.quantize_period if first else _WQ_DEFAULTS["quantization_period"],
        "schedule_offset": shared.get("schedule_offset", _WQ_DEFAULTS["schedule_offset"]),
        "groups": shared.get("quantize_groups", _WQ_DEFAULTS["quantize_groups"]),
        "symmetric": symmetric,
        "rounding": rounding,
        "fp16_mixed_quantize": mixed,
        "quantize_change_ratio": ratio,
        "use_quantizer_kernel": shared.get("quantizer_kernel", False),
        "verbose": shared.get("quantize_verbose", False),
        "include": include if include else ("*",),
        "different_groups": tuple(groups),
    }
    mapping = {
        "schedule_offset": "shared_parameters.schedule_offset",
        "groups": "shared_parameters.quantize_groups",
        "use_quantizer_kernel": "shared_parameters.quantizer_kernel",
        "verbose": "shared_parameters.quantize_verbose",
        "symmetric": "shared_parameters.quantization_type",
        "rounding": "shared_parameters.rounding",
    }
    try:
        return MoQConfig(**kwargs)
    except MoQConfigError as exc:
        if exc.key.startswith("different_groups."):
            # different_groups.<name>.<field> -> the DeepSpeed key under `params`
            name_field = exc.key.removeprefix("different_groups.")
            name, _, leaf = name_field.rpartition(".")
            leaf = {"quantize_period": "quantization_period", "groups": "quantize_groups"}.get(leaf, leaf)
            raise MoQConfigError(f"{p}.different_groups.{name}.params.{leaf}", exc.message) from None
        raise _rekey(exc, p, mapping) from None


_OTHER_TECHNIQUES = (
    "activation_quantization",
    "sparse_pruning",
    "row_pruning",
    "head_pruning",
    "channel_pruning",
    "layer_reduction",
)


def _warn_other_techniques(compression: Mapping[str, Any]) -> None:
    for key, value in compression.items():
        if key == "weight_quantization":
            continue
        if key not in _OTHER_TECHNIQUES:
            raise MoQConfigError(f"compression_training.{key}", "is not a known DeepSpeed compression technique")
        shared = value.get("shared_parameters", value) if isinstance(value, Mapping) else {}
        if isinstance(shared, Mapping) and shared.get("enabled") is True:
            warnings.warn(
                f"MoQ config: `compression_training.{key}` is enabled, but qkit.moq only implements weight "
                "quantization (MoQ); that technique is not applied",
                stacklevel=3,
            )
