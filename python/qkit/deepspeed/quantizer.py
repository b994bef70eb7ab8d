"""DeepSpeed's ``ds_quantizer`` helper (``deepspeed.ops.quantizer``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qkit.deepspeed import quantizer_op

_FakeQuantizer = Callable[[Tensor, int, int], Tensor]

# (sr, asym) -> (fp16 kernel, fp32 kernel). The suffix is only DeepSpeed's name:
# every variant takes fp32, fp16 and bf16 alike.
_KERNELS: dict[tuple[bool, bool], tuple[_FakeQuantizer, _FakeQuantizer]] = {
    (False, False): (quantizer_op.ds_quantize_fp16, quantizer_op.ds_quantize_fp32),
    (False, True): (quantizer_op.ds_quantize_asym_fp16, quantizer_op.ds_quantize_asym_fp32),
    (True, False): (quantizer_op.ds_sr_quantize_fp16, quantizer_op.ds_sr_quantize_fp32),
    (True, True): (quantizer_op.ds_sr_quantize_asym_fp16, quantizer_op.ds_sr_quantize_asym_fp32),
}


def ds_quantizer(input: Tensor, groups: int = 1, bit_num: int = 8, sr: bool = False, asym: bool = False) -> Tensor:
    """Fake-quantize ``input`` in place, group-wise, and return it (DeepSpeed's helper).

    Args:
        input: fp32, fp16 or bf16 tensor of ``M`` elements, any shape.
        groups: ``G``, dividing ``M``; groups are contiguous runs of the flattened tensor.
        bit_num: bits, 2..16.
        sr: stochastic rounding (torch's generator) instead of round-to-nearest.
        asym: asymmetric (min/max around the midpoint) instead of symmetric.

    Returns:
        ``input`` itself, overwritten with ``dequantize(quantize(input))``.
    """
    fp16_kernel, fp32_kernel = _KERNELS[bool(sr), bool(asym)]
    kernel = fp16_kernel if isinstance(input, Tensor) and input.dtype == torch.float16 else fp32_kernel
    return kernel(input, groups, bit_num)
