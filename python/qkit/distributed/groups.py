"""Process groups for the hierarchical (node, device) layout of ZeRO++ (docs/ops.md §4).

Ranks are laid out node-major: ``W = N * L`` ranks, ``L`` per node, rank
``r = n * L + d`` is device ``d`` of node ``n``. ``local_{n}`` holds the ``L``
ranks of node ``n``; ``global_{d}`` holds the ``N`` ranks with device index ``d``
(one per node). Inside ``local_{n}`` rank ``r`` has group rank ``d``; inside
``global_{d}`` it has group rank ``n``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qkit.distributed.consistency import Validate, check_validate, ensure_consistent

__all__ = ["UNSET", "Topology", "hierarchical_groups", "process_groups_arg", "require_initialized", "topology"]

UNSET: Any = object()
"""Default of a deprecated keyword: not passed."""


def process_groups_arg(fn: str, process_groups: dict[str, Any] | None, groups: Any = UNSET) -> dict[str, Any]:
    """``process_groups``, or the value of its deprecated keyword ``groups`` (qkit < 0.x named the
    dict of process groups ``groups``, which elsewhere counts quantization groups) with a
    ``DeprecationWarning``. ``TypeError`` when both or neither are given."""
    if groups is not UNSET:
        if process_groups is not None:
            raise TypeError(f"qkit.distributed.{fn}: got `process_groups` and its deprecated name `groups`; pass one")
        warnings.warn(
            f"qkit.distributed.{fn}: the keyword `groups` is deprecated; pass the dict from "
            "hierarchical_groups() as `process_groups` (or positionally)",
            DeprecationWarning,
            stacklevel=3,
        )
        return groups
    if process_groups is None:
        raise TypeError(f"qkit.distributed.{fn}: missing `process_groups` (the dict from hierarchical_groups())")
    return process_groups


_LOCAL = re.compile(r"^local_(\d+)$")
_GLOBAL = re.compile(r"^global_(\d+)$")


def require_initialized(fn: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"qkit.distributed.{fn}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )


# deviation: qgz-hierarchical-groups
def hierarchical_groups(local_world_size: int | None = None, *, validate: Validate = "once") -> dict[str, Any]:
    """Create the intra-node groups ``local_{n}`` and the cross-node groups ``global_{d}``.

    Collective: every rank of the default process group must call it, with the same
    argument; every rank creates every group, in the same order (``local_0`` …
    ``local_{N-1}``, then ``global_0`` … ``global_{L-1}``), as ``new_group`` requires.

    Args:
        local_world_size: ``L``, ranks per node. Defaults to ``torch.cuda.device_count()``
            on a machine with GPUs; on CPU it must be given.
        validate: ``"once"`` (default) or ``True``: first check (one tiny all-gather, at every
            call: it runs once per job anyway) that every rank resolved the same ``L``, raising the same
            ``ValueError`` on every rank if not (ranks creating different groups would hang).
            ``False``: no check, unsafe. See :mod:`qkit.distributed.consistency`.

    Returns:
        ``{"local_0": ProcessGroup, …, "global_0": ProcessGroup, …}`` — ``N + L`` entries
        (DeepSpeed's key names). Entries of groups this rank is not in hold whatever
        ``new_group`` returns to non-members; qkit only uses this rank's own two.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: ``local_world_size`` missing on CPU, not positive, or not dividing
            the world size; ranks passing different values.
    """
    fn = "hierarchical_groups"
    check_validate(validate, fn)
    require_initialized(fn)
    world = dist.get_world_size()
    error: Exception | None = None
    try:
        local_world_size = _resolve_local(local_world_size, world)
    except ValueError as exc:
        error = exc
    # Checked at every call, never from the cache: it runs once per job, and a rank that already
    # made the same call must still meet a peer that passes another value.
    ensure_consistent(fn, {"local_world_size": local_world_size}, validate=bool(validate), error=error)
    assert local_world_size is not None  # _resolve_local returned
    nodes = world // local_world_size
    groups: dict[str, Any] = {}
    for n in range(nodes):
        groups[f"local_{n}"] = dist.new_group(ranks=list(range(n * local_world_size, (n + 1) * local_world_size)))
    for d in range(local_world_size):
        groups[f"global_{d}"] = dist.new_group(ranks=list(range(d, world, local_world_size)))
    return groups


def _resolve_local(local_world_size: int | None, world: int) -> int:
    """``L`` as given, or the GPU count; checked against the world size."""
    if local_world_size is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                "qkit.distributed.hierarchical_groups: no GPU here, so the number of ranks per node "
                "cannot be guessed; pass local_world_size=L (ranks per node, dividing the world size "
                f"{world})"
            )
        local_world_size = count
    if isinstance(local_world_size, bool) or not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(
            f"qkit.distributed.hierarchical_groups: local_world_size must be a positive int, got {local_world_size!r}"
        )
    if world % local_world_size != 0:
        raise ValueError(
            f"qkit.distributed.hierarchical_groups: the world size ({world}) must be a multiple of "
            f"local_world_size ({local_world_size}): every node needs the same number of ranks"
        )
    return local_world_size


@dataclass(frozen=True)
class Topology:
    """Where this rank sits: ``rank = node * local_world_size + device``,
    ``world = nodes * local_world_size``."""

    world: int
    nodes: int
    local_world_size: int
    rank: int
    local_group: Any
    global_group: Any

    @property
    def node(self) -> int:
        """``n``: this rank's node (its group rank in ``global_{d}``)."""
        return self.rank // self.local_world_size

    @property
    def device(self) -> int:
        """``d``: this rank's index on its node (its group rank in ``local_{n}``)."""
        return self.rank % self.local_world_size

    @property
    def local(self) -> int:
        """Deprecated name of :attr:`local_world_size`."""
        warnings.warn(
            "qkit.distributed.Topology.local is deprecated; use Topology.local_world_size",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.local_world_size


def topology(process_groups: dict[str, Any], fn: str = "topology") -> Topology:
    """Read ``N`` and ``L`` (``local_world_size``) from a :func:`hierarchical_groups` dict (``N``
    ``local_*`` keys, ``L`` ``global_*`` keys) and check them against the default world.

    Raises:
        RuntimeError: torch.distributed is not initialized.
        ValueError: the dict does not describe the default world (``N * L != W``, missing keys).
    """
    require_initialized(fn)
    local_ids = sorted(int(m.group(1)) for k in process_groups if isinstance(k, str) and (m := _LOCAL.match(k)))
    global_ids = sorted(int(m.group(1)) for k in process_groups if isinstance(k, str) and (m := _GLOBAL.match(k)))
    nodes, local = len(local_ids), len(global_ids)
    world, rank = dist.get_world_size(), dist.get_rank()
    if nodes == 0 or local == 0 or local_ids != list(range(nodes)) or global_ids != list(range(local)):
        raise ValueError(
            f"qkit.distributed.{fn}: `process_groups` must hold local_0..local_{{N-1}} and global_0..global_{{L-1}} "
            f"(from qkit.distributed.hierarchical_groups), got keys {sorted(map(str, process_groups))}"
        )
    if nodes * local != world:
        raise ValueError(
            f"qkit.distributed.{fn}: `process_groups` describes {nodes} nodes x {local} ranks = {nodes * local} ranks, "
            f"but the world has {world}"
        )
    return Topology(
        world=world,
        nodes=nodes,
        local_world_size=local,
        rank=rank,
        local_group=process_groups[f"local_{rank // local}"],
        global_group=process_groups[f"global_{rank % local}"],
    )
