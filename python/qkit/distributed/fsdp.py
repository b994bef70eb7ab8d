"""ZeRO++ for FSDP2: quantized reduce-scatter (qgZ) and all-gather (qwZ) as FSDP2 custom comms.

FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.13) lets a module replace its
reduce-scatter and all-gather with objects implementing the ``ReduceScatter`` / ``AllGather``
interfaces of the private module ``torch.distributed.fsdp._fully_shard._fsdp_api``
(``allocate(size, *, dtype, device)`` and ``__call__(output_tensor, input_tensor, group, [op,]
async_op)``; returning ``None`` means the result is ready). This module implements both with
qkit's ``quantize``/``dequantize`` ops and plain ``torch.distributed`` collectives:

- :class:`QuantizedReduceScatter`: FSDP2's flat ``[k * s]`` gradient buffer is cut into the
  ``k`` destination chunks of ``s`` elements; each chunk is quantized (symmetric, group-wise
  scales, ``bits`` 4 or 8; or FP8 codes with ``grad_format``) and sent to its owner with one ``all_to_all``; the owner
  dequantizes the ``k`` received chunks to fp32, sums them in rank order, applies ``op``
  (SUM, AVG, or PREMUL_SUM's factor) and writes ``output_tensor`` in its dtype. With
  ``local_world_size`` (given, or read from ``LOCAL_WORLD_SIZE``) the exchange takes two hops
  over torch.distributed subgroups: inside the node (then an fp32 sum over the node's ranks,
  re-quantized), then across nodes (:func:`qkit.distributed.chunks.reduce_scatter_chunks`).
- :class:`QuantizedAllGather`: each rank quantizes its shard, codes and params of all
  ranks travel in one ``all_gather``, and every rank dequantizes all shards into
  ``output_tensor`` (its own shard too, so every rank holds the same weights).
- :class:`LocoConfig`: LoCo error feedback for the reduce-scatter (the error of each
  quantization is carried, per module and rank, into the next step's);
- :func:`zeropp`: installs them on every FSDP module of a model (one reduce-scatter per
  module, so LoCo state is per module) and returns a :class:`ZeroPP` handle (byte
  statistics, ``state_dict`` with the LoCo state).

The private torch API is imported lazily behind feature detection: importing this module
works on any torch; using the comms on a torch without it raises ``RuntimeError``.

Not supported (refused with an error naming the option): HSDP / meshes with a replicate
dimension, ``torch.compile`` of the model (a compiled ``OptimizedModule`` passed to
:func:`zeropp`, or a comm called while dynamo traces).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkit.distributed import comm
from qkit.distributed.chunks import (
    ChunkLayout,
    Hops,
    Loco,
    all_gather_chunks,
    chunk_layout,
    reduce_scatter_chunks,
)
from qkit.distributed.codec import DEFAULT_GRAD_BITS, Codec, describe_format, resolve_codec
from qkit.distributed.consistency import ensure_consistent
from qkit.distributed.groups import hierarchical_groups, topology
from qkit.distributed.loco import DEFAULT_ERR_BETA, DEFAULT_RESET_T, _check_hyper

__all__ = [
    "DEFAULT_GRAD_GROUP_SIZE",
    "DEFAULT_WEIGHT_GROUP_SIZE",
    "ChunkLayout",
    "LocoConfig",
    "QuantizedAllGather",
    "QuantizedReduceScatter",
    "ZeroPP",
    "chunk_layout",
    "predicted_bytes",
    "zeropp",
]

DEFAULT_GRAD_GROUP_SIZE = 256
"""Largest quantization group of a gradient chunk by default (4 bits + 4/256 bytes of scale)."""
DEFAULT_WEIGHT_GROUP_SIZE = 2048
"""Largest quantization group of a weight shard by default (as :func:`all_gather_quantized`)."""

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_VERSION = 3  # 2: LoCo entries carry the two-hop buffer `inter_error`; 3: config has `grad_format`


def _fsdp_api() -> Any:
    """The private ``_fsdp_api`` module of FSDP2, or ``RuntimeError`` naming what is missing."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_api
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            "qkit.distributed: FSDP2 custom comms need torch.distributed.fsdp._fully_shard._fsdp_api "
            f"(torch >= 2.13); this torch ({torch.__version__}) does not have it: {exc}"
        ) from exc
    for name in ("AllGather", "ReduceScatter"):
        if not hasattr(_fsdp_api, name):  # pragma: no cover
            raise RuntimeError(f"qkit.distributed: torch {torch.__version__}'s _fsdp_api has no {name}")
    return _fsdp_api


