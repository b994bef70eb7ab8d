"""MoQ's master weights: the full-precision value behind every quantized weight.

DeepSpeed's MoQ only ran under its fp16 optimizer, which steps an fp32 master copy and
copies it into the fp16 model before MoQ quantizes the model: the quantized weights never
feed back into the optimizer (a straight-through estimator). :class:`MasterWeights` does
the same for any optimizer. It keeps each weight's residual ``master - quantized`` (fp32,
or the weight's dtype if wider), so after an optimizer step ``master = weight + residual``;
the master is quantized into the weight and the residual updated. The optimizer sees and
updates the quantized weight; its update carries over to the master exactly for any
optimizer whose update does not read the weight's value (weight decay acts on the
quantized value).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["MasterWeights", "master_dtype"]


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The master's dtype for a weight of ``dtype``: fp32 for fp16/bf16 weights (DeepSpeed's),
    the weight's own dtype when wider."""
    return torch.promote_types(dtype, torch.float32)


class MasterWeights:
    """Residuals ``master - quantized`` of weights, by name.

    Args:
        params: ``{name: parameter}``; every residual starts as ``None`` (master = weight).

    Attributes:
        residuals: ``{name: residual or None}``, each of its parameter's shape, in
            :func:`master_dtype` of its dtype, on its device.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        self.residuals: dict[str, Tensor | None] = dict.fromkeys(self.params)

    def masters(self) -> dict[str, Tensor]:
        """Every master (``weight + residual``, a fresh tensor), by name."""
        out = {}
        for name, p in self.params.items():
            w = p.detach().to(master_dtype(p.dtype), copy=True)
            residual = self.residuals[name]
            out[name] = w if residual is None else w + residual
        return out

    def load(self) -> dict[str, Tensor]:
        """Put every master into its parameter (rounded to the parameter's dtype, as DeepSpeed's
        fp32 -> fp16 copy did) and return the masters."""
        masters = {}
        with torch.no_grad():
            for name, p in self.params.items():
                master = p.detach().to(master_dtype(p.dtype), copy=True)
                residual = self.residuals[name]
                if residual is not None:
                    master += residual
                p.copy_(master)
                masters[name] = master
        return masters

    def record(self, masters: Mapping[str, Tensor]) -> None:
        """After the parameters were quantized from ``masters`` (:meth:`load`): keep ``master - weight``."""
        for name, master in masters.items():
            self.residuals[name] = master - self.params[name].detach().to(master.dtype)
