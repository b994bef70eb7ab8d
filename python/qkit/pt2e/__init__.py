"""qkit in PyTorch's export-based quantization flow (PT2E), through torchao.

``QkitQuantizer`` annotates the ``linear``/``conv`` weights (and optionally their
input activations) of a ``torch.export``-ed model for torchao's ``prepare_pt2e``
(PTQ, :class:`QkitObserver`), ``prepare_qat_pt2e`` (QAT, :class:`QkitFakeQuantize`)
and ``convert_pt2e``. Both inserted modules run ``torch.ops.qkit.fake_quantize``,
so the prepared model computes exactly what the converted one will.

torchao is an optional dependency: ``pip install torchao`` (or ``pip install
'qkit[pt2e]'``). ``import qkit`` never imports it.
"""

from __future__ import annotations

try:
    import torchao.quantization.pt2e.quantizer  # noqa: F401 - probe: the PT2E quantizer API
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "qkit.pt2e needs torchao (>= 0.18), which is not installed: pip install torchao (or pip install 'qkit[pt2e]')"
    ) from exc

from qkit.pt2e.observers import QkitFakeQuantize, QkitObserver
from qkit.pt2e.quantizer import QkitQuantizer

__all__ = ["QkitFakeQuantize", "QkitObserver", "QkitQuantizer"]