def _check_bits_and_group(fn: str, bits: int, group_size: int | None, default: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"qkit.distributed.{fn}: `bits` must be 4 or 8, got {bits!r}")
    g = default if group_size is None else group_size
    if not isinstance(g, int) or g < 1 or (bits == 4 and g % 2 != 0):
        raise ValueError(
            f"qkit.distributed.{fn}: `group_size` must be a positive integer (even for 4 bits), got {group_size!r}"
        )
    return g


def resolve_grad(
    fn: str, bits: int | None, grad_format: object, group_size: int | None, bits_name: str = "bits"
) -> tuple[Codec, int]:
    """The gradient codec (:func:`qkit.distributed.codec.resolve_codec`) and group size."""
    codec = resolve_codec(fn, bits, grad_format, bits_name)
    return codec, _check_bits_and_group(fn, codec.bits, group_size, DEFAULT_GRAD_GROUP_SIZE)


@dataclass(frozen=True)
class LocoConfig:
    """LoCo error feedback of :class:`QuantizedReduceScatter`.

    Each rank keeps, per FSDP module, an error buffer ``e`` over its whole (padded) input, in the
    reduce dtype; every call quantizes ``s = input + e`` (fp32) and updates
    ``e <- beta * e + (1 - beta) * (s - dequant(q))`` (qkit's ``loco_swizzle_quantize`` with one
    node of one device, i.e. no swizzle). The buffer restarts from zero after every ``reset_T``
    calls (0: never).
    """

    beta: float = DEFAULT_ERR_BETA
    reset_T: int = DEFAULT_RESET_T

    def __post_init__(self) -> None:
        _check_hyper(self.beta, self.reset_T)


def _check_loco(fn: str, loco: object) -> None:
    if loco is not None and not isinstance(loco, LocoConfig):
        raise TypeError(
            f"qkit.distributed.{fn}: `loco` must be a qkit.distributed.LocoConfig or None, got a {type(loco).__name__}"
        )


def resolve_local_world_size(fn: str, local_world_size: int | None, world: int) -> int | None:
    """Ranks per node for the two-hop exchange, or ``None`` for one hop.

    ``None`` reads the ``LOCAL_WORLD_SIZE`` environment variable (set by ``torchrun``) and means
    one hop when it is unset. A value of 1 or ``world`` (one node) also means one hop; anything
    else must be a positive int dividing ``world`` (``ValueError`` naming ``local_world_size``)."""
    source = "`local_world_size`"
    if local_world_size is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            return None
        source = "the LOCAL_WORLD_SIZE environment variable (read because local_world_size=None)"
        try:
            local_world_size = int(env)
        except ValueError:
            raise ValueError(f"qkit.distributed.{fn}: {source} must be an int, got {env!r}") from None
    if isinstance(local_world_size, bool) or not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(f"qkit.distributed.{fn}: {source} must be a positive int, got {local_world_size!r}")
    if world % local_world_size != 0:
        raise ValueError(
            f"qkit.distributed.{fn}: {source} ({local_world_size}) must divide the world size ({world}): "
            "every node needs the same number of ranks"
        )
    return None if local_world_size in (1, world) else local_world_size


_HOPS: dict[tuple[int, int], Hops] = {}


def _hops(local_world_size: int) -> Hops:
    """The subgroups of the two-hop exchange over the default world (collective the first time
    per process and ``local_world_size``: :func:`~qkit.distributed.hierarchical_groups`)."""
    key = (id(dist.group.WORLD), local_world_size)
    if key not in _HOPS:
        topo = topology(hierarchical_groups(local_world_size))
        _HOPS[key] = Hops(topo.nodes, topo.local_world_size, topo.local_group, topo.global_group)
    return _HOPS[key]


def _refuse_compiling(fn: str) -> None:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        raise RuntimeError(
            f"qkit.distributed.{fn}: called while torch.compile traces the model; torch.compile of a model "
            "with qkit's FSDP2 comms is not supported (run the model eagerly)"
        )


