"""The chunked wire format shared by qkit's FSDP2 comms and DDP comm hook (``fsdp.py``, ``ddp.py``).

A flat buffer of ``k * s`` elements is ``k`` *chunks* of ``s`` (one per destination rank). Each
chunk is quantized on its own (symmetric integer codes, or FP8 codes with ``format``; group-wise
fp32 scales, :func:`chunk_layout` groups, zero-padded to whole groups), and the chunks bound for
one peer travel as one int8 row: ``[fp32 params of its chunks, as bytes][codes of its chunks]``.

- :func:`reduce_scatter_chunks`: quantize -> ``all_to_all`` -> dequantize -> fp32 sum in rank
  order (one hop), or, with a :class:`Hops` hierarchy, quantize -> ``all_to_all`` inside the node
  -> dequantize, fp32 sum over the node in device order, re-quantize -> ``all_to_all`` across
  nodes -> dequantize, fp32 sum in node order (two hops). Optional LoCo error feedback at each
  quantization.
- :func:`all_gather_chunks`: quantize this rank's chunk -> ``all_gather`` -> dequantize every
  chunk (this rank's too).

Every collective goes through :mod:`qkit.distributed.comm`, which counts the bytes sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkit.distributed import comm
from qkit.distributed.codec import Codec, sum_rows

__all__ = ["ChunkLayout", "Hops", "Loco", "all_gather_chunks", "chunk_layout", "reduce_scatter_chunks"]


@dataclass(frozen=True)
class ChunkLayout:
    """How one chunk of ``numel`` elements is quantized: ``groups`` groups of ``group_elems``
    elements (even for 4 bits), the chunk zero-padded to ``padded = groups * group_elems``;
    integer codes of ``bits``, or FP8 codes of ``format`` (``bits`` 8)."""

    numel: int
    groups: int
    group_elems: int
    bits: int
    format: str | None = None

    @property
    def codec(self) -> Codec:
        return Codec(self.bits, self.format)

    @property
    def padded(self) -> int:
        return self.groups * self.group_elems

    @property
    def code_bytes(self) -> int:
        """Bytes of codes per chunk."""
        return self.padded * self.bits // 8

    @property
    def wire_bytes(self) -> int:
        """Bytes per chunk in a send buffer: fp32 params and codes."""
        return 4 * self.groups + self.code_bytes


def chunk_layout(numel: int, bits: int, group_size: int, format: str | None = None) -> ChunkLayout:
    """The layout of a chunk of ``numel`` elements: the fewest groups of at most ``group_size``
    elements, sizes balanced (rounded up to even for 4 bits). Depends only on its arguments,
    so every rank computes the same. ``numel == 0`` gives one empty group. ``format``: FP8
    codes (then ``bits`` is 8)."""
    if numel == 0:
        return ChunkLayout(0, 1, 0, bits, format)
    groups = -(-numel // group_size)
    elems = -(-numel // groups)
    if bits == 4:
        elems += elems % 2
    return ChunkLayout(numel, groups, elems, bits, format)


@dataclass(frozen=True)
class Hops:
    """The two-hop hierarchy of a group of ``k = nodes * local_world_size`` ranks laid out
    node-major (group rank ``n * local_world_size + d`` is device ``d`` of node ``n``):
    ``local_group`` holds this rank's node, ``global_group`` the ranks of its device index."""

    nodes: int
    local_world_size: int
    local_group: Any
    global_group: Any


@dataclass
class Loco:
    """LoCo error feedback of one buffer: ``beta``, and the error buffers (updated in place) of
    the first quantization (``intra``: ``[k * padded]``) and, with two hops, of the re-quantization
    (``inter``: ``[nodes * padded]``), each in the dtype of the values it quantizes."""

    beta: float
    intra: Tensor
    inter: Tensor | None = None


def _pad_rows(rows: Tensor, layout: ChunkLayout) -> Tensor:
    """``rows`` ``[c, numel]`` -> ``[c, padded]`` (a copy padded with zeros when needed). Zeros
    never raise a symmetric group's absmax, so the real elements quantize as unpadded, and a
    padding element's LoCo error stays exactly zero."""
    if layout.padded == layout.numel:
        return rows
    padded = rows.new_zeros(rows.shape[0], layout.padded)
    padded[:, : layout.numel] = rows
    return padded


