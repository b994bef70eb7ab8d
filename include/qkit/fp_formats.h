// The floating-point element formats (FP8 E4M3/E5M2, FP6 E3M2/E2M3, FP4 E2M1) and
// their group scales (absmax, OCP MX, NVFP4), written once for every device
// (docs/ops.md §10). The CPU and CUDA kernels call exactly these functions, so the
// codes, scales and fake-quantized values agree bit for bit on both. Each step is a
// single correctly rounded fp32 operation (build with FP contraction off).
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "qkit/common.h"

// Every function below is always inlined on the host: the CPU kernels call them once per
// element, in units so large that GCC's inliner would otherwise give up on some of them
// (a call per element). On CUDA/HIP they are QKIT_HD (forced inline) as before.
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define QKIT_FP_HD QKIT_HD
#else
#define QKIT_FP_HD inline __attribute__((always_inline))
#endif

namespace qkit {

// The values are ours (the bindings translate the strings), shared by every device.
enum class FpFormat : int { E4M3 = 0, E5M2 = 1, E3M2 = 2, E2M3 = 3, E2M1 = 4 };

// Host side of every launcher: calls fn with std::integral_constant<FpFormat, format>, so
// each format's kernels are compiled with the format as a constant.
template <typename Fn>
inline void dispatch_format(FpFormat format, const Fn& fn) {
  switch (format) {
    case FpFormat::E4M3: fn(std::integral_constant<FpFormat, FpFormat::E4M3>{}); break;
    case FpFormat::E5M2: fn(std::integral_constant<FpFormat, FpFormat::E5M2>{}); break;
    case FpFormat::E3M2: fn(std::integral_constant<FpFormat, FpFormat::E3M2>{}); break;
    case FpFormat::E2M3: fn(std::integral_constant<FpFormat, FpFormat::E2M3>{}); break;
    case FpFormat::E2M1: fn(std::integral_constant<FpFormat, FpFormat::E2M1>{}); break;
  }
}

enum class FpScaling : int { Absmax = 0, Mx = 1, Nvfp4 = 2 };

// The element sizes that mx and nvfp4 scaling fix (a scale per 32 / 16 elements).
constexpr int64_t kMxBlock = 32;
constexpr int64_t kNvfp4Block = 16;

// One element format: sign, `ebits` exponent and `mbits` mantissa bits, exponent bias
// 2^(ebits-1) - 1. `max` is the largest finite magnitude and `max_pow2` its exponent
// (floor(log2(max)), what MX scaling aligns a block's largest value to). Of the five,
// only E4M3 and E5M2 have NaN codes (S.1111.111 and S.11111.1x); E5M2 also has
// infinities (S.11111.00), which qkit never produces (it saturates).
struct FpSpec {
  int ebits;
  int mbits;
  int bias;
  float max;
  int max_pow2;
  bool has_nan;
};

QKIT_FP_HD constexpr FpSpec fp_spec(FpFormat f) {
  return f == FpFormat::E4M3   ? FpSpec{4, 3, 7, 448.0f, 8, true}
         : f == FpFormat::E5M2 ? FpSpec{5, 2, 15, 57344.0f, 15, true}
         : f == FpFormat::E3M2 ? FpSpec{3, 2, 3, 28.0f, 4, false}
         : f == FpFormat::E2M3 ? FpSpec{2, 3, 1, 7.5f, 2, false}
                               : FpSpec{2, 1, 1, 6.0f, 2, false};
}

QKIT_FP_HD constexpr int fp_bits(FpFormat f) { return 1 + fp_spec(f).ebits + fp_spec(f).mbits; }

// 2^e as a float for -126 <= e <= 127 (every exponent the formats' rounding needs).
QKIT_FP_HD float fp_pow2(int e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

// log2 of the spacing of the format's values around magnitude a (a >= 0, not NaN):
// 2^(e - mbits) with e = a's exponent, or the smallest normal exponent below it.
QKIT_FP_HD int fp_spacing_exp(float a, const FpSpec& s) {
  const int emin = 1 - s.bias;
  const int e = static_cast<int>(float_bits(a) >> 23) - 127;  // -127 for 0 and fp32 subnormals
  return (e > emin ? e : emin) - s.mbits;
}

// |v| clamped to the format's range: values above max and +-Inf saturate to max
// (OCP "satfinite"); NaN also becomes max here (its NaN-ness is kept separately).
QKIT_FP_HD float fp_saturated_abs(float v, const FpSpec& s) {
  const float a = bits_float(float_bits(v) & 0x7FFFFFFFu);
  return a < s.max ? a : s.max;
}

// a (0 <= a <= max) rounded to the nearest value of the format, ties to even. Adding
// 2^(spacing+23) puts a's last kept bit at the last bit of an fp32 mantissa, so the
// FPU rounds (to nearest even) exactly where the format does; subtracting it is exact.
QKIT_FP_HD float fp_round_nearest(float a, const FpSpec& s) {
  const float magic = fp_pow2(fp_spacing_exp(a, s) + 23);
#if defined(__CUDA_ARCH__)
  return __fsub_rn(__fadd_rn(a, magic), magic);
#else
  return (a + magic) - magic;
#endif
}

// Stochastic rounding of a (0 <= a <= max) to one of its two neighbours in the format:
// floor(a / spacing + u) * spacing with u uniform in [0, 1), so the expectation is a
// (up to the fp32 rounding of a / spacing + u, below 2^-20 of a spacing). a / spacing
// and the product are exact (powers of two); max is a multiple of its spacing, so the
// result never exceeds max.
QKIT_FP_HD float fp_round_stochastic(float a, float u, const FpSpec& s) {
  const int k = fp_spacing_exp(a, s);
  const float t = a * fp_pow2(-k) + u;
  const float r = (t + 12582912.0f) - 12582912.0f;  // t < 2^5: nearest integer, then floor
  return (r > t ? r - 1.0f : r) * fp_pow2(k);
}

// The code of r, a value of the format (0 <= r <= max), with sign bit `negative`; for
// formats with a NaN code, `nan` gives S.1..1 (0x7F | sign) instead.
QKIT_FP_HD uint32_t fp_code_of(float r, bool negative, bool nan, const FpSpec& s) {
  const int emin = 1 - s.bias;
  const uint32_t rb = float_bits(r);
  const int re = static_cast<int>(rb >> 23) - 127;
  const uint32_t normal =
      (static_cast<uint32_t>(re + s.bias) << s.mbits) | ((rb & 0x7FFFFFu) >> (23 - s.mbits));
  // The subnormal count r / 2^(emin - mbits) (an integer below 2^mbits, exact) read from the
  // mantissa of count + 2^23: no float->int conversion, which compilers will not speculate
  // (it may trap), so the element loops stay branch-free and vectorise.
  const uint32_t subnormal = float_bits(r * fp_pow2(s.mbits - emin) + 8388608.0f) - 0x4B000000u;
  const uint32_t sign = negative ? 1u << (s.ebits + s.mbits) : 0u;
  const uint32_t code = (re >= emin ? normal : subnormal) | sign;
  // Selects and bitwise logic only (no short-circuit branch): the element loops vectorise.
  return (nan & s.has_nan) ? (sign | 0x7Fu) : code;
}

QKIT_FP_HD bool fp_is_nan(float v) { return (float_bits(v) & 0x7FFFFFFFu) > 0x7F800000u; }
QKIT_FP_HD bool fp_is_negative(float v) { return (float_bits(v) >> 31) != 0; }

// Nearest (u < 0) or stochastic rounding of an already scaled value v: its code.
QKIT_FP_HD uint32_t fp_encode(float v, const FpSpec& s) {
  const float r = fp_round_nearest(fp_saturated_abs(v, s), s);
  return fp_code_of(r, fp_is_negative(v), fp_is_nan(v), s);
}
QKIT_FP_HD uint32_t fp_encode_stochastic(float v, float u, const FpSpec& s) {
  const float r = fp_round_stochastic(fp_saturated_abs(v, s), u, s);
  return fp_code_of(r, fp_is_negative(v), fp_is_nan(v), s);
}

// The value fp_decode(fp_encode(v, s), s) has, without going through the code (what
// fake quantization multiplies by the group's dec): the rounded magnitude r (which
// fp_code_of / fp_decode round-trip exactly, r <= max never hitting a NaN or Inf
// code) or, for an NaN v in a format with NaN codes, the quiet NaN fp_decode returns;
// with v's sign bit, as fp_decode's `negative ? -a : a` sets it (-0 and -NaN included).
QKIT_FP_HD float fp_value_of(float r, float v, const FpSpec& s) {
  const float a = (fp_is_nan(v) & s.has_nan) ? bits_float(0x7FC00000u) : r;
  return bits_float(float_bits(a) | (float_bits(v) & 0x80000000u));
}
QKIT_FP_HD float fp_quantized(float v, const FpSpec& s) {
  return fp_value_of(fp_round_nearest(fp_saturated_abs(v, s), s), v, s);
}
QKIT_FP_HD float fp_quantized_stochastic(float v, float u, const FpSpec& s) {
  return fp_value_of(fp_round_stochastic(fp_saturated_abs(v, s), u, s), v, s);
}

// The value of a code (all codes valid: E4M3 S.1111.111 and E5M2 S.11111.xx with
// xx != 0 are NaN, E5M2 S.11111.00 is +-Inf).
QKIT_FP_HD float fp_decode(uint32_t code, const FpSpec& s) {
  const uint32_t mmask = (1u << s.mbits) - 1u, emask = (1u << s.ebits) - 1u;
  const uint32_t m = code & mmask, e = (code >> s.mbits) & emask;
  const bool negative = ((code >> (s.ebits + s.mbits)) & 1u) != 0;
  const float normal = bits_float((static_cast<uint32_t>(static_cast<int>(e) - s.bias + 127) << 23) |
                                  (m << (23 - s.mbits)));
  const float subnormal = static_cast<float>(static_cast<int32_t>(m)) * fp_pow2(1 - s.bias - s.mbits);
  float a = e == 0 ? subnormal : normal;
  const bool top = s.has_nan & (e == emask);
  const bool inf = top & (s.ebits == 5) & (m == 0);
  const bool nan = top & (s.ebits == 5 ? m != 0 : m == mmask);
  a = inf ? bits_float(0x7F800000u) : a;
  a = nan ? bits_float(0x7FC00000u) : a;
  return negative ? -a : a;
}

// ---- group scales

// What the kernels know about a group after one pass over it: the largest |x| bit
// pattern (NaN > Inf > every finite value, as unsigned integers) and the largest
// finite |x| pattern.
struct FpStats {
  uint32_t top;
  uint32_t finite;
};

QKIT_FP_HD FpStats fp_empty_stats() { return FpStats{0u, 0u}; }
QKIT_FP_HD void fp_accumulate(FpStats& st, float x) {
  const uint32_t a = float_bits(x) & 0x7FFFFFFFu;
  st.top = a > st.top ? a : st.top;
  const uint32_t f = a < 0x7F800000u ? a : 0u;
  st.finite = f > st.finite ? f : st.finite;
}
QKIT_FP_HD FpStats fp_merge(FpStats a, const FpStats& b) {
  a.top = b.top > a.top ? b.top : a.top;
  a.finite = b.finite > a.finite ? b.finite : a.finite;
  return a;
}
QKIT_FP_HD bool fp_stats_nan(const FpStats& st) { return st.top > 0x7F800000u; }

// How a group's elements are scaled: code = encode(x * enc) for mx and nvfp4, or
// encode(x / enc) for absmax (kDivide); the code decodes to decode(code) * dec. `byte`
// is what storage keeps for mx (E8M0) and nvfp4 (E4M3); absmax keeps dec as float32.
struct FpGroup {
  float enc;
  float dec;
  uint32_t byte;
};

// absmax: dec = m / max with m the group's largest finite |x|, so that m maps to the
// format's max; 1 for m = 0, the smallest subnormal where m / max underflows to 0, NaN
// when the group holds a NaN. +-Inf elements saturate to +-max * dec.
QKIT_FP_HD FpGroup fp_absmax_group(const FpStats& st, const FpSpec& s) {
  const float m = bits_float(st.finite);
  float step = m / s.max;
  step = m == 0.0f ? 1.0f : step == 0.0f ? FLT_TRUE_MIN : step;
  if (fp_stats_nan(st)) step = bits_float(0x7FC00000u);
  return FpGroup{step, step, 0u};
}

// The value of an E8M0 scale byte: 2^(b-127), NaN for 0xFF (OCP MX v1.0 §5.4).
QKIT_FP_HD float e8m0_value(uint32_t b) {
  const float value = b == 0 ? bits_float(0x00400000u) : fp_pow2(static_cast<int>(b) - 127);  // 2^-127: subnormal
  return b == 0xFFu ? bits_float(0x7FC00000u) : value;
}

// mx (OCP MX v1.0 §6.3, torchao's ScaleCalculationMode.FLOOR): with m = max |x| over the
// block (Inf counts, NaN propagates), the scale is 2^(floor(log2 m) - max_pow2), its
// exponent read from m's fp32 exponent field and clamped to [-127, 127] (E8M0's range; m
// = 0 or a subnormal m gives the smallest, 2^-127); a NaN block stores 0xFF. Elements
// are multiplied by the exact reciprocal (x / 2^e rounds as x * 2^-e does): by 0 for a
// NaN block, whose NaN elements stay NaN and which decodes to NaN in full.
QKIT_FP_HD FpGroup fp_mx_group(const FpStats& st, const FpSpec& s) {
  int e = static_cast<int>((st.top >> 23) & 0xFFu) - 127 - s.max_pow2;
  e = e < -127 ? -127 : e > 127 ? 127 : e;
  const uint32_t byte = fp_stats_nan(st) ? 0xFFu : static_cast<uint32_t>(e + 127);
  const float enc = fp_stats_nan(st) ? 0.0f : fp_pow2(-e);  // e <= 128 - max_pow2 <= 126
  return FpGroup{enc, e8m0_value(byte), byte};
}

// nvfp4's per-tensor fp32 scale from the tensor's largest finite |x| (m): m / (448 * 6),
// so a block holding m gets the largest E4M3 block scale; at least 2^-126 (so that its
// reciprocal is finite and an all-zero tensor is well defined).
QKIT_FP_HD float fp_nvfp4_tensor_scale(uint32_t finite_top) {
  const float t = bits_float(finite_top) / 2688.0f;
  return t > FLT_MIN ? t : FLT_MIN;
}

// nvfp4 (E2M1 elements, torchao's two-level nvfp4_quantize): block scale
// (m / 6) / tensor_scale clamped to [2^-6, 448] (NaN kept) and rounded to E4M3; elements
// are multiplied by (1 / tensor_scale) / block_scale; they decode with
// tensor_scale * block_scale. A NaN block stores the E4M3 NaN and decodes to NaN.
QKIT_FP_HD FpGroup fp_nvfp4_group(const FpStats& st, float tensor_scale) {
  constexpr FpSpec e4m3 = fp_spec(FpFormat::E4M3);
  const float m = bits_float(st.top);  // NaN and Inf propagate
  const float scaled = (m / 6.0f) / tensor_scale;
  const float lo = 0.015625f;  // 2^-6, E4M3's smallest normal
  const float clamped = fp_is_nan(scaled) ? scaled : scaled < lo ? lo : scaled > e4m3.max ? e4m3.max : scaled;
  const uint32_t byte = fp_encode(clamped, e4m3);
  const float block = fp_decode(byte, e4m3);
  return FpGroup{(1.0f / tensor_scale) / block, tensor_scale * block, byte};
}

// The group of a scaling mode from its stored scale (dequantize's side).
QKIT_FP_HD float fp_dec_of_absmax(float stored) { return stored; }
QKIT_FP_HD float fp_dec_of_mx(uint8_t stored) { return e8m0_value(stored); }
QKIT_FP_HD float fp_dec_of_nvfp4(uint8_t stored, float tensor_scale) {
  return tensor_scale * fp_decode(stored, fp_spec(FpFormat::E4M3));
}

// The scaled value of x in its group: what the element format rounds.
template <bool kDivide>
QKIT_FP_HD float fp_scaled(float x, const FpGroup& g) {
  return kDivide ? x / g.enc : x * g.enc;
}

// ---- packing (docs/ops.md §10): FP8 one code per byte; FP4 two per byte, the even
// element in the high nibble (as qkit's int4); FP6 four codes in three bytes, the first
// in the top six bits (a big-endian bit stream).

// The byte count of n codes (n a multiple of the unit: 1, 2 or 4 elements).
QKIT_FP_HD int64_t fp_code_bytes(int64_t n, FpFormat f) {
  const int bits = fp_bits(f);
  return bits == 8 ? n : bits == 4 ? n / 2 : n / 4 * 3;
}

// Elements per packing unit (the smallest run that fills whole bytes).
QKIT_FP_HD constexpr int fp_unit(FpFormat f) { return fp_bits(f) == 8 ? 1 : fp_bits(f) == 4 ? 2 : 4; }

// Packs one unit of codes c[0, unit) (uint8_t or uint32_t) into its bytes at b.
template <typename Code>
QKIT_FP_HD void fp_pack_unit(const Code* c, uint8_t* b, FpFormat f) {
  const int bits = fp_bits(f);
  if (bits == 8) {
    b[0] = static_cast<uint8_t>(c[0]);
  } else if (bits == 4) {
    b[0] = static_cast<uint8_t>(((c[0] & 0xFu) << 4) | (c[1] & 0xFu));
  } else {
    const uint32_t w = (static_cast<uint32_t>(c[0] & 0x3Fu) << 18) | (static_cast<uint32_t>(c[1] & 0x3Fu) << 12) |
                       (static_cast<uint32_t>(c[2] & 0x3Fu) << 6) | (c[3] & 0x3Fu);
    b[0] = static_cast<uint8_t>(w >> 16);
    b[1] = static_cast<uint8_t>(w >> 8);
    b[2] = static_cast<uint8_t>(w);
  }
}

// The code of element i of a packed stream.
QKIT_FP_HD uint32_t fp_code_at(const uint8_t* bytes, int64_t i, FpFormat f) {
  const int bits = fp_bits(f);
  if (bits == 8) return bytes[i];
  if (bits == 4) return (i & 1) ? (bytes[i >> 1] & 0xFu) : (bytes[i >> 1] >> 4);
  const uint8_t* b = bytes + (i >> 2) * 3;
  const uint32_t w = (static_cast<uint32_t>(b[0]) << 16) | (static_cast<uint32_t>(b[1]) << 8) | b[2];
  return (w >> (6 * (3 - (i & 3)))) & 0x3Fu;
}

}  // namespace qkit