def _op_scale(op: Any, k: int) -> tuple[str, float]:
    """FSDP2's reduce op -> (kind, value): ``("sum", 1)``, ``("avg", k)`` (divide) or
    ``("premul", f)`` (multiply; ``ReduceOp.PREMUL_SUM(f)`` carries ``f``)."""
    kind = getattr(op, "op", op)  # a ReduceOp object (PREMUL_SUM) wraps its RedOpType
    if kind == dist.ReduceOp.SUM:
        return "sum", 1.0
    if kind == dist.ReduceOp.AVG:
        return "avg", float(k)
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = getattr(op, "factor", None)
        if isinstance(factor, Tensor):
            factor = factor.item()
        if factor is None:
            raise ValueError("qkit.distributed.QuantizedReduceScatter: PREMUL_SUM without a factor")
        return "premul", float(factor)
    raise ValueError(
        f"qkit.distributed.QuantizedReduceScatter: reduce op {op!r} is not supported (SUM, AVG, PREMUL_SUM)"
    )


class _Stats:
    """Bytes this rank sent to other ranks through its collectives (counted by
    :func:`qkit.distributed.count_wire_bytes`'s rule, :func:`qkit.distributed.comm.sent_bytes`),
    and what FSDP2's default comm would have sent for the same calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent = 0
        self.baseline = 0

    def add(self, sent: int, baseline: int) -> None:
        self.calls += 1
        self.sent += sent
        self.baseline += baseline

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "sent": self.sent, "baseline": self.baseline}

    def load(self, d: dict[str, int]) -> None:
        self.calls, self.sent, self.baseline = d["calls"], d["sent"], d["baseline"]


class _Alloc:
    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A fresh ``torch.empty(size, dtype, device)`` (no persistent buffers)."""
        return torch.empty(size, dtype=dtype, device=device)


def _apply_op(acc: Tensor, kind: str, value: float) -> Tensor:
    if kind == "avg":
        acc.div_(value)
    elif kind == "premul":
        acc.mul_(value)
    return acc


