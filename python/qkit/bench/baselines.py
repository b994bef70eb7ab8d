"""What users have instead of qkit, for ``qkit bench`` and ``qkit.bench.zeropp``.

The same math as each qkit op written in eager PyTorch (the runners also time it under
``torch.compile``), aten's per-channel fake quantization, and on CUDA, when installed,
DeepSpeed's quantizer kernels (the deepspeed 0.17 op, built just in time) and
bitsandbytes' block-wise 8-bit quantization. The loaders return ``(module, None)`` or
``(None, reason)``: a missing baseline is reported, never fatal.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

# ---------------------------------------------------------------- core ops in eager PyTorch


def _symmetric_scale(g: Tensor, bits: int) -> Tensor:
    m = g.abs().amax(dim=1, keepdim=True)
    return torch.where(m == 0, torch.ones_like(m), 2.0 ** (bits - 1) / m)


def eager_fake_quantize(x: Tensor, groups: int, bits: int) -> Tensor:
    """Symmetric group-wise fake quantization as a user would write it in eager PyTorch."""
    g = x.float().reshape(groups, -1)
    scale = _symmetric_scale(g, bits)
    q = (g * scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round()
    return (q * (1.0 / scale)).to(x.dtype).reshape(x.shape)


def eager_quantize(x: Tensor, groups: int, bits: int = 8) -> tuple[Tensor, Tensor]:
    """int8 codes (4 bits: packed pairs) and fp32 steps ``[G, 1]``."""
    g = x.float().reshape(groups, -1)
    scale = _symmetric_scale(g, bits)
    codes = (g * scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round()
    if bits == 4:
        return eager_pack4(codes.to(torch.int32)), 1.0 / scale
    return codes.to(torch.int8).reshape(x.shape), 1.0 / scale


def eager_dequantize(q: Tensor, params: Tensor, groups: int, bits: int, dtype: torch.dtype) -> Tensor:
    codes = eager_unpack4(q) if bits == 4 else q
    return (codes.reshape(groups, -1).float() * params).to(dtype).reshape(-1)


def aten_per_channel_fake_quantize(x: Tensor, groups: int, bits: int) -> Tensor:
    """``torch.fake_quantize_per_channel_affine`` with one channel per group, scales included."""
    g = x.reshape(groups, -1)
    m = g.abs().amax(dim=1).float()
    scale = torch.where(m == 0, torch.ones_like(m), m / 2.0 ** (bits - 1))
    zero_point = torch.zeros(groups, dtype=torch.int32, device=x.device)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.fake_quantize_per_channel_affine(g, scale, zero_point, 0, low, high).reshape(x.shape)


# ---------------------------------------------------------------- the ZeRO++ qgZ chain


def eager_quantize4(v: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``[G, E]`` -> (int32 codes in [-8, 7], fp32 step ``[G, 1]``), symmetric, step = absmax/8."""
    m = v.abs().amax(dim=1, keepdim=True)
    scale = torch.where(m == 0, torch.ones_like(m), 8.0 / m)
    return (v * scale).round().clamp(-8, 7).to(torch.int32), 1.0 / scale


def eager_pack4(codes: Tensor) -> Tensor:
    """Flat pairs -> one byte, the even element in the high nibble."""
    c = codes.reshape(-1)
    return (((c[0::2] & 0xF) << 4) | (c[1::2] & 0xF)).to(torch.uint8).view(torch.int8)


def eager_unpack4(q: Tensor) -> Tensor:
    """int8 bytes -> flat int32 codes (sign-extended nibbles)."""
    b = q.reshape(-1).to(torch.int32)
    lo = b & 0xF
    return torch.stack([b >> 4, torch.where(lo >= 8, lo - 16, lo)], dim=1).reshape(-1)


