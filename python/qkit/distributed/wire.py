"""Bytes on the wire per call, as :func:`qkit.distributed.count_wire_bytes` counts them.

Per rank, for a gradient/shard of ``M`` elements, ``W = N * L`` ranks (``k`` in the
all-gather's group), ``G`` quantization groups (float32 params, 4 bytes each):

| call | bytes one rank sends |
| --- | --- |
| ``reduce_scatter`` (baseline, ``e``-byte dtype) | ``(W-1)/W * e*M`` |
| qgZ ``all_to_all_quant_reduce`` / LoCo | ``(L-1)/L * (M/2 + 4G) + (N-1)/N * (M/(2L) + 4G/L)`` |
| ↳ codes only | ``(W-1)/W * M/2`` = 1/8 of the fp32 reduce-scatter |
| qgZ / LoCo with ``grad_format`` (FP8) | ``(L-1)/L * (M + 4G) + (N-1)/N * (M/L + 4G/L)`` (codes: 1/4 of fp32) |
| qgZ fallback (fp32 sum; fp64 for float64) | ``(W-1) * 4*ceil(M/W)`` (8 for float64) |
| ``all_gather`` (baseline) | ``(k-1) * e*M`` |
| qwZ ``all_gather_quantized`` | ``(k-1) * (M*bits/8 + 4G)`` = 1/4 (int8) or 1/8 (int4) of fp32, plus params |
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qkit.distributed.codec import DEFAULT_GRAD_BITS, resolve_codec
from qkit.distributed.fallback import accumulate_dtype
from qkit.distributed.plan import plan_qgz
from qkit.distributed.qwz import default_groups

__all__ = ["CALLS", "wire_bytes"]

CALLS = ("qgz", "loco", "reduce_scatter", "qwz", "all_gather")


def wire_bytes(
    call: str,
    shape: Sequence[int] | int,
    *,
    world_size: int,
    local_world_size: int = 1,
    dtype: torch.dtype = torch.float32,
    bits: int = 8,
    groups: int | None = None,
    grad_format: str | None = None,
) -> int:
    """Bytes one rank sends to other ranks for one tensor in one call.

    Args:
        call: ``"qgz"``/``"loco"`` (:func:`~qkit.distributed.all_to_all_quant_reduce`, including
            its fallback for shapes it cannot take), ``"reduce_scatter"`` (a plain reduce-scatter
            in ``dtype``), ``"qwz"`` (:func:`~qkit.distributed.all_gather_quantized` of a shard of
            ``shape`` at ``bits``, ``groups`` as it defaults) or ``"all_gather"`` (plain, in ``dtype``).
        shape: the gradient's (qgZ) or the shard's (all-gather) shape, or an element count
            (a 1-D shape).
        world_size: ``W``, or the all-gather group's size ``k``.
        local_world_size: ``L`` (qgZ).
        dtype: element type of the plain collectives (qgZ: decides the path only).
        grad_format: qgZ's ``grad_format`` (``None``: 4-bit codes; ``"e4m3"``/``"e5m2"``: FP8, one
            byte per element; the groups are the same).

    Several tensors in one qgZ call share two collectives; their bytes add up.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    w = world_size
    esize = torch.empty((), dtype=dtype).element_size()
    if call in ("qgz", "loco"):
        codec = resolve_codec("wire_bytes", DEFAULT_GRAD_BITS if grad_format is not None else 4, grad_format)
        if w % local_world_size != 0:
            raise ValueError(f"wire_bytes: world_size ({w}) must be a multiple of local_world_size")
        plan = plan_qgz(shape, dtype, w)
        if not plan.quantized:
            acc = torch.empty((), dtype=accumulate_dtype(dtype)).element_size()
            return 0 if numel == 0 else (w - 1) * acc * -(-numel // w)
        n, loc, g = w // local_world_size, local_world_size, plan.groups
        codes = codec.code_bytes(numel)
        return (loc - 1) * (codes + 4 * g) // loc + (n - 1) * (codes // loc + 4 * g // loc) // n
    if call == "reduce_scatter":
        return (w - 1) * esize * numel // w
    if call == "all_gather":
        return (w - 1) * esize * numel
    if call == "qwz":
        if numel == 0:
            return 0
        g = default_groups(numel) if groups is None else groups
        return (w - 1) * (numel * bits // 8 + 4 * g)
    raise ValueError(f"wire_bytes: `call` must be one of {CALLS}, got {call!r}")