class QuantizedReduceScatter(_Alloc):
    """FSDP2 ``ReduceScatter`` with gradients quantized on the wire (qgZ).

    ``__call__(output_tensor, input_tensor, group, op, async_op=False)``: ``input_tensor`` is
    FSDP2's flat reduce buffer ``[k * s]`` (fp32/bf16/fp16, ``k`` = group size, chunk ``j``
    for group rank ``j``), ``output_tensor`` ``[s]`` of the same dtype. Result, for this rank
    ``r`` (one hop): ``op_apply(sum_j fp32(dequantize(quantize(chunk r of rank j))))`` cast to
    the output's dtype, the sum taken in rank order ``j = 0, 1, ...`` in fp32, then ``/ k``
    (AVG), ``* f`` (PREMUL_SUM(f)) or nothing (SUM). Two hops (``k = N * L``, rank
    ``n * L + d``): node ``m``'s fp32 sum over its devices ``d' = 0, 1, ...`` of the dequantized
    chunks ``r``, re-quantized, then summed over ``m = 0, 1, ...`` in fp32 and ``op`` applied.
    Synchronous: returns ``None``.

    Other dtypes (float64) take FSDP2's plain ``reduce_scatter`` (full precision; the path
    depends only on the dtype, so every rank takes the same one).

    Args:
        bits: 4 (default) or 8.
        group_size: largest number of elements per quantization group (default 256; even for 4 bits).
        grad_format: ``None`` (integer codes of ``bits``), ``"e4m3"`` or ``"e5m2"``: FP8 codes with
            an absmax fp32 scale per group (``bits`` must then be left at its default; ``self.bits``
            reads 8). LoCo and two hops work with either.
        loco: :class:`LocoConfig` for error feedback, or ``None``. The state belongs to this
            object: use one object per FSDP module (as :func:`zeropp` does); it restarts from zero
            when the buffer's layout (group size, chunk size, dtype) changes.
        local_world_size: ranks per node for the two-hop exchange; ``None`` reads
            ``LOCAL_WORLD_SIZE`` (one hop when unset); 1 or the world size: one hop. Two hops need
            FSDP2's group to be the default world in rank order (a 1-D mesh over all ranks), and
            the first object built with a given value creates the subgroups (collective: every
            rank builds it, in the same order).
    """

    def __init__(
        self,
        bits: int = DEFAULT_GRAD_BITS,
        group_size: int | None = None,
        loco: LocoConfig | None = None,
        local_world_size: int | None = None,
        *,
        grad_format: str | None = None,
    ) -> None:
        fn = "QuantizedReduceScatter"
        _fsdp_api()
        _check_loco(fn, loco)
        codec, self.group_size = resolve_grad(fn, bits, grad_format, group_size)
        self.bits = codec.bits
        self.grad_format = codec.format
        self.loco = loco
        self.local_world_size: int | None = None
        self.hops: Hops | None = None
        if local_world_size is not None or "LOCAL_WORLD_SIZE" in os.environ:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(f"qkit.distributed.{fn}: local_world_size needs torch.distributed to be initialized")
            self.local_world_size = resolve_local_world_size(fn, local_world_size, dist.get_world_size())
            self.hops = None if self.local_world_size is None else _hops(self.local_world_size)
        self.stats = _Stats()
        self.error: Tensor | None = None  # LoCo, first quantization: flat [k * padded] in the reduce dtype
        self.inter_error: Tensor | None = None  # LoCo, two hops, re-quantization: [nodes * padded]
        self.steps = 0  # LoCo: calls since the last reset
        self.error_key: tuple[int, int, int, str] | None = None  # (k, chunk numel, padded chunk, dtype)
        self._checked_groups: set[int] = set()

    def _check_group(self, group: Any, k: int) -> None:
        """Two hops run over subgroups of the default world: FSDP2's group must be that world."""
        if self.hops is None or id(group) in self._checked_groups:
            return
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(k))
        if ranks != list(range(dist.get_world_size())):
            raise ValueError(
                "qkit.distributed.QuantizedReduceScatter: `local_world_size` (two hops) needs FSDP2's "
                f"reduce-scatter group to be the default world in rank order, got ranks {ranks[:16]}; "
                "pass local_world_size=None for one hop"
            )
        self._checked_groups.add(id(group))

    def _loco_state(self, rows: Tensor, layout: ChunkLayout) -> Loco:
        """The LoCo buffers for ``rows`` (fresh on a new layout, zeroed every ``reset_T`` calls)."""
        assert self.loco is not None
        k = rows.shape[0]
        nodes = 0 if self.hops is None else self.hops.nodes
        key = (k, layout.numel, layout.padded, str(rows.dtype).removeprefix("torch."))
        if self.error is None or self.error_key != key:
            self.error = torch.zeros(k * layout.padded, dtype=rows.dtype, device=rows.device)
            self.inter_error = None if not nodes else torch.zeros(nodes * layout.padded, dtype=rows.dtype)
            self.error_key, self.steps = key, 0
        elif self.loco.reset_T and self.steps >= self.loco.reset_T:
            self.error.zero_()
            if self.inter_error is not None:
                self.inter_error.zero_()
            self.steps = 0
        if self.error.device != rows.device:
            self.error = self.error.to(rows.device)
        if self.inter_error is not None and self.inter_error.device != rows.device:
            self.inter_error = self.inter_error.to(rows.device)
        return Loco(float(self.loco.beta), self.error, self.inter_error)

    def __call__(
        self, output_tensor: Tensor, input_tensor: Tensor, group: Any, op: Any, async_op: bool = False
    ) -> None:
        _refuse_compiling("QuantizedReduceScatter")
        k = dist.get_world_size(group)
        n = input_tensor.numel()
        if n % k != 0 or output_tensor.numel() != n // k:
            raise ValueError(
                f"qkit.distributed.QuantizedReduceScatter: input of {n} elements and output of "
                f"{output_tensor.numel()} do not match a group of {k}"
            )
        s = n // k
        dtype = input_tensor.dtype
        baseline = comm.sent_bytes("reduce_scatter", k, n * input_tensor.element_size())
        if dtype not in _FLOAT_DTYPES or output_tensor.dtype != dtype:
            comm_fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            comm_fn(output_tensor, input_tensor, op=op, group=group)
            self.stats.add(baseline, baseline)
            return None
        kind, value = _op_scale(op, k)
        self._check_group(group, k)
        if s == 0:  # the same on every rank: nothing to exchange
            return None
        layout = chunk_layout(s, self.bits, self.group_size, self.grad_format)
        with torch.no_grad(), comm.count_wire_bytes() as counter:
            rows = input_tensor.view(k, s)
            loco = None if self.loco is None else self._loco_state(rows, layout)
            acc = reduce_scatter_chunks(rows, layout, group, self.hops, loco)
            output_tensor.copy_(_apply_op(acc, kind, value).view(output_tensor.shape))
        if loco is not None:
            self.steps += 1
        self.stats.add(counter.bytes, baseline)
        return None


