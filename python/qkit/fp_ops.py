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

from qkit.ops import (
    FLOAT_DTYPES,
    OUT_HAS_NO_GRADIENT,
    QkitTypeError,
    QkitValueError,
    check_float_input,
    check_groups,
    check_out,
    checked_product,
    define,
    dtype_name,
    register_autograd_rules,
)

#: Element formats: name -> (exponent bits, mantissa bits).
FORMATS: dict[str, tuple[int, int]] = {"e4m3": (4, 3), "e5m2": (5, 2), "e3m2": (3, 2), "e2m3": (2, 3), "e2m1": (2, 1)}
#: Scalings, and the block size that mx and nvfp4 fix.
SCALINGS = ("absmax", "mx", "nvfp4")
BLOCK = {"mx": 32, "nvfp4": 16}
#: The dtype of each format's codes and of each scaling's scales.
CODE_DTYPES: dict[str, torch.dtype] = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "e3m2": torch.uint8,
    "e2m3": torch.uint8,
    "e2m1": torch.float4_e2m1fn_x2,
}
SCALE_DTYPES: dict[str, torch.dtype] = {
    "absmax": torch.float32,
    "mx": torch.float8_e8m0fnu,
    "nvfp4": torch.float8_e4m3fn,
}
#: Bytes ahead of the block scales in nvfp4's scales (the fp32 tensor scale).
NVFP4_TENSOR_SCALE_BYTES = 4


def format_bits(format: str) -> int:
    """Bits of one code of ``format``."""
    ebits, mbits = FORMATS[format]
    return 1 + ebits + mbits


def _unit(format: str) -> int:
    """Elements per packing unit (whole bytes): 1 (FP8), 2 (FP4) or 4 (FP6)."""
    return {8: 1, 4: 2, 6: 4}[format_bits(format)]


def _code_bytes(n: int, format: str) -> int:
    bits = format_bits(format)
    return n if bits == 8 else n // 2 if bits == 4 else n // 4 * 3


# ---------------------------------------------------------------- argument checks
# The same checks, in the same order and words, as src/fp_ops.cpp.


def _check_format_and_scaling(format: str, scaling: str, op: str) -> None:
    if format not in FORMATS:
        raise QkitValueError(f"qkit.{op}: `format` must be e4m3, e5m2, e3m2, e2m3 or e2m1, got '{format}'")
    if scaling not in SCALINGS:
        raise QkitValueError(f"qkit.{op}: `scaling` must be absmax, mx or nvfp4, got '{scaling}'")
    if scaling == "nvfp4" and format != "e2m1":
        raise QkitValueError(f"qkit.{op}: `scaling` nvfp4 needs `format` e2m1, got '{format}'")


def _check_fp_groups(numel: int, groups: int, scaling: str, op: str, numel_of: str) -> None:
    if scaling == "absmax":
        check_groups(numel, groups, op, numel_of)
        checked_product((groups, 4), "the bytes of the float32 scales, `groups` * 4", op)
        return
    block = BLOCK[scaling]
    if numel % block != 0:
        raise QkitValueError(
            f"qkit.{op}: {scaling} scaling needs blocks of {block} elements: the number of elements of "
            f"`{numel_of}` ({numel}) must be a multiple of {block}"
        )
    if groups != numel // block:
        raise QkitValueError(
            f"qkit.{op}: `groups` must be the number of {block}-element blocks of `{numel_of}` ({numel // block}) "
            f"for {scaling} scaling, got {groups}"
        )


def _check_packable(t: Tensor, format: str, op: str, arg: str) -> None:
    unit = _unit(format)
    if unit == 1 or t.numel() == 0:
        return
    if t.dim() == 0 or t.shape[-1] % unit != 0:
        bits = format_bits(format)
        raise QkitValueError(
            f"qkit.{op}: {bits}-bit storage packs {unit} codes per {unit * bits // 8} byte(s) along the last "
            f"dimension: `{arg}` needs a last dimension divisible by {unit}"
        )


def _check_fake_args(input: Tensor, groups: int, format: str, scaling: str, op: str) -> None:
    check_float_input(input, op)
    _check_format_and_scaling(format, scaling, op)
    _check_fp_groups(input.numel(), groups, scaling, op, "input")


