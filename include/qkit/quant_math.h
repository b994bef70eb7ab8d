// The group-wise quantizer, written once for every device (docs/ops.md §1-2).
// CPU and CUDA kernels call exactly these functions, so they agree bit for bit
// on nearest rounding. Every step is a single correctly rounded fp32 operation;
// build with FP contraction off (-ffp-contract=off / --fmad=false) so no
// compiler fuses a multiply and an add behind our back.
#pragma once

#include <cfloat>
#include <cstdint>

#include "qkit/common.h"

namespace qkit {

// Running statistics of one group (or one slice of it).
//   hi: max|x| (symmetric) or max x (asymmetric);  lo: min x (asymmetric only).
//   poison: sum of x*0, which is NaN exactly when some x is NaN or +-Inf. It lets
//   the min/max loops stay branch-free (and vectorisable) yet still notice
//   non-finite input, which then turns the whole group (and only it) into NaN.
struct GroupStats {
  float hi;
  float lo;
  float poison;
};

QKIT_HD GroupStats empty_stats(bool symmetric) {
  return symmetric ? GroupStats{0.0f, 0.0f, 0.0f} : GroupStats{-FLT_MAX, FLT_MAX, 0.0f};
}

QKIT_HD float max_ignoring_nan(float a, float b) { return b > a ? b : a; }
QKIT_HD float min_ignoring_nan(float a, float b) { return b < a ? b : a; }

QKIT_HD void accumulate(GroupStats& s, float x, bool symmetric) {
  if (symmetric) {
    s.hi = max_ignoring_nan(s.hi, x < 0.0f ? -x : x);
  } else {
    s.hi = max_ignoring_nan(s.hi, x);
    s.lo = min_ignoring_nan(s.lo, x);
  }
  s.poison += x * 0.0f;
}

QKIT_HD GroupStats merge(GroupStats a, const GroupStats& b) {
  a.hi = max_ignoring_nan(a.hi, b.hi);
  a.lo = min_ignoring_nan(a.lo, b.lo);
  a.poison += b.poison;
  return a;
}

// Quantizer parameters of a group. `step` and `offset` are what storage keeps
// (params[g] = [step] or [step, offset]); `scale` is what multiplies the input.
struct QuantParams {
  float scale;
  float step;
  float offset;
};

QKIT_HD float pow2(int e) { return static_cast<float>(1u << e); }
QKIT_HD float code_min(int bits) { return -pow2(bits - 1); }
QKIT_HD float code_max(int bits) { return pow2(bits - 1) - 1.0f; }

// scale = 2^b / range, written as 2^(b-1) / (range/2) so that no finite input
// overflows an intermediate (the two forms are equal for every normal range).
// It is +inf exactly when the half range is below about 2^(b-1)/FLT_MAX: see
// divides_by_step.
QKIT_HD float scale_for_half_range(float half_range, int bits) { return pow2(bits - 1) / half_range; }

// A group whose scale overflows fp32 has a step below 1/FLT_MAX (a subnormal) whose
// reciprocal is no float, so its codes divide by the step instead of multiplying by
// the scale (code_units). The cap at FLT_MAX this replaces gave such groups a step of
// 1/FLT_MAX, far coarser than range/2^b, and all-zero codes for deep subnormals.
QKIT_HD bool divides_by_step(const QuantParams& p) { return p.scale > FLT_MAX; }

// The step of such a group: range/2^b rounded up to a float (a multiple of the
// smallest subnormal, never 0), so that range/step <= 2^b and every value stays
// within one step (docs/ops.md §1, §6). `range` is below 2^b/FLT_MAX here, so
// step * 2^b is exact.
QKIT_HD float step_for_tiny_range(float range, int bits) {
  const float levels = pow2(bits);
  const float step = range * (1.0f / levels);  // one rounding, to nearest
  return step * levels < range ? step + FLT_TRUE_MIN : step;
}

QKIT_HD QuantParams make_params(const GroupStats& s, int bits, bool symmetric) {
  QuantParams p;
  float range;  // max - min (2 max|x| symmetric): read only for a group that divides by its step
  if (symmetric) {
    p.scale = s.hi == 0.0f ? 1.0f : scale_for_half_range(s.hi, bits);
    p.offset = 0.0f;
    range = 2.0f * s.hi;
  } else {
    // hi < lo only for a group with no elements: step 1, offset 0 (as symmetric).
    p.scale = s.hi > s.lo ? scale_for_half_range(0.5f * s.hi - 0.5f * s.lo, bits) : 1.0f;
    p.offset = s.hi < s.lo ? 0.0f : 0.5f * s.hi + 0.5f * s.lo;  // the midpoint, without overflowing hi+lo
    range = s.hi - s.lo;
  }
  if (s.poison != 0.0f) {  // NaN (never anything else): a non-finite value was seen
    p.scale = s.poison;
    p.offset = s.poison;
  }
  // Both computed, then selected: keeps the CPU's per-block params loop branch-free.
  const float tiny_step = step_for_tiny_range(range, bits);
  p.step = divides_by_step(p) ? tiny_step : 1.0f / p.scale;
  return p;
}

// Clamp first, then round: equivalent for integer bounds, and it keeps every
// value inside the range where the round-to-even trick below is exact.
// NaN clamps to `lo`, so the later float->int conversion is always defined.
QKIT_HD float clamp_code(float v, float lo, float hi) {
  v = v > lo ? v : lo;
  return v < hi ? v : hi;
}

// 1.5*2^23. For |v| <= 2^22, v + kRoundingMagic is v rounded to an integer r (ties to
// even) plus the magic, and its bit pattern is 0x4B400000 + r: the low byte is r's.
constexpr float kRoundingMagic = 12582912.0f;

// Round to nearest, ties to even, for |v| <= 2^22.
QKIT_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  // Adding and removing the magic makes the FPU do the rounding; plain x86-64 has
  // no rounding instruction, and this keeps the CPU loops vectorisable.
  return (v + kRoundingMagic) - kRoundingMagic;
#endif
}

