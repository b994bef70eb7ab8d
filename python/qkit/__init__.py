"""qkit: group-wise quantization kernels for PyTorch.

``import qkit`` loads the compiled kernels once and registers ``torch.ops.qkit.*``.
"""

from __future__ import annotations

import torch  # noqa: F401 - libtorch must be loaded before qkit._C

from qkit import zeropp_ops  # noqa: F401 - registers the ZeRO++ ops
from qkit._loader import QkitLoadError
from qkit.fp_ops import dequantize_fp, fake_quantize_fp, fake_quantize_fp_, quantize_fp
from qkit.ops import QkitTypeError, QkitValueError, dequantize, fake_quantize, fake_quantize_, quantize
from qkit.quant_spec import QuantSpec

__version__ = "0.1.0"

__all__ = [
    "QkitLoadError",
    "QkitTypeError",
    "QkitValueError",
    "QuantSpec",
    "__version__",
    "dequantize",
    "dequantize_fp",
    "fake_quantize",
    "fake_quantize_",
    "fake_quantize_fp",
    "fake_quantize_fp_",
    "quantize",
    "quantize_fp",
]