class QuantizedAllGather(_Alloc):
    """FSDP2 ``AllGather`` with weights quantized on the wire (qwZ).

    ``__call__(output_tensor, input_tensor, group, async_op=False)``: ``input_tensor`` is this
    rank's flat shard ``[m]`` (a view into ``output_tensor``, as FSDP2 lays it out),
    ``output_tensor`` ``[k * m]`` of the same dtype (fp32/bf16/fp16). Result: shard ``j`` of
    ``output_tensor`` holds ``dequantize(quantize(shard of rank j))`` in the output's dtype,
    for every ``j`` including this rank (so all ranks compute with the same weights). Codes and
    params of a shard travel in one ``all_gather``. Synchronous: returns ``None``.

    Other dtypes (``uint8``, which FSDP2 uses for mixed-dtype parameter groups, float64) take
    the plain ``all_gather`` (every rank sees the same dtype, so takes the same path).

    Args:
        bits: 8 (default) or 4.
        group_size: largest number of elements per quantization group (default 2048).
    """

    def __init__(self, bits: int = 8, group_size: int | None = None) -> None:
        _fsdp_api()
        self.bits = bits
        self.group_size = _check_bits_and_group("QuantizedAllGather", bits, group_size, DEFAULT_WEIGHT_GROUP_SIZE)
        self.stats = _Stats()

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: Any, async_op: bool = False) -> None:
        _refuse_compiling("QuantizedAllGather")
        k = dist.get_world_size(group)
        m = input_tensor.numel()
        if output_tensor.numel() != k * m:
            raise ValueError(
                f"qkit.distributed.QuantizedAllGather: output of {output_tensor.numel()} elements does not hold "
                f"{k} shards of {m}"
            )
        dtype = input_tensor.dtype
        baseline = comm.sent_bytes("all_gather", k, m * input_tensor.element_size())
        if dtype not in _FLOAT_DTYPES or output_tensor.dtype != dtype:
            comm_fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            comm_fn(output_tensor, input_tensor, group=group)
            self.stats.add(baseline, baseline)
            return None
        if m == 0:  # the same on every rank: nothing to exchange
            return None
        layout = chunk_layout(m, self.bits, self.group_size)
        with torch.no_grad(), comm.count_wire_bytes() as counter:
            # quantized before anything is written: input_tensor aliases this rank's slot of output_tensor
            values = all_gather_chunks(input_tensor.reshape(-1), layout, group, dtype)
            output_tensor.view(k, m).copy_(values)
        self.stats.add(counter.bytes, baseline)
        return None


