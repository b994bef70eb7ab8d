"""The core ops, one section each: schema, fake (meta) implementation, autograd and typed
wrapper, in that order.

The kernels are ``qkit._C`` (CPU and CUDA), registered under ``torch.ops.qkit``.
Semantics: ``docs/ops.md`` §1-3. Groups are contiguous runs of the flattened tensor;
all arithmetic is fp32; params are float32 ``[G, 1]`` (symmetric: the step) or
``[G, 2]`` (asymmetric: step, midpoint offset). The toolkit that defines them is
:mod:`qkit._library`; every argument check and message is in :mod:`qkit._checks`
(both re-exported here, where they were before).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkit._checks import (
    DEQUANTIZE_HINT,
    FAKE_QUANTIZE_INPLACE_HINT,
    FLOAT_DTYPES,
    FORWARD_HINT,
    MAX_BITS,
    MAX_STORAGE_BITS,
    MIN_BITS,
    OUT_HAS_NO_GRADIENT,
    ROUNDING_MODES,
    WIRE_BITS,
    QkitTypeError,
    QkitValueError,
    check_code_outputs,
    check_codes_and_params,
    check_dequantize_args,
    check_dequantize_out_dtype,
    check_fake_bits,
    check_fake_quantize_args,
    check_float_input,
    check_groups,
    check_no_self_overlap,
    check_out,
    check_packable,
    check_params_size,
    check_quantize_args,
    check_storage_bits,
    check_vmap_randomness,
    checked_product,
    dtype_name,
    packed_storage,
)
from qkit._library import (
    DEFINED_OPS,
    MISSING_PRIVATE_APIS,
    STRAIGHT_CALLS,
    KernelKeys,
    batch_first,
    bump,
    define,
    each_sample,
    forward_ad_active,
    has_tangent,
    kernel_keys,
    lib,
    register_autograd_rules,
    register_straight_through,
    sample_like,
    straight_to_kernel,
)

# The ops' wrappers, and the names defined here before _library.py and _checks.py took them
# (callers still import them from here).
__all__ = [
    "DEFINED_OPS",
    "FLOAT_DTYPES",
    "FORWARD_HINT",
    "MAX_BITS",
    "MAX_STORAGE_BITS",
    "MIN_BITS",
    "MISSING_PRIVATE_APIS",
    "OUT_HAS_NO_GRADIENT",
    "ROUNDING_MODES",
    "STRAIGHT_CALLS",
    "WIRE_BITS",
    "KernelKeys",
    "QkitTypeError",
    "QkitValueError",
    "bump",
    "check_code_outputs",
    "check_codes_and_params",
    "check_dequantize_args",
    "check_fake_bits",
    "check_float_input",
    "check_groups",
    "check_no_self_overlap",
    "check_out",
    "check_packable",
    "check_params_size",
    "check_storage_bits",
    "checked_product",
    "define",
    "dequantize",
    "dtype_name",
    "fake_quantize",
    "fake_quantize_",
    "forward_ad_active",
    "has_tangent",
    "kernel_keys",
    "quantize",
    "register_autograd_rules",
    "straight_to_kernel",
]


# ---------------------------------------------------------------- fake_quantize

define(
    "fake_quantize(Tensor input, int groups, int bits, bool symmetric=True, bool stochastic=False) -> Tensor",
    seeded=True,
)
define(
    "fake_quantize_(Tensor(a!) input, int groups, int bits, bool symmetric=True, bool stochastic=False) -> ()",
    seeded=True,
)
define(
    "fake_quantize.out(Tensor input, int groups, int bits, bool symmetric=True, bool stochastic=False, *, "
    "Tensor(a!) out) -> ()",
    seeded=True,
)


@torch.library.register_fake("qkit::fake_quantize")
def _fake_quantize_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> Tensor:
    check_fake_quantize_args(input, groups, bits, "fake_quantize")
    return input.new_empty(input.shape)


@torch.library.register_fake("qkit::fake_quantize_")
def _fake_quantize_inplace_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> None:
    check_fake_quantize_args(input, groups, bits, "fake_quantize_")
    check_no_self_overlap(input, "fake_quantize_")


@torch.library.register_fake("qkit::fake_quantize.out")
def _fake_quantize_out_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False, *, out: Tensor
) -> None:
    check_fake_quantize_args(input, groups, bits, "fake_quantize")
    check_out(out, "out", input.dtype, list(input.shape), input, "input", "fake_quantize")


register_autograd_rules("fake_quantize.out", mutates="out", no_grad_for=("input",), hint=OUT_HAS_NO_GRADIENT)
register_autograd_rules("fake_quantize_", mutates="input", hint=FAKE_QUANTIZE_INPLACE_HINT)


def _fake_quantize_vmap(
    info, in_dims: tuple, input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> tuple[Tensor, int]:
    """Batching rule of ``fake_quantize``: ``B`` samples of ``groups`` groups each are one
    call with ``B * groups`` groups, since groups are contiguous runs of the flattened
    batch-first tensor. ``info.randomness`` decides stochastic rounding: "error" refuses,
    "different" draws once for the whole batch, "same" replays one draw for every sample."""
    op = "fake_quantize"
    batch = info.batch_size
    x = batch_first(input, in_dims[0], batch)
    check_fake_quantize_args(sample_like(x), groups, bits, op)  # the words the unbatched call would use
    check_vmap_randomness(stochastic, info.randomness, op)
    if batch == 0:
        return x.new_empty(x.shape), 0
    if stochastic and info.randomness == "same":

        def one(sample: Tensor) -> Tensor:
            return torch.ops.qkit.fake_quantize.default(sample, groups, bits, symmetric, True)

        return each_sample(one, x, same_draw=op), 0
    return torch.ops.qkit.fake_quantize.default(x, batch * groups, bits, symmetric, stochastic), 0


register_straight_through("fake_quantize")
if hasattr(torch.library, "register_vmap"):  # reached at the FuncTorchBatched key, below autograd
    torch.library.register_vmap("qkit::fake_quantize", _fake_quantize_vmap, lib=lib)


# Writing forms under vmap: the functional op's batching rule, then a batched copy (torch's
# own fallback refuses ops that write). One extra copy, and only under vmap. The checks
# are the unbatched call's, on the per-sample view: copy_ alone would broadcast a wrong
# shape and cast a wrong dtype.
def _fake_quantize_inplace_batched(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False
) -> None:
    check_no_self_overlap(input, "fake_quantize_")
    input.copy_(torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic))


def _fake_quantize_out_batched(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, stochastic: bool = False, *, out: Tensor
) -> None:
    check_out(out, "out", input.dtype, list(input.shape), input, "input", "fake_quantize")
    out.copy_(torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic))


lib.impl("fake_quantize_", _fake_quantize_inplace_batched, "FuncTorchBatched")
lib.impl("fake_quantize.out", _fake_quantize_out_batched, "FuncTorchBatched")
_fake_quantize_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize.default)
_fake_quantize_out_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize.out)
_fake_quantize_in_place_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize_.default)


def fake_quantize(
    input: Tensor,
    groups: int = 1,
    bits: int = 8,
    symmetric: bool = True,
    stochastic: bool = False,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Quantize and dequantize ``input`` group-wise: ``dequantize(quantize(input))``.

    Args:
        input: float32/float16/bfloat16 tensor of any shape (``M`` elements), any layout.
        groups: number of groups ``G``; must divide ``M``. Group ``g`` is elements
            ``[g*M/G, (g+1)*M/G)`` of the flattened tensor.
        bits: 2..16.
        symmetric: ``scale = 2^b / (2 max|x|)``; otherwise ``2^b / (max - min)``
            around the group's midpoint.
        stochastic: round ``floor(v + u)``, ``u ~ U[0, 1)`` from torch's generator
            (``torch.manual_seed`` reproduces it) instead of to nearest-even.
        out: optional preallocated result (``input``'s shape, dtype and device; it may be
            ``input`` itself, but must not partly overlap it). Reusing one saves the
            allocation and first-touch page faults of a fresh output on every call.

    Returns:
        A new contiguous tensor of ``input``'s shape and dtype, or ``out``. Autograd
        passes the gradient straight through (not with ``out=``, which has no gradient).
    """
    if out is None:
        keys = kernel_keys(input)
        if keys is not None:
            return _fake_quantize_kernel(keys, input, groups, bits, symmetric, stochastic)
        return torch.ops.qkit.fake_quantize.default(input, groups, bits, symmetric, stochastic)
    keys = kernel_keys(input, out)
    if keys is not None:
        _fake_quantize_out_kernel(keys, input, groups, bits, symmetric, stochastic, out=out)
        bump(out)
        return out
    torch.ops.qkit.fake_quantize.out(input, groups, bits, symmetric, stochastic, out=out)
    return out


