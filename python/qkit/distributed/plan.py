"""Which path a gradient takes through qgZ, and with how many quantization groups.

The decision depends only on the tensor's shape and dtype and on ``(W, L)``, which
every rank shares, so every rank takes the same path for the same tensor and the
collectives always match (no hang, no shape error on one rank only).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["QgzFallbackWarning", "QgzPlan", "plan_qgz", "warn_fallback"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QgzFallbackWarning(UserWarning):
    """A gradient went through the averaging reduce-scatter instead of the 4-bit qgZ path."""


@dataclass(frozen=True)
class QgzPlan:
    """How one tensor is reduced.

    ``groups`` is the number ``G`` of 4-bit quantization groups on the main path
    (``G % W == 0``, ``M % G == 0``, ``M / G`` even), or ``None`` for the fallback,
    with ``reason`` (a short key, one warning per key) and ``detail`` (for the message).
    """

    numel: int
    groups: int | None
    reason: str | None = None
    detail: str = ""

    @property
    def quantized(self) -> bool:
        return self.groups is not None


@functools.lru_cache(maxsize=4096)
def _choose_groups(numel: int, world: int, target: int) -> int:
    """The smallest valid ``G >= target``, else the largest valid ``G``.

    Valid ``G`` are ``W * k`` with ``k`` dividing ``K = M / (2W)``: then ``G`` divides
    ``M``, ``W`` divides ``G`` (equal partitions per rank) and ``E = M / G = 2K / k`` is
    even (4-bit codes of a group fill whole bytes). ``G = W`` is always valid.
    """
    k_max = numel // (2 * world)
    divisors: set[int] = set()
    for i in range(1, math.isqrt(k_max) + 1):
        if k_max % i == 0:
            divisors.update((i, k_max // i))
    big_enough = [k for k in divisors if world * k >= target]
    return world * (min(big_enough) if big_enough else max(divisors))


# deviation: qgz-dtypes-and-groups
def plan_qgz(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, world: int) -> QgzPlan:
    """Decide the path of a gradient of ``shape``/``dtype`` in a world of ``W`` ranks.

    Main path: at least 2-D, fp32/fp16/bf16, ``M > 0`` and ``M % (2W) == 0``. ``G``
    starts from DeepSpeed's ``max(shape[0], shape[1], W)`` and moves to the nearest
    valid value above it (so odd shapes like ``(3, 40)`` still quantize, and DeepSpeed's
    choice is kept whenever it was valid).

    Raises:
        TypeError: ``dtype`` is not a floating-point type (the same on every rank).
    """
    if not dtype.is_floating_point:
        raise TypeError(f"qkit.distributed: gradients must be floating point, got {dtype}")
    numel = math.prod(shape)
    if numel == 0:
        return QgzPlan(0, None, "empty", "empty tensor")
    if dtype not in KERNEL_DTYPES:
        return QgzPlan(numel, None, "dtype", f"dtype {dtype} (the 4-bit kernels take float32/float16/bfloat16)")
    if len(shape) < 2:
        return QgzPlan(numel, None, "1-D", f"{len(shape)}-D tensor of shape {tuple(shape)} (qgZ takes 2-D and up)")
    if numel % (2 * world) != 0:
        return QgzPlan(
            numel,
            None,
            "size",
            f"tensor of shape {tuple(shape)}: {numel} elements is not a multiple of 2 * world size = {2 * world}",
        )
    return QgzPlan(numel, _choose_groups(numel, world, max(shape[0], shape[1], world)))


_warned: set[str] = set()


def warn_fallback(plan: QgzPlan) -> None:
    """Warn once per process per fallback reason (an empty tensor needs no warning)."""
    if plan.reason is None or plan.reason == "empty" or plan.reason in _warned:
        return
    _warned.add(plan.reason)
    warnings.warn(
        f"qkit.distributed: qgZ falls back to an averaging reduce-scatter (full precision) for a {plan.detail}. "
        "Same result contract; warned once per reason.",
        QgzFallbackWarning,
        stacklevel=4,
    )


def reset_fallback_warnings() -> None:
    """Forget which fallback reasons were warned about (tests)."""
    _warned.clear()
