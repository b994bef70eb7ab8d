"""MoQ (Mixture-of-Quantization): quantize weights during training, descending in bits on a schedule.

- :class:`MoQ`: the front for any model and optimizer (``MoQ(model, config).attach(optimizer)``).
- :class:`MoQConfig` (:meth:`MoQConfig.from_deepspeed` reads DeepSpeed JSON configs),
  :class:`GroupConfig`, :class:`EigenvalueConfig`.
- :class:`Quantizer`: DeepSpeed's runtime quantizer (``deepspeed.runtime.quantize``),
  same constructor and ``quantize(...)``, same schedule and values, its defects fixed.
- :mod:`qkit.moq.eigenvalue`: per-block Hessian top eigenvalues (power iteration) and
  DeepSpeed's ``Eigenvalue`` class.
"""

from __future__ import annotations

from qkit.moq import eigenvalue
from qkit.moq.config import EigenvalueConfig, GroupConfig, MoQConfig, MoQConfigError
from qkit.moq.eigenvalue import Eigenvalue
from qkit.moq.moq import BitDrop, MoQ
from qkit.moq.quantizer import Quantizer, quantize_binary, quantize_highbit, quantize_ternary, quantize_weight

__all__ = [
    "BitDrop",
    "Eigenvalue",
    "EigenvalueConfig",
    "GroupConfig",
    "MoQ",
    "MoQConfig",
    "MoQConfigError",
    "Quantizer",
    "eigenvalue",
    "quantize_binary",
    "quantize_highbit",
    "quantize_ternary",
    "quantize_weight",
]