def fake_quantize_(
    input: Tensor, groups: int = 1, bits: int = 8, symmetric: bool = True, stochastic: bool = False
) -> Tensor:
    """In-place :func:`fake_quantize`; returns ``input``.

    No gradient: a tensor that requires grad is refused unless grad mode is off
    (``torch.no_grad()``, or ``param.data`` as optimizers and MoQ use it).
    """
    keys = kernel_keys(input)
    if keys is not None:
        _fake_quantize_in_place_kernel(keys, input, groups, bits, symmetric, stochastic)
        bump(input)
        return input
    torch.ops.qkit.fake_quantize_.default(input, groups, bits, symmetric, stochastic)
    return input


# ---------------------------------------------------------------- quantize

define("quantize(Tensor input, int groups, int bits, bool symmetric=True, bool packed=True) -> (Tensor, Tensor)")
define(
    "quantize.out(Tensor input, int groups, int bits, bool symmetric=True, bool packed=True, "
    "*, Tensor(a!) q, Tensor(b!) params) -> ()"
)


def _code_shape(shape: torch.Size, bits: int, packed: bool) -> list[int]:
    out = list(shape)
    if packed_storage(bits, packed) and out:
        out[-1] //= 2
    return out


@torch.library.register_fake("qkit::quantize")
def _quantize_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, packed: bool = True
) -> tuple[Tensor, Tensor]:
    check_quantize_args(input, groups, bits, symmetric, packed)
    codes = input.new_empty(_code_shape(input.shape, bits, packed), dtype=torch.int8)
    params = input.new_empty((groups, 1 if symmetric else 2), dtype=torch.float32)
    return codes, params


