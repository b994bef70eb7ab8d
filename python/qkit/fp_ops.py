"""Floating-point formats as qkit ops (docs/ops.md §10): FP8 (``e4m3``, ``e5m2``), FP6
(``e3m2``, ``e2m3``) and FP4 (``e2m1``) elements with group-wise ``absmax`` scales, OCP MX
block scales (``mx``: 32 elements, E8M0 scale) or ``nvfp4`` (16 elements of e2m1, E4M3
block scales and one fp32 tensor scale). Schema, fake impl and typed wrapper side by side;
kernels in ``qkit._C`` (CPU and CUDA).

Storage: FP8 codes as ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``; FP4 codes two per
byte as ``torch.float4_e2m1fn_x2`` (element ``2j`` in the high nibble, as qkit's int4); FP6
codes four in three bytes (``torch.uint8``). Scales: float32 ``[G]`` (absmax),
``torch.float8_e8m0fnu`` ``[G]`` (mx), ``torch.float8_e4m3fn`` ``[4 + G]`` (nvfp4: the first
four bytes hold the fp32 tensor scale, see :func:`nvfp4_scales`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkit._checks import (
    BLOCK,
    CODE_DTYPES,
    DEQUANTIZE_FP_HINT,
    FAKE_QUANTIZE_FP_INPLACE_HINT,
    FORMATS,
    NVFP4_TENSOR_SCALE_BYTES,
    OUT_HAS_NO_GRADIENT,
    SCALE_DTYPES,
    SCALINGS,
    QkitValueError,
    check_dequantize_fp_args,
    check_dequantize_fp_dtype,
    check_dequantize_fp_out_dtype,
    check_fake_quantize_fp_args,
    check_float_input,
    check_no_self_overlap,
    check_out,
    check_quantize_fp_args,
    check_vmap_randomness,
    fp_codes_shape,
    fp_format_bits,
    fp_scales_shape,
)
from qkit._library import (
    batch_first,
    bump,
    define,
    each_sample,
    kernel_keys,
    lib,
    register_autograd_rules,
    register_straight_through,
    sample_like,
    straight_to_kernel,
)

__all__ = [
    "BLOCK",
    "CODE_DTYPES",
    "FORMATS",
    "NVFP4_TENSOR_SCALE_BYTES",
    "SCALE_DTYPES",
    "SCALINGS",
    "default_groups",
    "dequantize_fp",
    "fake_quantize_fp",
    "fake_quantize_fp_",
    "fp_format_bits",
    "nvfp4_scales",
    "quantize_fp",
]


# ---------------------------------------------------------------- schemas and fake impls

_FAKE_ARGS = 'Tensor input, int groups, str format, str scaling="absmax", bool stochastic=False'
define(f"fake_quantize_fp({_FAKE_ARGS}) -> Tensor", seeded=True)
define(
    'fake_quantize_fp_(Tensor(a!) input, int groups, str format, str scaling="absmax", bool stochastic=False) -> ()',
    seeded=True,
)
define(f"fake_quantize_fp.out({_FAKE_ARGS}, *, Tensor(a!) out) -> ()", seeded=True)
define('quantize_fp(Tensor input, int groups, str format, str scaling="absmax") -> (Tensor codes, Tensor scales)')
define(
    'quantize_fp.out(Tensor input, int groups, str format, str scaling="absmax", *, Tensor(a!) codes, '
    "Tensor(b!) scales) -> ()"
)
define(
    'dequantize_fp(Tensor codes, Tensor scales, int groups, str format, str scaling="absmax", '
    "ScalarType? dtype=None) -> Tensor"
)
define(
    'dequantize_fp.out(Tensor codes, Tensor scales, int groups, str format, str scaling="absmax", *, '
    "Tensor(a!) out) -> ()"
)


@torch.library.register_fake("qkit::fake_quantize_fp")
def _fake_quantize_fp_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False
) -> Tensor:
    check_fake_quantize_fp_args(input, groups, format, scaling, "fake_quantize_fp")
    return input.new_empty(input.shape)


@torch.library.register_fake("qkit::fake_quantize_fp_")
def _fake_quantize_fp_inplace_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False
) -> None:
    check_fake_quantize_fp_args(input, groups, format, scaling, "fake_quantize_fp_")
    check_no_self_overlap(input, "fake_quantize_fp_")


@torch.library.register_fake("qkit::fake_quantize_fp.out")
def _fake_quantize_fp_out_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False, *, out: Tensor
) -> None:
    check_fake_quantize_fp_args(input, groups, format, scaling, "fake_quantize_fp")
    check_out(out, "out", input.dtype, list(input.shape), input, "input", "fake_quantize_fp")


@torch.library.register_fake("qkit::quantize_fp")
def _quantize_fp_fake(input: Tensor, groups: int, format: str, scaling: str = "absmax") -> tuple[Tensor, Tensor]:
    check_quantize_fp_args(input, groups, format, scaling)
    codes = input.new_empty(fp_codes_shape(input.shape, format), dtype=CODE_DTYPES[format])
    scales = input.new_empty(fp_scales_shape(groups, scaling), dtype=SCALE_DTYPES[scaling])
    return codes, scales


@torch.library.register_fake("qkit::quantize_fp.out")
def _quantize_fp_out_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", *, codes: Tensor, scales: Tensor
) -> None:
    check_quantize_fp_args(input, groups, format, scaling)
    op = "quantize_fp"
    check_out(codes, "codes", CODE_DTYPES[format], fp_codes_shape(input.shape, format), input, "input", op)
    check_out(scales, "scales", SCALE_DTYPES[scaling], fp_scales_shape(groups, scaling), input, "input", op)


@torch.library.register_fake("qkit::dequantize_fp")
def _dequantize_fp_fake(
    codes: Tensor,
    scales: Tensor,
    groups: int,
    format: str,
    scaling: str = "absmax",
    dtype: torch.dtype | None = None,
) -> Tensor:
    shape = check_dequantize_fp_args(codes, scales, groups, format, scaling)
    return codes.new_empty(shape, dtype=check_dequantize_fp_dtype(dtype, "dequantize_fp"))


@torch.library.register_fake("qkit::dequantize_fp.out")
def _dequantize_fp_out_fake(
    codes: Tensor, scales: Tensor, groups: int, format: str, scaling: str = "absmax", *, out: Tensor
) -> None:
    shape = check_dequantize_fp_args(codes, scales, groups, format, scaling)
    check_float_input(out, "dequantize_fp", "out")
    check_out(out, "out", out.dtype, shape, codes, "codes", "dequantize_fp")


# ---------------------------------------------------------------- autograd

# fake_quantize_fp: d out / d input := 1 (straight through) in every autograd mode, like
# qkit.fake_quantize; the writing forms and the codec have no derivative.
register_straight_through("fake_quantize_fp")
register_autograd_rules("fake_quantize_fp.out", mutates="out", no_grad_for=("input",), hint=OUT_HAS_NO_GRADIENT)
register_autograd_rules("fake_quantize_fp_", mutates="input", hint=FAKE_QUANTIZE_FP_INPLACE_HINT)
register_autograd_rules("quantize_fp")
register_autograd_rules("quantize_fp.out", mutates=("codes", "scales"), hint=OUT_HAS_NO_GRADIENT)
register_autograd_rules("dequantize_fp", no_grad_for=("scales",), hint=DEQUANTIZE_FP_HINT)
register_autograd_rules("dequantize_fp.out", mutates="out", no_grad_for=("scales",), hint=DEQUANTIZE_FP_HINT)


# ---------------------------------------------------------------- vmap
# Groups are contiguous runs of the flattened tensor, so ``B`` batch-first samples of ``G``
# groups are one call with ``B * G`` groups, and absmax/mx scales are per group: ``[B * G]``
# is ``[B, G]``. Codes pack along the last dimension, which a sample shares with the batch,
# so a sample's bytes are its slice of the batch's. nvfp4 also has one tensor scale per
# call (the 4-byte header of its scales): under vmap it runs once per sample.


def _fake_quantize_fp_vmap(
    info, in_dims: tuple, input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False
) -> tuple[Tensor, int]:
    """Batching rule of ``fake_quantize_fp``. ``info.randomness`` decides stochastic rounding:
    "error" refuses, "different" draws once for the whole batch (nvfp4: once per sample),
    "same" replays one draw for every sample."""
    op = "fake_quantize_fp"
    batch = info.batch_size
    x = batch_first(input, in_dims[0], batch)
    check_fake_quantize_fp_args(sample_like(x), groups, format, scaling, op)  # the unbatched call's words
    check_vmap_randomness(stochastic, info.randomness, op)
    if batch == 0:
        return x.new_empty(x.shape), 0

    def one(sample: Tensor) -> Tensor:
        return torch.ops.qkit.fake_quantize_fp.default(sample, groups, format, scaling, stochastic)

    if stochastic and info.randomness == "same":
        return each_sample(one, x, same_draw=op), 0
    if scaling == "nvfp4":
        return each_sample(one, x), 0
    return torch.ops.qkit.fake_quantize_fp.default(x, batch * groups, format, scaling, stochastic), 0


def _quantize_fp_vmap(
    info, in_dims: tuple, input: Tensor, groups: int, format: str, scaling: str = "absmax"
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    """Batching rule of ``quantize_fp``: codes ``[B, *codes]``, scales ``[B, *scales]``."""
    batch = info.batch_size
    x = batch_first(input, in_dims[0], batch)
    codes, scales = _quantize_fp_fake(sample_like(x), groups, format, scaling)  # checks, per-sample shapes
    if batch == 0:
        empty_codes = x.new_empty((0, *codes.shape), dtype=codes.dtype)
        return (empty_codes, x.new_empty((0, *scales.shape), dtype=scales.dtype)), (0, 0)
    if scaling == "nvfp4":

        def one(sample: Tensor) -> tuple[Tensor, Tensor]:
            return torch.ops.qkit.quantize_fp.default(sample, groups, format, scaling)

        return each_sample(one, x), (0, 0)
    codes, scales = torch.ops.qkit.quantize_fp.default(x, batch * groups, format, scaling)
    return (codes, scales.view(batch, groups)), (0, 0)


def _dequantize_fp_vmap(
    info,
    in_dims: tuple,
    codes: Tensor,
    scales: Tensor,
    groups: int,
    format: str,
    scaling: str = "absmax",
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, int]:
    """Batching rule of ``dequantize_fp``; an unbatched ``codes`` or ``scales`` is shared by
    every sample."""
    batch = info.batch_size
    c = batch_first(codes, in_dims[0], batch)
    s = batch_first(scales, in_dims[1], batch)
    shape = check_dequantize_fp_args(sample_like(c), sample_like(s), groups, format, scaling)
    out_dtype = check_dequantize_fp_dtype(dtype, "dequantize_fp")
    if batch == 0:
        return c.new_empty((0, *shape), dtype=out_dtype), 0
    if scaling == "nvfp4":

        def one(sample_codes: Tensor, sample_scales: Tensor) -> Tensor:
            return torch.ops.qkit.dequantize_fp.default(sample_codes, sample_scales, groups, format, scaling, dtype)

        return each_sample(one, c, s), 0
    flat_scales = s.reshape(batch * groups)
    return torch.ops.qkit.dequantize_fp.default(c, flat_scales, batch * groups, format, scaling, dtype), 0


if hasattr(torch.library, "register_vmap"):  # reached at the FuncTorchBatched key, below autograd
    torch.library.register_vmap("qkit::fake_quantize_fp", _fake_quantize_fp_vmap, lib=lib)
    torch.library.register_vmap("qkit::quantize_fp", _quantize_fp_vmap, lib=lib)
    torch.library.register_vmap("qkit::dequantize_fp", _dequantize_fp_vmap, lib=lib)


# Writing forms under vmap: the unbatched call's checks (the fake impls) on the per-sample
# views, the functional op's batching rule, then a batched copy (torch's own fallback
# refuses ops that write). One extra copy, and only under vmap.
def _fake_quantize_fp_inplace_batched(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False
) -> None:
    _fake_quantize_fp_inplace_fake(input, groups, format, scaling, stochastic)
    input.copy_(torch.ops.qkit.fake_quantize_fp.default(input, groups, format, scaling, stochastic))


def _fake_quantize_fp_out_batched(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False, *, out: Tensor
) -> None:
    _fake_quantize_fp_out_fake(input, groups, format, scaling, stochastic, out=out)
    out.copy_(torch.ops.qkit.fake_quantize_fp.default(input, groups, format, scaling, stochastic))


def _quantize_fp_out_batched(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", *, codes: Tensor, scales: Tensor
) -> None:
    _quantize_fp_out_fake(input, groups, format, scaling, codes=codes, scales=scales)
    new_codes, new_scales = torch.ops.qkit.quantize_fp.default(input, groups, format, scaling)
    codes.copy_(new_codes)
    scales.copy_(new_scales)


def _dequantize_fp_out_batched(
    codes: Tensor, scales: Tensor, groups: int, format: str, scaling: str = "absmax", *, out: Tensor
) -> None:
    _dequantize_fp_out_fake(codes, scales, groups, format, scaling, out=out)
    out.copy_(torch.ops.qkit.dequantize_fp.default(codes, scales, groups, format, scaling, out.dtype))


lib.impl("fake_quantize_fp_", _fake_quantize_fp_inplace_batched, "FuncTorchBatched")
lib.impl("fake_quantize_fp.out", _fake_quantize_fp_out_batched, "FuncTorchBatched")
lib.impl("quantize_fp.out", _quantize_fp_out_batched, "FuncTorchBatched")
lib.impl("dequantize_fp.out", _dequantize_fp_out_batched, "FuncTorchBatched")


# ---------------------------------------------------------------- wrappers
# Each takes the straight call to qkit's kernel where nothing else could act on it
# (qkit._library.kernel_keys), the normal dispatcher call otherwise; same results.

_fake_quantize_fp_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize_fp.default)
_fake_quantize_fp_out_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize_fp.out)
_fake_quantize_fp_in_place_kernel = straight_to_kernel(torch.ops.qkit.fake_quantize_fp_.default)
_quantize_fp_kernel = straight_to_kernel(torch.ops.qkit.quantize_fp.default)
_quantize_fp_out_kernel = straight_to_kernel(torch.ops.qkit.quantize_fp.out)
_dequantize_fp_kernel = straight_to_kernel(torch.ops.qkit.dequantize_fp.default)
_dequantize_fp_out_kernel = straight_to_kernel(torch.ops.qkit.dequantize_fp.out)


def default_groups(numel: int, scaling: str) -> int:
    """``groups`` when not given: one group (absmax), or one per block (mx: numel / 32,
    nvfp4: numel / 16; a numel that is no multiple of the block is left to the op's check)."""
    if scaling in BLOCK:
        return max(numel // BLOCK[scaling], 1)
    return 1


def fake_quantize_fp(
    input: Tensor,
    groups: int | None = None,
    format: str = "e4m3",
    scaling: str = "absmax",
    stochastic: bool = False,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Round ``input`` to a floating-point format and back: ``dequantize_fp(quantize_fp(input))``.

    Args:
        input: float32/float16/bfloat16 tensor of any shape (``M`` elements), any layout.
        groups: ``G`` scale groups, contiguous runs of the flattened tensor. absmax: any
            divisor of ``M`` (default 1); mx: ``M / 32``; nvfp4: ``M / 16`` (the defaults).
        format: ``"e4m3"``, ``"e5m2"``, ``"e3m2"``, ``"e2m3"`` or ``"e2m1"``.
        scaling: ``"absmax"``, ``"mx"`` or ``"nvfp4"`` (``e2m1`` only).
        stochastic: round to one of the two neighbouring values with probability linear in
            the distance (unbiased), from torch's generator, instead of to nearest-even.
        out: optional preallocated result (``input``'s shape, dtype and device).

    Returns:
        A tensor of ``input``'s shape and dtype (or ``out``). Autograd passes the gradient
        straight through (not with ``out=``).
    """
    if groups is None:
        groups = default_groups(input.numel(), scaling)
    if out is None:
        keys = kernel_keys(input)
        if keys is not None:
            return _fake_quantize_fp_kernel(keys, input, groups, format, scaling, stochastic)
        return torch.ops.qkit.fake_quantize_fp.default(input, groups, format, scaling, stochastic)
    keys = kernel_keys(input, out)
    if keys is not None:
        _fake_quantize_fp_out_kernel(keys, input, groups, format, scaling, stochastic, out=out)
        bump(out)
        return out
    torch.ops.qkit.fake_quantize_fp.out(input, groups, format, scaling, stochastic, out=out)
    return out


def fake_quantize_fp_(
    input: Tensor, groups: int | None = None, format: str = "e4m3", scaling: str = "absmax", stochastic: bool = False
) -> Tensor:
    """In-place :func:`fake_quantize_fp`; returns ``input`` (no gradient)."""
    if groups is None:
        groups = default_groups(input.numel(), scaling)
    keys = kernel_keys(input)
    if keys is not None:
        _fake_quantize_fp_in_place_kernel(keys, input, groups, format, scaling, stochastic)
        bump(input)
        return input
    torch.ops.qkit.fake_quantize_fp_.default(input, groups, format, scaling, stochastic)
    return input


def quantize_fp(
    input: Tensor,
    groups: int | None = None,
    format: str = "e4m3",
    scaling: str = "absmax",
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize ``input`` to ``format`` codes and per-group scales.

    Args:
        input: float32/float16/bfloat16, ``M`` elements; e2m1 needs an even last dimension,
            e3m2/e2m3 one divisible by 4.
        groups, format, scaling: as :func:`fake_quantize_fp`.
        out: optional preallocated ``(codes, scales)`` of the shapes and dtypes below.

    Returns:
        ``(codes, scales)``. ``codes``: ``input``'s shape in ``CODE_DTYPES[format]``, the last
        dimension halved (e2m1) or times 3/4 (FP6, uint8). ``scales``: float32 ``[G]``
        (absmax: the decode step), float8_e8m0fnu ``[G]`` (mx) or float8_e4m3fn ``[4 + G]``
        (nvfp4; :func:`nvfp4_scales` splits it). No gradient.
    """
    if groups is None:
        groups = default_groups(input.numel(), scaling)
    if out is None:
        keys = kernel_keys(input)
        if keys is not None:
            return _quantize_fp_kernel(keys, input, groups, format, scaling)
        return torch.ops.qkit.quantize_fp.default(input, groups, format, scaling)
    codes, scales = out
    keys = kernel_keys(input, codes, scales)
    if keys is not None:
        _quantize_fp_out_kernel(keys, input, groups, format, scaling, codes=codes, scales=scales)
        bump(out)
        return codes, scales
    torch.ops.qkit.quantize_fp.out(input, groups, format, scaling, codes=codes, scales=scales)
    return codes, scales


def dequantize_fp(
    codes: Tensor,
    scales: Tensor,
    groups: int | None = None,
    format: str = "e4m3",
    scaling: str = "absmax",
    dtype: torch.dtype | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Inverse of :func:`quantize_fp`: each code's value times its group's scale, in fp32,
    rounded once to ``dtype`` (float32 by default, or float16/bfloat16; with ``out=``,
    ``out``'s dtype). ``groups`` defaults to the number of scales."""
    if groups is None:
        groups = scales.shape[0] - (NVFP4_TENSOR_SCALE_BYTES if scaling == "nvfp4" else 0) if scales.dim() else 1
    if out is None:
        keys = kernel_keys(codes, scales)
        if keys is not None:
            return _dequantize_fp_kernel(keys, codes, scales, groups, format, scaling, dtype)
        return torch.ops.qkit.dequantize_fp.default(codes, scales, groups, format, scaling, dtype)
    check_dequantize_fp_out_dtype(dtype, out)
    keys = kernel_keys(codes, scales, out)
    if keys is not None:
        _dequantize_fp_out_kernel(keys, codes, scales, groups, format, scaling, out=out)
        bump(out)
        return out
    torch.ops.qkit.dequantize_fp.out(codes, scales, groups, format, scaling, out=out)
    return out


def nvfp4_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Split nvfp4 ``scales`` (float8_e4m3fn ``[4 + G]``) into the fp32 tensor scale (a
    0-dim view of the first four bytes, native byte order) and the ``G`` E4M3 block scales."""
    if scales.dtype != torch.float8_e4m3fn or scales.dim() != 1 or scales.shape[0] < NVFP4_TENSOR_SCALE_BYTES:
        raise QkitValueError("qkit.nvfp4_scales: `scales` must be float8_e4m3fn of shape [4 + groups]")
    head = scales[:NVFP4_TENSOR_SCALE_BYTES].contiguous().view(torch.uint8).view(torch.float32)
    return head[0], scales[NVFP4_TENSOR_SCALE_BYTES:]
