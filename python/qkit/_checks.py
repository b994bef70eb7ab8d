"""Every argument check and error message of qkit's ops, in one place.

The C++ bindings make the same checks with the same words; these run where the
kernels do not (FakeTensor, meta, torch.compile tracing) and in the typed wrappers.
The kernels can only raise RuntimeError, so these errors are RuntimeErrors too (and
ValueError or TypeError for code that expects those): one ``except`` works on every
path. ``tests/test_error_parity.py`` compares each message with the kernel's, whole.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from enum import IntEnum

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# The one definition of these ranges on the Python side (QuantSpec and MoQ import them);
# the C++ bindings check the same numbers.
#: Code widths ``fake_quantize`` accepts.
MIN_BITS, MAX_BITS = 2, 16
#: ``quantize`` / ``dequantize`` store widths ``MIN_BITS..MAX_STORAGE_BITS``, one code per
#: int8 (4 bits: two per byte unless ``packed=False``; see :func:`packed_storage`).
MAX_STORAGE_BITS = 8
#: Code widths the ZeRO++ ops move.
WIRE_BITS = (4, 8)
#: Rounding modes (``stochastic=False`` / ``True`` of ``fake_quantize``).
ROUNDING_MODES = ("nearest", "stochastic")

_INT64_MAX = 2**63 - 1


class QkitValueError(RuntimeError, ValueError):
    """A qkit op got an argument with a bad value."""


class QkitTypeError(RuntimeError, TypeError):
    """A qkit op got an argument of a bad dtype."""


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as messages name it, without "torch." (the C++ bindings' ``dtype_name``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------- autograd hints and refusals

FORWARD_HINT = "pass the primal (torch.autograd.forward_ad.unpack_dual(t).primal) to drop the tangent on purpose"
OUT_HAS_NO_GRADIENT = "out= writes are not differentiable; call the op without out= (or under torch.no_grad())"
FAKE_QUANTIZE_INPLACE_HINT = "use qkit.fake_quantize (straight-through) or run under torch.no_grad()"
DEQUANTIZE_HINT = "detach `params`, or train with qkit.fake_quantize (straight-through)"
ZEROPP_NO_GRADIENT = "use them on detached tensors (they are communication ops, not differentiable)"


def requires_grad_error(op_name: str, arg_name: str, name: str, hint: str) -> QkitValueError:
    """``arg_name`` of ``qkit::name`` requires grad while grad mode is on; the op has no gradient."""
    return QkitValueError(f"qkit.{op_name}: `{arg_name}` requires grad, but {name} has no gradient - {hint}")


def tangent_error(op_name: str, arg_name: str, name: str) -> QkitValueError:
    """``arg_name`` of ``qkit::name`` carries a forward-mode tangent; the op has no derivative."""
    return QkitValueError(
        f"qkit.{op_name}: `{arg_name}` carries a forward-mode tangent, but {name} has no derivative - {FORWARD_HINT}"
    )


def functorch_unsupported_error(op: str) -> QkitValueError:
    """A torch.func transform of a straight-through op (``fake_quantize``, ``fake_quantize_fp``)
    on a torch without single-level Functions."""
    return QkitValueError(
        f"qkit.{op}: torch.func transforms of it need torch's single-level autograd.Function, "
        f"which torch {torch.__version__} lacks; differentiate with torch.autograd instead"
    )


# ---------------------------------------------------------------- shared checks


def check_float_input(t: Tensor, op: str, arg: str = "input") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise QkitTypeError(f"qkit.{op}: `{arg}` must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def check_groups(numel: int, groups: int, op: str, numel_of: str = "input", name: str = "groups") -> None:
    if groups < 1:
        raise QkitValueError(f"qkit.{op}: `{name}` must be >= 1, got {groups}")
    if numel % groups != 0:
        raise QkitValueError(
            f"qkit.{op}: `{name}` ({groups}) must divide the number of elements of `{numel_of}` ({numel})"
        )


def check_positive(value: int, name: str, op: str) -> None:
    if value < 1:
        raise QkitValueError(f"qkit.{op}: `{name}` must be >= 1, got {value}")


def checked_product(factors: Sequence[int], what: str, op: str) -> int:
    """The product of non-negative int arguments (or sizes) that ``what`` names; the C++
    bindings' error when it does not fit in int64 (where theirs would wrap)."""
    product = math.prod(factors)
    if product > _INT64_MAX:
        raise QkitValueError(f"qkit.{op}: {what} ({' * '.join(str(f) for f in factors)}) overflows int64")
    return product