class ZeroPP:
    """What :func:`zeropp` installed: the comms, their byte statistics, the LoCo state.

    Attributes:
        modules: FSDP module name (``model.named_modules()``; ``""`` for the root) -> module.
        reduce_scatters: module name -> its :class:`QuantizedReduceScatter` (empty when
            ``grad_bits=None`` and no ``grad_format``); they share one byte counter.
        all_gather: the :class:`QuantizedAllGather` shared by every module, or ``None``.
        stats: ``"reduce_scatter"`` / ``"all_gather"`` -> the byte counter of that side (only the
            sides installed).
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        reduce_scatters: dict[str, QuantizedReduceScatter],
        all_gather: QuantizedAllGather | None,
        config: dict[str, Any],
    ) -> None:
        self.modules = modules
        self.reduce_scatters = reduce_scatters
        self.all_gather = all_gather
        self.stats: dict[str, _Stats] = {}
        if reduce_scatters:
            self.stats["reduce_scatter"] = next(iter(reduce_scatters.values())).stats
        if all_gather is not None:
            self.stats["all_gather"] = all_gather.stats
        self._config = config

    def wire_bytes(self) -> dict[str, int]:
        """Bytes this rank sent to other ranks since install (what it handed to torch.distributed,
        less its own chunk: :func:`qkit.distributed.comm.sent_bytes`) and what FSDP2's default comms
        would have sent for the same calls:
        ``{"reduce_scatter", "all_gather", "baseline_reduce_scatter", "baseline_all_gather"}``.
        A side left at FSDP2's default (``grad_bits=None`` / ``weight_bits=None``) reads 0."""
        out = {"reduce_scatter": 0, "all_gather": 0, "baseline_reduce_scatter": 0, "baseline_all_gather": 0}
        for name, st in self.stats.items():
            out[name] = st.sent
            out[f"baseline_{name}"] = st.baseline
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "config", "stats", "loco"}``. ``loco`` maps each module name to
        ``{"error": Tensor | None, "inter_error": Tensor | None, "steps": int, "layout": [k, chunk,
        padded chunk, dtype]}`` (empty without LoCo; ``inter_error`` only with two hops); the error
        tensors are this rank's (save one state per rank)."""
        loco: dict[str, Any] = {}
        if self._config["loco"] is not None:
            for name, rs in self.reduce_scatters.items():
                loco[name] = {
                    "error": None if rs.error is None else rs.error.detach().clone(),
                    "inter_error": None if rs.inter_error is None else rs.inter_error.detach().clone(),
                    "steps": rs.steps,
                    "layout": None if rs.error_key is None else list(rs.error_key),
                }
        return {
            "version": _STATE_VERSION,
            "config": dict(self._config),
            "stats": {name: st.as_dict() for name, st in self.stats.items()},
            "loco": loco,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics and LoCo state (so a resumed run continues bit for bit). Everything
        is checked first (version, the same config and module names as this handle, well-formed
        counters and error buffers); on any error nothing changes and ``ValueError`` is raised."""
        fn = "qkit.distributed.ZeroPP.load_state_dict"
        if not isinstance(state, dict) or set(state) != {"version", "config", "stats", "loco"}:
            raise ValueError(f"{fn}: expected a dict with keys version, config, stats, loco; got {state!r:.200}")
        if state["version"] not in (2, _STATE_VERSION):
            raise ValueError(f"{fn}: state version {state['version']!r}, this qkit reads 2 and {_STATE_VERSION}")
        config = state["config"]
        if state["version"] == 2 and isinstance(config, dict) and "grad_format" not in config:
            config = {**config, "grad_format": None}  # version 2 had integer codes only
        if config != self._config:
            raise ValueError(f"{fn}: state was saved with config {config}, this handle has {self._config}")
        stats = state["stats"]
        if not isinstance(stats, dict) or set(stats) != set(self.stats):
            got = sorted(stats) if isinstance(stats, dict) else repr(stats)
            raise ValueError(f"{fn}: stats for {got}, expected {sorted(self.stats)}")
        for name, d in stats.items():
            if not isinstance(d, dict) or set(d) != {"calls", "sent", "baseline"}:
                raise ValueError(f"{fn}: stats[{name!r}] must have keys calls, sent, baseline; got {d!r:.200}")
            if not all(type(v) is int and v >= 0 for v in d.values()):
                raise ValueError(f"{fn}: stats[{name!r}] must hold non-negative ints; got {d!r:.200}")
        loco = state["loco"]
        want = set(self.reduce_scatters) if self._config["loco"] is not None else set()
        if not isinstance(loco, dict) or set(loco) != want:
            got = sorted(loco) if isinstance(loco, dict) else repr(loco)
            raise ValueError(f"{fn}: LoCo state for modules {got}, this handle has {sorted(want)}")
        nodes = None
        if self._config["local_world_size"] is not None:
            nodes = next(iter(self.reduce_scatters.values())).hops.nodes  # type: ignore[union-attr]
        for name, d in loco.items():
            _check_loco_entry(fn, name, d, nodes)
        for name, d in stats.items():
            self.stats[name].load(d)
        for name, d in loco.items():
            rs = self.reduce_scatters[name]
            rs.error = None if d["error"] is None else d["error"].detach().clone()
            rs.inter_error = None if d["inter_error"] is None else d["inter_error"].detach().clone()
            rs.steps = d["steps"]
            rs.error_key = None if d["layout"] is None else tuple(d["layout"])


def _check_loco_entry(fn: str, name: str, d: object, nodes: int | None) -> None:
    """One module's LoCo state is well formed (see :meth:`ZeroPP.state_dict`); ``nodes``: the
    two-hop node count of the handle (``None``: one hop, no ``inter_error``)."""
    keys = {"error", "inter_error", "steps", "layout"}
    if not isinstance(d, dict) or set(d) != keys:
        raise ValueError(f"{fn}: loco[{name!r}] must have keys {', '.join(sorted(keys))}; got {d!r:.200}")
    error, inter, steps, layout = d["error"], d["inter_error"], d["steps"], d["layout"]
    if type(steps) is not int or steps < 0:
        raise ValueError(f"{fn}: loco[{name!r}]['steps'] must be a non-negative int, got {steps!r}")
    if error is None and inter is None and layout is None:
        return
    ok = (
        isinstance(error, Tensor)
        and isinstance(layout, list)
        and len(layout) == 4
        and all(type(v) is int and v >= 0 for v in layout[:3])
        and error.dim() == 1
        and error.numel() == layout[0] * layout[2]
        and str(error.dtype).removeprefix("torch.") == layout[3]
        and error.dtype in _FLOAT_DTYPES
    )
    if ok and nodes is None:
        ok = inter is None
    elif ok:
        ok = (
            isinstance(inter, Tensor)
            and inter.dim() == 1
            and inter.numel() == nodes * layout[2]
            and inter.dtype == error.dtype
        )
    if not ok:
        raise ValueError(
            f"{fn}: loco[{name!r}]: `error` must be a 1-D float32/float16/bfloat16 tensor of k * padded elements "
            "in the dtype `layout` = [k, chunk, padded, dtype] names, and `inter_error` one of nodes * padded "
            "elements in that dtype with two hops, None with one (or all three None); got layout "
            f"{layout!r}, error {_describe(error)}, inter_error {_describe(inter)}"
        )


def _describe(t: object) -> object:
    return (t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else t


def _fsdp_modules(model: torch.nn.Module) -> dict[str, Any]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError(f"qkit.distributed.zeropp: this torch ({torch.__version__}) has no FSDP2: {exc}") from exc
    return {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}


def _refuse_replicated(module: Any) -> None:
    """HSDP (2-D mesh) and replicate-only meshes all-reduce after the reduce-scatter: refused."""
    state = module._get_fsdp_state()
    for pg in getattr(state, "_fsdp_param_groups", []):
        info = getattr(pg, "mesh_info", None)
        if getattr(info, "replicate_mesh_dim", None) is not None:
            raise NotImplementedError(
                f"qkit.distributed.zeropp: {type(module).__name__} is sharded on a mesh with a replicate "
                "dimension (HSDP / 2-D mesh), which is not supported; use a 1-D mesh"
            )


def _refuse_compiled(model: torch.nn.Module) -> None:
    """A model wrapped by ``torch.compile`` (an ``OptimizedModule``) or compiled in place
    (``module.compile()``) is refused: qkit's comms are tested eagerly only."""
    compiled = isinstance(getattr(model, "_orig_mod", None), torch.nn.Module) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )
    if compiled:
        raise NotImplementedError(
            "qkit.distributed.zeropp: `model` is compiled (torch.compile); torch.compile of a model with "
            "qkit's FSDP2 comms is not supported: call zeropp on the eager model and do not compile it"
        )


