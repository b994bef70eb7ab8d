"""ZeRO++ ops (docs/ops.md §3): swizzled quantization, quantized reduction, their LoCo
error-feedback variants, and the unsigned-code dequantizer. One section per op: schema,
fake impl, autograd, typed wrapper, in that order; the argument checks and messages are
:mod:`qkit._checks`' (mirroring ``src/zeropp_ops.cpp``); kernels in ``qkit._C`` (CPU and CUDA).

Layout reminder: ``P = nodes * devices_per_node`` partitions of ``groups / P``
groups; swizzling writes partition (node n, device d) at (device d, node n),
with every partition's pipeline slice y before any slice y + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkit._checks import (
    OUT_HAS_NO_GRADIENT,
    ZEROPP_NO_GRADIENT,
    check_code_outputs,
    check_dequantize_unsigned,
    check_error_feedback,
    check_reduction,
    check_swizzle,
)
from qkit._library import define, register_autograd_rules

__all__ = [
    "dequantize_unsigned",
    "loco_quantized_reduction",
    "loco_swizzle_quantize",
    "quantized_reduction",
    "swizzle_quantize",
]


# ---------------------------------------------------------------- swizzle_quantize

define(
    "swizzle_quantize(Tensor input, int groups, int bits, bool symmetric, int pipeline, int nodes, "
    "int devices_per_node) -> (Tensor, Tensor)"
)
define(
    "swizzle_quantize.out(Tensor input, int groups, int bits, bool symmetric, int pipeline, int nodes, "
    "int devices_per_node, *, Tensor(a!) q, Tensor(b!) params) -> ()"
)


def _swizzle_outputs(input: Tensor, groups: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    codes = input.new_empty((input.numel() * bits // 8,), dtype=torch.int8)
    return codes, input.new_empty((groups, 1 if symmetric else 2), dtype=torch.float32)


@torch.library.register_fake("qkit::swizzle_quantize")
def _swizzle_quantize_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool, pipeline: int, nodes: int, devices_per_node: int
) -> tuple[Tensor, Tensor]:
    check_swizzle(input, groups, bits, symmetric, pipeline, nodes, devices_per_node, "swizzle_quantize")
    return _swizzle_outputs(input, groups, bits, symmetric)


@torch.library.register_fake("qkit::swizzle_quantize.out")
def _swizzle_quantize_out_fake(
    input: Tensor,
    groups: int,
    bits: int,
    symmetric: bool,
    pipeline: int,
    nodes: int,
    devices_per_node: int,
    *,
    q: Tensor,
    params: Tensor,
) -> None:
    op = "swizzle_quantize"
    check_swizzle(input, groups, bits, symmetric, pipeline, nodes, devices_per_node, op)
    check_code_outputs(q, params, [input.numel() * bits // 8], groups, symmetric, input, op)


register_autograd_rules("swizzle_quantize")
register_autograd_rules("swizzle_quantize.out", mutates=("q", "params"), hint=OUT_HAS_NO_GRADIENT)


def swizzle_quantize(
    input: Tensor,
    groups: int,
    bits: int = 4,
    symmetric: bool = True,
    pipeline: int = 1,
    nodes: int = 1,
    devices_per_node: int = 1,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``input`` group-wise and lay the groups out for the ZeRO++ all-to-all.

    Args:
        input: float32/float16/bfloat16, ``M`` elements in ``groups`` contiguous groups.
        groups: a multiple of ``nodes * devices_per_node * pipeline``.
        bits: 4 or 8 (4-bit needs an even group size).
        symmetric, pipeline, nodes, devices_per_node: see docs/ops.md §3.
        out: optional preallocated ``(q, params)`` of the shapes and dtypes below, on
            ``input``'s device, sharing no memory with ``input`` or each other (a
            send buffer reused every step saves the allocation and its page faults).

    Returns:
        ``(q, params)``: int8 1-D ``[M*bits/8]`` codes and float32 ``[groups, 1|2]``
        params, both in swizzled group order (``out``'s tensors when given).
    """
    if out is None:
        return torch.ops.qkit.swizzle_quantize.default(
            input, groups, bits, symmetric, pipeline, nodes, devices_per_node
        )
    q, params = out
    torch.ops.qkit.swizzle_quantize.out(
        input, groups, bits, symmetric, pipeline, nodes, devices_per_node, q=q, params=params
    )
    return q, params


# ---------------------------------------------------------------- loco_swizzle_quantize

define(
    "loco_swizzle_quantize(Tensor input, Tensor(a!) error_feedback, float err_beta, int groups, int bits, "
    "bool symmetric, int pipeline, int nodes, int devices_per_node) -> (Tensor, Tensor)"
)


@torch.library.register_fake("qkit::loco_swizzle_quantize")
def _loco_swizzle_quantize_fake(
    input: Tensor,
    error_feedback: Tensor,
    err_beta: float,
    groups: int,
    bits: int,
    symmetric: bool,
    pipeline: int,
    nodes: int,
    devices_per_node: int,
) -> tuple[Tensor, Tensor]:
    op = "loco_swizzle_quantize"
    check_swizzle(input, groups, bits, symmetric, pipeline, nodes, devices_per_node, op)
    check_error_feedback(error_feedback, input, "input", input.numel(), True, err_beta, op)
    return _swizzle_outputs(input, groups, bits, symmetric)


register_autograd_rules("loco_swizzle_quantize", mutates="error_feedback", hint=ZEROPP_NO_GRADIENT)


