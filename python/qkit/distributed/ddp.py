"""A DDP communication hook with quantized gradients on the wire (qgZ-style all-reduce).

In the style of torch's ``torch.distributed.algorithms.ddp_comm_hooks`` (a state object and a
hook function)::

    state = qd.QuantizedAllReduceState(process_group=None, bits=4, loco=qd.LocoConfig())
    ddp_model.register_comm_hook(state, qd.quantized_allreduce_hook)

Each gradient bucket (DDP's flat ``[n]`` buffer, the parameters' dtype) is averaged in two
quantized steps over the ``k`` ranks of the group:

1. reduce-scatter: the buffer, zero-padded to ``k * s`` (``s = ceil(n / k)``), is cut into ``k``
   chunks; each is quantized (symmetric, group-wise fp32 scales, ``bits``; or FP8 codes of
   ``grad_format``) and sent to its owner
   with one ``all_to_all``; the owner dequantizes the ``k`` chunks, sums them in fp32 in rank
   order and divides by ``k`` (the mean, as DDP's default ``allreduce_hook`` gives);
2. all-gather: every rank quantizes its averaged chunk (fp32) the same way; one ``all_gather``
   carries codes and scales; every rank dequantizes all ``k`` chunks, its own too, into the
   bucket in its dtype, so every replica ends with the same gradient, bit for bit.

With ``loco`` each rank carries the error of both quantizations into the next step (LoCo error
feedback, per bucket). The state's :meth:`~QuantizedAllReduceState.state_dict` holds that error
and the byte counters; :meth:`~QuantizedAllReduceState.load_state_dict` validates everything
before changing anything, so a resumed run continues bit for bit — provided the resumed steps
see the saved bucket layout: DDP rebuilds its buckets (in gradient-ready order) after its first
backward, so run one backward pass without an optimizer step before ``load_state_dict`` (the
LoCo state is keyed by bucket index and the bucket's parameter shapes, so a bucket laid out
otherwise starts from zero error rather than taking another parameter's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkit.distributed import comm
from qkit.distributed.chunks import ChunkLayout, Loco, all_gather_chunks, chunk_layout, reduce_scatter_chunks
from qkit.distributed.codec import DEFAULT_GRAD_BITS, describe_format
from qkit.distributed.consistency import ensure_consistent
from qkit.distributed.fsdp import LocoConfig, _check_loco, resolve_grad
from qkit.distributed.groups import require_initialized

__all__ = ["QuantizedAllReduceState", "quantized_allreduce", "quantized_allreduce_hook"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_VERSION = 2  # 2: config has `grad_format`


@dataclass
class _BucketError:
    """LoCo state of one bucket: ``rs`` ``[k * padded]`` in the bucket's dtype (reduce-scatter
    quantization), ``ag`` ``[padded]`` fp32 (all-gather quantization), ``steps`` since the last
    reset, ``layout`` ``[n, dtype, shapes]`` it was made for (``shapes``: the bucket's parameter
    shapes in order, so that a bucket DDP rebuilt with another order starts fresh instead of
    feeding one parameter's error into another)."""

    rs: Tensor
    ag: Tensor
    steps: int
    layout: list[Any]


class QuantizedAllReduceState:
    """State of :func:`quantized_allreduce_hook`: configuration, byte counters, LoCo error.

    Building it is collective on ``process_group``: one tiny all-gather checks that every rank
    passed the same ``bits``, ``grad_format``, ``group_size`` and ``loco``, and every rank raises the same
    ``ValueError`` if not (or the same argument error, if one rank's arguments are bad).

    Args:
        process_group: the group DDP reduces over (``None``: the default group).
        bits: 4 (default) or 8, for both quantizations.
        loco: :class:`~qkit.distributed.LocoConfig` for error feedback, or ``None``.
        group_size: largest number of elements per quantization group (default 256; even for 4 bits).
        grad_format: ``None`` (integer codes of ``bits``), ``"e4m3"`` or ``"e5m2"``: FP8 codes with
            an absmax fp32 scale per group for both quantizations (``bits`` must then be left at
            its default; ``self.bits`` reads 8).

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: bad ``bits``/``group_size``/``grad_format``, both ``bits`` and ``grad_format``
            given, or ranks disagree.
        TypeError: ``loco`` is not a ``LocoConfig``.
    """

    def __init__(
        self,
        process_group: Any = None,
        bits: int = DEFAULT_GRAD_BITS,
        loco: LocoConfig | None = None,
        *,
        group_size: int | None = None,
        grad_format: str | None = None,
    ) -> None:
        fn = "QuantizedAllReduceState"
        require_initialized(fn)
        error: Exception | None = None
        gs: int | None = None
        codec = None
        try:
            _check_loco(fn, loco)
            codec, gs = resolve_grad(fn, bits, grad_format, group_size)
        except (TypeError, ValueError) as exc:
            error = exc
        fields = {
            "bits": bits,
            "grad_format": describe_format(grad_format),
            "group_size": group_size,
            "loco": repr(loco) if loco is None or isinstance(loco, LocoConfig) else type(loco).__name__,
        }
        ensure_consistent(fn, fields, group=process_group, validate=True, error=error)
        assert gs is not None and codec is not None
        self.process_group = process_group
        self.bits = codec.bits
        self.grad_format = codec.format
        self.group_size = gs
        self.loco = loco
        self.errors: dict[int, _BucketError] = {}
        self.calls = 0
        self.sent = {"reduce_scatter": 0, "all_gather": 0}
        self.baseline = 0

    def config(self) -> dict[str, Any]:
        """What :meth:`state_dict` records and :meth:`load_state_dict` requires to match."""
        return {
            "bits": self.bits,
            "grad_format": self.grad_format,
            "group_size": self.group_size,
            "loco": None if self.loco is None else {"beta": float(self.loco.beta), "reset_T": self.loco.reset_T},
            "world": dist.get_world_size(self.process_group),
        }

    def wire_bytes(self) -> dict[str, int]:
        """Bytes this rank sent to other ranks since the state was made (``reduce_scatter``,
        ``all_gather``) and what DDP's default all-reduce of the same buckets would have sent
        (``baseline_all_reduce``: ``2 (k - 1) / k`` of each bucket's bytes, a bandwidth-optimal
        all-reduce; :func:`qkit.distributed.comm.sent_bytes`)."""
        return {**self.sent, "baseline_all_reduce": self.baseline}

    def _loco(
        self, index: int, rows: Tensor, layout: ChunkLayout, n: int, shapes: list[list[int]]
    ) -> tuple[Loco, Tensor]:
        """The LoCo buffers of bucket ``index`` (fresh on a new layout, zeroed every ``reset_T`` steps)."""
        assert self.loco is not None
        key = [n, str(rows.dtype).removeprefix("torch."), shapes]
        st = self.errors.get(index)
        k = rows.shape[0]
        if st is None or st.layout != key or st.rs.numel() != k * layout.padded:
            st = _BucketError(
                rs=torch.zeros(k * layout.padded, dtype=rows.dtype, device=rows.device),
                ag=torch.zeros(layout.padded, dtype=torch.float32, device=rows.device),
                steps=0,
                layout=key,
            )
            self.errors[index] = st
        elif self.loco.reset_T and st.steps >= self.loco.reset_T:
            st.rs.zero_()
            st.ag.zero_()
            st.steps = 0
        return Loco(float(self.loco.beta), st.rs), st.ag

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "config", "stats", "buckets"}``: ``stats`` = ``{"calls", "reduce_scatter",
        "all_gather", "baseline_all_reduce"}``; ``buckets`` maps each bucket index to ``{"rs_error",
        "ag_error", "steps", "layout"}`` (empty without LoCo; ``layout`` = ``[n, dtype, parameter
        shapes]``). This rank's error: save one per rank."""
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "stats": {"calls": self.calls, **self.wire_bytes()},
            "buckets": {
                i: {"rs_error": e.rs.clone(), "ag_error": e.ag.clone(), "steps": e.steps, "layout": _copy(e.layout)}
                for i, e in self.errors.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and LoCo error from :meth:`state_dict`. Checked first (version, the
        same configuration and world size, well-formed counters and buffers); on any error
        nothing changes and ``ValueError`` is raised."""
        fn = "qkit.distributed.QuantizedAllReduceState.load_state_dict"
        if not isinstance(state, dict) or set(state) != {"version", "config", "stats", "buckets"}:
            raise ValueError(f"{fn}: expected a dict with keys version, config, stats, buckets; got {state!r:.200}")
        if state["version"] not in (1, _STATE_VERSION):
            raise ValueError(f"{fn}: state version {state['version']!r}, this qkit reads 1 and {_STATE_VERSION}")
        config = state["config"]
        if state["version"] == 1 and isinstance(config, dict) and "grad_format" not in config:
            config = {**config, "grad_format": None}  # version 1 had integer codes only
        if config != self.config():
            raise ValueError(f"{fn}: state was saved with config {config}, this state has {self.config()}")
        stats = state["stats"]
        keys = {"calls", "reduce_scatter", "all_gather", "baseline_all_reduce"}
        if (
            not isinstance(stats, dict)
            or set(stats) != keys
            or not all(type(v) is int and v >= 0 for v in stats.values())
        ):
            raise ValueError(f"{fn}: `stats` must map {sorted(keys)} to non-negative ints; got {stats!r:.200}")
        buckets = state["buckets"]
        if not isinstance(buckets, dict) or (buckets and self.loco is None):
            raise ValueError(f"{fn}: `buckets` must be a dict, empty without LoCo; got {buckets!r:.200}")
        k = dist.get_world_size(self.process_group)
        restored = {}
        for i, d in buckets.items():
            restored[i] = _check_bucket(fn, i, d, k, self.bits, self.group_size)
        self.calls = stats["calls"]
        self.sent = {"reduce_scatter": stats["reduce_scatter"], "all_gather": stats["all_gather"]}
        self.baseline = stats["baseline_all_reduce"]
        self.errors = restored


def _check_bucket(fn: str, index: object, d: object, k: int, bits: int, group_size: int) -> _BucketError:
    """One bucket's LoCo entry, checked against the layout its ``[n, dtype]`` implies."""
    keys = {"rs_error", "ag_error", "steps", "layout"}
    if type(index) is not int or index < 0 or not isinstance(d, dict) or set(d) != keys:
        raise ValueError(f"{fn}: buckets[{index!r}] must be keyed by a bucket index and hold {sorted(keys)}")
    layout, rs, ag, steps = d["layout"], d["rs_error"], d["ag_error"], d["steps"]
    dtypes = {str(t).removeprefix("torch."): t for t in _FLOAT_DTYPES}
    ok = (
        isinstance(layout, list)
        and len(layout) == 3
        and type(layout[0]) is int
        and layout[0] > 0
        and layout[1] in dtypes
        and isinstance(layout[2], list)
        and all(isinstance(sh, list) and all(type(v) is int and v >= 0 for v in sh) for sh in layout[2])
        and sum(math.prod(sh) for sh in layout[2]) == layout[0]
        and type(steps) is int
        and steps >= 0
    )
    if ok:
        padded = chunk_layout(-(-layout[0] // k), bits, group_size).padded
        ok = (
            isinstance(rs, Tensor)
            and rs.dim() == 1
            and rs.numel() == k * padded
            and rs.dtype == dtypes[layout[1]]
            and isinstance(ag, Tensor)
            and ag.dim() == 1
            and ag.numel() == padded
            and ag.dtype == torch.float32
        )
    if not ok:
        raise ValueError(
            f"{fn}: buckets[{index}]: `layout` must be [n > 0, float dtype, parameter shapes of n elements in all], "
            "`steps` a non-negative int, "
            "`rs_error` 1-D of k * padded elements in that dtype and `ag_error` 1-D float32 of padded "
            f"elements (padded: the chunk layout of ceil(n / k)); got layout {layout!r}, steps {steps!r}"
        )
    return _BucketError(rs.detach().clone(), ag.detach().clone(), steps, _copy(layout))


def _copy(layout: list[Any]) -> list[Any]:
    return [layout[0], layout[1], [list(sh) for sh in layout[2]]]


def quantized_allreduce(
    state: QuantizedAllReduceState, buffer: Tensor, index: int = 0, shapes: list[list[int]] | None = None
) -> Tensor:
    """Average ``buffer`` (DDP's flat bucket ``[n]``) over ``state.process_group`` in place,
    quantized on the wire (collective; see the module doc). ``index`` and ``shapes`` (the
    bucket's parameter shapes; default ``[[n]]``) key the LoCo state.

    Returns ``buffer``: ``deq(q(mean chunk))`` of every chunk, in ``buffer``'s dtype, the same on
    every rank. float64 buckets take a plain all-reduce (divided by ``k`` first, as DDP's default
    hook): the path depends only on the dtype, which every rank shares."""
    group = state.process_group
    k = dist.get_world_size(group)
    n = buffer.numel()
    nbytes = n * buffer.element_size()
    if buffer.dtype not in _FLOAT_DTYPES:
        buffer.div_(k)
        dist.all_reduce(buffer, group=group)
        sent = comm.sent_bytes("all_reduce", k, nbytes)
        state.calls += 1
        state.sent["reduce_scatter"] += sent
        state.baseline += sent
        return buffer
    if n == 0 or k == 1:
        return buffer
    s = -(-n // k)
    layout = chunk_layout(s, state.bits, state.group_size, state.grad_format)
    with torch.no_grad():
        rows = buffer.new_zeros(k * s)
        rows[:n] = buffer.reshape(-1)
        rows = rows.view(k, s)
        shapes = [[n]] if shapes is None else [list(sh) for sh in shapes]
        loco, ag_error = (None, None) if state.loco is None else state._loco(index, rows, layout, n, shapes)
        with comm.count_wire_bytes() as rs_counter:
            mean = reduce_scatter_chunks(rows, layout, group, None, loco).div_(k)
        beta = 0.0 if loco is None else loco.beta
        with comm.count_wire_bytes() as ag_counter:
            gathered = all_gather_chunks(mean, layout, group, buffer.dtype, ag_error, beta)
        buffer.view(-1).copy_(gathered.reshape(-1)[:n])
    if state.loco is not None:
        state.errors[index].steps += 1
    state.calls += 1
    state.sent["reduce_scatter"] += rs_counter.bytes
    state.sent["all_gather"] += ag_counter.bytes
    state.baseline += comm.sent_bytes("all_reduce", k, nbytes)
    return buffer


def quantized_allreduce_hook(state: QuantizedAllReduceState, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP comm hook: :func:`quantized_allreduce` of ``bucket.buffer()`` (keyed by
    ``bucket.index()``); returns a completed future holding the averaged bucket.

    Register with ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``."""
    if not isinstance(state, QuantizedAllReduceState):
        raise TypeError(
            "qkit.distributed.quantized_allreduce_hook: `state` must be a qkit.distributed.QuantizedAllReduceState, "
            f"got a {type(state).__name__}"
        )
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    shapes = [list(p.shape) for p in bucket.parameters()]
    fut.set_result(quantized_allreduce(state, bucket.buffer(), bucket.index(), shapes))
    return fut


# DDP's register_comm_hook compares the annotations of `bucket` and of the return value with the
# real classes; this module's annotations are strings (`from __future__ import annotations`).
if hasattr(dist, "GradBucket"):
    quantized_allreduce_hook.__annotations__.update(
        {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    )
