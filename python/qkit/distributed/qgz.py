"""ZeRO++ qgZ: the hierarchical 4-bit (or FP8) quantized gradient reduce-scatter (docs/ops.md §4).

For ``W = N * L`` ranks (``r = n * L + d``) and a gradient ``T`` of ``M`` elements in
``G`` groups, every rank:

1. ``swizzle_quantize(T, G, 4, sym, 1, N, L)``: 4-bit codes ``[M/2]`` + params ``[G, 1]``
   laid out ``[L][N][G/W]`` groups, so chunk ``d'`` holds what node-peer ``d'`` reduces;
2. ``all_to_all`` inside the node (``local_{n}``);
3. ``quantized_reduction(·, ·, G, G/L, 4, sym, L)``: fp32 sum of the ``L`` received
   tensors, re-quantized: codes ``[M/(2L)]`` + params ``[G/L, 1]`` laid out ``[N][G/W]``;
4. ``all_to_all`` across nodes (``global_{d}``);
5. ``dequantize`` to fp32 ``[N, M/W]``; 6. sum over the ``N`` nodes in node order (fp32) and
   divide by ``W``.

Rank ``r`` ends with the ``r``-th contiguous ``1/W`` slice of the flattened mean over
all ``W`` ranks, in the input's dtype — the slice an averaging ``reduce_scatter`` gives.
Codes and params of all tensors in a call travel together: two collectives per call.

With ``grad_format="e4m3"``/``"e5m2"`` the codes are FP8 (one byte per element, an absmax fp32
scale per group) instead: steps 1, 3 and 5 use ``quantize_fp``/``dequantize_fp`` on the same
groups and layout (:class:`qkit.distributed.codec.Codec`; docs/zeropp.md "FP8 gradients").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkit.distributed import comm
from qkit.distributed.codec import DEFAULT_GRAD_BITS, Codec, describe_format, resolve_codec, sum_rows
from qkit.distributed.consistency import Validate, check_validate, ensure_consistent
from qkit.distributed.fallback import mean_reduce_scatter
from qkit.distributed.groups import UNSET, Topology, process_groups_arg, require_initialized, topology
from qkit.distributed.plan import QgzPlan, plan_qgz, warn_fallback

__all__ = ["all_to_all_quant_reduce", "reduce", "run"]

# (index in the call, tensor, G) -> (codes, params)
Stage = Callable[[int, Tensor, int], tuple[Tensor, Tensor]]
# (index, received codes of L tensors, their params, G) -> (codes of the sum, params)
ReduceStage = Callable[[int, Tensor, Tensor, int], tuple[Tensor, Tensor]]


def _as_bytes(codes: Tensor, params: Tensor, peers: int) -> tuple[Tensor, Tensor]:
    """Codes (int8, or FP8 read as bytes) and params as int8 ``[peers, ·]`` blocks (row ``k`` goes
    to peer ``k``)."""
    return codes.view(torch.int8).reshape(peers, -1), params.contiguous().view(torch.int8).reshape(peers, -1)


# deviation: qgz-coalesced (one all_to_all for every tensor's codes and params)
def _exchange(blocks: list[tuple[Tensor, Tensor]], peers: int, group: Any) -> list[tuple[Tensor, Tensor]]:
    """One ``all_to_all`` of every tensor's (codes, params) blocks; returns the received
    blocks, each ``[peers, ·]`` with row ``k`` from peer ``k``."""
    flat = [b for pair in blocks for b in pair]
    send = torch.cat(flat, dim=1)
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send, group)
    out, col = [], 0
    for codes, params in blocks:
        c, p = codes.shape[1], params.shape[1]
        out.append((recv[:, col : col + c], recv[:, col + c : col + c + p]))
        col += c + p
    return out


def _params_of(raw: Tensor, rows: int) -> Tensor:
    """Received param bytes ``[peers, ·]`` -> float32 ``[rows, 1]`` (a fresh, aligned copy: the
    slice may start at any byte and, with one peer, keep its parent's row stride)."""
    return raw.flatten().clone().view(torch.float32).reshape(rows, 1)


def reduce(
    tensors: Sequence[Tensor],
    plans: Sequence[QgzPlan],
    topo: Topology,
    stage1: Stage,
    stage3: ReduceStage,
    codec: Codec,
) -> list[Tensor]:
    """The qgZ pipeline for tensors whose plans are quantized (steps 1-6 of the module doc),
    with the quantizers of steps 1 and 3 supplied (plain or LoCo) and ``codec`` decoding step 5."""
    if not tensors:
        return []
    n_nodes, local, world = topo.nodes, topo.local_world_size, topo.world
    first = []
    for i, (t, p) in enumerate(zip(tensors, plans, strict=True)):
        codes, params = stage1(i, t, p.groups)
        first.append(_as_bytes(codes, params, local))
    second = []
    for i, (codes, raw) in enumerate(_exchange(first, local, topo.local_group)):
        g = plans[i].groups
        q, params = stage3(i, codes.reshape(-1), _params_of(raw, g), g)
        second.append(_as_bytes(q, params, n_nodes))
    out = []
    for (codes, raw), t, p in zip(_exchange(second, n_nodes, topo.global_group), tensors, plans, strict=True):
        g = p.groups // local
        values = codec.dequantize(codes.reshape(-1), _params_of(raw, g), g, torch.float32)
        # deviation: qgz-mean (DeepSpeed divided by N here, returning L x the mean)
        out.append(sum_rows(values.view(n_nodes, p.numel // world)).div_(world).to(t.dtype))
    return out


# deviation: qgz-hierarchical-groups
def _topology(
    process_groups: dict[str, Any], fn: str, plans: Sequence[QgzPlan], tensors: Sequence[Tensor]
) -> Topology | None:
    """The hierarchy from ``process_groups``, or ``None`` for ``{}`` when no tensor needs it (the
    fallback runs on the world group alone, as DeepSpeed's did)."""
    if isinstance(process_groups, Mapping) and len(process_groups) == 0:
        needs = next((i for i, p in enumerate(plans) if p.quantized), None)
        if needs is None:
            return None
        raise ValueError(
            f"qkit.distributed.{fn}: `process_groups` is empty, but tensors[{needs}] "
            f"(shape {tuple(tensors[needs].shape)}, {tensors[needs].dtype}) takes the quantized path, which needs "
            "the hierarchical groups: pass qkit.distributed.hierarchical_groups(...) (only calls whose "
            "tensors all take the fallback "
            "accept process_groups={})"
        )
    return topology(process_groups, fn)


def _describe_groups(process_groups: object) -> str:
    """``process_groups`` for the fingerprint, read from its keys alone (so that an argument error
    on one rank does not show up as a difference in process groups too)."""
    if not isinstance(process_groups, Mapping):
        return type(process_groups).__name__
    if not process_groups:
        return "{} (world group only)"
    keys = [str(k) for k in process_groups]
    nodes, local = sum(k.startswith("local_") for k in keys), sum(k.startswith("global_") for k in keys)
    if nodes + local == len(keys):
        return f"{nodes} nodes x {local} ranks"
    return f"keys {sorted(keys)}"


def run(
    tensors: Sequence[Tensor],
    process_groups: dict[str, Any],
    fn: str,
    stage1: Callable[[Topology], Stage],
    stage3: Callable[[Topology], ReduceStage],
    validate: Validate,
    *,
    codec: Codec | None,
    grad_format: object = None,
    settings: tuple[Any, ...] = (),
    error: Exception | None = None,
) -> tuple[list[Tensor], list[QgzPlan]]:
    """Plan every tensor, run the quantized ones through :func:`reduce` and the others through
    the fallback; results in input order. ``stage1``/``stage3`` build the stages, which
    receive each tensor's index in ``tensors``; ``codec`` decodes the last hop (``None`` only
    with an ``error``). ``grad_format`` (as the caller got it) is part of the fingerprint.

    Argument errors found here (or passed in ``error`` by the caller) are raised only after the
    cross-rank check, so that a rank with a bad argument never leaves its peers waiting.
    ``settings`` (e.g. LoCo's hyper-parameters) are part of the fingerprint."""
    check_validate(validate, fn)
    require_initialized(fn)
    tensors = list(tensors)
    world, rank = dist.get_world_size(), dist.get_rank()
    topo: Topology | None = None
    plans: list[QgzPlan] = []
    if error is None:
        try:
            if any(t.device != tensors[0].device for t in tensors):
                raise ValueError(f"qkit.distributed.{fn}: all tensors of one call must be on one device")
            plans = [plan_qgz(tuple(t.shape), t.dtype, world) for t in tensors]
            topo = _topology(process_groups, fn, plans, tensors)
        except (TypeError, ValueError) as exc:
            error = exc
    fields = {
        "tensor count": len(tensors),
        "tensor shapes": [tuple(t.shape) for t in tensors],
        "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
        "device types": sorted({t.device.type for t in tensors}),
        "process groups": _describe_groups(process_groups),
        "grad_format": describe_format(grad_format),
        "settings": settings,
    }
    device = tensors[0].device if tensors else None
    ensure_consistent(fn, fields, device=device, validate=validate, error=error)
    main = [i for i, p in enumerate(plans) if p.quantized]
    rest = [i for i, p in enumerate(plans) if not p.quantized]
    for i in rest:
        warn_fallback(plans[i])
    out: list[Tensor | None] = [None] * len(tensors)
    with torch.no_grad():
        if main:
            assert topo is not None and codec is not None  # a tensor needs them; no error was found
            s1, s3 = stage1(topo), stage3(topo)
            reduced = reduce(
                [tensors[i] for i in main],
                [plans[i] for i in main],
                topo,
                lambda j, t, g: s1(main[j], t, g),
                lambda j, q, p, g: s3(main[j], q, p, g),
                codec,
            )
            for i, r in zip(main, reduced, strict=True):
                out[i] = r
        for i, r in zip(rest, mean_reduce_scatter([tensors[i] for i in rest], world, rank), strict=True):
            out[i] = r
    return [o for o in out if o is not None], plans


def all_to_all_quant_reduce(
    tensors: Sequence[Tensor],
    process_groups: dict[str, Any] | None = None,
    *,
    validate: Validate = "once",
    groups: Any = UNSET,
    grad_format: str | None = None,
) -> list[Tensor]:
    """ZeRO++ qgZ: averaging reduce-scatter of gradients at 4 bits (or FP8) on the wire (collective).

    Args:
        tensors: gradients, float32/float16/bfloat16, on one device (CPU with gloo, CUDA with
            NCCL); every rank passes the same shapes in the same order.
        process_groups: from :func:`qkit.distributed.hierarchical_groups` (``N`` and ``L`` are
            read from its keys). ``{}`` is accepted when every tensor takes the fallback (which
            runs on the world group); a tensor on the 4-bit path then raises ``ValueError``.
        groups: deprecated keyword name of ``process_groups`` (a ``DeprecationWarning``).
        validate: ``"once"`` (default): before the first call of each distinct signature
            (tensor count, shapes, dtypes, process groups), one tiny all-gather checks that every rank
            passed the same, and every rank raises the same ``ValueError`` naming what differs
            if not; later calls with a checked signature communicate nothing extra.
            ``True``: check every call. ``False``: no check — **unsafe**, ranks that pass
            different calls can hang or return garbage. See :mod:`qkit.distributed.consistency`.
        grad_format: ``None`` (default): 4-bit integer codes. ``"e4m3"`` or ``"e5m2"``: FP8
            codes (one byte per element) with an absmax fp32 scale per group, on the same groups,
            layout and collectives (docs/zeropp.md, "FP8 gradients"). Part of the checked signature.

    Returns:
        One 1-D tensor per input in its dtype: with ``c = ceil(M / W)``, elements
        ``[r*c, min((r+1)*c, M))`` of the flattened **mean** over all ``W`` ranks (``M / W``
        elements when ``W`` divides ``M``, always the case on the quantized path).

    Tensors of fewer than 2 dimensions, with ``M % (2W) != 0``, empty, or float64 take a
    full-precision averaging reduce-scatter instead (fp32 sums; fp64 for float64), with one
    :class:`QgzFallbackWarning` per reason per process; the decision depends only on shapes
    and dtypes, so all ranks agree.
    Bytes on the wire: :func:`qkit.distributed.wire_bytes` and ``docs/distributed.md``.
    """

    fn = "all_to_all_quant_reduce"
    codec, error = codec_or_error(fn, grad_format)

    def stage1(topo: Topology) -> Stage:
        assert codec is not None
        return lambda i, t, g: codec.swizzle_quantize(t, g, topo.nodes, topo.local_world_size)

    def stage3(topo: Topology) -> ReduceStage:
        assert codec is not None
        lws = topo.local_world_size
        return lambda i, q, p, g: codec.reduce(q, p, g, g // lws, lws)

    pgs = process_groups_arg(fn, process_groups, groups)
    return run(tensors, pgs, fn, stage1, stage3, validate, codec=codec, grad_format=grad_format, error=error)[0]


def codec_or_error(fn: str, grad_format: object) -> tuple[Codec | None, Exception | None]:
    """qgZ's codec (4-bit integer codes, or FP8 of ``grad_format``), or the argument error, which
    :func:`run` raises after the cross-rank check."""
    try:
        return resolve_codec(fn, DEFAULT_GRAD_BITS if grad_format is not None else 4, grad_format), None
    except ValueError as exc:
        return None, exc