def eager_swizzled(x: Tensor, groups: int, nodes: int, local: int) -> Tensor:
    """fp32 ``[G, E]`` in swizzled group order: the (node, device) grid transposed."""
    return x.float().reshape(nodes, local, groups // (nodes * local), -1).transpose(0, 1).reshape(groups, -1)


def eager_stage1(x: Tensor, groups: int, nodes: int, local: int) -> tuple[Tensor, Tensor]:
    codes, step = eager_quantize4(eager_swizzled(x, groups, nodes, local))
    return eager_pack4(codes), step


def eager_stage3(q: Tensor, params: Tensor, groups: int, local: int) -> tuple[Tensor, Tensor]:
    vals = eager_unpack4(q).reshape(local, groups // local, -1).float() * params.reshape(local, groups // local, 1)
    codes, step = eager_quantize4(vals.sum(dim=0))
    return eager_pack4(codes), step


def eager_stage5(q: Tensor, params: Tensor, nodes: int, world: int, dtype: torch.dtype) -> Tensor:
    vals = eager_unpack4(q).reshape(params.shape[0], -1).float() * params
    return vals.reshape(nodes, -1).sum(dim=0).div_(world).to(dtype)


def eager_loco_stage1(
    x: Tensor, err: Tensor, beta: float, groups: int, nodes: int, local: int
) -> tuple[Tensor, Tensor]:
    s = eager_swizzled(x, groups, nodes, local) + err.float().reshape(groups, -1)
    codes, step = eager_quantize4(s)
    err.copy_((beta * err.float() + (1 - beta) * (s - codes * step).reshape(-1)).to(err.dtype))
    return eager_pack4(codes), step


def eager_loco_stage3(
    q: Tensor, params: Tensor, err: Tensor, beta: float, groups: int, local: int
) -> tuple[Tensor, Tensor]:
    vals = eager_unpack4(q).reshape(local, groups // local, -1).float() * params.reshape(local, groups // local, 1)
    s = vals.sum(dim=0) + err.float().reshape(groups // local, -1)
    codes, step = eager_quantize4(s)
    err.copy_((beta * err.float() + (1 - beta) * (s - codes * step).reshape(-1)).to(err.dtype))
    return eager_pack4(codes), step


# ---------------------------------------------------------------- floating-point formats in eager PyTorch

#: (exponent bits, mantissa bits, largest finite value) of each element format (OCP FP8 and MX v1.0).
FP_FORMATS = {
    "e4m3": (4, 3, 448.0),
    "e5m2": (5, 2, 57344.0),
    "e3m2": (3, 2, 28.0),
    "e2m3": (2, 3, 7.5),
    "e2m1": (2, 1, 6.0),
}
#: Elements per MX block.
MX_BLOCK = 32


def eager_round_fp(v: Tensor, fmt: str) -> Tensor:
    """fp32 ``v`` rounded to the nearest value of ``fmt`` (ties to even), saturating at its max:
    the quantum of ``|v|``'s binade (never below the subnormal one), ``round(|v| / quantum)``."""
    ebits, mbits, top = FP_FORMATS[fmt]
    a = v.abs().clamp(max=top)
    _, e = torch.frexp(a)  # a = f·2^e with f in [0.5, 1): the binade's exponent is e - 1
    min_exp = 2 - 2 ** (ebits - 1)  # 1 - bias
    quantum = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=min_exp) - mbits)
    return torch.copysign(torch.round(a / quantum) * quantum, v)


def _fp_scale(g: Tensor, fmt: str, scaling: str) -> Tensor:
    """Per-group fp32 decode scale ``[G, 1]``: absmax / max (absmax), or the MX power of two."""
    top = FP_FORMATS[fmt][2]
    m = g.abs().amax(dim=1, keepdim=True)
    if scaling == "absmax":
        step = m / top
        step = torch.where(step == 0, torch.full_like(step, 2.0**-149), step)
        return torch.where(m == 0, torch.ones_like(m), step)
    _, e = torch.frexp(m)  # floor(log2 m) = e - 1; 0 -> the smallest scale
    _, top_e = torch.frexp(torch.tensor(top))
    exp = torch.where(m == 0, -127, (e - 1) - (top_e - 1)).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(m), exp)


#: Elements per NVFP4 block; its tensor scale maps the tensor's absmax to E4M3's max (448)
#: times e2m1's (6); block scales are E4M3 normals, [2^-6, 448].
NVFP4_BLOCK = 16
_NVFP4_RANGE = 448.0 * 6.0


def _nvfp4_scales(g: Tensor) -> tuple[Tensor, Tensor]:
    """NVFP4's two levels for fp32 blocks ``g`` ``[G, 16]``: the fp32 tensor scale ``t`` (0-dim)
    and the E4M3 block scales ``[G, 1]`` (of ``(block absmax / 6) / t``), each one fp32 step."""
    a = g.abs()
    t = torch.clamp(a.amax() / _NVFP4_RANGE, min=2.0**-126)
    block = (a.amax(dim=1, keepdim=True) / 6.0) / t
    return t, block.clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn)


