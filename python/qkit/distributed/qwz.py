"""ZeRO++ qwZ: the quantized weight all-gather.

Each rank quantizes its shard (int8 or int4, symmetric, ``G`` groups of the flattened
shard), the codes and params of all ranks are gathered in one collective, and every
rank dequantizes the whole. The result is what ``all_gather_into_tensor`` returns —
the shards concatenated along dim 0, in the shard's dtype — with each shard replaced by
``dequantize(quantize(shard))``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkit import ops
from qkit.distributed import comm
from qkit.distributed.consistency import Validate, check_validate, ensure_consistent
from qkit.distributed.plan import KERNEL_DTYPES

__all__ = ["TARGET_GROUP_SIZE", "all_gather_quantized", "default_groups"]

# deviation: qwz-group-size (DeepSpeed aimed below 8000 elements per group)
TARGET_GROUP_SIZE = 2048
"""Largest default group of :func:`all_gather_quantized` (DeepSpeed's qwZ aimed below 8000 elements)."""


@functools.lru_cache(maxsize=4096)
def default_groups(numel: int, target: int = TARGET_GROUP_SIZE) -> int:
    """The fewest groups (dividing ``numel``) whose size is at most ``target``; 1 for an empty shard."""
    if numel == 0:
        return 1
    low = -(-numel // target)
    best = numel
    for i in range(1, math.isqrt(numel) + 1):
        if numel % i == 0:
            for d in (i, numel // i):
                if low <= d < best:
                    best = d
    return best


def all_gather_quantized(
    tensor: Tensor,
    group: Any = None,
    bits: int = 8,
    groups: int | None = None,
    *,
    out: Tensor | None = None,
    validate: Validate = "once",
) -> Tensor:
    """All-gather ``tensor`` (this rank's shard) at ``bits`` bits per element (collective).

    Args:
        tensor: float32/float16/bfloat16 shard, the same shape on every rank of ``group``
            (CPU with gloo, CUDA with NCCL). For ``bits=4`` its element count must be even.
        group: the process group (``None``: the default group).
        bits: 8 or 4, the same on every rank.
        groups: quantization groups per shard, dividing its element count; default
            :func:`default_groups` (groups of at most 2048 elements). The same on every rank.
        out: optional output, as ``all_gather_into_tensor`` takes it.
        validate: ``"once"`` (default): before the first call of each distinct signature
            (shard shape, dtype, bits, groups), one tiny all-gather on ``group`` checks that every
            rank passed the same, and every rank raises the same ``ValueError`` naming what
            differs if not (ranks quantizing with different ``bits`` or ``groups`` would decode
            each other's bytes wrongly). ``True``: check every call. ``False``: no check —
            **unsafe**. See :mod:`qkit.distributed.consistency`.

    Returns:
        ``[k * s0, *s[1:]]`` for a shard of shape ``s`` (``[k]`` for a 0-d shard) in the shard's
        dtype, ``k`` = group size: shard ``j`` holds rank ``j``'s ``dequantize(quantize(shard))``.

    Wire: each rank sends ``(k-1) * (M*bits/8 + 4*G)`` bytes, vs ``(k-1) * 4*M`` for an fp32
    all-gather (``M`` elements per shard).
    """
    fn = "all_gather_quantized"
    check_validate(validate, fn)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("qkit.distributed.all_gather_quantized: torch.distributed is not initialized")
    k = dist.get_world_size(group)
    numel = tensor.numel()
    shape = [k * tensor.shape[0], *tensor.shape[1:]] if tensor.dim() > 0 else [k]
    g = groups
    # Argument errors are raised after the cross-rank check, so that peers of a rank with a bad
    # argument raise too instead of waiting for it in the all-gather.
    error: Exception | None = None
    try:
        g = _check_args(tensor, bits, groups, out, shape)
    except (TypeError, ValueError) as exc:
        error = exc
    fields = {
        "shard shape": tuple(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "device type": tensor.device.type,
        "bits": bits,
        "groups": g,
    }
    ensure_consistent(fn, fields, group=group, device=tensor.device, validate=validate, error=error)
    assert g is not None  # _check_args returned it
    if numel == 0:
        return out if out is not None else tensor.new_empty(shape)
    with torch.no_grad():
        codes, params = ops.quantize(tensor.detach().reshape(-1), g, bits, True)
        send = torch.cat([params.view(torch.int8).reshape(-1), codes])
        recv = torch.empty(k * send.numel(), dtype=torch.int8, device=tensor.device).view(k, -1)
        comm.all_gather(recv.view(-1), send, group)
        all_params = recv[:, : 4 * g].flatten().clone().view(torch.float32).reshape(k * g, 1)
        all_codes = recv[:, 4 * g :].reshape(-1)
        values = ops.dequantize(all_codes, all_params, k * g, bits, True, tensor.dtype).view(shape)
    if out is None:
        return values
    return out.copy_(values)


def _check_args(tensor: Tensor, bits: int, groups: int | None, out: Tensor | None, shape: list[int]) -> int:
    """Local argument checks of :func:`all_gather_quantized`; returns the number of groups."""
    if tensor.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"qkit.distributed.all_gather_quantized: `tensor` must be float32/float16/bfloat16, got {tensor.dtype}"
        )
    if bits not in (4, 8):
        raise ValueError(f"qkit.distributed.all_gather_quantized: `bits` must be 4 or 8, got {bits}")
    numel = tensor.numel()
    if bits == 4 and numel % 2 != 0:
        raise ValueError(
            f"qkit.distributed.all_gather_quantized: 4-bit codes come in pairs; the shard has {numel} elements"
        )
    g = default_groups(numel) if groups is None else groups
    if g < 1 or (numel > 0 and numel % g != 0):
        raise ValueError(
            f"qkit.distributed.all_gather_quantized: `groups` ({g}) must be positive and divide the shard's "
            f"{numel} elements"
        )
    if out is not None and (list(out.shape) != shape or out.dtype != tensor.dtype):
        raise ValueError(
            f"qkit.distributed.all_gather_quantized: `out` must be {tensor.dtype} of shape {shape}, "
            f"got {out.dtype} {list(out.shape)}"
        )
    return g
