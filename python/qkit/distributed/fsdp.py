"""ZeRO++ for FSDP2: quantized reduce-scatter (qgZ) and all-gather (qwZ) as FSDP2 custom comms.

FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.13) lets a module replace its
reduce-scatter and all-gather with objects implementing the ``ReduceScatter`` / ``AllGather``
interfaces of the private module ``torch.distributed.fsdp._fully_shard._fsdp_api``
(``allocate(size, *, dtype, device)`` and ``__call__(output_tensor, input_tensor, group, [op,]
async_op)``; returning ``None`` means the result is ready). This module implements both with
qkit's ``quantize``/``dequantize`` ops and plain ``torch.distributed`` collectives:

- :class:`QuantizedReduceScatter`: FSDP2's flat ``[k * s]`` gradient buffer is cut into the
  ``k`` destination chunks of ``s`` elements; each chunk is quantized (symmetric, group-wise
  scales, ``bits`` 4 or 8) and sent to its owner with one ``all_to_all``; the owner
  dequantizes the ``k`` received chunks to fp32, sums them in rank order, applies ``op``
  (SUM, AVG, or PREMUL_SUM's factor) and writes ``output_tensor`` in its dtype. One hop.
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

Not supported (refused with an error naming the option): the two-hop intra/inter-node
exchange (``local_world_size``), HSDP / replicated meshes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkit import ops
from qkit.distributed import comm
from qkit.distributed.consistency import ensure_consistent
from qkit.distributed.loco import DEFAULT_ERR_BETA, DEFAULT_RESET_T, _check_hyper
from qkit.zeropp_ops import loco_swizzle_quantize

__all__ = [
    "DEFAULT_GRAD_GROUP_SIZE",
    "DEFAULT_WEIGHT_GROUP_SIZE",
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
_STATE_VERSION = 1


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


@dataclass(frozen=True)
class ChunkLayout:
    """How one chunk of ``numel`` elements is quantized: ``groups`` groups of ``group_elems``
    elements (even for 4 bits), the chunk zero-padded to ``padded = groups * group_elems``."""

    numel: int
    groups: int
    group_elems: int
    bits: int

    @property
    def padded(self) -> int:
        return self.groups * self.group_elems

    @property
    def code_bytes(self) -> int:
        """Bytes of codes per chunk."""
        return self.padded * self.bits // 8

    @property
    def wire_bytes(self) -> int:
        """Bytes per chunk on the wire: fp32 params first, then codes."""
        return 4 * self.groups + self.code_bytes


def chunk_layout(numel: int, bits: int, group_size: int) -> ChunkLayout:
    """The layout of a chunk of ``numel`` elements: the fewest groups of at most ``group_size``
    elements, sizes balanced (rounded up to even for 4 bits). Depends only on its arguments,
    so every rank computes the same. ``numel == 0`` gives one empty group."""
    if numel == 0:
        return ChunkLayout(0, 1, 0, bits)
    groups = -(-numel // group_size)
    elems = -(-numel // groups)
    if bits == 4:
        elems += elems % 2
    return ChunkLayout(numel, groups, elems, bits)


def _check_bits_and_group(fn: str, bits: int, group_size: int | None, default: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"qkit.distributed.{fn}: `bits` must be 4 or 8, got {bits!r}")
    g = default if group_size is None else group_size
    if not isinstance(g, int) or g < 1 or (bits == 4 and g % 2 != 0):
        raise ValueError(
            f"qkit.distributed.{fn}: `group_size` must be a positive integer (even for 4 bits), got {group_size!r}"
        )
    return g


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


def _refuse_unsupported(fn: str, loco: object, local_world_size: int | None) -> None:
    if loco is not None and not isinstance(loco, LocoConfig):
        raise TypeError(
            f"qkit.distributed.{fn}: `loco` must be a qkit.distributed.LocoConfig or None, got a {type(loco).__name__}"
        )
    if local_world_size is not None:
        raise NotImplementedError(
            f"qkit.distributed.{fn}: `local_world_size` (the two-hop intra-/inter-node exchange) is not "
            "implemented for FSDP2 yet; pass local_world_size=None for the one-hop all_to_all"
        )


def _quantize_rows(rows: Tensor, layout: ChunkLayout) -> Tensor:
    """``rows`` ``[k, numel]`` (float) -> int8 ``[k, layout.wire_bytes]``: per row, the fp32 params
    of its ``groups`` groups (as bytes), then its codes. Rows are zero-padded to ``padded``
    (zeros never raise a symmetric group's max, so the real elements quantize as unpadded)."""
    k = rows.shape[0]
    if layout.padded != layout.numel:
        padded = rows.new_zeros(k, layout.padded)
        padded[:, : layout.numel] = rows
        rows = padded
    codes, params = ops.quantize(rows.reshape(-1), k * layout.groups, layout.bits, True)
    return torch.cat([params.view(torch.int8).reshape(k, -1), codes.reshape(k, -1)], dim=1)


def _dequantize_rows(buf: Tensor, layout: ChunkLayout, dtype: torch.dtype) -> Tensor:
    """Inverse layout of :func:`_quantize_rows`: int8 ``[k, wire_bytes]`` -> ``[k, numel]`` in ``dtype``."""
    k = buf.shape[0]
    pbytes = 4 * layout.groups
    params = buf[:, :pbytes].contiguous().view(torch.float32).reshape(k * layout.groups, 1)
    codes = buf[:, pbytes:].contiguous().reshape(-1)
    values = ops.dequantize(codes, params, k * layout.groups, layout.bits, True, dtype)
    return values.view(k, layout.padded)[:, : layout.numel]


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
    """Bytes handed to torch.distributed (input buffers of the collectives) and what FSDP2's
    default comm would have handed for the same call."""

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


class QuantizedReduceScatter(_Alloc):
    """FSDP2 ``ReduceScatter`` with gradients quantized on the wire (qgZ, one hop).

    ``__call__(output_tensor, input_tensor, group, op, async_op=False)``: ``input_tensor`` is
    FSDP2's flat reduce buffer ``[k * s]`` (fp32/bf16/fp16, ``k`` = group size, chunk ``j``
    for group rank ``j``), ``output_tensor`` ``[s]`` of the same dtype. Result: for this rank
    ``r``, ``op_apply(sum_j fp32(dequantize(quantize(chunk r of rank j))))`` cast to the
    output's dtype, the sum taken in rank order ``j = 0, 1, ...`` in fp32, then ``/ k`` (AVG),
    ``* f`` (PREMUL_SUM(f)) or nothing (SUM). Synchronous: returns ``None``.

    Other dtypes (float64) take FSDP2's plain ``reduce_scatter`` (full precision; the path
    depends only on the dtype, so every rank takes the same one).

    Args:
        bits: 4 (default) or 8.
        group_size: largest number of elements per quantization group (default 256; even for 4 bits).
        loco: :class:`LocoConfig` for error feedback, or ``None``. The state belongs to this
            object: use one object per FSDP module (as :func:`zeropp` does); it restarts from zero
            when the buffer's layout (group size, chunk size, dtype) changes.
        local_world_size: not implemented; anything but ``None`` raises ``NotImplementedError``.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        loco: LocoConfig | None = None,
        local_world_size: int | None = None,
    ) -> None:
        _fsdp_api()
        _refuse_unsupported("QuantizedReduceScatter", loco, local_world_size)
        self.bits = bits
        self.group_size = _check_bits_and_group("QuantizedReduceScatter", bits, group_size, DEFAULT_GRAD_GROUP_SIZE)
        self.loco = loco
        self.stats = _Stats()
        self.error: Tensor | None = None  # LoCo: flat [k * padded] in the reduce dtype
        self.steps = 0  # LoCo: calls since the last reset
        self.error_key: tuple[int, int, int, str] | None = None  # (k, chunk numel, padded chunk, dtype)

    def _loco_quantize_rows(self, rows: Tensor, layout: ChunkLayout) -> Tensor:
        """:func:`_quantize_rows` of ``rows + error`` with the LoCo update of ``self.error``."""
        assert self.loco is not None
        k = rows.shape[0]
        key = (k, layout.numel, layout.padded, str(rows.dtype).removeprefix("torch."))
        if self.error is None or self.error_key != key:
            self.error = torch.zeros(k * layout.padded, dtype=rows.dtype, device=rows.device)
            self.error_key, self.steps = key, 0
        elif self.loco.reset_T and self.steps >= self.loco.reset_T:
            self.error.zero_()
            self.steps = 0
        if self.error.device != rows.device:
            self.error = self.error.to(rows.device)
        padded = rows.new_zeros(k, layout.padded)
        padded[:, : layout.numel] = rows
        # padding stays zero: s = 0 + 0 quantizes to 0 exactly, so its error stays 0
        codes, params = loco_swizzle_quantize(
            padded.reshape(-1), self.error, self.loco.beta, k * layout.groups, layout.bits, True, 1, 1, 1
        )
        self.steps += 1
        return torch.cat([params.view(torch.int8).reshape(k, -1), codes.reshape(k, -1)], dim=1)

    def __call__(
        self, output_tensor: Tensor, input_tensor: Tensor, group: Any, op: Any, async_op: bool = False
    ) -> None:
        k = dist.get_world_size(group)
        n = input_tensor.numel()
        if n % k != 0 or output_tensor.numel() != n // k:
            raise ValueError(
                f"qkit.distributed.QuantizedReduceScatter: input of {n} elements and output of "
                f"{output_tensor.numel()} do not match a group of {k}"
            )
        s = n // k
        dtype = input_tensor.dtype
        baseline = n * input_tensor.element_size()
        if dtype not in _FLOAT_DTYPES or output_tensor.dtype != dtype:
            comm_fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            comm_fn(output_tensor, input_tensor, op=op, group=group)
            self.stats.add(baseline, baseline)
            return None
        kind, value = _op_scale(op, k)
        if s == 0:  # the same on every rank: nothing to exchange
            return None
        layout = chunk_layout(s, self.bits, self.group_size)
        with torch.no_grad():
            rows = input_tensor.view(k, s)
            send = _quantize_rows(rows, layout) if self.loco is None else self._loco_quantize_rows(rows, layout)
            recv = torch.empty_like(send)
            comm.all_to_all(recv, send, group)
            values = _dequantize_rows(recv, layout, torch.float32)
            acc = values[0].clone()
            for j in range(1, k):
                acc += values[j]
            if kind == "avg":
                acc.div_(value)
            elif kind == "premul":
                acc.mul_(value)
            output_tensor.copy_(acc.view(output_tensor.shape))
        self.stats.add(send.numel(), baseline)
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
        k = dist.get_world_size(group)
        m = input_tensor.numel()
        if output_tensor.numel() != k * m:
            raise ValueError(
                f"qkit.distributed.QuantizedAllGather: output of {output_tensor.numel()} elements does not hold "
                f"{k} shards of {m}"
            )
        dtype = input_tensor.dtype
        baseline = m * input_tensor.element_size()
        if dtype not in _FLOAT_DTYPES or output_tensor.dtype != dtype:
            comm_fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            comm_fn(output_tensor, input_tensor, group=group)
            self.stats.add(baseline, baseline)
            return None
        if m == 0:  # the same on every rank: nothing to exchange
            return None
        layout = chunk_layout(m, self.bits, self.group_size)
        with torch.no_grad():
            # quantize before writing: input_tensor aliases this rank's slot of output_tensor
            send = _quantize_rows(input_tensor.view(1, m), layout).view(-1)
            recv = torch.empty(k * send.numel(), dtype=torch.int8, device=send.device)
            comm.all_gather(recv, send, group)
            values = _dequantize_rows(recv.view(k, -1), layout, dtype)
            output_tensor.view(k, m).copy_(values)
        self.stats.add(send.numel(), baseline)
        return None


class ZeroPP:
    """What :func:`zeropp` installed: the comms, their byte statistics, the LoCo state.

    Attributes:
        modules: FSDP module name (``model.named_modules()``; ``""`` for the root) -> module.
        reduce_scatters: module name -> its :class:`QuantizedReduceScatter` (empty when
            ``grad_bits=None``); they share one byte counter.
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
        """Bytes this rank handed to torch.distributed since install (input buffers of its
        collectives) and what FSDP2's default comms would have handed for the same calls:
        ``{"reduce_scatter", "all_gather", "baseline_reduce_scatter", "baseline_all_gather"}``.
        A side left at FSDP2's default (``grad_bits=None`` / ``weight_bits=None``) reads 0."""
        out = {"reduce_scatter": 0, "all_gather": 0, "baseline_reduce_scatter": 0, "baseline_all_gather": 0}
        for name, st in self.stats.items():
            out[name] = st.sent
            out[f"baseline_{name}"] = st.baseline
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "config", "stats", "loco"}``. ``loco`` maps each module name to
        ``{"error": Tensor | None, "steps": int, "layout": [k, chunk, padded chunk, dtype]}`` (empty
        without LoCo); the error tensors are this rank's (save one state per rank)."""
        loco: dict[str, Any] = {}
        if self._config["loco"] is not None:
            for name, rs in self.reduce_scatters.items():
                loco[name] = {
                    "error": None if rs.error is None else rs.error.detach().clone(),
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
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"{fn}: state version {state['version']!r}, this qkit reads {_STATE_VERSION}")
        if state["config"] != self._config:
            raise ValueError(f"{fn}: state was saved with config {state['config']}, this handle has {self._config}")
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
        for name, d in loco.items():
            _check_loco_entry(fn, name, d)
        for name, d in stats.items():
            self.stats[name].load(d)
        for name, d in loco.items():
            rs = self.reduce_scatters[name]
            rs.error = None if d["error"] is None else d["error"].detach().clone()
            rs.steps = d["steps"]
            rs.error_key = None if d["layout"] is None else tuple(d["layout"])