def _fp_rounded(x: Tensor, groups: int, fmt: str, scaling: str) -> tuple[Tensor, Tensor]:
    """``x``'s values in ``fmt``, ``[G, E]`` fp32, and their decode scale ``[G, 1]`` fp32."""
    g = x.float().reshape(groups, -1)
    if scaling == "nvfp4":
        t, block = _nvfp4_scales(g)
        b = block.float()
        return eager_round_fp(g * ((1.0 / t) / b), fmt), t * b
    scale = _fp_scale(g, fmt, scaling)
    return eager_round_fp(g / scale, fmt), scale


def eager_fake_quantize_fp(x: Tensor, groups: int, fmt: str, scaling: str = "absmax") -> Tensor:
    """Group-wise fake quantization to a floating-point format (absmax, MX or NVFP4 scaling), eager."""
    values, dec = _fp_rounded(x, groups, fmt, scaling)
    return (values * dec).to(x.dtype).reshape(x.shape)


def _fp_table(fmt: str) -> Tensor:
    """The non-negative values of ``fmt``'s codes 0, 1, ... (finite ones)."""
    ebits, mbits, _ = FP_FORMATS[fmt]
    codes = torch.arange(2 ** (ebits + mbits), dtype=torch.int32)
    e, m = codes >> mbits, codes & (2**mbits - 1)
    bias = 2 ** (ebits - 1) - 1
    normal = (1 + m / 2**mbits) * torch.pow(2.0, (e - bias).float())
    sub = m / 2**mbits * 2.0 ** (1 - bias)
    return torch.where(e == 0, sub, normal)


def _pack_fp4(values: Tensor, fmt: str, shape: torch.Size) -> Tensor:
    """Values of a 4-bit ``fmt`` as nibbles, two per byte (the even element high), uint8 of
    ``shape`` with the last dimension halved."""
    r = values.reshape(-1)
    table = _fp_table(fmt).to(r.device)
    code = torch.searchsorted(table, r.abs()) | (
        torch.signbit(r).to(torch.int64) << (FP_FORMATS[fmt][0] + FP_FORMATS[fmt][1])
    )
    packed = ((code[0::2] << 4) | code[1::2]).to(torch.uint8)
    out = list(shape)
    out[-1] //= 2
    return packed.reshape(out)


def eager_quantize_fp(x: Tensor, groups: int, fmt: str, scaling: str = "absmax") -> tuple[Tensor, Tensor]:
    """Codes and scales as qkit stores them: FP8 as torch's float8 dtypes (fp32 scales for
    absmax, E8M0 for mx); e2m1 as nibbles, two per byte (the even element high), in uint8
    (the bits of qkit's ``torch.float4_e2m1fn_x2``; inductor has no fp4 dtype); nvfp4 scales
    as qkit's bytes, uint8 ``[4 + G]``: the fp32 tensor scale's four, then the E4M3 blocks'."""
    if scaling == "nvfp4":
        g = x.float().reshape(groups, -1)
        t, block = _nvfp4_scales(g)
        values = eager_round_fp(g * ((1.0 / t) / block.float()), fmt)
        header = t.reshape(1).view(torch.uint8)
        return _pack_fp4(values, fmt, x.shape), torch.cat([header, block.reshape(-1).view(torch.uint8)])
    g = x.float().reshape(groups, -1)
    scale = _fp_scale(g, fmt, scaling)
    v = g / scale
    stored = scale.reshape(-1) if scaling == "absmax" else scale.reshape(-1).to(torch.float8_e8m0fnu)
    if fmt in ("e4m3", "e5m2"):
        dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
        top = FP_FORMATS[fmt][2]  # torch's e5m2 cast overflows to Inf: saturate first
        return v.clamp(-top, top).to(dtype).reshape(x.shape), stored
    return _pack_fp4(eager_round_fp(v, fmt), fmt, x.shape), stored