QKIT_HD float round_down(float v) {
  const float r = round_half_even(v);
  return r > v ? r - 1.0f : r;
}

// x in code units: (x - offset) * scale, or (x - offset) / step for a group that
// divides_by_step. kByStep must be divides_by_step(p): the CPU kernels hoist that test
// out of their element loops (an if-converted division would cost every group).
template <bool kByStep>
QKIT_HD float code_units(float x, const QuantParams& p) {
  return kByStep ? (x - p.offset) / p.step : (x - p.offset) * p.scale;
}

// x scaled into code units and clamped to [qmin, qmax]: what nearest rounding rounds.
template <bool kByStep>
QKIT_HD float clamped_code_value(float x, const QuantParams& p, float qmin, float qmax) {
  return clamp_code(code_units<kByStep>(x, p), qmin, qmax);
}

// The integer code of x in [code_min, code_max], as a float (exact).
template <bool kByStep>
QKIT_HD float quantize_nearest(float x, const QuantParams& p, float qmin, float qmax) {
  return round_half_even(clamped_code_value<kByStep>(x, p, qmin, qmax));
}

// Stochastic rounding floor(v + u), u in [0, 1): unbiased inside the range.
template <bool kByStep>
QKIT_HD float quantize_stochastic(float x, const QuantParams& p, float qmin, float qmax, float u) {
  return round_down(clamp_code(code_units<kByStep>(x, p) + u, qmin, qmax));
}

// The same, choosing per element (for kernels that do not hoist the choice).
QKIT_HD float quantize_nearest(float x, const QuantParams& p, float qmin, float qmax) {
  return divides_by_step(p) ? quantize_nearest<true>(x, p, qmin, qmax) : quantize_nearest<false>(x, p, qmin, qmax);
}
QKIT_HD float quantize_stochastic(float x, const QuantParams& p, float qmin, float qmax, float u) {
  return divides_by_step(p) ? quantize_stochastic<true>(x, p, qmin, qmax, u)
                            : quantize_stochastic<false>(x, p, qmin, qmax, u);
}

QKIT_HD float dequantize_code(float q, float step, float offset) { return step * q + offset; }

// Params storage (docs/ops.md §2): row g is [step] (symmetric) or [step, offset].
struct StoredParams {
  float step;
  float offset;
};

QKIT_HD StoredParams load_params(const float* params, int64_t g, bool symmetric) {
  return symmetric ? StoredParams{params[g], 0.0f} : StoredParams{params[2 * g], params[2 * g + 1]};
}

QKIT_HD void store_params(float* params, int64_t g, const QuantParams& p, bool symmetric) {
  if (symmetric) {
    params[g] = p.step;
  } else {
    params[2 * g] = p.step;
    params[2 * g + 1] = p.offset;
  }
}

// 4-bit storage: the even element of a pair in the high nibble (docs/ops.md §2).
QKIT_HD int8_t pack_nibbles(int even, int odd) {
  return static_cast<int8_t>(static_cast<uint8_t>(((even & 0xF) << 4) | (odd & 0xF)));
}
QKIT_HD int unpack_high(int8_t byte) { return static_cast<int>(byte) >> 4; }
QKIT_HD int unpack_low(int8_t byte) {
  return static_cast<int>(static_cast<int8_t>(static_cast<uint8_t>(byte) << 4)) >> 4;
}

// Stored codes: 4-bit codes two per byte unless the caller asks for one per int8
// (`pack` false); every other width (2..8) takes one int8.
QKIT_HD constexpr bool packed_storage(int bits, bool pack = true) { return pack && bits == 4; }

// The signed code of element i of a stored code stream (one per int8, or packed pairs).
QKIT_HD int code_at(const int8_t* codes, int64_t i, bool packed) {
  if (!packed) return codes[i];
  const int8_t byte = codes[i >> 1];
  return (i & 1) ? unpack_low(byte) : unpack_high(byte);
}

}  // namespace qkit
