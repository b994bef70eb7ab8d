"""Independent pure-PyTorch reference of qkit's core quantizer (docs/ops.md §1-3).

Every step is one fp32 torch op, in the order the spec gives, so nearest-rounding
results must match the kernels bit for bit. No qkit import on purpose.

Conventions the spec leaves open, chosen here (and checked by the tests):
- a group holding a NaN or +-Inf gets NaN params and NaN output; its codes are
  undefined (``ref_quantize`` returns them, but tests mask them with ``ref_finite_mask``);
- an empty group (``E == 0``) has ``m == 0`` (``mx == mn``): step 1, offset 0;
- a tiny-range group, whose fp32 scale ``2^(b-1) / half_range`` overflows to +inf, gets
  the step ``range / 2^b`` rounded up to fp32 (range = ``2m`` or ``mx - mn`` in fp32) and
  codes ``(x - offset) / step``: its step is subnormal and has no fp32 reciprocal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_range(bits: int) -> tuple[float, float]:
    return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)


def _groups_of(x: Tensor, groups: int) -> Tensor:
    """x flattened in logical order, as fp32 ``[G, E]``."""
    return x.detach().cpu().reshape(-1).to(torch.float32).reshape(groups, -1)


def ref_finite_mask(x: Tensor, groups: int) -> Tensor:
    """Per element (flattened): True where the element's group is all finite."""
    xg = _groups_of(x, groups)
    return torch.isfinite(xg).all(dim=1, keepdim=True).expand_as(xg).reshape(-1)


def _rounded_up_to_fp32(exact: Tensor) -> Tensor:
    """float64 values -> the smallest fp32 values at or above them."""
    nearest = exact.to(torch.float32)
    up = torch.nextafter(nearest, torch.full_like(nearest, torch.inf))
    return torch.where(nearest.to(torch.float64) < exact, up, nearest)


def ref_params(x: Tensor, groups: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, step, offset), each fp32 ``[G, 1]``; scale is +inf for a tiny-range group."""
    xg = _groups_of(x, groups)
    half = torch.tensor(float(2 ** (bits - 1)), dtype=torch.float32)
    zero = torch.zeros(groups, 1, dtype=torch.float32)
    if xg.shape[1] == 0:
        scale, offset, spread = torch.ones(groups, 1), zero, zero
    elif symmetric:
        m = xg.abs().amax(dim=1, keepdim=True)
        scale = torch.where(m == 0, 1.0, half / m)
        offset = zero
        spread = 2 * m
    else:
        mx = xg.amax(dim=1, keepdim=True)
        mn = xg.amin(dim=1, keepdim=True)
        hmx, hmn = 0.5 * mx, 0.5 * mn
        scale = torch.where(mx == mn, 1.0, half / (hmx - hmn))
        offset = hmx + hmn
        spread = mx - mn
    finite = torch.isfinite(xg).all(dim=1, keepdim=True)
    scale = torch.where(finite, scale, torch.nan)
    offset = torch.where(finite, offset, torch.nan)
    # spread / 2^b is exact in float64 (a power-of-two quotient of an fp32 value)
    tiny_step = _rounded_up_to_fp32(spread.to(torch.float64) / 2**bits)
    step = torch.where(torch.isinf(scale), tiny_step, torch.div(torch.ones_like(scale), scale))
    return scale, step, offset


def ref_code_units(x: Tensor, groups: int, bits: int, symmetric: bool) -> Tensor:
    """``(x - offset) * scale`` (``/ step`` for a tiny-range group), fp32 ``[G, E]``, unclamped."""
    scale, step, offset = ref_params(x, groups, bits, symmetric)
    d = _groups_of(x, groups) - offset
    return torch.where(torch.isinf(scale), d / step, d * scale)


def ref_codes(x: Tensor, groups: int, bits: int, symmetric: bool) -> Tensor:
    """Nearest (half-even) integer codes, fp32 ``[G, E]``."""
    qmin, qmax = code_range(bits)
    return torch.round(torch.clamp(ref_code_units(x, groups, bits, symmetric), qmin, qmax))


def pack_int4(codes: Tensor, shape: torch.Size) -> Tensor:
    """Pairs (2k, 2k+1) of the flat code stream -> one byte, the even code in the high nibble."""
    c = codes.reshape(-1).to(torch.int32)
    byte = ((c[0::2] & 0xF) << 4) | (c[1::2] & 0xF)
    out_shape = [*shape[:-1], shape[-1] // 2]
    return byte.to(torch.uint8).view(torch.int8).reshape(out_shape)


def unpack_int4(q: Tensor) -> Tensor:
    """Inverse of pack_int4, flat int32 codes (sign-extended nibbles)."""
    b = q.cpu().reshape(-1).to(torch.int32)
    hi = b >> 4  # arithmetic shift of the sign-extended byte
    lo = b & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    return torch.stack([hi, lo], dim=1).reshape(-1)


def codes_of_storage(q: Tensor, bits: int, packed: bool = True) -> Tensor:
    """Flat int32 codes of a stored tensor (one int8 per code as is; packed 4-bit: unpacked)."""
    return unpack_int4(q) if bits == 4 and packed else q.cpu().reshape(-1).to(torch.int32)


def ref_quantize(
    x: Tensor, groups: int, bits: int, symmetric: bool = True, packed: bool = True
) -> tuple[Tensor, Tensor]:
    """(q int8, params fp32 [G, 1|2]); q has x's shape, packed 4-bit: last dim halved and packed."""
    assert 2 <= bits <= 8
    _, step, offset = ref_params(x, groups, bits, symmetric)
    codes = ref_codes(x, groups, bits, symmetric)
    codes = torch.nan_to_num(codes, nan=0.0)  # non-finite groups: codes undefined
    params = step if symmetric else torch.cat([step, offset], dim=1)
    if bits == 4 and packed:
        return pack_int4(codes, x.shape), params
    return codes.to(torch.int8).reshape(x.shape), params


