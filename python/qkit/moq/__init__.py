"""MoQ (Mixture-of-Quantization): quantize weights during training, descending in bits on a schedule.

- :class:`MoQ` (:mod:`qkit.moq.moq`): the front for any model and optimizer
  (``MoQ(model, config).attach(optimizer)``); :mod:`qkit.moq.selection` picks its weights,
  :mod:`qkit.moq.master` keeps their master weights, :mod:`qkit.moq.state` checks its checkpoints.
- :class:`MoQConfig`, :class:`GroupConfig`, :class:`EigenvalueConfig` (:mod:`qkit.moq.config`);
  :meth:`MoQConfig.from_deepspeed` reads DeepSpeed JSON/hjson configs (:mod:`qkit.moq.deepspeed_config`).
- :class:`ScheduleEngine`, :class:`ParamSchedule`, :class:`QuantizerSettings`
  (:mod:`qkit.moq.schedule`): the one schedule engine, per-parameter state keyed by name.
- :class:`Quantizer` (:mod:`qkit.moq.quantizer`): DeepSpeed's runtime quantizer
  (``deepspeed.runtime.quantize``), same constructor, ``quantize(...)`` and parameter
  attributes, an adapter over the engine, its defects fixed.
- :func:`quantize_weight` and DeepSpeed's formulas (:mod:`qkit.moq.values`).
- :mod:`qkit.moq.eigenvalue`: per-block Hessian top eigenvalues (power iteration) and
  DeepSpeed's ``Eigenvalue`` class.
"""

from __future__ import annotations

from qkit.moq import eigenvalue
from qkit.moq.config import EigenvalueConfig, GroupConfig, MoQConfig, MoQConfigError
from qkit.moq.eigenvalue import Eigenvalue
from qkit.moq.moq import BitDrop, MoQ
from qkit.moq.quantizer import Quantizer
from qkit.moq.schedule import ParamSchedule, QuantizerSettings, ScheduleEngine
from qkit.moq.values import quantize_binary, quantize_highbit, quantize_ternary, quantize_weight

__all__ = [
    "BitDrop",
    "Eigenvalue",
    "EigenvalueConfig",
    "GroupConfig",
    "MoQ",
    "MoQConfig",
    "MoQConfigError",
    "ParamSchedule",
    "Quantizer",
    "QuantizerSettings",
    "ScheduleEngine",
    "eigenvalue",
    "quantize_binary",
    "quantize_highbit",
    "quantize_ternary",
    "quantize_weight",
]
