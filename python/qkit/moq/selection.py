"""Which weights MoQ schedules, with which settings, and its eigenvalue blocks.

A parameter is selected when it has more than one dimension and its module's dotted name
passes ``config.include``/``config.exclude``; a ``config.different_groups`` entry whose
patterns match the module gives it that group's settings (at most one group may match).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from qkit.moq.config import GroupConfig, MoQConfig, MoQConfigError, pattern_matches
from qkit.moq.eigenvalue import resolve_module
from qkit.moq.schedule import ParamSchedule

__all__ = ["SelectedWeight", "eigen_blocks", "initial_schedule", "select_weights"]


@dataclass(frozen=True)
class SelectedWeight:
    """One scheduled weight.

    Attributes:
        name: the parameter's name in the model (the schedule's key).
        module_name: its module's dotted name.
        param: the parameter (more than one dimension).
        group: the :class:`GroupConfig` it belongs to, or ``None`` (the config's defaults).
    """

    name: str
    module_name: str
    param: nn.Parameter
    group: GroupConfig | None


def _matching(model: nn.Module, config: MoQConfig) -> list[SelectedWeight]:
    selected = []
    for name, param in model.named_parameters():
        if param.dim() <= 1:
            continue
        module_name = name.rpartition(".")[0]
        if config.include and not any(pattern_matches(p, module_name) for p in config.include):
            continue
        if any(pattern_matches(p, module_name) for p in config.exclude):
            continue
        matches = [g for g in config.different_groups if any(pattern_matches(p, module_name) for p in g.modules)]
        if len(matches) > 1:
            raise MoQConfigError(
                f"different_groups.{matches[1].name}",
                f"and `different_groups.{matches[0].name}` both match module {module_name!r}; "
                "a weight may belong to one group only",
            )
        selected.append(SelectedWeight(name, module_name, param, matches[0] if matches else None))
    return selected


def _check_quantizable(config: MoQConfig, w: SelectedWeight) -> None:
    """The weight's groups (or its group's QuantSpec) fit its shape."""
    if w.group is not None and w.group.scheme is not None:
        try:
            w.group.scheme.check_shape(w.param.shape)
        except ValueError as exc:
            raise MoQConfigError(f"different_groups.{w.group.name}.scheme", f"{w.name}: {exc}") from None
        return
    own = w.group is not None and w.group.groups is not None
    groups = w.group.groups if own else config.groups
    key = f"different_groups.{w.group.name}.groups" if own else "groups"
    if w.param.numel() % groups != 0:
        raise MoQConfigError(key, f"({groups}) must divide the number of elements of {w.name!r} ({w.param.numel()})")


def select_weights(model: nn.Module, config: MoQConfig) -> list[SelectedWeight]:
    """The weights of ``model`` that ``config`` schedules, in model order (tied weights once).

    Raises:
        MoQConfigError: an enabled config selects no weight, a weight matches two groups,
            or a weight's group count (or QuantSpec) does not fit it. A group that matches
            no weight is only warned about.
    """
    selected = _matching(model, config)
    if config.enabled and not selected:
        raise MoQConfigError(
            "include",
            "selects no weight of the model (only parameters with more than one dimension are quantized); "
            "check `include`/`exclude`/`different_groups.*.modules` against model.named_modules()",
        )
    used = {w.group.name for w in selected if w.group is not None}
    for g in config.different_groups:
        if g.name not in used:
            # stacklevel 3: the caller of MoQ(...)
            warnings.warn(f"MoQ: `different_groups.{g.name}` matches no weight of the model", stacklevel=3)
    for w in selected:
        _check_quantizable(config, w)
    return selected


def initial_schedule(config: MoQConfig, group: GroupConfig | None) -> ParamSchedule:
    """The schedule a weight of ``group`` (``None``: the defaults) starts with."""
    start, target = config.bits_of(group)
    period = config.quantize_period
    if group is not None and group.quantize_period is not None:
        period = group.quantize_period
    return ParamSchedule(
        bits=start,
        target_bits=target,
        next_drop=period,
        groups=None if group is None else group.groups,
        scheme=None if group is None else group.scheme,
    )


def eigen_blocks(model: nn.Module, config: MoQConfig, selected: list[SelectedWeight]) -> list[list[nn.Parameter]]:
    """The blocks whose Hessian eigenvalues scale the periods: the children of
    ``config.eigenvalue.layer_name`` (its first ``layer_num``), or else every module that
    owns a selected weight. Each block is the list of its parameters (trainable ones for
    ``layer_name`` children)."""
    eig = config.eigenvalue
    if eig.layer_name is None:
        by_module: dict[str, list[nn.Parameter]] = {}
        for w in selected:
            by_module.setdefault(w.module_name, []).append(w.param)
        return list(by_module.values())
    container = resolve_module(model, eig.layer_name)
    layers = list(container.children())
    count = eig.layer_num or len(layers)
    if count > len(layers):
        raise MoQConfigError(
            "eigenvalue.layer_num", f"is {count} but {eig.layer_name!r} holds only {len(layers)} blocks"
        )
    return [[p for p in layer.parameters() if p.requires_grad] for layer in layers[:count]]
