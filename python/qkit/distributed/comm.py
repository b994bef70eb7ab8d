"""The collectives qkit.distributed issues, with optional accounting of bytes on the wire.

Every collective goes through the three wrappers here, so :func:`count_wire_bytes`
sees all traffic. A rank's *sent bytes* are counted as a bandwidth-optimal
algorithm sends them (what NCCL's ring/direct algorithms and gloo's send):

| collective (group of ``k`` ranks) | bytes this rank sends |
| --- | --- |
| ``all_to_all_single`` of ``B`` input bytes (even split) | ``B * (k - 1) / k`` (its own chunk stays) |
| ``reduce_scatter`` of ``B`` input bytes | ``B * (k - 1) / k`` |
| ``all_gather`` of ``B`` input bytes | ``B * (k - 1)`` |
| ``all_reduce`` of ``B`` bytes (baselines only) | ``2 * B * (k - 1) / k`` (reduce-scatter + all-gather) |
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = [
    "WireCounter",
    "all_gather",
    "all_to_all",
    "count_wire_bytes",
    "init_local_gloo",
    "reduce_scatter_sum",
    "sent_bytes",
]


def init_local_gloo(rank: int, world_size: int, port: int, timeout_s: float = 120.0) -> None:
    """Join a gloo process group of ``world_size`` processes on 127.0.0.1 (qkit's demos and benchmarks).

    Binds gloo to the loopback device where there is one, so the group works whatever the
    host name resolves to; a collective that waits longer than ``timeout_s`` raises.
    """
    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# torch >= 2.13 renamed the tensor forms; older releases only have the old names. Looked up at
# call time, so that a test wrapping torch.distributed's functions sees qkit's calls too.
def _reduce_scatter(output: Tensor, input: Tensor, op: Any, group: Any) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input, op=op, group=group)


def _all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


@dataclass
class WireCounter:
    """Bytes this rank sent to other ranks while :func:`count_wire_bytes` was active.

    ``calls`` lists ``(collective, group size, bytes sent)`` in issue order.
    """

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Total bytes sent by this rank."""
        return sum(c[2] for c in self.calls)


_counters: list[WireCounter] = []


@contextlib.contextmanager
def count_wire_bytes() -> Iterator[WireCounter]:
    """Count the bytes qkit.distributed's collectives send from this rank (nests)."""
    counter = WireCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record(name: str, size: int, sent: int) -> None:
    for c in _counters:
        c.calls.append((name, size, sent))


def sent_bytes(collective: str, k: int, input_bytes: int) -> int:
    """Bytes one rank sends when it hands ``input_bytes`` to ``collective`` (``"all_to_all"``,
    ``"reduce_scatter"``, ``"all_gather"`` or ``"all_reduce"``) in a group of ``k`` ranks (the
    table above)."""
    if collective in ("all_to_all", "reduce_scatter"):
        return input_bytes * (k - 1) // k
    if collective == "all_reduce":
        return 2 * input_bytes * (k - 1) // k
    if collective == "all_gather":
        return input_bytes * (k - 1)
    raise ValueError(f"qkit.distributed.comm.sent_bytes: unknown collective {collective!r}")


def group_size(group: Any) -> int:
    """Ranks in ``group`` (``None``: the default group)."""
    return dist.get_world_size(group)


def all_to_all(output: Tensor, input: Tensor, group: Any) -> None:
    """``all_to_all_single`` with an even split: chunk ``k`` of ``input`` goes to group rank ``k``,
    chunk ``k`` of ``output`` comes from group rank ``k``. A group of one copies."""
    k = group_size(group)
    _record("all_to_all", k, sent_bytes("all_to_all", k, input.numel() * input.element_size()))
    if k == 1:
        output.copy_(input)
    else:
        dist.all_to_all_single(output, input, group=group)


def reduce_scatter_sum(output: Tensor, input: Tensor, group: Any = None) -> None:
    """Sum over the group, chunk ``k`` (of ``k`` equal chunks of ``input``) to group rank ``k``."""
    k = group_size(group)
    _record("reduce_scatter", k, sent_bytes("reduce_scatter", k, input.numel() * input.element_size()))
    if k == 1:
        output.copy_(input)
    else:
        _reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=group)


def all_gather(output: Tensor, input: Tensor, group: Any = None) -> None:
    """Concatenate every group rank's ``input`` into ``output`` in group-rank order."""
    k = group_size(group)
    _record("all_gather", k, sent_bytes("all_gather", k, input.numel() * input.element_size()))
    if k == 1:
        output.copy_(input)
    else:
        _all_gather(output, input, group=group)
