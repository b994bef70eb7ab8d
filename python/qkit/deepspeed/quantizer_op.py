"""DeepSpeed's quantizer module (what ``QuantizerBuilder().load()`` returns), served by qkit's ops.

Names and argument orders are DeepSpeed's, so code written against
``deepspeed.ops.op_builder.QuantizerBuilder().load()`` runs unchanged. The
behaviour is qkit's (``docs/ops.md``), which fixes DeepSpeed's defects:

- the ``ds_*`` fake quantizers take fp32, fp16 and bf16 whatever their suffix
  (the suffix only names DeepSpeed's kernel), any group size and bits 2..16, and
  reject bad arguments with an error instead of returning the input unchanged;
- the fp32 variants return ``q * step``, not that value rounded to an integer;
- the asymmetric variants have ``2^b`` levels, and ``ds_sr_quantize_asym_*`` is
  really asymmetric;
- ``quantize`` / ``dequantize`` accept any float input and any group size;
- the ZeRO++ ops (``swizzle_quant``, ``quantized_reduction``, their ``loco_``
  variants) take fp32/fp16/bf16 and any group size, accumulate the reduction in
  fp32, read the right asymmetric params for every tensor, and reject bad layouts
  with an error; ``dequantize_int{4,8}_to_half_experimental`` work for any number
  of groups (DeepSpeed launched nothing below 32).

Importing this module does not need the compiled kernels; calling an op without
them raises :class:`qkit.QkitLoadError` with the diagnosis.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import Tensor

# deviation: ops-defects, ops-ieee-math, ops-stochastic-rng (the module docstring and docs/deviations.md)
from qkit import ops, zeropp_ops
from qkit._checks import ds_fake_quantize_args, ds_is_symmetric

__all__ = [
    "Asymmetric",
    "QuantizationType",
    "Symmetric",
    "dequantize",
    "dequantize_fp32",
    "dequantize_int4_to_half_experimental",
    "dequantize_int8_to_half_experimental",
    "ds_quantize_asym_fp16",
    "ds_quantize_asym_fp32",
    "ds_quantize_fp16",
    "ds_quantize_fp32",
    "ds_sr_quantize_asym_fp16",
    "ds_sr_quantize_asym_fp32",
    "ds_sr_quantize_fp16",
    "ds_sr_quantize_fp32",
    "loco_quantized_reduction",
    "loco_swizzle_quant",
    "quantize",
    "quantized_reduction",
    "swizzle_quant",
]


class QuantizationType(IntEnum):
    """DeepSpeed's quantization scheme enum (the values are DeepSpeed's)."""

    Symmetric = 0
    Asymmetric = 1


# DeepSpeed's module exported the enum members at module level too.
Symmetric = QuantizationType.Symmetric
Asymmetric = QuantizationType.Asymmetric


# ---------------------------------------------------------------- argument checks (qkit._checks)


def _is_symmetric(qtype: object, op: str) -> bool:
    return ds_is_symmetric(qtype, op, QuantizationType)


def _fake_quantize_inplace(vals: Tensor, groups: int, bits: int, symmetric: bool, stochastic: bool, op: str) -> Tensor:
    groups, bits = ds_fake_quantize_args(vals, groups, bits, op)
    return ops.fake_quantize_(vals, groups, bits, symmetric, stochastic)


# ---------------------------------------------------------------- fake quantizers (in place)
# Each takes `vals` (fp32/fp16/bf16, M elements, any shape or layout), `groups`
# (dividing M) and `bits` (2..16), overwrites `vals` with dequantize(quantize(vals))
# and returns `vals` itself, as DeepSpeed's ops did.


def ds_quantize_fp32(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Symmetric, round-to-nearest fake quantization of ``vals`` in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, True, False, "ds_quantize_fp32")


def ds_quantize_fp16(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Symmetric, round-to-nearest fake quantization of ``vals`` in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, True, False, "ds_quantize_fp16")


def ds_sr_quantize_fp32(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Symmetric fake quantization with stochastic rounding (torch's generator), in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, True, True, "ds_sr_quantize_fp32")


def ds_sr_quantize_fp16(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Symmetric fake quantization with stochastic rounding (torch's generator), in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, True, True, "ds_sr_quantize_fp16")


def ds_quantize_asym_fp32(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Asymmetric (midpoint offset), round-to-nearest fake quantization in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, False, False, "ds_quantize_asym_fp32")


def ds_quantize_asym_fp16(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Asymmetric (midpoint offset), round-to-nearest fake quantization in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, False, False, "ds_quantize_asym_fp16")


def ds_sr_quantize_asym_fp32(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Asymmetric fake quantization with stochastic rounding, in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, False, True, "ds_sr_quantize_asym_fp32")


def ds_sr_quantize_asym_fp16(vals: Tensor, groups: int, bits: int) -> Tensor:
    """Asymmetric fake quantization with stochastic rounding, in place; returns ``vals``."""
    return _fake_quantize_inplace(vals, groups, bits, False, True, "ds_sr_quantize_asym_fp16")


# ---------------------------------------------------------------- real quantizer


def quantize(input: Tensor, groups: int, bits: int, qtype: QuantizationType | int) -> list[Tensor]:
    """Quantize group-wise to int8 codes (4-bit: two per byte, even element in the high nibble).

    Args:
        input: fp16 (as DeepSpeed), fp32 or bf16; ``M`` elements, ``groups`` dividing ``M``;
            for 4 bits an even last dimension.
        groups: ``G``.
        bits: 4 or 8.
        qtype: :class:`QuantizationType` or its int value.

    Returns:
        ``[q, params]`` (a list, as DeepSpeed returns): ``q`` int8 of the input's shape
        (4-bit: last dimension halved); ``params`` float32 ``[G, 1]`` (step) or ``[G, 2]``
        (step, offset).
    """
    symmetric = _is_symmetric(qtype, "quantize")
    q, params = ops.quantize(input, groups, bits, symmetric)
    return [q, params]


def dequantize(q: Tensor, params: Tensor, groups: int, bits: int, qtype: QuantizationType | int) -> Tensor:
    """Inverse of :func:`quantize` to fp16: ``y = step * q (+ offset)``.

    Args:
        q: int8 codes from :func:`quantize` (4-bit: packed).
        params: float32 ``[G, 1|2]`` from :func:`quantize`.
        groups: ``G``.
        bits: 4 or 8, as quantized.
        qtype: :class:`QuantizationType` or its int value, as quantized.

    Returns:
        float16 tensor of ``q``'s shape (4-bit: last dimension doubled).
    """
    symmetric = _is_symmetric(qtype, "dequantize")
    return ops.dequantize(q, params, groups, bits, symmetric, torch.float16)


def dequantize_fp32(q: Tensor, params: Tensor, groups: int, bits: int, qtype: QuantizationType | int) -> Tensor:
    """:func:`dequantize` to float32, computed in fp32 and never rounded through fp16.

    Returns:
        float32 tensor of ``q``'s shape (4-bit: last dimension doubled).
    """
    symmetric = _is_symmetric(qtype, "dequantize_fp32")
    return ops.dequantize(q, params, groups, bits, symmetric, torch.float32)


# ---------------------------------------------------------------- ZeRO++ communication ops (docs/ops.md §3)


def swizzle_quant(
    x: Tensor,
    groups: int,
    bits: int,
    qtype: QuantizationType | int,
    pipeline_size: int,
    nodes: int,
    devices_per_node: int,
) -> list[Tensor]:
    """Quantize ``x`` group-wise, groups laid out for the ZeRO++ all-to-all (qkit ``swizzle_quantize``).

    Args:
        x: fp16 (as DeepSpeed), fp32 or bf16; ``M`` elements in ``groups`` contiguous groups.
        groups: ``G``, a multiple of ``nodes * devices_per_node * pipeline_size``.
        bits: 4 or 8 (4-bit needs an even group size).
        qtype: :class:`QuantizationType` or its int value.
        pipeline_size, nodes, devices_per_node: the layout (docs/ops.md §3).

    Returns:
        ``[q, params]``: int8 1-D ``[M*bits/8]`` codes and float32 ``[G, 1|2]`` params, both
        in swizzled group order.
    """
    symmetric = _is_symmetric(qtype, "swizzle_quant")
    q, params = zeropp_ops.swizzle_quantize(x, groups, bits, symmetric, pipeline_size, nodes, devices_per_node)
    return [q, params]


def quantized_reduction(
    q: Tensor,
    params: Tensor,
    in_groups: int,
    out_groups: int,
    bits: int,
    qtype: QuantizationType | int,
    devices_per_node: int,
) -> list[Tensor]:
    """Dequantize the ``devices_per_node`` tensors concatenated in ``q``, sum them in fp32
    and requantize the sum in ``out_groups`` groups (qkit ``quantized_reduction``).

    Returns:
        ``[q, params]``: codes shaped like ``q`` with the last dimension divided by
        ``devices_per_node``, and float32 ``[out_groups, 1|2]`` params. The sum, not the mean.
    """
    symmetric = _is_symmetric(qtype, "quantized_reduction")
    q_out, params_out = zeropp_ops.quantized_reduction(
        q, params, in_groups, out_groups, bits, symmetric, devices_per_node
    )
    return [q_out, params_out]


def loco_swizzle_quant(
    x: Tensor,
    error_feedback: Tensor,
    err_beta: float,
    groups: int,
    bits: int,
    qtype: QuantizationType | int,
    pipeline_size: int,
    nodes: int,
    devices_per_node: int,
) -> list[Tensor]:
    """:func:`swizzle_quant` of ``x + error_feedback`` with LoCo error feedback.

    ``error_feedback`` (``M`` elements of ``x``'s dtype, indexed by swizzled position) is
    updated in place: ``e <- err_beta*e + (1-err_beta)*(s - dequant(q))``.

    Returns:
        ``[q, params]`` as :func:`swizzle_quant`.
    """
    symmetric = _is_symmetric(qtype, "loco_swizzle_quant")
    q, params = zeropp_ops.loco_swizzle_quantize(
        x, error_feedback, err_beta, groups, bits, symmetric, pipeline_size, nodes, devices_per_node
    )
    return [q, params]


def loco_quantized_reduction(
    q: Tensor,
    params: Tensor,
    error_feedback: Tensor,
    err_beta: float,
    in_groups: int,
    out_groups: int,
    bits: int,
    qtype: QuantizationType | int,
    devices_per_node: int,
) -> list[Tensor]:
    """:func:`quantized_reduction` of the sum plus ``error_feedback`` (one value per output
    value, any float dtype, natural order), which is updated in place as in :func:`loco_swizzle_quant`.

    Returns:
        ``[q, params]`` as :func:`quantized_reduction`.
    """
    symmetric = _is_symmetric(qtype, "loco_quantized_reduction")
    q_out, params_out = zeropp_ops.loco_quantized_reduction(
        q, params, error_feedback, err_beta, in_groups, out_groups, bits, symmetric, devices_per_node
    )
    return [q_out, params_out]


def dequantize_int4_to_half_experimental(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int
) -> Tensor:
    """DeepSpeed's inference dequantizer for unsigned 4-bit codes (even element in the high nibble).

    Args:
        data: raw bytes (uint8/int8), ``num_groups * group_size / 2`` of them.
        scale, minv: ``num_groups`` values each: the forward scale and the group minimum.
        num_groups, group_size: any (DeepSpeed launched nothing below 32 groups).

    Returns:
        float16 ``[num_groups, group_size]``: ``code / scale[g] + minv[g]``, computed in fp32
        and rounded once.
    """
    return zeropp_ops.dequantize_unsigned(data, scale, minv, num_groups, group_size, 4)


def dequantize_int8_to_half_experimental(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int
) -> Tensor:
    """:func:`dequantize_int4_to_half_experimental` for unsigned 8-bit codes (one byte each)."""
    return zeropp_ops.dequantize_unsigned(data, scale, minv, num_groups, group_size, 8)
