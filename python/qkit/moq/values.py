"""MoQ's weight values: one quantization of a weight at a given width (no schedule).

- :func:`quantize_highbit`, :func:`quantize_ternary`, :func:`quantize_binary`: DeepSpeed's
  own MoQ formulas (``deepspeed.runtime.quantize``), computed in the weight's dtype in
  DeepSpeed's order, so they match its runtime quantizer bit for bit; zero-range groups,
  which DeepSpeed turned into NaN, are left finite (see :mod:`qkit.moq.quantizer`).
- :func:`quantize_weight`: the dispatch the schedule uses: a :class:`qkit.QuantSpec`, the
  ``qkit.fake_quantize`` kernel (docs/ops.md §1, 2..16 bits), or the formulas above by width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkit import ops

__all__ = ["quantize_binary", "quantize_highbit", "quantize_ternary", "quantize_weight"]


def quantize_highbit(x: Tensor, bits: int, groups: int, symmetric: bool, stochastic: bool) -> Tensor:
    """DeepSpeed's uniform MoQ quantizer (3+ bits), group-wise, in ``x``'s dtype.

    With ``n = 2^bits`` and per group ``lo, hi = min, max``:

    - symmetric: ``s = 2·max(|lo|, |hi|) / n``; ``q = clamp(round(x/s + u), -n/2, n/2 - 1)·s``;
    - asymmetric: ``s = (hi - lo) / n``, ``z = round(lo/s)·s``;
      ``q = clamp(round((x - z)/s + u), 0, n - 1)·s + z``;

    ``round`` is half-to-even; ``u = 0`` (nearest) or ``u ~ U[-0.5, 0.5)`` drawn from
    torch's generator for ``x``'s device (stochastic). A group with ``s = 0`` is
    returned unchanged.

    Args:
        x: float tensor of any shape, ``M`` elements.
        bits: >= 1 (MoQ uses it for 3+).
        groups: ``G`` dividing ``M``; group ``g`` is a contiguous run of the flattened tensor.
        symmetric: symmetric or asymmetric ranges.
        stochastic: stochastic instead of nearest rounding.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype.
    """
    q_range = 2**bits
    if not symmetric and x.is_floating_point() and q_range - 1 > torch.finfo(x.dtype).max:
        # fp16 cannot hold the top code of 16-bit asymmetric (65535): DeepSpeed raised
        # there; compute in fp32 and round once.
        return quantize_highbit(x.float(), bits, groups, symmetric, stochastic).to(x.dtype)
    flat = x.reshape(groups, -1)
    g_min = flat.amin(dim=-1, keepdim=True)
    g_max = flat.amax(dim=-1, keepdim=True)
    # The draw happens whatever the range, so the generator advances as DeepSpeed's did.
    noise: Tensor | float = torch.empty_like(flat).uniform_(-0.5, 0.5) if stochastic else 0.0
    if symmetric:
        scale = 2 * torch.max(torch.abs(g_min), torch.abs(g_max)) / q_range
        out = (flat / scale + noise).round().clamp(-(q_range >> 1), (q_range >> 1) - 1) * scale
    else:
        scale = (g_max - g_min) / q_range
        zero_point = (g_min / scale).round() * scale
        out = ((flat - zero_point) / scale + noise).round().clamp(0, q_range - 1) * scale + zero_point
    out = torch.where(scale == 0, flat, out)  # DeepSpeed: 0/0 = NaN for a zero-range group
    return out.reshape(x.shape).contiguous()


def quantize_ternary(x: Tensor, groups: int) -> Tensor:
    """DeepSpeed's 2-bit MoQ quantizer: ternary ``{-a, 0, +a}`` per group, in ``x``'s dtype.

    Per group of ``n`` elements: threshold ``t = 0.7·mean|x|``; ``a`` = mean of ``|x|``
    over the elements with ``|x| > t``; output ``+a`` where ``x > t``, ``-a`` where
    ``x < -t``, else 0 (an all-zero group stays zero).

    Args:
        x: float tensor, ``M`` elements.
        groups: ``G`` dividing ``M``.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype.
    """
    flat = x.reshape(groups, -1)
    n = flat.shape[1]
    mean_abs = flat.norm(p=1, dim=1).div(n)
    thres = (0.7 * mean_abs).view(-1, 1)
    pos = (flat > thres).to(x.dtype)
    neg = (flat < -thres).to(x.dtype)
    mask = (flat.abs() > thres).to(x.dtype)
    kept = mask.sum(dim=1)
    alpha = ((mask * flat).abs().sum(dim=1) / kept).view(-1, 1)
    alpha = torch.where(kept.view(-1, 1) == 0, torch.zeros_like(alpha), alpha)  # DeepSpeed: 0/0 = NaN
    out = alpha * pos - alpha * neg
    return out.reshape(x.shape).contiguous()


def quantize_binary(x: Tensor, groups: int) -> Tensor:
    """DeepSpeed's 1-bit MoQ quantizer: ``sign(x)·mean|x|`` per group, in ``x``'s dtype.

    Args:
        x: float tensor, ``M`` elements.
        groups: ``G`` dividing ``M``.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype (zeros stay zero).
    """
    flat = x.reshape(groups, -1)
    n = flat.shape[1]
    mean_abs = flat.norm(p=1, dim=1, keepdim=True).div(n)
    return flat.sign().mul(mean_abs).reshape(x.shape).contiguous()


def quantize_weight(
    x: Tensor,
    bits: int,
    groups: int,
    symmetric: bool = True,
    stochastic: bool = False,
    use_kernel: bool = False,
    scheme: Any = None,
) -> Tensor:
    """One MoQ quantization of ``x`` at ``bits`` (no schedule, no blending).

    Args:
        x: float32/float16/bfloat16 tensor (not requiring grad), ``M`` elements.
        bits: current width; the pure path takes 1..16, the kernel and scheme paths 2..16.
        groups: ``G`` dividing ``M`` (ignored with ``scheme``).
        symmetric, stochastic: the scheme (ignored with ``scheme``).
        use_kernel: ``qkit.fake_quantize`` (docs/ops.md §1) instead of DeepSpeed's formulas.
        scheme: a :class:`qkit.QuantSpec`; quantize with ``scheme.with_bits(bits)``.

    Returns:
        A new tensor of ``x``'s shape and dtype.
    """
    if scheme is not None:
        return scheme.with_bits(bits).fake_quantize(x)
    if use_kernel:
        if bits < 2:
            raise ValueError(
                f"Quantizer: {bits}-bit quantization has no kernel (qkit.fake_quantize takes 2..16 bits); "
                "use the pure-PyTorch path (use_quantizer_kernel=False) for binary weights"
            )
        return ops.fake_quantize(x, groups, bits, symmetric, stochastic)
    if bits >= 3:
        return quantize_highbit(x, bits, groups, symmetric, stochastic)
    if not symmetric or stochastic:
        kind = "ternary" if bits == 2 else "binary"
        raise ValueError(f"Quantizer: {kind} ({bits}-bit) quantization needs q_type='symmetric' and 'nearest' rounding")
    if bits == 2:
        return quantize_ternary(x, groups)
    if bits == 1:
        return quantize_binary(x, groups)
    raise ValueError(f"Quantizer: bits must be >= 1, got {bits}")