def _check_quantize_args(input: Tensor, groups: int, format: str, scaling: str) -> None:
    op = "quantize_fp"
    check_float_input(input, op)
    _check_format_and_scaling(format, scaling, op)
    _check_fp_groups(input.numel(), groups, scaling, op, "input")
    _check_packable(input, format, op, "input")


def _codes_shape(shape: torch.Size, format: str) -> list[int]:
    out = list(shape)
    if out:
        out[-1] = _code_bytes(out[-1], format)
    return out


def _scales_shape(groups: int, scaling: str) -> list[int]:
    return [groups + NVFP4_TENSOR_SCALE_BYTES if scaling == "nvfp4" else groups]


def _check_dequantize_args(codes: Tensor, scales: Tensor, groups: int, format: str, scaling: str) -> list[int]:
    """dequantize_fp's checks; returns the output's shape."""
    op = "dequantize_fp"
    _check_format_and_scaling(format, scaling, op)
    want = CODE_DTYPES[format]
    if codes.dtype != want:
        raise QkitTypeError(
            f"qkit.{op}: `codes` must be {dtype_name(want)} for format {format}, got {dtype_name(codes.dtype)}"
        )
    want = SCALE_DTYPES[scaling]
    if scales.dtype != want:
        raise QkitTypeError(
            f"qkit.{op}: `scales` must be {dtype_name(want)} for {scaling} scaling, got {dtype_name(scales.dtype)}"
        )
    if scales.device != codes.device:
        raise QkitValueError(f"qkit.{op}: `scales` must be on the same device as `codes`")
    bits = format_bits(format)
    if bits != 8 and codes.dim() == 0:
        raise QkitValueError(f"qkit.{op}: packed `codes` must have at least one dimension")
    if bits == 6 and codes.numel() > 0 and codes.shape[-1] % 3 != 0:
        raise QkitValueError(
            f"qkit.{op}: 6-bit `codes` hold four codes in three bytes: their last dimension must be divisible by 3"
        )
    numel = codes.numel() if bits == 8 else 2 * codes.numel() if bits == 4 else codes.numel() // 3 * 4
    _check_fp_groups(numel, groups, scaling, op, "the dequantized output")
    want_shape = _scales_shape(groups, scaling)
    if list(scales.shape) != want_shape:
        raise QkitValueError(
            f"qkit.{op}: `scales` must have shape {want_shape} for {scaling} scaling, got {list(scales.shape)}"
        )
    shape = list(codes.shape)
    if bits != 8:
        shape[-1] = 2 * shape[-1] if bits == 4 else shape[-1] // 3 * 4
    return shape


def _check_output_dtype(dtype: torch.dtype | None, op: str) -> torch.dtype:
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise QkitTypeError(f"qkit.{op}: `dtype` must be float32, float16 or bfloat16, got {dtype_name(dtype)}")
    return dtype


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
    _check_fake_args(input, groups, format, scaling, "fake_quantize_fp")
    return input.new_empty(input.shape)


@torch.library.register_fake("qkit::fake_quantize_fp_")
def _fake_quantize_fp_inplace_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False
) -> None:
    from qkit.ops import check_no_self_overlap

    _check_fake_args(input, groups, format, scaling, "fake_quantize_fp_")
    check_no_self_overlap(input, "fake_quantize_fp_")


@torch.library.register_fake("qkit::fake_quantize_fp.out")
def _fake_quantize_fp_out_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", stochastic: bool = False, *, out: Tensor
) -> None:
    _check_fake_args(input, groups, format, scaling, "fake_quantize_fp")
    check_out(out, "out", input.dtype, list(input.shape), input, "input", "fake_quantize_fp")


@torch.library.register_fake("qkit::quantize_fp")
def _quantize_fp_fake(input: Tensor, groups: int, format: str, scaling: str = "absmax") -> tuple[Tensor, Tensor]:
    _check_quantize_args(input, groups, format, scaling)
    codes = input.new_empty(_codes_shape(input.shape, format), dtype=CODE_DTYPES[format])
    scales = input.new_empty(_scales_shape(groups, scaling), dtype=SCALE_DTYPES[scaling])
    return codes, scales


@torch.library.register_fake("qkit::quantize_fp.out")
def _quantize_fp_out_fake(
    input: Tensor, groups: int, format: str, scaling: str = "absmax", *, codes: Tensor, scales: Tensor
) -> None:
    _check_quantize_args(input, groups, format, scaling)
    op = "quantize_fp"
    check_out(codes, "codes", CODE_DTYPES[format], _codes_shape(input.shape, format), input, "input", op)
    check_out(scales, "scales", SCALE_DTYPES[scaling], _scales_shape(groups, scaling), input, "input", op)


