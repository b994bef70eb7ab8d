"""qkit.distributed: ZeRO++ communication on torch.distributed (NCCL on GPUs, gloo on CPU).

- :func:`hierarchical_groups` — the intra-node ``local_{n}`` / cross-node ``global_{d}`` groups;
- :func:`all_to_all_quant_reduce` — qgZ: averaging reduce-scatter of gradients at 4 bits (or FP8
  codes with ``grad_format="e4m3"``/``"e5m2"``, as everywhere gradients are quantized here);
- :func:`all_to_all_loco_quant_reduce` / :class:`LocoReducer` — qgZ with per-parameter LoCo error feedback;
- :func:`all_gather_quantized` — qwZ: all-gather of weight shards at 8 (or 4) bits;
- :func:`wire_bytes` / :func:`count_wire_bytes` — bytes on the wire, predicted and counted;
- :func:`zeropp` / :class:`QuantizedReduceScatter` / :class:`QuantizedAllGather` / :class:`LocoConfig`
  — qgZ (with LoCo; one or two hops) and qwZ as FSDP2 custom comms (torch >= 2.13; the private FSDP2
  API is imported only when used);
- :class:`QuantizedAllReduceState` / :func:`quantized_allreduce_hook` — a DDP comm hook: quantized
  reduce-scatter then quantized all-gather of each bucket, with optional LoCo error feedback.

Every collective first checks, once per distinct call signature, that all ranks made the same
call (``validate="once"``; see :mod:`qkit.distributed.consistency`).

See ``docs/distributed.md`` for the algorithm, the output contract and the wire-byte table.
"""

from __future__ import annotations

from qkit.distributed.comm import WireCounter, count_wire_bytes
from qkit.distributed.ddp import QuantizedAllReduceState, quantized_allreduce, quantized_allreduce_hook
from qkit.distributed.fallback import slice_bounds
from qkit.distributed.fsdp import LocoConfig, QuantizedAllGather, QuantizedReduceScatter, ZeroPP, zeropp
from qkit.distributed.groups import Topology, hierarchical_groups, topology
from qkit.distributed.loco import LocoReducer, LocoState, all_to_all_loco_quant_reduce
from qkit.distributed.plan import QgzFallbackWarning, QgzPlan, plan_qgz
from qkit.distributed.qgz import all_to_all_quant_reduce
from qkit.distributed.qwz import all_gather_quantized, default_groups
from qkit.distributed.wire import wire_bytes

__all__ = [
    "LocoConfig",
    "LocoReducer",
    "LocoState",
    "QgzFallbackWarning",
    "QgzPlan",
    "QuantizedAllGather",
    "QuantizedAllReduceState",
    "QuantizedReduceScatter",
    "Topology",
    "WireCounter",
    "ZeroPP",
    "all_gather_quantized",
    "all_to_all_loco_quant_reduce",
    "all_to_all_quant_reduce",
    "count_wire_bytes",
    "default_groups",
    "hierarchical_groups",
    "plan_qgz",
    "quantized_allreduce",
    "quantized_allreduce_hook",
    "slice_bounds",
    "topology",
    "wire_bytes",
    "zeropp",
]