def _quantize(rows: Tensor, layout: ChunkLayout, error: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """Rows ``[c, numel]`` -> (codes ``[c * code_bytes]`` int8, params fp32 ``[c * groups, 1]``);
    with ``error``, LoCo's ``quantize(rows + error)`` and the update of ``error``."""
    flat = _pad_rows(rows, layout).reshape(-1)
    g = rows.shape[0] * layout.groups
    if error is None:
        return layout.codec.quantize(flat, g)
    return layout.codec.loco_quantize(flat, error, beta, g)


def _pack(codes: Tensor, params: Tensor, peers: int) -> Tensor:
    """int8 ``[peers, ·]``: row ``p`` = the params (as bytes) then the codes of peer ``p``'s chunks."""
    return torch.cat([params.view(torch.int8).reshape(peers, -1), codes.reshape(peers, -1)], dim=1)


def _unpack(buf: Tensor, layout: ChunkLayout, per_peer: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_pack`: (codes flat int8, params fp32 ``[peers * per_peer * groups, 1]``)."""
    pbytes = 4 * layout.groups * per_peer
    params = buf[:, :pbytes].contiguous().view(torch.float32).reshape(-1, 1)
    return buf[:, pbytes:].contiguous().reshape(-1), params


def _dequantize(codes: Tensor, params: Tensor, layout: ChunkLayout, dtype: torch.dtype) -> Tensor:
    """(codes, params) of ``c`` chunks -> ``[c, numel]`` in ``dtype``."""
    g = params.shape[0]
    values = layout.codec.dequantize(codes, params, g, dtype)
    return values.view(g // layout.groups, layout.padded)[:, : layout.numel]


def _exchange(send: Tensor, group: Any) -> Tensor:
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send, group)
    return recv


def reduce_scatter_chunks(
    rows: Tensor, layout: ChunkLayout, group: Any, hops: Hops | None = None, loco: Loco | None = None
) -> Tensor:
    """This rank's fp32 sum of chunk ``r`` over the ranks of ``group`` (collective).

    Args:
        rows: ``[k, s]`` float (fp32/bf16/fp16), row ``j`` bound for group rank ``j``; not modified.
        layout: :func:`chunk_layout` of ``s``.
        group: the process group (``k`` ranks; with ``hops``, laid out node-major).
        hops: ``None`` for one ``all_to_all`` on ``group``; else the two-hop hierarchy.
        loco: error feedback (its buffers are updated in place), or ``None``.

    Returns:
        fp32 ``[s]``: one hop: ``sum_j deq(q(row r of rank j))`` in rank order ``j = 0, 1, ...``;
        two hops: ``sum_m deq(q(S_m))`` in node order, ``S_m`` = the fp32 sum over the devices
        ``d' = 0, 1, ...`` of node ``m`` of ``deq(q(row r of rank m * L + d'))``.
    """
    k = rows.shape[0]
    beta = 0.0 if loco is None else loco.beta
    if hops is None:
        codes, params = _quantize(rows, layout, None if loco is None else loco.intra, beta)
        recv = _exchange(_pack(codes, params, k), group)
        return sum_rows(_dequantize(*_unpack(recv, layout, 1), layout, torch.float32))
    n_nodes, local = hops.nodes, hops.local_world_size
    # rows in (device d', node m) order: peer d' of this node gets the chunks of ranks m * L + d'
    ordered = rows.view(n_nodes, local, -1).transpose(0, 1).reshape(k, -1)
    codes, params = _quantize(ordered, layout, None if loco is None else loco.intra, beta)
    recv = _exchange(_pack(codes, params, local), hops.local_group)
    codes, params = _unpack(recv, layout, n_nodes)
    # fp32 sum over the L node peers (in device order) of their n_nodes chunks, re-quantized
    g_in, g_out = local * n_nodes * layout.groups, n_nodes * layout.groups
    if loco is None:
        codes, params = layout.codec.reduce(codes, params, g_in, g_out, local)
    else:
        assert loco.inter is not None
        codes, params = layout.codec.reduce(codes, params, g_in, g_out, local, loco.inter, beta)
    recv = _exchange(_pack(codes, params, n_nodes), hops.global_group)
    return sum_rows(_dequantize(*_unpack(recv, layout, 1), layout, torch.float32))


def all_gather_chunks(
    chunk: Tensor, layout: ChunkLayout, group: Any, dtype: torch.dtype, error: Tensor | None = None, beta: float = 0.0
) -> Tensor:
    """Every rank's ``deq(q(chunk))`` (collective): ``chunk`` ``[s]`` float -> ``[k, s]`` in
    ``dtype``, row ``j`` from group rank ``j`` (this rank's row too). With ``error`` (``[padded]``,
    ``chunk``'s dtype), LoCo error feedback on the quantization."""
    codes, params = _quantize(chunk.view(1, -1), layout, error, beta)
    send = _pack(codes, params, 1).view(-1)
    k = dist.get_world_size(group)
    recv = torch.empty(k * send.numel(), dtype=torch.int8, device=send.device)
    comm.all_gather(recv, send, group)
    return _dequantize(*_unpack(recv.view(k, -1), layout, 1), layout, dtype)
