"""Independent pure-PyTorch reference of qkit's core quantizer (OPS.md §1-3).

Every step is one fp32 torch op, in the order the spec gives, so nearest-rounding
results must match the kernels bit for bit. No qkit import on purpose.

Conventions the spec leaves open, chosen here (and checked by the tests):
- a group holding a NaN or +-Inf gets NaN params and NaN output; its codes are
  undefined (``ref_quantize`` returns them, but tests mask them with ``ref_finite_mask``);
- an empty group (``E == 0``) has ``m == 0`` (``mx == mn``): step 1, offset 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLT_MAX = torch.finfo(torch.float32).max


def code_range(bits: int) -> tuple[float, float]:
    return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)


def _groups_of(x: Tensor, groups: int) -> Tensor:
    """x flattened in logical order, as fp32 ``[G, E]``."""
    return x.detach().cpu().reshape(-1).to(torch.float32).reshape(groups, -1)


def ref_finite_mask(x: Tensor, groups: int) -> Tensor:
    """Per element (flattened): True where the element's group is all finite."""
    xg = _groups_of(x, groups)
    return torch.isfinite(xg).all(dim=1, keepdim=True).expand_as(xg).reshape(-1)


def ref_params(x: Tensor, groups: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, step, offset), each fp32 ``[G, 1]``."""
    xg = _groups_of(x, groups)
    half = torch.tensor(float(2 ** (bits - 1)), dtype=torch.float32)
    zero = torch.zeros(groups, 1, dtype=torch.float32)
    if xg.shape[1] == 0:
        scale, offset = torch.ones(groups, 1), zero
    elif symmetric:
        m = xg.abs().amax(dim=1, keepdim=True)
        scale = torch.where(m == 0, 1.0, torch.clamp(half / m, max=FLT_MAX))
        offset = zero
    else:
        mx = xg.amax(dim=1, keepdim=True)
        mn = xg.amin(dim=1, keepdim=True)
        hmx, hmn = 0.5 * mx, 0.5 * mn
        scale = torch.where(mx == mn, 1.0, torch.clamp(half / (hmx - hmn), max=FLT_MAX))
        offset = hmx + hmn
    finite = torch.isfinite(xg).all(dim=1, keepdim=True)
    scale = torch.where(finite, scale, torch.nan)
    offset = torch.where(finite, offset, torch.nan)
    step = torch.div(torch.ones_like(scale), scale)
    return scale, step, offset


def ref_codes(x: Tensor, groups: int, bits: int, symmetric: bool) -> Tensor:
    """Nearest (half-even) integer codes, fp32 ``[G, E]``."""
    scale, _, offset = ref_params(x, groups, bits, symmetric)
    qmin, qmax = code_range(bits)
    v = (_groups_of(x, groups) - offset) * scale
    return torch.round(torch.clamp(v, qmin, qmax))


def pack_int4(codes: Tensor, shape: torch.Size) -> Tensor:
    """Pairs (2k, 2k+1) of the flat code stream -> one byte, the even code in the high nibble."""
    c = codes.reshape(-1).to(torch.int32)
    byte = ((c[0::2] & 0xF) << 4) | (c[1::2] & 0xF)
    out_shape = [*shape[:-1], shape[-1] // 2]
    return byte.to(torch.uint8).view(torch.int8).reshape(out_shape)


def unpack_int4(q: Tensor) -> Tensor:
    """Inverse of pack_int4, flat int32 codes (sign-extended nibbles)."""
    b = q.cpu().reshape(-1).to(torch.int32)
    hi = b >> 4  # arithmetic shift of the sign-extended byte
    lo = b & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    return torch.stack([hi, lo], dim=1).reshape(-1)


def codes_of_storage(q: Tensor, bits: int) -> Tensor:
    """Flat int32 codes of a stored tensor (8-bit: as is; 4-bit: unpacked)."""
    return unpack_int4(q) if bits == 4 else q.cpu().reshape(-1).to(torch.int32)


def ref_quantize(x: Tensor, groups: int, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """(q int8, params fp32 [G, 1|2]); q has x's shape, 4-bit: last dim halved and packed."""
    assert bits in (4, 8)
    _, step, offset = ref_params(x, groups, bits, symmetric)
    codes = ref_codes(x, groups, bits, symmetric)
    codes = torch.nan_to_num(codes, nan=0.0)  # non-finite groups: codes undefined
    params = step if symmetric else torch.cat([step, offset], dim=1)
    if bits == 8:
        return codes.to(torch.int8).reshape(x.shape), params
    return pack_int4(codes, x.shape), params


def dequant_codes(codes: Tensor, step: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    prod = step * codes  # fp32 multiply ...
    return (prod + offset).to(dtype)  # ... then fp32 add (no FMA), then one rounding to dtype


def ref_dequantize(
    q: Tensor, params: Tensor, groups: int, bits: int, symmetric: bool = True, dtype: torch.dtype | None = None
) -> Tensor:
    params = params.cpu().to(torch.float32)
    codes = codes_of_storage(q, bits).to(torch.float32).reshape(groups, -1)
    step = params[:, 0:1]
    offset = torch.zeros_like(step) if symmetric else params[:, 1:2]
    shape = list(q.shape)
    if bits == 4:
        shape[-1] *= 2
    return dequant_codes(codes, step, offset, dtype or torch.float16).reshape(shape)


def ref_fake_quantize(x: Tensor, groups: int, bits: int, symmetric: bool = True) -> Tensor:
    """dequantize(quantize(x)) in fp32, rounded once to x's dtype; any bits in [2, 16]."""
    _, step, offset = ref_params(x, groups, bits, symmetric)
    codes = ref_codes(x, groups, bits, symmetric)
    return dequant_codes(codes, step, offset, x.dtype).reshape(x.shape)