def check_params_size(groups: int, symmetric: bool, op: str, name: str = "groups") -> None:
    """The bytes of a ``[groups, 1|2]`` float32 params output fit in int64 (an empty input
    accepts any ``groups``, and only the allocation would notice, naming nothing)."""
    per_group = 1 if symmetric else 2
    checked_product((groups, per_group, 4), f"the bytes of the float32 params, `{name}` * {per_group} * 4", op)


def check_fake_bits(bits: int, op: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise QkitValueError(f"qkit.{op}: `bits` must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def check_storage_bits(bits: int, op: str) -> None:
    if not MIN_BITS <= bits <= MAX_STORAGE_BITS:
        raise QkitValueError(f"qkit.{op}: `bits` must be in [{MIN_BITS}, {MAX_STORAGE_BITS}], got {bits}")


def check_wire_bits(bits: int, op: str) -> None:
    if bits not in WIRE_BITS:
        raise QkitValueError(f"qkit.{op}: `bits` must be {WIRE_BITS[0]} or {WIRE_BITS[1]}, got {bits}")


def packed_storage(bits: int, packed: bool = True) -> bool:
    """Whether codes of width ``bits`` are stored two per byte (4 bits, unless ``packed`` is false)."""
    return packed and bits == 4


def check_packable(t: Tensor, packed: bool, op: str, arg: str) -> None:
    if packed and t.numel() > 0 and (t.dim() == 0 or t.shape[-1] % 2 != 0):
        raise QkitValueError(
            f"qkit.{op}: 4-bit storage packs pairs along the last dimension: `{arg}` needs an even last dimension"
        )


def check_no_self_overlap(t: Tensor, op: str, arg: str = "input") -> None:
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True)):
        raise QkitValueError(
            f"qkit.{op}: `{arg}` has elements that share memory (an expanded view); in-place writes "
            "would collide - pass a tensor that owns its elements (e.g. .clone())"
        )


def check_out(
    out: Tensor, name: str, dtype: torch.dtype, shape: list[int], like: Tensor, like_name: str, op: str
) -> None:
    """An ``out=`` tensor: ``dtype``, on ``like``'s device, exactly ``shape``, no expanded dimensions."""
    if out.dtype != dtype:
        raise QkitTypeError(f"qkit.{op}: `{name}` must be {dtype_name(dtype)}, got {dtype_name(out.dtype)}")
    if out.device != like.device:
        raise QkitValueError(f"qkit.{op}: `{name}` must be on the same device as `{like_name}`")
    if list(out.shape) != list(shape):
        raise QkitValueError(f"qkit.{op}: `{name}` must have shape {list(shape)}, got {list(out.shape)}")
    check_no_self_overlap(out, op, name)


def check_code_outputs(
    q: Tensor, params: Tensor, code_shape: list[int], groups: int, symmetric: bool, input: Tensor, op: str
) -> None:
    """The ``out=`` buffers of a quantizing op: int8 ``q`` of ``code_shape`` and float32
    ``params`` ``[groups, 1|2]``, on ``input``'s device."""
    check_out(q, "q", torch.int8, code_shape, input, "input", op)
    check_out(params, "params", torch.float32, [groups, 1 if symmetric else 2], input, "input", op)


def check_codes_and_params(q: Tensor, params: Tensor, op: str) -> None:
    """Quantized input of an op: int8 codes and float32 params on the codes' device."""
    if q.dtype != torch.int8:
        raise QkitTypeError(f"qkit.{op}: `q` must be int8, got {dtype_name(q.dtype)}")
    if params.dtype != torch.float32:
        raise QkitTypeError(f"qkit.{op}: `params` must be float32, got {dtype_name(params.dtype)}")
    if params.device != q.device:
        raise QkitValueError(f"qkit.{op}: `params` must be on the same device as `q`")


# ---------------------------------------------------------------- fake_quantize


