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
