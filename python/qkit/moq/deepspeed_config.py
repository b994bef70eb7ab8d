"""DeepSpeed's MoQ configs, read into a :class:`qkit.moq.MoQConfig`.

:func:`read_deepspeed_config` (also :meth:`MoQConfig.from_deepspeed`) reads either of
DeepSpeed's two spellings of a MoQ run:

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

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qkit.moq.config import (
    EigenvalueConfig,
    GroupConfig,
    MoQConfig,
    MoQConfigError,
    _check_bool,
    _check_float,
    _pattern_tuple,
)

__all__ = ["Q_TYPES", "ROUNDINGS", "deepspeed_choice", "read_deepspeed_config", "read_deepspeed_file"]

#: DeepSpeed's spellings of the quantization type (0/1 are its old constants) -> ``symmetric``.
Q_TYPES: Mapping[object, bool] = {"symmetric": True, 0: True, "asymmetric": False, 1: False}
#: DeepSpeed's spellings of the rounding mode -> ``stochastic``.
ROUNDINGS: Mapping[object, bool] = {"nearest": False, 0: False, "stochastic": True, 1: True}


def deepspeed_choice(spellings: Mapping[object, bool], value: object) -> bool | None:
    """``spellings[value]`` (:data:`Q_TYPES`, :data:`ROUNDINGS`), or ``None`` for anything
    else, ``True``/``False`` included (a bool is a typo here, not DeepSpeed's 1/0)."""
    if isinstance(value, bool):
        return None
    try:
        return spellings.get(value)
    except TypeError:  # unhashable: no spelling of these
        return None


def read_deepspeed_config(cfg: Mapping[str, Any] | str | os.PathLike[str]) -> MoQConfig:
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
    """``symmetric`` from a ``q_type``/``quantization_type`` value."""
    symmetric = deepspeed_choice(Q_TYPES, value)
    if symmetric is None:
        raise MoQConfigError(key, f"must be 'symmetric' or 'asymmetric', got {value!r}")
    return symmetric


def _rounding(key: str, value: object) -> str:
    """``"nearest"``/``"stochastic"`` from a ``rounding`` value."""
    stochastic = deepspeed_choice(ROUNDINGS, value)
    if stochastic is None:
        raise MoQConfigError(key, f"must be 'nearest' or 'stochastic', got {value!r}")
    return "stochastic" if stochastic else "nearest"


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
                stacklevel=4,  # the caller of MoQConfig.from_deepspeed
            )