def check_fake_quantize_args(input: Tensor, groups: int, bits: int, op: str) -> None:
    """``fake_quantize`` (and its in-place and ``out=`` forms, named by ``op``)."""
    check_float_input(input, op)
    check_fake_bits(bits, op)
    check_groups(input.numel(), groups, op)


def check_vmap_randomness(stochastic: bool, randomness: str, op: str) -> None:
    """A fake quantization under ``torch.vmap``: stochastic rounding draws, which
    ``randomness="error"`` forbids."""
    if stochastic and randomness == "error":
        raise QkitValueError(
            f"qkit.{op}: stochastic rounding draws random numbers, refused under vmap(randomness='error'); "
            "pass randomness='different' or 'same' to torch.vmap"
        )


def check_vmap_same_device(device: torch.device, op: str) -> None:
    """A fake quantization under ``vmap(randomness="same")`` replays one generator state:
    only CPU's and CUDA's."""
    if device.type not in ("cpu", "cuda"):
        raise QkitValueError(f"qkit.{op}: vmap(randomness='same') is supported on CPU and CUDA, not {device}")


# ---------------------------------------------------------------- quantize / dequantize


def check_quantize_args(input: Tensor, groups: int, bits: int, symmetric: bool, packed: bool) -> None:
    op = "quantize"
    check_float_input(input, op)
    check_storage_bits(bits, op)
    check_groups(input.numel(), groups, op)
    check_params_size(groups, symmetric, op)
    check_packable(input, packed_storage(bits, packed), op, "input")


def check_dequantize_args(
    q: Tensor, params: Tensor, groups: int, bits: int, symmetric: bool, dtype: torch.dtype | None, packed: bool
) -> None:
    op = "dequantize"
    check_codes_and_params(q, params, op)
    check_storage_bits(bits, op)
    pairs = packed_storage(bits, packed)
    if pairs and q.dim() == 0:
        raise QkitValueError(f"qkit.{op}: 4-bit `q` must have at least one dimension")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise QkitTypeError(f"qkit.{op}: `dtype` must be float32, float16 or bfloat16, got {dtype_name(dtype)}")
    numel = q.numel() * (2 if pairs else 1)
    check_groups(numel, groups, op, "the dequantized output")
    per_group = 1 if symmetric else 2
    if params.dim() != 2 or params.shape[0] != groups or params.shape[1] != per_group:
        kind = "symmetric" if symmetric else "asymmetric"
        raise QkitValueError(
            f"qkit.{op}: `params` must have shape [groups, {per_group}] = [{groups}, {per_group}] for {kind} "
            f"quantization, got {list(params.shape)}"
        )


def check_dequantize_out_dtype(dtype: torch.dtype | None, out: Tensor) -> None:
    """The wrapper's ``dtype`` and ``out=`` of :func:`qkit.dequantize` agree (``None``: take ``out``'s)."""
    if dtype is not None and dtype != out.dtype:
        raise QkitTypeError(
            f"qkit.dequantize: `dtype` ({dtype_name(dtype)}) and `out` ({dtype_name(out.dtype)}) disagree"
        )


# ---------------------------------------------------------------- ZeRO++ ops (mirror src/zeropp_ops.cpp)