@torch.library.register_fake("qkit::quantize.out")
def _quantize_out_fake(
    input: Tensor, groups: int, bits: int, symmetric: bool = True, packed: bool = True, *, q: Tensor, params: Tensor
) -> None:
    check_quantize_args(input, groups, bits, symmetric, packed)
    check_code_outputs(q, params, _code_shape(input.shape, bits, packed), groups, symmetric, input, "quantize")


register_autograd_rules("quantize")
register_autograd_rules("quantize.out", mutates=("q", "params"), hint=OUT_HAS_NO_GRADIENT)
_quantize_kernel = straight_to_kernel(torch.ops.qkit.quantize.default)
_quantize_out_kernel = straight_to_kernel(torch.ops.qkit.quantize.out)


def quantize(
    input: Tensor,
    groups: int = 1,
    bits: int = 8,
    symmetric: bool = True,
    packed: bool = True,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``input`` group-wise to int8 codes (4 bits: packed two per byte by default).

    Args:
        input: float32/float16/bfloat16, ``M`` elements; for packed 4 bits an even last dimension.
        groups: ``G``, dividing ``M``.
        bits: 2..8; codes lie in ``[-2^(b-1), 2^(b-1) - 1]``, one int8 per element, except
            4 bits, whose pairs are packed (the even element in the high nibble).
        symmetric: symmetric (params ``[G, 1]``: step) or asymmetric (``[G, 2]``: step, offset).
        packed: ``False`` stores 4-bit codes one per int8 too (ignored for other widths).
        out: optional preallocated ``(q, params)`` of the shapes and dtypes below, on
            ``input``'s device, sharing no memory with ``input`` or each other.

    Returns:
        ``(q, params)``: ``q`` int8 of ``input``'s shape (packed 4-bit: last dimension halved),
        ``params`` float32 ``[G, 1|2]``. No gradient flows through either.
    """
    if out is None:
        keys = kernel_keys(input)
        if keys is not None:
            return _quantize_kernel(keys, input, groups, bits, symmetric, packed)
        return torch.ops.qkit.quantize.default(input, groups, bits, symmetric, packed)
    q, params = out
    keys = kernel_keys(input, q, params)
    if keys is not None:
        _quantize_out_kernel(keys, input, groups, bits, symmetric, packed, q=q, params=params)
        bump(out)
        return q, params
    torch.ops.qkit.quantize.out(input, groups, bits, symmetric, packed, q=q, params=params)
    return q, params


# ---------------------------------------------------------------- dequantize

define(
    "dequantize(Tensor q, Tensor params, int groups, int bits, bool symmetric=True, ScalarType? dtype=None, "
    "bool packed=True) -> Tensor"
)
define(
    "dequantize.out(Tensor q, Tensor params, int groups, int bits, bool symmetric=True, bool packed=True, "
    "*, Tensor(a!) out) -> ()"
)


def _dequantized_shape(q: Tensor, bits: int, packed: bool) -> list[int]:
    shape = list(q.shape)
    if packed_storage(bits, packed):
        shape[-1] *= 2
    return shape


@torch.library.register_fake("qkit::dequantize")
def _dequantize_fake(
    q: Tensor,
    params: Tensor,
    groups: int,
    bits: int,
    symmetric: bool = True,
    dtype: torch.dtype | None = None,
    packed: bool = True,
) -> Tensor:
    check_dequantize_args(q, params, groups, bits, symmetric, dtype, packed)
    return q.new_empty(_dequantized_shape(q, bits, packed), dtype=dtype or torch.float16)


@torch.library.register_fake("qkit::dequantize.out")
def _dequantize_out_fake(
    q: Tensor, params: Tensor, groups: int, bits: int, symmetric: bool = True, packed: bool = True, *, out: Tensor
) -> None:
    check_dequantize_args(q, params, groups, bits, symmetric, None, packed)
    check_float_input(out, "dequantize", "out")
    check_out(out, "out", out.dtype, _dequantized_shape(q, bits, packed), q, "q", "dequantize")


register_autograd_rules("dequantize", no_grad_for=("params",), hint=DEQUANTIZE_HINT)
register_autograd_rules("dequantize.out", mutates="out", no_grad_for=("params",), hint=DEQUANTIZE_HINT)
_dequantize_kernel = straight_to_kernel(torch.ops.qkit.dequantize.default)
_dequantize_out_kernel = straight_to_kernel(torch.ops.qkit.dequantize.out)


def dequantize(
    q: Tensor,
    params: Tensor,
    groups: int | None = None,
    bits: int = 8,
    symmetric: bool = True,
    dtype: torch.dtype | None = None,
    packed: bool = True,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Inverse of :func:`quantize`: ``y = step * q (+ offset)``, computed in fp32 and rounded once.

    Args:
        q: int8 codes from :func:`quantize`.
        params: float32 ``[G, 1|2]`` from :func:`quantize`.
        groups: ``G``; defaults to ``params.shape[0]``.
        bits: 2..8, as quantized.
        symmetric: as quantized.
        dtype: output dtype: float16 (default, as DeepSpeed), bfloat16 or float32.
            With ``out=``, the dtype of ``out`` (``dtype``, if given, must match it).
        out: optional preallocated result, on ``q``'s device, sharing no memory with
            ``q`` or ``params``.
        packed: as quantized (``False``: 4-bit codes one per int8).

    Returns:
        Tensor of ``q``'s shape (packed 4-bit: last dimension doubled) and ``dtype``, or ``out``.
    """
    if groups is None:
        groups = params.shape[0] if params.dim() > 0 else 1
    if out is None:
        keys = kernel_keys(q, params)
        if keys is not None:
            return _dequantize_kernel(keys, q, params, groups, bits, symmetric, dtype, packed)
        return torch.ops.qkit.dequantize.default(q, params, groups, bits, symmetric, dtype, packed)
    check_dequantize_out_dtype(dtype, out)
    keys = kernel_keys(q, params, out)
    if keys is not None:
        _dequantize_out_kernel(keys, q, params, groups, bits, symmetric, packed, out=out)
        bump(out)
        return out
    torch.ops.qkit.dequantize.out(q, params, groups, bits, symmetric, packed, out=out)
    return out
