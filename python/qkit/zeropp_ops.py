"""ZeRO++ ops (docs/ops.md §3): swizzled quantization, quantized reduction, their LoCo
error-feedback variants, and the unsigned-code dequantizer. Schema, fake impl
and typed wrapper side by side; kernels in ``qkit._C`` (CPU and CUDA).

Layout reminder: ``P = nodes * devices_per_node`` partitions of ``groups / P``
groups; swizzling writes partition (node n, device d) at (device d, node n),
with every partition's pipeline slice y before any slice y + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkit.ops import (
    OUT_HAS_NO_GRADIENT,
    QkitTypeError,
    QkitValueError,
    check_code_outputs,
    check_codes_and_params,
    check_float_input,
    check_groups,
    check_no_self_overlap,
    check_params_size,
    check_storage_bits,
    checked_product,
    define,
    dtype_name,
    register_autograd_rules,
)

define(
    "swizzle_quantize(Tensor input, int groups, int bits, bool symmetric, int pipeline, int nodes, "
    "int devices_per_node) -> (Tensor, Tensor)"
)
define(
    "swizzle_quantize.out(Tensor input, int groups, int bits, bool symmetric, int pipeline, int nodes, "
    "int devices_per_node, *, Tensor(a!) q, Tensor(b!) params) -> ()"
)
define(
    "loco_swizzle_quantize(Tensor input, Tensor(a!) error_feedback, float err_beta, int groups, int bits, "
    "bool symmetric, int pipeline, int nodes, int devices_per_node) -> (Tensor, Tensor)"
)
define(
    "quantized_reduction(Tensor q, Tensor params, int in_groups, int out_groups, int bits, bool symmetric, "
    "int devices_per_node) -> (Tensor, Tensor)"
)
define(
    "loco_quantized_reduction(Tensor q, Tensor params, Tensor(a!) error_feedback, float err_beta, int in_groups, "
    "int out_groups, int bits, bool symmetric, int devices_per_node) -> (Tensor, Tensor)"
)
define(
    "dequantize_unsigned(Tensor data, Tensor scale, Tensor minv, int num_groups, int group_size, int bits) -> Tensor"
)


_NO_GRADIENT = "use them on detached tensors (they are communication ops, not differentiable)"
for _name in ("swizzle_quantize", "quantized_reduction", "dequantize_unsigned"):
    register_autograd_rules(_name)
register_autograd_rules("swizzle_quantize.out", mutates=("q", "params"), hint=OUT_HAS_NO_GRADIENT)
for _name in ("loco_swizzle_quantize", "loco_quantized_reduction"):
    register_autograd_rules(_name, mutates="error_feedback", hint=_NO_GRADIENT)


# ---------------------------------------------------------------- checks (mirror src/zeropp_ops.cpp)


def _check_positive(value: int, name: str, op: str) -> None:
    if value < 1:
        raise QkitValueError(f"qkit.{op}: `{name}` must be >= 1, got {value}")


def _check_swizzle(
    input: Tensor,
    groups: int,
    bits: int,
    symmetric: bool,
    pipeline: int,
    nodes: int,
    devices_per_node: int,
    op: str,
) -> None:
    check_float_input(input, op)
    check_storage_bits(bits, op)
    check_groups(input.numel(), groups, op)
    check_params_size(groups, symmetric, op)
    if bits == 4 and (input.numel() // groups) % 2 != 0:
        raise QkitValueError(
            f"qkit.{op}: 4-bit swizzling moves whole bytes: `groups` must leave an even group size, "
            f"got {input.numel() // groups}"
        )
    _check_positive(pipeline, "pipeline", op)
    _check_positive(nodes, "nodes", op)
    _check_positive(devices_per_node, "devices_per_node", op)
    parts = checked_product((nodes, devices_per_node, pipeline), "`nodes` * `devices_per_node` * `pipeline`", op)
    if groups % parts != 0:
        raise QkitValueError(
            f"qkit.{op}: `groups` ({groups}) must be a multiple of `nodes` * `devices_per_node` * `pipeline` ({parts})"
        )


def _check_error_feedback(
    error: Tensor, like: Tensor, like_name: str, numel: int, same_dtype: bool, beta: float, op: str
) -> None:
    """The LoCo buffer: float, ``numel`` elements, on the device of ``like`` (the argument
    ``like_name``), of its dtype when ``same_dtype``; and ``err_beta`` in [0, 1]."""
    check_float_input(error, op, "error_feedback")
    if error.device != like.device:
        raise QkitValueError(f"qkit.{op}: `error_feedback` must be on the same device as `{like_name}`")
    if error.numel() != numel:
        raise QkitValueError(f"qkit.{op}: `error_feedback` must have {numel} elements, got {error.numel()}")
    if same_dtype and error.dtype != like.dtype:
        raise QkitTypeError(
            f"qkit.{op}: `error_feedback` must have the dtype of `{like_name}` ({dtype_name(like.dtype)}), "
            f"got {dtype_name(error.dtype)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise QkitValueError(f"qkit.{op}: `err_beta` must be in [0, 1], got {beta}")
    check_no_self_overlap(error, op, "error_feedback")


def _check_reduction(
    q: Tensor, params: Tensor, in_groups: int, out_groups: int, bits: int, symmetric: bool, devices: int, op: str
) -> int:
    """Checks and returns V, the number of values per input tensor."""
    check_codes_and_params(q, params, bits, op)
    _check_positive(devices, "devices_per_node", op)
    if q.dim() == 0 or q.shape[-1] % devices != 0:
        raise QkitValueError(
            f"qkit.{op}: the last dimension of `q` must split into `devices_per_node` ({devices}) equal tensors"
        )
    if in_groups < 1 or in_groups % devices != 0:
        raise QkitValueError(
            f"qkit.{op}: `in_groups` ({in_groups}) must be a positive multiple of `devices_per_node` ({devices})"
        )
    values = q.numel() * (8 // bits) // devices
    if values % (in_groups // devices) != 0:
        raise QkitValueError(
            f"qkit.{op}: `in_groups` / devices_per_node ({in_groups // devices}) must divide the values per "
            f"tensor ({values})"
        )
    check_groups(values, out_groups, op, "the reduced output", name="out_groups")
    check_params_size(out_groups, symmetric, op, "out_groups")
    per_group = 1 if symmetric else 2
    if params.dim() != 2 or tuple(params.shape) != (in_groups, per_group):
        raise QkitValueError(
            f"qkit.{op}: `params` must have shape [in_groups, {per_group}] = [{in_groups}, {per_group}], "
            f"got {list(params.shape)}"
        )
    return values


def _swizzle_outputs(input: Tensor, groups: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    codes = input.new_empty((input.numel() * bits // 8,), dtype=torch.int8)
    return codes, input.new_empty((groups, 1 if symmetric else 2), dtype=torch.float32)


def _reduction_outputs(q: Tensor, out_groups: int, symmetric: bool, devices: int) -> tuple[Tensor, Tensor]:
    shape = [*q.shape[:-1], q.shape[-1] // devices]
    return q.new_empty(shape), q.new_empty((out_groups, 1 if symmetric else 2), dtype=torch.float32)


# ---------------------------------------------------------------- fake impls


@torch.library.register_fake("qkit::swizzle_quantize")
def _swizzle_quantize_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool, pipeline: int, nodes: int, devices_per_node: int
) -> tuple[Tensor, Tensor]:
    _check_swizzle(input, groups, bits, symmetric, pipeline, nodes, devices_per_node, "swizzle_quantize")
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
    _check_swizzle(input, groups, bits, symmetric, pipeline, nodes, devices_per_node, op)
    check_code_outputs(q, params, [input.numel() * bits // 8], groups, symmetric, input, op)


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
    _check_swizzle(input, groups, bits, symmetric, pipeline, nodes, devices_per_node, op)
    _check_error_feedback(error_feedback, input, "input", input.numel(), True, err_beta, op)
    return _swizzle_outputs(input, groups, bits, symmetric)


@torch.library.register_fake("qkit::quantized_reduction")
def _quantized_reduction_fake(
    q: Tensor, params: Tensor, in_groups: int, out_groups: int, bits: int, symmetric: bool, devices_per_node: int
) -> tuple[Tensor, Tensor]:
    _check_reduction(q, params, in_groups, out_groups, bits, symmetric, devices_per_node, "quantized_reduction")
    return _reduction_outputs(q, out_groups, symmetric, devices_per_node)


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
    values = _check_reduction(q, params, in_groups, out_groups, bits, symmetric, devices_per_node, op)
    _check_error_feedback(error_feedback, q, "q", values, False, err_beta, op)
    return _reduction_outputs(q, out_groups, symmetric, devices_per_node)


@torch.library.register_fake("qkit::dequantize_unsigned")
def _dequantize_unsigned_fake(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int, bits: int
) -> Tensor:
    op = "dequantize_unsigned"
    if data.dtype not in (torch.int8, torch.uint8):
        raise QkitTypeError(f"qkit.{op}: `data` must be int8 or uint8 (raw bytes), got {dtype_name(data.dtype)}")
    check_storage_bits(bits, op)
    if num_groups < 0:
        raise QkitValueError(f"qkit.{op}: `num_groups` must be >= 0, got {num_groups}")
    _check_positive(group_size, "group_size", op)
    numel = checked_product((num_groups, group_size), "`num_groups` * `group_size`", op)
    checked_product((num_groups, group_size, 2), "the bytes of the float16 output, `num_groups` * `group_size` * 2", op)
    if bits == 4 and numel % 2 != 0:
        raise QkitValueError(
            f"qkit.{op}: 4-bit codes come in pairs: `num_groups` * `group_size` ({numel}) must be even"
        )
    if data.numel() != numel * bits // 8:
        raise QkitValueError(
            f"qkit.{op}: `data` must hold `num_groups` * `group_size` * `bits` / 8 = {numel * bits // 8} bytes, "
            f"got {data.numel()}"
        )
    check_float_input(scale, op, "scale")
    if minv.dtype != scale.dtype:
        raise QkitTypeError(f"qkit.{op}: `minv` must have the dtype of `scale`")
    for name, t in (("scale", scale), ("minv", minv)):
        if t.numel() != num_groups:
            raise QkitValueError(f"qkit.{op}: `{name}` must have `num_groups` ({num_groups}) elements, got {t.numel()}")
        if t.device != data.device:
            raise QkitValueError(f"qkit.{op}: `{name}` must be on the same device as `data`")
    return data.new_empty((num_groups, group_size), dtype=torch.float16)


# ---------------------------------------------------------------- typed wrappers


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


__all__ = [
    "dequantize_unsigned",
    "loco_quantized_reduction",
    "loco_swizzle_quantize",
    "quantized_reduction",
    "swizzle_quantize",
]
