"""DeepSpeed drop-in: replace ``deepspeed.ops`` quantizer imports with these.

- ``from qkit.deepspeed import QuantizerBuilder``: ``QuantizerBuilder().load()`` returns
  :mod:`qkit.deepspeed.quantizer_op` (``ds_quantize_fp16``, ``quantize``, ``dequantize``, ...)
  with DeepSpeed's names and argument orders, backed by the prebuilt ``qkit._C``.
- ``from qkit.deepspeed import ds_quantizer``: DeepSpeed's in-place fake-quantization helper.

Importing this package does not need the compiled kernels; using them does.
"""

from __future__ import annotations

from qkit.deepspeed.builder import QuantizerBuilder
from qkit.deepspeed.quantizer import ds_quantizer
from qkit.deepspeed.quantizer_op import QuantizationType

__all__ = ["QuantizationType", "QuantizerBuilder", "ds_quantizer"]