def _check_loco_entry(fn: str, name: str, d: object) -> None:
    """One module's LoCo state is well formed (see :meth:`ZeroPP.state_dict`)."""
    if not isinstance(d, dict) or set(d) != {"error", "steps", "layout"}:
        raise ValueError(f"{fn}: loco[{name!r}] must have keys error, steps, layout; got {d!r:.200}")
    error, steps, layout = d["error"], d["steps"], d["layout"]
    if type(steps) is not int or steps < 0:
        raise ValueError(f"{fn}: loco[{name!r}]['steps'] must be a non-negative int, got {steps!r}")
    if error is None and layout is None:
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
    if not ok:
        raise ValueError(
            f"{fn}: loco[{name!r}]: `error` must be a 1-D float32/float16/bfloat16 tensor of k * padded elements "
            f"in the dtype `layout` = [k, chunk, padded, dtype] names (or both None); got layout {layout!r}, error "
            f"{None if not isinstance(error, Tensor) else (error.dtype, tuple(error.shape))}"
        )


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


def zeropp(
    model: torch.nn.Module,
    grad_bits: int | None = 4,
    weight_bits: int | None = 8,
    loco: LocoConfig | None = None,
    local_world_size: int | None = None,
    *,
    grad_group_size: int | None = None,
    weight_group_size: int | None = None,
) -> ZeroPP:
    """Install qkit's quantized comms on every FSDP2 module in ``model`` (collective).

    Call after ``fully_shard`` on the modules. Each FSDP module gets its own
    :class:`QuantizedReduceScatter` (gradients at ``grad_bits``, LoCo state per module when
    ``loco`` is a :class:`LocoConfig`); one :class:`QuantizedAllGather` (weights at
    ``weight_bits``) serves all. ``None`` leaves that side at FSDP2's default. Every rank must
    pass the same configuration: a tiny all-gather on the default group checks it (and the
    FSDP module names), and every rank raises the same ``ValueError`` if they differ.

    Raises:
        ValueError: no FSDP module in ``model``, bad bits/group sizes, or ranks disagree.
        TypeError: ``loco`` is not a :class:`LocoConfig`.
        NotImplementedError: ``local_world_size`` (two-hop), or an HSDP / replicated mesh.
        RuntimeError: torch has no FSDP2 custom-comm API, or torch.distributed is not initialized.
    """
    fn = "zeropp"
    _fsdp_api()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("qkit.distributed.zeropp: torch.distributed is not initialized")
    modules = _fsdp_modules(model)
    error: Exception | None = None
    rs: dict[str, QuantizedReduceScatter] = {}
    ag: QuantizedAllGather | None = None
    try:
        _refuse_unsupported(fn, loco, local_world_size)
        if not modules:
            raise ValueError("qkit.distributed.zeropp: `model` holds no FSDP2 module (call fully_shard first)")
        for m in modules.values():
            _refuse_replicated(m)
        if grad_bits is not None:
            stats = _Stats()
            for name in modules:
                rs[name] = QuantizedReduceScatter(grad_bits, grad_group_size, loco)
                rs[name].stats = stats
        ag = None if weight_bits is None else QuantizedAllGather(weight_bits, weight_group_size)
    except (TypeError, ValueError, NotImplementedError) as exc:
        error = exc
    fields = {
        "grad": (grad_bits, grad_group_size),
        "weight": (weight_bits, weight_group_size),
        # not repr(loco) for other types: it may hold an address
        "loco": repr(loco) if loco is None or isinstance(loco, LocoConfig) else type(loco).__name__,
        "local_world_size": local_world_size,
        "fsdp modules": sorted(modules),
    }
    ensure_consistent(fn, fields, validate=True, error=error)
    for name, m in modules.items():
        if name in rs:
            m.set_custom_reduce_scatter(rs[name])
        if ag is not None:
            m.set_custom_all_gather(ag)
    first = next(iter(rs.values()), None)
    config = {
        "grad_bits": grad_bits,
        "grad_group_size": first.group_size if first else None,
        "weight_bits": weight_bits,
        "weight_group_size": ag.group_size if ag else None,
        "loco": None if loco is None else {"beta": float(loco.beta), "reset_T": loco.reset_T},
    }
    return ZeroPP(modules, rs, ag, config)


def predicted_bytes(numel: int, world: int, bits: int, group_size: int, kind: str) -> int:
    """Bytes :class:`QuantizedReduceScatter` (``kind="reduce_scatter"``, ``numel`` = FSDP2's input
    ``[k*s]``) or :class:`QuantizedAllGather` (``"all_gather"``, ``numel`` = the shard) hands to
    torch.distributed for one call."""
    if kind == "reduce_scatter":
        return world * chunk_layout(numel // world, bits, group_size).wire_bytes
    if kind == "all_gather":
        return chunk_layout(numel, bits, group_size).wire_bytes
    raise ValueError(f"kind must be 'reduce_scatter' or 'all_gather', got {kind!r}")