@torch.library.register_fake("qkit::dequantize_fp")
def _dequantize_fp_fake(
    codes: Tensor,
    scales: Tensor,
    groups: int,
    format: str,
    scaling: str = "absmax",
    dtype: torch.dtype | None = None,
) -> Tensor:
    shape = _check_dequantize_args(codes, scales, groups, format, scaling)
    return codes.new_empty(shape, dtype=_check_output_dtype(dtype, "dequantize_fp"))


@torch.library.register_fake("qkit::dequantize_fp.out")
def _dequantize_fp_out_fake(
    codes: Tensor, scales: Tensor, groups: int, format: str, scaling: str = "absmax", *, out: Tensor
) -> None:
    shape = _check_dequantize_args(codes, scales, groups, format, scaling)
    check_float_input(out, "dequantize_fp", "out")
    check_out(out, "out", out.dtype, shape, codes, "codes", "dequantize_fp")


# ---------------------------------------------------------------- autograd


def _ste_setup(ctx: object, inputs: tuple, output: Tensor) -> None:
    pass  # the straight-through estimator needs nothing from the forward


def _ste_backward(ctx: object, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
    return grad, None, None, None, None


# fake_quantize_fp: d out / d input := 1 (straight through), like qkit.fake_quantize.
torch.library.register_autograd("qkit::fake_quantize_fp", _ste_backward, setup_context=_ste_setup)
register_autograd_rules("fake_quantize_fp.out", mutates="out", no_grad_for=("input",), hint=OUT_HAS_NO_GRADIENT)
register_autograd_rules(
    "fake_quantize_fp_",
    mutates="input",
    hint="use qkit.fake_quantize_fp (straight-through) or run under torch.no_grad()",
)
register_autograd_rules("quantize_fp")
register_autograd_rules("quantize_fp.out", mutates=("codes", "scales"), hint=OUT_HAS_NO_GRADIENT)
_DEQUANTIZE_HINT = "detach `scales`, or train with qkit.fake_quantize_fp (straight-through)"
register_autograd_rules("dequantize_fp", no_grad_for=("scales",), hint=_DEQUANTIZE_HINT)
register_autograd_rules("dequantize_fp.out", mutates="out", no_grad_for=("scales",), hint=_DEQUANTIZE_HINT)


# ---------------------------------------------------------------- wrappers


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
        return torch.ops.qkit.fake_quantize_fp.default(input, groups, format, scaling, stochastic)
    torch.ops.qkit.fake_quantize_fp.out(input, groups, format, scaling, stochastic, out=out)
    return out


def fake_quantize_fp_(
    input: Tensor, groups: int | None = None, format: str = "e4m3", scaling: str = "absmax", stochastic: bool = False
) -> Tensor:
    """In-place :func:`fake_quantize_fp`; returns ``input`` (no gradient)."""
    if groups is None:
        groups = default_groups(input.numel(), scaling)
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
        return torch.ops.qkit.quantize_fp.default(input, groups, format, scaling)
    codes, scales = out
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
        return torch.ops.qkit.dequantize_fp.default(codes, scales, groups, format, scaling, dtype)
    if dtype is not None and dtype != out.dtype:
        raise QkitTypeError(
            f"qkit.dequantize_fp: `dtype` ({dtype_name(dtype)}) and `out` ({dtype_name(out.dtype)}) disagree"
        )
    torch.ops.qkit.dequantize_fp.out(codes, scales, groups, format, scaling, out=out)
    return out


def nvfp4_scales(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Split nvfp4 ``scales`` (float8_e4m3fn ``[4 + G]``) into the fp32 tensor scale (a
    0-dim view of the first four bytes, native byte order) and the ``G`` E4M3 block scales."""
    if scales.dtype != torch.float8_e4m3fn or scales.dim() != 1 or scales.shape[0] < NVFP4_TENSOR_SCALE_BYTES:
        raise QkitValueError("qkit.nvfp4_scales: `scales` must be float8_e4m3fn of shape [4 + groups]")
    head = scales[:NVFP4_TENSOR_SCALE_BYTES].contiguous().view(torch.uint8).view(torch.float32)
    return head[0], scales[NVFP4_TENSOR_SCALE_BYTES:]