def check_swizzle(
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
    check_wire_bits(bits, op)
    check_groups(input.numel(), groups, op)
    check_params_size(groups, symmetric, op)
    if bits == 4 and (input.numel() // groups) % 2 != 0:
        raise QkitValueError(
            f"qkit.{op}: 4-bit swizzling moves whole bytes: `groups` must leave an even group size, "
            f"got {input.numel() // groups}"
        )
    check_positive(pipeline, "pipeline", op)
    check_positive(nodes, "nodes", op)
    check_positive(devices_per_node, "devices_per_node", op)
    parts = checked_product((nodes, devices_per_node, pipeline), "`nodes` * `devices_per_node` * `pipeline`", op)
    if groups % parts != 0:
        raise QkitValueError(
            f"qkit.{op}: `groups` ({groups}) must be a multiple of `nodes` * `devices_per_node` * `pipeline` ({parts})"
        )


def check_error_feedback(
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


def check_reduction(
    q: Tensor, params: Tensor, in_groups: int, out_groups: int, bits: int, symmetric: bool, devices: int, op: str
) -> int:
    """Checks and returns V, the number of values per input tensor."""
    check_codes_and_params(q, params, op)
    check_wire_bits(bits, op)
    check_positive(devices, "devices_per_node", op)
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


def check_dequantize_unsigned(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int, bits: int
) -> None:
    op = "dequantize_unsigned"
    if data.dtype not in (torch.int8, torch.uint8):
        raise QkitTypeError(f"qkit.{op}: `data` must be int8 or uint8 (raw bytes), got {dtype_name(data.dtype)}")
    check_wire_bits(bits, op)
    if num_groups < 0:
        raise QkitValueError(f"qkit.{op}: `num_groups` must be >= 0, got {num_groups}")
    check_positive(group_size, "group_size", op)
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


# ---------------------------------------------------------------- DeepSpeed drop-in (qkit.deepspeed)


def ds_int(value: object, arg: str, op: str) -> int:
    """An int argument of the DeepSpeed drop-in's ``op``; refuses bool and non-integers."""
    # bool is an int subclass; `groups=True` is a mistake, not 1 group.
    if isinstance(value, bool):
        raise TypeError(f"qkit.deepspeed.{op}: `{arg}` must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"qkit.deepspeed.{op}: `{arg}` must be an int, got {type(value).__name__}") from None


def ds_fake_quantize_args(vals: object, groups: object, bits: object, op: str) -> tuple[int, int]:
    """A DeepSpeed fake quantizer's arguments, checked here so errors name the DeepSpeed
    function called; returns ``(groups, bits)`` as ints."""
    name = f"deepspeed.{op}"
    if not isinstance(vals, Tensor):
        raise TypeError(f"qkit.{name}: `vals` must be a torch.Tensor, got {type(vals).__name__}")
    groups_i = ds_int(groups, "groups", op)
    bits_i = ds_int(bits, "bits", op)
    check_float_input(vals, name, "vals")
    check_fake_bits(bits_i, name)
    check_groups(vals.numel(), groups_i, name, "vals")
    return groups_i, bits_i


def ds_is_symmetric(qtype: object, op: str, kinds: type[IntEnum]) -> bool:
    """Whether DeepSpeed's ``qtype`` (a member of ``kinds``, ``Symmetric = 0`` and
    ``Asymmetric = 1``, or its int) means symmetric; refuses bool and other values."""
    # True would silently mean Asymmetric (== 1): refuse bools outright.
    if isinstance(qtype, bool):
        raise TypeError(f"qkit.deepspeed.{op}: `qtype` must be a QuantizationType (or 0/1), got bool")
    try:
        return kinds(operator.index(qtype)) == 0
    except TypeError:
        raise TypeError(
            f"qkit.deepspeed.{op}: `qtype` must be a QuantizationType (or 0/1), got {type(qtype).__name__}"
        ) from None
    except ValueError:
        raise ValueError(
            f"qkit.deepspeed.{op}: `qtype` must be QuantizationType.Symmetric (0) or .Asymmetric (1), got {qtype!r}"
        ) from None


# ---------------------------------------------------------------- floating-point format ops (mirror src/fp_ops.cpp)
# docs/ops.md §10. The same checks, in the same order and words, as the bindings.

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


def fp_format_bits(format: str) -> int:
    """Bits of one code of ``format``."""
    ebits, mbits = FORMATS[format]
    return 1 + ebits + mbits


def fp_unit(format: str) -> int:
    """Elements per packing unit (whole bytes): 1 (FP8), 2 (FP4) or 4 (FP6)."""
    return {8: 1, 4: 2, 6: 4}[fp_format_bits(format)]


def fp_code_bytes(n: int, format: str) -> int:
    bits = fp_format_bits(format)
    return n if bits == 8 else n // 2 if bits == 4 else n // 4 * 3


def check_fp_format_and_scaling(format: str, scaling: str, op: str) -> None:
    if format not in FORMATS:
        raise QkitValueError(f"qkit.{op}: `format` must be e4m3, e5m2, e3m2, e2m3 or e2m1, got '{format}'")
    if scaling not in SCALINGS:
        raise QkitValueError(f"qkit.{op}: `scaling` must be absmax, mx or nvfp4, got '{scaling}'")
    if scaling == "nvfp4" and format != "e2m1":
        raise QkitValueError(f"qkit.{op}: `scaling` nvfp4 needs `format` e2m1, got '{format}'")


def check_fp_groups(numel: int, groups: int, scaling: str, op: str, numel_of: str) -> None:
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


def check_fp_packable(t: Tensor, format: str, op: str, arg: str) -> None:
    unit = fp_unit(format)
    if unit == 1 or t.numel() == 0:
        return
    if t.dim() == 0 or t.shape[-1] % unit != 0:
        bits = fp_format_bits(format)
        raise QkitValueError(
            f"qkit.{op}: {bits}-bit storage packs {unit} codes per {unit * bits // 8} byte(s) along the last "
            f"dimension: `{arg}` needs a last dimension divisible by {unit}"
        )


def check_fake_quantize_fp_args(input: Tensor, groups: int, format: str, scaling: str, op: str) -> None:
    check_float_input(input, op)
    check_fp_format_and_scaling(format, scaling, op)
    check_fp_groups(input.numel(), groups, scaling, op, "input")


def check_quantize_fp_args(input: Tensor, groups: int, format: str, scaling: str) -> None:
    op = "quantize_fp"
    check_float_input(input, op)
    check_fp_format_and_scaling(format, scaling, op)
    check_fp_groups(input.numel(), groups, scaling, op, "input")
    check_fp_packable(input, format, op, "input")


def fp_codes_shape(shape: torch.Size, format: str) -> list[int]:
    out = list(shape)
    if out:
        out[-1] = fp_code_bytes(out[-1], format)
    return out


def fp_scales_shape(groups: int, scaling: str) -> list[int]:
    return [groups + NVFP4_TENSOR_SCALE_BYTES if scaling == "nvfp4" else groups]


def check_dequantize_fp_args(codes: Tensor, scales: Tensor, groups: int, format: str, scaling: str) -> list[int]:
    """dequantize_fp's checks; returns the output's shape."""
    op = "dequantize_fp"
    check_fp_format_and_scaling(format, scaling, op)
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
    bits = fp_format_bits(format)
    if bits != 8 and codes.dim() == 0:
        raise QkitValueError(f"qkit.{op}: packed `codes` must have at least one dimension")
    if bits == 6 and codes.numel() > 0 and codes.shape[-1] % 3 != 0:
        raise QkitValueError(
            f"qkit.{op}: 6-bit `codes` hold four codes in three bytes: their last dimension must be divisible by 3"
        )
    numel = codes.numel() if bits == 8 else 2 * codes.numel() if bits == 4 else codes.numel() // 3 * 4
    check_fp_groups(numel, groups, scaling, op, "the dequantized output")
    want_shape = fp_scales_shape(groups, scaling)
    if list(scales.shape) != want_shape:
        raise QkitValueError(
            f"qkit.{op}: `scales` must have shape {want_shape} for {scaling} scaling, got {list(scales.shape)}"
        )
    shape = list(codes.shape)
    if bits != 8:
        shape[-1] = 2 * shape[-1] if bits == 4 else shape[-1] // 3 * 4
    return shape


FAKE_QUANTIZE_FP_INPLACE_HINT = "use qkit.fake_quantize_fp (straight-through) or run under torch.no_grad()"
DEQUANTIZE_FP_HINT = "detach `scales`, or train with qkit.fake_quantize_fp (straight-through)"


def check_dequantize_fp_out_dtype(dtype: torch.dtype | None, out: Tensor) -> None:
    """The wrapper's ``dtype`` and ``out=`` of :func:`qkit.dequantize_fp` agree (``None``: take ``out``'s)."""
    if dtype is not None and dtype != out.dtype:
        raise QkitTypeError(
            f"qkit.dequantize_fp: `dtype` ({dtype_name(dtype)}) and `out` ({dtype_name(out.dtype)}) disagree"
        )


def check_dequantize_fp_dtype(dtype: torch.dtype | None, op: str) -> torch.dtype:
    """dequantize_fp's output dtype: float32 when ``None`` (FP8 ranges overflow float16)."""
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise QkitTypeError(f"qkit.{op}: `dtype` must be float32, float16 or bfloat16, got {dtype_name(dtype)}")
    return dtype