def dequant_codes(codes: Tensor, step: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    prod = step * codes  # fp32 multiply ...
    return (prod + offset).to(dtype)  # ... then fp32 add (no FMA), then one rounding to dtype


def ref_dequantize(
    q: Tensor,
    params: Tensor,
    groups: int,
    bits: int,
    symmetric: bool = True,
    dtype: torch.dtype | None = None,
    packed: bool = True,
) -> Tensor:
    params = params.cpu().to(torch.float32)
    codes = codes_of_storage(q, bits, packed).to(torch.float32).reshape(groups, -1)
    step = params[:, 0:1]
    offset = torch.zeros_like(step) if symmetric else params[:, 1:2]
    shape = list(q.shape)
    if bits == 4 and packed:
        shape[-1] *= 2
    return dequant_codes(codes, step, offset, dtype or torch.float16).reshape(shape)


def ref_fake_quantize(x: Tensor, groups: int, bits: int, symmetric: bool = True) -> Tensor:
    """dequantize(quantize(x)) in fp32, rounded once to x's dtype; any bits in [2, 16]."""
    _, step, offset = ref_params(x, groups, bits, symmetric)
    codes = ref_codes(x, groups, bits, symmetric)
    return dequant_codes(codes, step, offset, x.dtype).reshape(x.shape)


def ref_philox_uniforms(seed: int, numel: int) -> Tensor:
    """The stochastic-rounding uniforms of elements ``[0, numel)``, fp32: Philox 4x32-10
    (Salmon et al., SC'11) keyed by ``seed``, counter = element // 4, output word element % 4,
    24 bits each. Python integers, one block at a time: slow, and obviously so."""
    mask = 0xFFFFFFFF
    out = []
    for block in range((numel + 3) // 4):
        x, y, z, w = block & mask, (block >> 32) & mask, 0, 0
        k0, k1 = seed & mask, (seed >> 32) & mask
        for _ in range(10):
            p0, p1 = 0xD2511F53 * x, 0xCD9E8D57 * z
            x, y, z, w = (p1 >> 32) ^ y ^ k0, p1 & mask, (p0 >> 32) ^ w ^ k1, p0 & mask
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        out += [(word >> 8) / 16777216.0 for word in (x, y, z, w)]
    return torch.tensor(out[:numel], dtype=torch.float32)


def ref_stochastic_fake_quantize(x: Tensor, groups: int, bits: int, symmetric: bool, seed: int) -> Tensor:
    """Stochastic fake quantization: code ``floor(clamp(v + u))`` (v: :func:`ref_code_units`) with u from
    :func:`ref_philox_uniforms`, each step one fp32 op, then dequantized as for nearest."""
    _, step, offset = ref_params(x, groups, bits, symmetric)
    u = ref_philox_uniforms(seed, x.numel()).reshape(groups, -1)
    qmin, qmax = code_range(bits)
    codes = torch.floor(torch.clamp(ref_code_units(x, groups, bits, symmetric) + u, qmin, qmax))
    return dequant_codes(codes, step, offset, x.dtype).reshape(x.shape)


# ---------------------------------------------------------------- ZeRO++ ops (docs/ops.md §3)
#
# Built on ref_quantize / ref_dequantize: the swizzle is a permutation of plain
# per-group quantization, the reduction is dequantize -> fp32 sum -> quantize,
# LoCo adds the error first and updates it from the dequantized result.


def ref_swizzle_slot(g: int, groups: int, pipeline: int, nodes: int, devices: int) -> int:
    """Output slot of input group ``g``: ``o = (y*P + d*nodes + n)*c + x`` (docs/ops.md §3)."""
    partitions = nodes * devices
    per_partition = groups // partitions
    per_slice = per_partition // pipeline
    z, w = divmod(g, per_partition)
    n, d = divmod(z, devices)
    y, x = divmod(w, per_slice)
    return (y * partitions + d * nodes + n) * per_slice + x


def ref_swizzle_order(groups: int, pipeline: int, nodes: int, devices: int) -> list[int]:
    """``order[o]`` = the input group written to output slot ``o``."""
    order = [-1] * groups
    for g in range(groups):
        order[ref_swizzle_slot(g, groups, pipeline, nodes, devices)] = g
    assert sorted(order) == list(range(groups)), "the swizzle must be a permutation"
    return order


def ref_swizzle(x: Tensor, groups: int, pipeline: int, nodes: int, devices: int) -> Tensor:
    """x flattened, its groups moved to their swizzled slots; 1-D, x's dtype."""
    xg = x.detach().cpu().reshape(groups, -1)
    return xg[ref_swizzle_order(groups, pipeline, nodes, devices)].reshape(-1)


def ref_swizzle_quantize(
    x: Tensor, groups: int, bits: int, symmetric: bool, pipeline: int, nodes: int, devices: int
) -> tuple[Tensor, Tensor]:
    """(q int8 1-D, params [G, 1|2]) in swizzled group order: quantize the swizzled groups."""
    return ref_quantize(ref_swizzle(x, groups, pipeline, nodes, devices), groups, bits, symmetric)


def _loco_update(e: Tensor, s: Tensor, d: Tensor, beta: float) -> Tensor:
    """``beta*e + (1-beta)*(s-d)``, every step one fp32 op; flat, fp32."""
    b = torch.tensor(beta, dtype=torch.float32)
    e32 = e.detach().cpu().reshape(-1).to(torch.float32)
    return b * e32 + (1 - b) * (s - d)


def ref_loco_swizzle_quantize(
    x: Tensor,
    e: Tensor,
    beta: float,
    groups: int,
    bits: int,
    symmetric: bool,
    pipeline: int,
    nodes: int,
    devices: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, params, e_new): ``s = swizzled(x) + e`` in fp32 (e indexed by output position),
    ``s`` quantized, ``e_new = beta*e + (1-beta)*(s - dequant(q))`` in fp32, in e's dtype and shape."""
    s = ref_swizzle(x, groups, pipeline, nodes, devices).to(torch.float32) + e.detach().cpu().reshape(-1).float()
    q, params = ref_quantize(s, groups, bits, symmetric)
    d = ref_dequantize(q, params, groups, bits, symmetric, torch.float32)
    e_new = _loco_update(e, s, d, beta).to(e.dtype).reshape(e.shape)
    return q, params, e_new


def ref_reduction_sum(q: Tensor, params: Tensor, in_groups: int, bits: int, symmetric: bool, devices: int) -> Tensor:
    """``S = sum_j dequant_j`` in fp32, tensors added in order j = 0, 1, ... from 0; 1-D ``[V]``.

    Tensor ``j`` is the j-th of ``devices`` equal slices of the flat code stream and
    dequantizes with its own param rows ``[j*in_groups/L, (j+1)*in_groups/L)``.
    """
    codes = codes_of_storage(q, bits).to(torch.float32).reshape(devices, -1)  # [L, V]
    params = params.detach().cpu().to(torch.float32).reshape(devices, in_groups // devices, -1)
    total = torch.zeros(codes.shape[1], dtype=torch.float32)
    for j in range(devices):
        rows = params[j]  # [g_t, 1|2]
        step = rows[:, 0:1]
        offset = torch.zeros_like(step) if symmetric else rows[:, 1:2]
        deq = dequant_codes(codes[j].reshape(rows.shape[0], -1), step, offset, torch.float32)
        total = total + deq.reshape(-1)
    return total


def _reduced_shape(q: Tensor, devices: int) -> list[int]:
    return [*q.shape[:-1], q.shape[-1] // devices]


def ref_quantized_reduction(
    q: Tensor, params: Tensor, in_groups: int, out_groups: int, bits: int, symmetric: bool, devices: int
) -> tuple[Tensor, Tensor]:
    """(q, params): the fp32 sum of the ``devices`` dequantized tensors, quantized in
    ``out_groups`` groups; q shaped like the input with the last dimension divided by L."""
    total = ref_reduction_sum(q, params, in_groups, bits, symmetric, devices)
    q_out, p_out = ref_quantize(total, out_groups, bits, symmetric)
    return q_out.reshape(_reduced_shape(q, devices)), p_out


def ref_loco_quantized_reduction(
    q: Tensor,
    params: Tensor,
    e: Tensor,
    beta: float,
    in_groups: int,
    out_groups: int,
    bits: int,
    symmetric: bool,
    devices: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, params, e_new): ``s = S + e`` (fp32), quantized; e updated as in LoCo swizzle."""
    s = ref_reduction_sum(q, params, in_groups, bits, symmetric, devices) + e.detach().cpu().reshape(-1).float()
    q_out, p_out = ref_quantize(s, out_groups, bits, symmetric)
    d = ref_dequantize(q_out, p_out, out_groups, bits, symmetric, torch.float32)
    e_new = _loco_update(e, s, d, beta).to(e.dtype).reshape(e.shape)
    return q_out.reshape(_reduced_shape(q, devices)), p_out, e_new


def unsigned_codes(data: Tensor, bits: int) -> Tensor:
    """Flat int32 unsigned codes of raw bytes (4-bit: high nibble = even element)."""
    b = data.detach().cpu().reshape(-1).view(torch.uint8).to(torch.int32)
    if bits == 8:
        return b
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)


def ref_dequantize_unsigned(
    data: Tensor, scale: Tensor, minv: Tensor, num_groups: int, group_size: int, bits: int
) -> Tensor:
    """fp16 ``[num_groups, group_size]``: ``code / scale[g] + minv[g]`` in fp32, rounded once."""
    codes = unsigned_codes(data, bits).to(torch.float32).reshape(num_groups, group_size)
    s = scale.detach().cpu().reshape(-1, 1).to(torch.float32)
    m = minv.detach().cpu().reshape(-1, 1).to(torch.float32)
    return (codes / s + m).to(torch.float16)


# ---------------------------------------------------------------- floating-point formats (docs/ops.md §10)
#
# A second model of the formats, built differently from the kernels: every format is its
# table of representable values (from the sign/exponent/mantissa definition, in float64),
# and rounding is a search in that table (nearest, ties to the even code). Scales follow
# the spec's formulas, one fp32 torch op per step.

FP_FORMATS = {"e4m3": (4, 3), "e5m2": (5, 2), "e3m2": (3, 2), "e2m3": (2, 3), "e2m1": (2, 1)}
FP_BLOCK = {"mx": 32, "nvfp4": 16}


def fp_bits(fmt: str) -> int:
    ebits, mbits = FP_FORMATS[fmt]
    return 1 + ebits + mbits


def ref_fp_value_of_code(code: int, fmt: str) -> float:
    """The value of one code, from the definition (NaN/Inf codes of e4m3/e5m2 included)."""
    ebits, mbits = FP_FORMATS[fmt]
    bias = 2 ** (ebits - 1) - 1
    sign = -1.0 if code >> (ebits + mbits) & 1 else 1.0
    e, m = (code >> mbits) & (2**ebits - 1), code & (2**mbits - 1)
    if fmt == "e4m3" and e == 15 and m == 7:
        return float("nan")
    if fmt == "e5m2" and e == 31:
        return sign * float("inf") if m == 0 else float("nan")
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - mbits)
    return sign * (1 + m / 2**mbits) * 2.0 ** (e - bias)


def ref_fp_table(fmt: str) -> Tensor:
    """float64 values of the non-negative finite codes 0, 1, ... (increasing)."""
    values = [ref_fp_value_of_code(c, fmt) for c in range(2 ** (fp_bits(fmt) - 1))]
    return torch.tensor([v for v in values if v == v and abs(v) != float("inf")], dtype=torch.float64)


def ref_fp_max(fmt: str) -> float:
    return float(ref_fp_table(fmt)[-1])


def _fp_sign_bit(v: Tensor) -> Tensor:
    return (v.to(torch.float32).view(torch.int32) < 0).to(torch.int64)


def ref_fp_round(v: Tensor, fmt: str, u: Tensor | None = None) -> Tensor:
    """Codes (int64, sign included) of fp32 values ``v``: |v| saturated to max, then the
    nearest table value (tie: the even code), or with uniforms ``u`` stochastic rounding
    ``floor(|v| / spacing + u)`` in fp32. NaN -> 0x7F (with sign) for e4m3/e5m2, else the max code."""
    table = ref_fp_table(fmt)
    v32 = v.to(torch.float32).reshape(-1)
    a = v32.abs().to(torch.float64)
    nan = torch.isnan(a)
    a = torch.where(nan | (a > table[-1]), table[-1], a)
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)
    lo = torch.where(table[hi] == a, hi, (hi - 1).clamp(min=0))
    if u is None:
        d_lo, d_hi = a - table[lo], table[hi] - a
        pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    else:
        spacing = (table[hi] - table[lo]).to(torch.float32)
        t = torch.where(hi == lo, torch.zeros_like(v32), a.to(torch.float32) / torch.where(hi == lo, 1.0, spacing))
        k_lo = torch.where(hi == lo, 0.0, table[lo] / torch.where(hi == lo, 1.0, spacing.to(torch.float64)))
        pick_hi = (torch.floor(t + u.reshape(-1).to(torch.float32)) > k_lo.to(torch.float32)) & (hi != lo)
    code = torch.where(pick_hi, hi, lo)
    ebits, mbits = FP_FORMATS[fmt]
    sign = _fp_sign_bit(v32) << (ebits + mbits)
    code = code | sign
    if fmt in ("e4m3", "e5m2"):
        code = torch.where(nan, sign | 0x7F, code)
    return code


def ref_fp_decode(codes: Tensor, fmt: str) -> Tensor:
    """fp32 values of int codes."""
    lut = torch.tensor([ref_fp_value_of_code(c, fmt) for c in range(2 ** fp_bits(fmt))], dtype=torch.float32)
    return lut[codes.to(torch.int64)]


def _fp_groups(x: Tensor, groups: int) -> Tensor:
    return x.detach().cpu().reshape(-1).to(torch.float32).reshape(groups, -1)


def ref_fp_tensor_scale(x: Tensor) -> Tensor:
    """nvfp4's fp32 tensor scale: max(finite amax / 2688, 2^-126)."""
    a = x.detach().cpu().reshape(-1).to(torch.float32).abs()
    amax = torch.where(torch.isfinite(a), a, 0.0).max() if a.numel() else torch.tensor(0.0)
    return torch.clamp(amax / torch.tensor(448.0 * 6.0), min=2.0**-126)


def ref_fp_scales(x: Tensor, groups: int, fmt: str, scaling: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scaled values [G, E] fp32, dec [G, 1] fp32, stored scales (qkit's dtype), tensor scale)."""
    xg = _fp_groups(x, groups)
    a = xg.abs()
    has_nan = torch.isnan(xg).any(dim=1, keepdim=True) if xg.shape[1] else torch.zeros(groups, 1, dtype=torch.bool)
    nan = torch.tensor(float("nan"))
    ts = torch.tensor(0.0)
    if scaling == "absmax":
        finite = torch.where(torch.isfinite(a), a, 0.0)
        m = finite.amax(dim=1, keepdim=True) if xg.shape[1] else torch.zeros(groups, 1)
        step = m / torch.tensor(ref_fp_max(fmt), dtype=torch.float32)
        step = torch.where(step == 0, torch.tensor(2.0**-149), step)
        step = torch.where(m == 0, torch.tensor(1.0), step)
        step = torch.where(has_nan, nan, step)
        return xg / step, step, step.reshape(-1).clone(), ts
    m = a.amax(dim=1, keepdim=True) if xg.shape[1] else torch.zeros(groups, 1)  # NaN propagates
    if scaling == "mx":
        max_pow2 = int(torch.floor(torch.log2(torch.tensor(ref_fp_max(fmt)))))
        _, fe = torch.frexp(m.to(torch.float64))
        floor_log2 = torch.where(m == 0, -127, fe - 1)  # frexp: m = f * 2^fe, f in [0.5, 1)
        floor_log2 = torch.where(torch.isinf(m), 128, floor_log2)
        e = torch.clamp(floor_log2 - max_pow2, -127, 127)
        byte = torch.where(has_nan, 255, e + 127).to(torch.uint8)
        scale64 = torch.pow(torch.tensor(2.0, dtype=torch.float64), e.to(torch.float64))
        scaled = (xg.to(torch.float64) / scale64).to(torch.float32)
        scaled = torch.where(has_nan, xg * 0.0, scaled)
        dec = torch.where(has_nan, nan, scale64.to(torch.float32))
        return scaled, dec, byte.reshape(-1).view(torch.float8_e8m0fnu), ts
    ts = ref_fp_tensor_scale(x)
    block = (m / torch.tensor(6.0)) / ts
    block = torch.where(torch.isnan(block), block, torch.clamp(block, 2.0**-6, 448.0))
    block_code = ref_fp_round(block, "e4m3").reshape(groups, 1)
    block32 = ref_fp_decode(block_code, "e4m3")
    enc = (torch.tensor(1.0) / ts) / block32
    stored = torch.cat([ts.reshape(1).view(torch.uint8), block_code.reshape(-1).to(torch.uint8)])
    return xg * enc, ts * block32, stored.view(torch.float8_e4m3fn), ts


def ref_pack_fp(codes: Tensor, fmt: str, shape: torch.Size) -> Tensor:
    """Storage of int codes of a tensor of ``shape``: FP8 one byte each, FP4 pairs (element
    2j in the high nibble), FP6 quads in three bytes (element 4j in the top six bits)."""
    c = codes.reshape(-1).to(torch.int64)
    bits = fp_bits(fmt)
    out_shape = list(shape)
    if bits == 8:
        return c.to(torch.uint8).reshape(out_shape).view(torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2)
    if bits == 4:
        out_shape[-1] //= 2
        return ((c[0::2] << 4) | c[1::2]).to(torch.uint8).reshape(out_shape).view(torch.float4_e2m1fn_x2)
    out_shape[-1] = out_shape[-1] // 4 * 3
    w = (c[0::4] << 18) | (c[1::4] << 12) | (c[2::4] << 6) | c[3::4]
    return torch.stack([w >> 16, (w >> 8) & 0xFF, w & 0xFF], dim=1).to(torch.uint8).reshape(out_shape)


def ref_unpack_fp(storage: Tensor, fmt: str) -> Tensor:
    """int64 codes (flattened) of qkit's FP storage."""
    b = storage.detach().cpu().contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
    bits = fp_bits(fmt)
    if bits == 8:
        return b
    if bits == 4:
        return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    w = (b[0::3] << 16) | (b[1::3] << 8) | b[2::3]
    return torch.stack([(w >> 18) & 0x3F, (w >> 12) & 0x3F, (w >> 6) & 0x3F, w & 0x3F], dim=1).reshape(-1)


def ref_quantize_fp(x: Tensor, groups: int, fmt: str, scaling: str = "absmax") -> tuple[Tensor, Tensor]:
    """(codes storage, scales) as qkit.quantize_fp stores them."""
    scaled, _, stored, _ = ref_fp_scales(x, groups, fmt, scaling)
    return ref_pack_fp(ref_fp_round(scaled, fmt), fmt, x.shape), stored


def ref_fake_quantize_fp(
    x: Tensor, groups: int, fmt: str, scaling: str = "absmax", uniforms: Tensor | None = None
) -> Tensor:
    """decode(round(scaled)) * dec in fp32, rounded once to x's dtype; stochastic with ``uniforms``."""
    scaled, dec, _, _ = ref_fp_scales(x, groups, fmt, scaling)
    codes = ref_fp_round(scaled, fmt, uniforms).reshape(scaled.shape)
    return (ref_fp_decode(codes, fmt) * dec).to(x.dtype).reshape(x.shape)