def loco_swizzle_quantize(
    input: Tensor,
    error_feedback: Tensor,
    err_beta: float,
    groups: int,
    bits: int = 4,
    symmetric: bool = True,
    pipeline: int = 1,
    nodes: int = 1,
    devices_per_node: int = 1,
) -> tuple[Tensor, Tensor]:
    """:func:`swizzle_quantize` of ``input + error_feedback`` with LoCo error feedback.

    ``error_feedback`` (``M`` elements, ``input``'s dtype, indexed by swizzled
    position) is updated in place: ``e <- err_beta*e + (1-err_beta)*(s - dequant(q))``.
    """
    return torch.ops.qkit.loco_swizzle_quantize.default(
        input, error_feedback, err_beta, groups, bits, symmetric, pipeline, nodes, devices_per_node
    )


# ---------------------------------------------------------------- quantized_reduction

define(
    "quantized_reduction(Tensor q, Tensor params, int in_groups, int out_groups, int bits, bool symmetric, "
    "int devices_per_node) -> (Tensor, Tensor)"
)


def _reduction_outputs(q: Tensor, out_groups: int, symmetric: bool, devices: int) -> tuple[Tensor, Tensor]:
    shape = [*q.shape[:-1], q.shape[-1] // devices]
    return q.new_empty(shape), q.new_empty((out_groups, 1 if symmetric else 2), dtype=torch.float32)


@torch.library.register_fake("qkit::quantized_reduction")
def _quantized_reduction_fake(
    q: Tensor, params: Tensor, in_groups: int, out_groups: int, bits: int, symmetric: bool, devices_per_node: int
) -> tuple[Tensor, Tensor]:
    check_reduction(q, params, in_groups, out_groups, bits, symmetric, devices_per_node, "quantized_reduction")
    return _reduction_outputs(q, out_groups, symmetric, devices_per_node)


register_autograd_rules("quantized_reduction")


def quantized_reduction(
    q: Tensor,
    params: Tensor,
    in_groups: int,
    out_groups: int,
    bits: int = 4,
    symmetric: bool = True,
    devices_per_node: int = 1,
) -> tuple[Tensor, Tensor]:
    """Sum ``devices_per_node`` quantized tensors (concatenated in ``q``) and requantize the sum.

    Args:
        q: int8 codes of ``L = devices_per_node`` equal tensors, back to back along the last dimension.
        params: float32 ``[in_groups, 1|2]``; tensor ``j`` uses rows ``[j*in_groups/L, (j+1)*in_groups/L)``.
        in_groups, out_groups: groups of the inputs (all tensors together) and of the sum.
        bits, symmetric: as quantized.
        devices_per_node: ``L``.

    Returns:
        ``(q_sum, params_sum)``: the fp32 sum (not the mean) requantized; codes shaped like
        ``q`` with the last dimension divided by ``L``, params ``[out_groups, 1|2]``.
    """
    return torch.ops.qkit.quantized_reduction.default(
        q, params, in_groups, out_groups, bits, symmetric, devices_per_node
    )


# ---------------------------------------------------------------- loco_quantized_reduction

define(
    "loco_quantized_reduction(Tensor q, Tensor params, Tensor(a!) error_feedback, float err_beta, int in_groups, "
    "int out_groups, int bits, bool symmetric, int devices_per_node) -> (Tensor, Tensor)"
)


@torch.library.register_fake("qkit::loco_quantized_reduction")
def _loco_quantized_reduction_fake(
    q: Tensor,
    params: Tensor,
    error_feedback: Tensor,
    err_beta: float,
    in_groups: int,
    out_groups: int,
    bits: int,
    symmetric: bool,
    devices_per_node: int,
) -> tuple[Tensor, Tensor]:
    op = "loco_quantized_reduction"
    values = check_reduction(q, params, in_groups, out_groups, bits, symmetric, devices_per_node, op)
    check_error_feedback(error_feedback, q, "q", values, False, err_beta, op)
    return _reduction_outputs(q, out_groups, symmetric, devices_per_node)


register_autograd_rules("loco_quantized_reduction", mutates="error_feedback", hint=ZEROPP_NO_GRADIENT)


def loco_quantized_reduction(
    q: Tensor,
    params: Tensor,
    error_feedback: Tensor,
    err_beta: float,
    in_groups: int,
    out_groups: int,
    bits: int = 4,
    symmetric: bool = True,
    devices_per_node: int = 1,
) -> tuple[Tensor, Tensor]:
    """:func:`quantized_reduction` of the sum plus ``error_feedback`` (``V`` elements, any
    float dtype, natural order), which is updated in place as in :func:`loco_swizzle_quantize`."""
    return torch.ops.qkit.loco_quantized_reduction.default(
        q, params, error_feedback, err_beta, in_groups, out_groups, bits, symmetric, devices_per_node
    )


# ---------------------------------------------------------------- dequantize_unsigned

define(
    "dequantize_unsigned(Tensor data, Tensor scale, Tensor minv, int num_groups, int group_size, int bits) -> Tensor"
)


@torch.library.register_fake("qkit::dequantize_unsigned")
def _dequantize_unsigned_fake(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int, bits: int
) -> Tensor:
    check_dequantize_unsigned(data, scale, minv, num_groups, group_size, bits)
    return data.new_empty((num_groups, group_size), dtype=torch.float16)


register_autograd_rules("dequantize_unsigned")


def dequantize_unsigned(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int, bits: int = 8
) -> Tensor:
    """DeepSpeed's inference dequantizer: unsigned codes, ``y = code / scale[g] + minv[g]``.

    Args:
        data: raw bytes (int8/uint8), ``num_groups*group_size*bits/8`` of them; 4-bit codes
            are packed with the even element in the high nibble.
        scale, minv: ``num_groups`` values each (the forward scale and the group minimum),
            any float dtype.

    Returns:
        float16 ``[num_groups, group_size]``, computed in fp32 and rounded once.
    """
    return torch.ops.qkit.dequantize_unsigned.default(data, scale, minv, num_groups, group_size, bits)