def zeropp(
    model: torch.nn.Module,
    grad_bits: int | None = DEFAULT_GRAD_BITS,
    weight_bits: int | None = 8,
    loco: LocoConfig | None = None,
    local_world_size: int | None = None,
    *,
    grad_group_size: int | None = None,
    weight_group_size: int | None = None,
    grad_format: str | None = None,
) -> ZeroPP:
    """Install qkit's quantized comms on every FSDP2 module in ``model`` (collective).

    Call after ``fully_shard`` on the modules. Each FSDP module gets its own
    :class:`QuantizedReduceScatter` (gradients at ``grad_bits``, LoCo state per module when
    ``loco`` is a :class:`LocoConfig`, two hops when ``local_world_size`` is given or
    ``LOCAL_WORLD_SIZE`` is set and names more than one node); one :class:`QuantizedAllGather`
    (weights at ``weight_bits``) serves all. ``None`` leaves that side at FSDP2's default.
    ``grad_format="e4m3"`` or ``"e5m2"`` sends gradients as FP8 codes (one byte per element and an
    absmax fp32 scale per group) instead of ``grad_bits``-bit integers: pass one of ``grad_bits``
    and ``grad_format`` (the handle's config then records ``grad_bits`` 8 and the format). Every
    rank must pass the same configuration: a tiny all-gather on the default group checks it (the
    resolved ``local_world_size`` and the FSDP module names too), and every rank raises the same
    error if they differ.

    Raises:
        ValueError: no FSDP module in ``model``, bad bits/group sizes/``grad_format`` or
            ``local_world_size``, ``grad_bits`` and ``grad_format`` both given, or ranks disagree.
        TypeError: ``loco`` is not a :class:`LocoConfig`.
        NotImplementedError: an HSDP / replicated mesh, or a compiled model (``torch.compile``).
        RuntimeError: torch has no FSDP2 custom-comm API, or torch.distributed is not initialized.
    """
    fn = "zeropp"
    _fsdp_api()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("qkit.distributed.zeropp: torch.distributed is not initialized")
    modules = _fsdp_modules(model)
    error: Exception | None = None
    resolved: int | None = None
    grad_gs = weight_gs = None
    codec: Codec | None = None
    try:
        _check_loco(fn, loco)
        _refuse_compiled(model)
        if not modules:
            raise ValueError("qkit.distributed.zeropp: `model` holds no FSDP2 module (call fully_shard first)")
        for m in modules.values():
            _refuse_replicated(m)
        if grad_bits is not None or grad_format is not None:
            codec, grad_gs = resolve_grad(fn, grad_bits, grad_format, grad_group_size, "grad_bits")
            resolved = resolve_local_world_size(fn, local_world_size, dist.get_world_size())
        if weight_bits is not None:
            weight_gs = _check_bits_and_group(fn, weight_bits, weight_group_size, DEFAULT_WEIGHT_GROUP_SIZE)
    except (TypeError, ValueError, NotImplementedError) as exc:
        error = exc
    fields = {
        "grad": (grad_bits, describe_format(grad_format), grad_group_size),
        "weight": (weight_bits, weight_group_size),
        # not repr(loco) for other types: it may hold an address
        "loco": repr(loco) if loco is None or isinstance(loco, LocoConfig) else type(loco).__name__,
        "local_world_size": (local_world_size, resolved),
        "fsdp modules": sorted(modules),
    }
    ensure_consistent(fn, fields, validate=True, error=error)
    rs: dict[str, QuantizedReduceScatter] = {}
    if codec is not None:
        stats = _Stats()
        for name in modules:
            if codec.format is None:
                rs[name] = QuantizedReduceScatter(codec.bits, grad_gs, loco, resolved or 1)
            else:
                rs[name] = QuantizedReduceScatter(
                    group_size=grad_gs, loco=loco, local_world_size=resolved or 1, grad_format=codec.format
                )
            rs[name].stats = stats
    ag = None if weight_bits is None else QuantizedAllGather(weight_bits, weight_gs)
    for name, m in modules.items():
        if name in rs:
            m.set_custom_reduce_scatter(rs[name])
        if ag is not None:
            m.set_custom_all_gather(ag)
    config = {
        "grad_bits": None if codec is None else codec.bits,
        "grad_format": None if codec is None else codec.format,
        "grad_group_size": grad_gs,
        "weight_bits": weight_bits,
        "weight_group_size": weight_gs,
        "loco": None if loco is None else {"beta": float(loco.beta), "reset_T": loco.reset_T},
        "local_world_size": resolved,
    }
    return ZeroPP(modules, rs, ag, config)


def predicted_bytes(numel: int, world: int, bits: int, group_size: int, kind: str) -> int:
    """Bytes :class:`QuantizedReduceScatter` (``kind="reduce_scatter"``, ``numel`` = FSDP2's input
    ``[k*s]``, one or two hops alike) or :class:`QuantizedAllGather` (``"all_gather"``, ``numel`` =
    the shard) sends to other ranks in one call, in a group of ``world`` ranks. FP8 gradients
    (``grad_format``) count as ``bits=8``: one byte per element, as int8 codes."""
    if kind == "reduce_scatter":
        return (world - 1) * chunk_layout(numel // world, bits, group_size).wire_bytes
    if kind == "all_gather":
        return (world - 1) * chunk_layout(numel, bits, group_size).wire_bytes
    raise ValueError(f"kind must be 'reduce_scatter' or 'all_gather', got {kind!r}")
