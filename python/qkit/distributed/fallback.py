"""The averaging reduce-scatter that tensors outside qgZ's reach go through.

Output contract (the same as qgZ's): with ``c = ceil(M / W)``, rank ``r`` gets
elements ``[r*c, min((r+1)*c, M))`` of the flattened mean over all ``W`` ranks,
1-D, in the input's dtype (``M / W`` elements each when ``W`` divides ``M``; the
last ranks' slices are shorter, possibly empty, otherwise — never padding).
Values are summed in fp32 (float64 tensors: in fp64) and divided by ``W`` once, so the
result is the exact mean rounded once to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qkit.distributed import comm

__all__ = ["accumulate_dtype", "mean_reduce_scatter", "slice_bounds"]


def slice_bounds(numel: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s slice of ``numel`` flattened elements."""
    chunk = -(-numel // world)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a fallback tensor is summed (and sent) in: float64 stays, everything else goes to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# deviation: qgz-fallback-slices (summed in fp32, divided once, exact slices)
def mean_reduce_scatter(tensors: Sequence[Tensor], world: int, rank: int, group: object = None) -> list[Tensor]:
    """Averaging reduce-scatter of each tensor over ``group`` (default: the world), coalesced:
    one collective for the float32-summed tensors, one for float64 ones.

    Args:
        tensors: any shapes, floating point, one device; the same shapes on every rank.
        world, rank: size of ``group`` and this rank's index in it.

    Returns:
        One 1-D tensor per input, this rank's slice of the mean (see the module doc).
    """
    out: list[Tensor | None] = [None] * len(tensors)
    for acc in (torch.float32, torch.float64):
        idx = [i for i, t in enumerate(tensors) if accumulate_dtype(t.dtype) == acc]
        if idx:
            for i, r in zip(idx, _reduce_scatter([tensors[i] for i in idx], world, rank, group, acc), strict=True):
                out[i] = r
    return [o for o in out if o is not None]


def _reduce_scatter(tensors: Sequence[Tensor], world: int, rank: int, group: object, acc: torch.dtype) -> list[Tensor]:
    chunks = [-(-t.numel() // world) for t in tensors]
    device = tensors[0].device
    parts = []
    for t, c in zip(tensors, chunks, strict=True):
        flat = t.detach().reshape(-1).to(device=device, dtype=acc)
        if flat.numel() != c * world:
            flat = torch.nn.functional.pad(flat, (0, c * world - flat.numel()))
        parts.append(flat.view(world, c))
    send = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    recv = torch.empty(sum(chunks), dtype=acc, device=device)
    comm.reduce_scatter_sum(recv, send.reshape(-1), group)
    recv.div_(world)
    out = []
    offset = 0
    for t, c in zip(tensors, chunks, strict=True):
        start, stop = slice_bounds(t.numel(), world, rank)
        out.append(recv[offset : offset + stop - start].to(t.dtype, copy=True))
        offset += c
    return out