def eager_dequantize_fp(
    codes: Tensor, scales: Tensor, groups: int, fmt: str, dtype: torch.dtype, scaling: str = "absmax"
) -> Tensor:
    """Values of :func:`eager_quantize_fp`'s storage (e2m1 bytes and nvfp4 scales as uint8),
    flattened, in ``dtype``."""
    if scaling == "nvfp4":
        t = scales[:4].view(torch.float32)
        s = t * scales[4:].view(torch.float8_e4m3fn).float().reshape(groups, 1)
    else:
        s = scales.float().reshape(groups, 1)
    if fmt in ("e4m3", "e5m2"):
        return (codes.float().reshape(groups, -1) * s).to(dtype).reshape(-1)
    b = codes.reshape(-1).to(torch.int64)
    code = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    table = _fp_table(fmt).to(codes.device)
    sign_bit = 1 << (FP_FORMATS[fmt][0] + FP_FORMATS[fmt][1])
    values = torch.where(code & sign_bit != 0, -table[code & (sign_bit - 1)], table[code & (sign_bit - 1)])
    return (values.reshape(groups, -1) * s).to(dtype).reshape(-1)


def load_torchao_nvfp4() -> tuple[ModuleType | None, str | None]:
    """torchao's NVFP4 reference module (``torchao.prototype.mx_formats.nvfp4_tensor``), when installed."""
    try:
        from torchao.prototype.mx_formats import nvfp4_tensor
    except Exception as error:  # ImportError, or a torchao that does not match this torch
        return None, f"torchao NVFP4 not importable ({type(error).__name__})"
    return nvfp4_tensor, None


def load_torchao_mx() -> tuple[ModuleType | None, str | None]:
    """torchao's MX reference module (``torchao.prototype.mx_formats.mx_tensor``), when installed."""
    try:
        from torchao.prototype.mx_formats import mx_tensor
    except Exception as error:  # ImportError, or a torchao that does not match this torch
        return None, f"torchao MX not importable ({type(error).__name__})"
    return mx_tensor, None


# ---------------------------------------------------------------- GPU libraries, when installed


def load_deepspeed(allow_jit: bool = True) -> tuple[ModuleType | None, str | None]:
    """DeepSpeed's quantizer op (``QuantizerBuilder().load()``), or why it is unavailable.

    ``allow_jit=False`` takes the op only when DeepSpeed was installed with it prebuilt
    (``DS_BUILD_QUANTIZER=1``), never compiling it just in time (minutes of nvcc)."""
    if not torch.cuda.is_available():
        return None, "CUDA only"
    try:
        from deepspeed.ops.op_builder import QuantizerBuilder
    except Exception as error:  # any import failure means "not available"
        return None, f"not installed ({type(error).__name__})"
    if not allow_jit:
        try:
            from deepspeed.git_version_info import installed_ops
        except Exception as error:
            return None, f"no prebuilt op list ({type(error).__name__}); JIT build off (--no-jit)"
        if not installed_ops.get(QuantizerBuilder().name, False):
            return None, "quantizer op not prebuilt; JIT build off (--no-jit)"
    try:
        return QuantizerBuilder().load(), None
    except Exception as error:  # its JIT build fails in many ways
        return None, f"build failed: {str(error).splitlines()[0][:80] if str(error) else type(error).__name__}"


def load_bitsandbytes() -> tuple[ModuleType | None, str | None]:
    """``bitsandbytes.functional`` (block-wise 8-bit quantization), or why it is unavailable."""
    if not torch.cuda.is_available():
        return None, "CUDA only"
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as error:
        return None, f"not installed ({type(error).__name__})"
    return bnb_functional, None


#: Block sizes bitsandbytes' quantize_blockwise accepts.
BNB_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
