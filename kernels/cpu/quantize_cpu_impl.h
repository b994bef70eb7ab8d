// The CPU quantizer kernels, written once and compiled once per instruction set
// (quantize_cpu_{generic,avx2,avx512}.cpp include this file inside their own
// namespace, under their own target flags). The math is qkit/quant_math.h; this
// file decides how data is walked: in fp32 tiles that stay in L1, so the inner
// loops are plain float loops the compiler vectorises, with fp16/bf16 converted
// at the tile's edges (F16C instructions where the target has them).
//
// The including file defines QKIT_CPU_ISA_NS (the namespace to define), and
// optionally QKIT_CPU_TARGET_PRAGMA (a _Pragma("GCC target(...)")),
// QKIT_CPU_HAS_F16C and QKIT_CPU_VEC_BYTES (SIMD register width, default 16).
//
// Every header is included before the target switch (group_segments.h, a fragment
// meant to be included inside a namespace, is the exception), and everything defined
// after it lives in the ISA namespace, instantiates only ISA-local types and
// calls no out-of-line std templates: the linker folds identical inline and
// template functions across translation units, and an AVX-512 copy of a shared
// one must never be what a generic CPU ends up running.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
// GCC 12 reports -Wmaybe-uninitialized inside its own _mm512_cvtph_ps and
// _mm512_cvtps_ph (a false positive in the header, gone in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#include "qkit/kernels.h"
#include "qkit/philox.h"
#include "qkit/quant_math.h"

#ifndef QKIT_CPU_HAS_F16C
#define QKIT_CPU_HAS_F16C 0
#endif
#ifndef QKIT_CPU_VEC_BYTES
#define QKIT_CPU_VEC_BYTES 16
#endif

#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC push_options
QKIT_CPU_TARGET_PRAGMA
#endif

namespace qkit::cpu::QKIT_CPU_ISA_NS {
namespace {

inline int64_t min_of(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max_of(int64_t a, int64_t b) { return a > b ? a : b; }

// ISA-local element types for the scratch vectors (see the note above).
struct StatsSlot {
  GroupStats stats;
};
struct ParamsSlot {
  QuantParams params;
};

constexpr int64_t kTile = 1024;   // fp32 elements converted and processed at a time (4 KiB)
constexpr int64_t kChunk = 16384;  // elements per task of the statistics / element passes
// Groups up to this size are done in one sweep each (statistics, then the
// transform while the group is still in cache), many groups per task.
constexpr int64_t kFusedGroupLimit = 65536;

// ---- conversions of a tile to and from fp32

inline const float* as_float(const float* x, int64_t, float*) { return x; }
inline const float* as_float(const bf16_t* x, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(x[i]);
  return buf;
}

// fp16 <-> fp32 without branches, for the loops where no conversion instruction
// is available (the whole generic build, the short tails elsewhere): the same bits
// as half_to_float / float_to_half in qkit/common.h, written as selects between
// candidates so the compiler vectorises the loops. (The branchy scalar forms left
// the generic build's fp16 loops scalar: 5-7 ns per element against under 1 for bf16.)

// c ? a : b as bit arithmetic: nested ?: over values that include fp32 arithmetic
// stayed branches (GCC does not speculate a float operation under -ftrapping-math).
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c))); }

inline uint32_t half_bits_to_float_bits(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, magnitude = h & 0x7FFFu;
  // Normal: rebias the exponent (127 - 15 = 112). Inf/NaN: exponent all ones, payload kept.
  const uint32_t normal = (magnitude << 13) + 0x38000000u;
  const uint32_t special = (magnitude << 13) | 0x7F800000u;
  // Zero and subnormals are mantissa * 2^-24: exact in fp32.
  const uint32_t tiny = float_bits(static_cast<float>(static_cast<int32_t>(magnitude)) * 5.9604644775390625e-8f);
  return sign | select_bits(magnitude >= 0x7C00u, special, select_bits(magnitude < 0x400u, tiny, normal));
}

inline uint16_t float_bits_to_half_bits(uint32_t u) {
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  // Normal halves: drop 13 mantissa bits rounding to nearest even (a carry into the
  // exponent is the correct next binade), and rebias the exponent.
  const uint32_t normal = ((a + 0xFFFu + ((a >> 13) & 1u)) >> 13) - 0x1C000u;
  // Below the smallest normal half: adding 0.5 puts the value's bits at the half
  // subnormal step (2^-24) and the fp32 add rounds to nearest even; what lands above
  // 0.5's bits is the half's mantissa (0x400, the smallest normal, when it rounds up).
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  // NaN stays NaN, quiet, with the top of its payload; Inf and overflow give Inf.
  const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  const uint32_t finite = select_bits(a < 0x38800000u, subnormal, normal);
  const uint32_t body = select_bits(a > 0x7F800000u, nan, select_bits(a >= 0x477FF000u, 0x7C00u, finite));
  return static_cast<uint16_t>(sign | body);
}

inline const float* as_float(const half_t* x, int64_t n, float* buf) {
  int64_t i = 0;
#if QKIT_CPU_VEC_BYTES >= 64
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
  }
#endif
#if QKIT_CPU_HAS_F16C
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
#endif
  for (; i < n; ++i) buf[i] = bits_float(half_bits_to_float_bits(x[i].bits));
  return buf;
}

inline void store(const float* v, int64_t n, float* y) { std::memcpy(y, v, sizeof(float) * n); }
inline void store(const float* v, int64_t n, bf16_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(v[i]);
}
inline void store(const float* v, int64_t n, half_t* y) {
  int64_t i = 0;
#if QKIT_CPU_VEC_BYTES >= 64
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
#if QKIT_CPU_HAS_F16C
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) y[i].bits = float_bits_to_half_bits(float_bits(v[i]));
}

// A hint that x[0, n) is read soon (prefetches never fault).
template <typename T>
inline void prefetch(const T* x, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(x);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b);
}

// ---- statistics

// One SIMD register of floats (GCC vector extension): 16 bytes in the generic
// build, 32 / 64 under AVX2 / AVX-512, so one loop serves every ISA.
typedef float Vec __attribute__((vector_size(QKIT_CPU_VEC_BYTES)));
constexpr int64_t kVecLanes = QKIT_CPU_VEC_BYTES / sizeof(float);

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec splat(float f) { return Vec{} + f; }

// Branch-free, NaN-ignoring max/min (NaN and Inf are caught through abs_bits).
inline Vec vmax(Vec a, Vec b) { return b > a ? b : a; }
inline Vec vmin(Vec a, Vec b) { return b < a ? b : a; }

// The same register as int32 lanes.
typedef int32_t IntVec __attribute__((vector_size(QKIT_CPU_VEC_BYTES)));
inline IntVec imax(IntVec a, IntVec b) { return b > a ? b : a; }

// |x| as a bit pattern: ordered like |x| for every non-NaN float, and at or above
// kNonFiniteBits exactly for Inf and NaN. One integer max per register gives the
// symmetric range and the NaN/Inf check together, with no float compare/blend
// and no loop-carried add (the "poison" sum of the scalar code).
constexpr int32_t kNonFiniteBits = 0x7F800000;
inline IntVec abs_bits(Vec v) { return (IntVec)v & 0x7FFFFFFF; }  // a vector cast reinterprets the bits

// Lane l of the result is lane (l + kShift) mod kVecLanes of v.
template <int kShift, typename V>
inline V rotate_lanes(V v) {
#if defined(__clang__)  // clang's shuffle builtin wants literal indices: go through memory
  V r;
  for (int l = 0; l < kVecLanes; ++l) r[l] = v[(l + kShift) % kVecLanes];
  return r;
#else
  IntVec index;
  for (int l = 0; l < kVecLanes; ++l) index[l] = (l + kShift) % kVecLanes;
  return __builtin_shuffle(v, index);
#endif
}

// Horizontal max/min in log2(lanes) shuffle steps (a scalar loop over the lanes
// costs more than the whole vertical pass for a 64-element group).
template <int kWidth = kVecLanes / 2, typename V, typename Op>
inline auto reduce_lanes(V v, const Op& op) {
  if constexpr (kWidth == 0) {
    return v[0];
  } else {
    return reduce_lanes<kWidth / 2>(op(v, rotate_lanes<kWidth>(v)), op);
  }
}
struct MaxOf {
  Vec operator()(Vec a, Vec b) const { return vmax(a, b); }
  IntVec operator()(IntVec a, IntVec b) const { return imax(a, b); }
};
struct MinOf {
  Vec operator()(Vec a, Vec b) const { return vmin(a, b); }
};
inline float reduce_max(Vec v) { return reduce_lanes(v, MaxOf{}); }
inline float reduce_min(Vec v) { return reduce_lanes(v, MinOf{}); }
inline int32_t reduce_max(IntVec v) { return reduce_lanes(v, MaxOf{}); }

// Statistics one element at a time, poison included: for data with NaN/Inf.
GroupStats stats_of_floats_exact(const float* x, int64_t n, bool symmetric) {
  GroupStats s = empty_stats(symmetric);
  for (int64_t i = 0; i < n; ++i) accumulate(s, x[i], symmetric);
  return s;
}

GroupStats stats_of_floats(const float* x, int64_t n, bool symmetric) {
  // Two independent accumulators per statistic hide the max latency.
  const GroupStats init = empty_stats(symmetric);
  IntVec top0{}, top1{};
  Vec hi0 = splat(init.hi), hi1 = hi0, lo0 = splat(init.lo), lo1 = lo0;
  int64_t i = 0;
  for (; i + 2 * kVecLanes <= n; i += 2 * kVecLanes) {
    const Vec v0 = load_vec(x + i), v1 = load_vec(x + i + kVecLanes);
    top0 = imax(top0, abs_bits(v0));
    top1 = imax(top1, abs_bits(v1));
    if (!symmetric) {
      hi0 = vmax(hi0, v0);
      hi1 = vmax(hi1, v1);
      lo0 = vmin(lo0, v0);
      lo1 = vmin(lo1, v1);
    }
  }
  const int32_t top = reduce_max(imax(top0, top1));
  if (top >= kNonFiniteBits) return stats_of_floats_exact(x, n, symmetric);
  GroupStats s = symmetric ? GroupStats{bits_float(static_cast<uint32_t>(top)), 0.0f, 0.0f}
                           : GroupStats{reduce_max(vmax(hi0, hi1)), reduce_min(vmin(lo0, lo1)), 0.0f};
  for (; i < n; ++i) accumulate(s, x[i], symmetric);
  return s;
}

template <typename T>
GroupStats stats_of(const T* x, int64_t n, bool symmetric) {
  GroupStats s = empty_stats(symmetric);
  float buf[kTile];
  for (int64_t b = 0; b < n; b += kTile) {
    const int64_t m = min_of(kTile, n - b);
    s = merge(s, stats_of_floats(as_float(x + b, m, buf), m, symmetric));
  }
  return s;
}

#include "group_segments.h"  // for_each_group_segment, defined here in the ISA namespace

// Room for the Philox blocks that cover up to kTile elements starting anywhere.
constexpr int64_t kUniformBuf = kTile + 8;

// The stochastic-rounding uniforms of elements [first, first + n) of stream `seed`
// (n <= kTile), at the returned pointer into buf: the Philox draws of the blocks of
// four that cover them, computed round by round over arrays of counters so the
// multiplies vectorise. (A loop over elements drawing on every fourth one was
// if-converted into a draw per element: 100x slower than nearest rounding.)
const float* uniforms_for(uint64_t seed, int64_t first, int64_t n, float (&buf)[kUniformBuf]) {
  constexpr int64_t kMaxBlocks = kUniformBuf / 4;
  const int64_t b0 = first >> 2, count = ((first + n + 3) >> 2) - b0;
  uint32_t x[kMaxBlocks], y[kMaxBlocks], z[kMaxBlocks], w[kMaxBlocks];
  for (int64_t b = 0; b < count; ++b) {
    const auto counter = static_cast<uint64_t>(b0 + b);
    x[b] = static_cast<uint32_t>(counter);
    y[b] = static_cast<uint32_t>(counter >> 32);
    z[b] = 0;
    w[b] = 0;
  }
  auto k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int64_t b = 0; b < count; ++b) philox_round(x[b], y[b], z[b], w[b], k0, k1);
    philox_next_key(k0, k1);
  }
  for (int64_t b = 0; b < count; ++b) {
    buf[4 * b] = uniform_of(x[b]);
    buf[4 * b + 1] = uniform_of(y[b]);
    buf[4 * b + 2] = uniform_of(z[b]);
    buf[4 * b + 3] = uniform_of(w[b]);
  }
  return buf + (first & 3);
}

// Calls put(i, code) with the integer code (as a float) of each fp32 value v[i],
// i < n; v[0, n) are elements [first, first + n) of the tensor (the index keys
// the stochastic draws). `put` is inlined into each loop, so the codes never go
// through memory and the loops vectorise. (Nearest int8 codes skip this: int_codes_of.)
// p and put are taken by value: through a reference, an int8 store may alias them
// (char aliasing), so the params and put's captured pointer would be reloaded per
// element and the loop would not vectorise (6x slower).
template <bool kByStep, typename Put>
void emit_codes_as(const float* v, int64_t n, int64_t first, const QuantParams p, const QuantJob& job, Put put) {
  const float qmin = code_min(job.bits), qmax = code_max(job.bits);
  if (job.seed == nullptr) {
    for (int64_t i = 0; i < n; ++i) put(i, quantize_nearest<kByStep>(v[i], p, qmin, qmax));
    return;
  }
  const uint64_t seed = static_cast<uint64_t>(*job.seed);
  float buf[kUniformBuf];
  for (int64_t s = 0; s < n; s += kTile) {
    const int64_t m = min_of(kTile, n - s);
    const float* u = uniforms_for(seed, first + s, m, buf);
    for (int64_t i = 0; i < m; ++i) put(s + i, quantize_stochastic<kByStep>(v[s + i], p, qmin, qmax, u[i]));
  }
}

// The tiny-range test (divides_by_step) once per call, not per element.
template <typename Put>
void emit_codes(const float* v, int64_t n, int64_t first, const QuantParams p, const QuantJob& job, Put put) {
  if (divides_by_step(p)) {
    emit_codes_as<true>(v, n, first, p, job, put);
  } else {
    emit_codes_as<false>(v, n, first, p, job, put);
  }
}

// quantize_nearest's code as an int8, read from the low byte of the rounding sum's bits
// (see kRoundingMagic): no subtract and no float->int conversion per element.
template <bool kByStep>
inline int8_t nearest_code_byte(float x, const QuantParams& p, float qmin, float qmax) {
  const float sum = clamped_code_value<kByStep>(x, p, qmin, qmax) + kRoundingMagic;
  uint32_t bits;
  std::memcpy(&bits, &sum, sizeof bits);
  return static_cast<int8_t>(bits & 0xFFu);
}

// The int8 codes of v[0, n) into q (see emit_codes).
void int_codes_of(const float* v, int64_t n, int64_t first, const QuantParams p, const QuantJob& job, int8_t* q) {
  if (job.seed == nullptr) {
    const float qmin = code_min(job.bits), qmax = code_max(job.bits);
    if (divides_by_step(p)) {
      for (int64_t i = 0; i < n; ++i) q[i] = nearest_code_byte<true>(v[i], p, qmin, qmax);
    } else {
      for (int64_t i = 0; i < n; ++i) q[i] = nearest_code_byte<false>(v[i], p, qmin, qmax);
    }
    return;
  }
  emit_codes(v, n, first, p, job, [q](int64_t i, float code) { q[i] = static_cast<int8_t>(static_cast<int>(code)); });
}

// dequantize(quantize(v[0, n))) into y (y may be v).
void fake_values_of(const float* v, int64_t n, int64_t first, const QuantParams& p, const QuantJob& job, float* y) {
  emit_codes(v, n, first, p, job, [y, step = p.step, offset = p.offset](int64_t i, float code) {
    y[i] = dequantize_code(code, step, offset);
  });
}

// Int8 codes c[0, n) (n even) two per byte, element 2j in the high nibble.
void pack_pairs(const int8_t* c, int64_t n, int8_t* q) {
  for (int64_t j = 0; j < n / 2; ++j) q[j] = pack_nibbles(c[2 * j], c[2 * j + 1]);
}

// What a quantizing pass does with the codes of one segment.
enum class Sink { Fake, Int8, Int4 };

template <typename T, Sink kSink>
struct Transform {
  const QuantJob& job;
  const T* in;
  void* out;

  // Writes the output of elements [first, first + n) of one group, whose fp32
  // values are v[0, n) (n <= kTile). For Int4, first and n must be even.
  void write(const QuantParams& p, const float* v, int64_t first, int64_t n) const {
    if constexpr (kSink == Sink::Fake) {
      float y[kTile];
      fake_values_of(v, n, first, p, job, y);
      store(y, n, static_cast<T*>(out) + first);
    } else if constexpr (kSink == Sink::Int8) {
      int_codes_of(v, n, first, p, job, static_cast<int8_t*>(out) + first);
    } else {
      int8_t codes[kTile];
      int_codes_of(v, n, first, p, job, codes);
      pack_pairs(codes, n, static_cast<int8_t*>(out) + first / 2);
    }
  }

  // Elements [begin, end) of one group, read from the input tile by tile. With
  // `ahead`, the input `ahead` elements further on is pulled toward the cache
  // on the way (the next group, whose statistics pass comes next).
  void operator()(const QuantParams& p, int64_t begin, int64_t end, int64_t ahead = 0) const {
    float buf[kTile];
    for (int64_t b = begin; b < end; b += kTile) {
      const int64_t n = min_of(kTile, end - b);
      if (ahead > 0) prefetch(in + b + ahead, n);
      write(p, as_float(in + b, n, buf), b, n);
    }
  }
};

// Params output of a quantizing pass (absent for fake quantization).
void maybe_store_params(float* params, int64_t g, const QuantParams& p, bool symmetric) {
  if (params != nullptr) store_params(params, g, p, symmetric);
}

// Groups of up to one tile are quantized a block of whole groups at a time
// (about one tile): the 16-bit conversions, the int8/int4 packing and the params
// run as loops over the block rather than over one short group, and the input is
// scanned for NaN/Inf once per block instead of once per group.
struct BlockParams {
  float scale[kTile], step[kTile], offset[kTile];
  QuantParams of(int64_t k) const { return QuantParams{scale[k], step[k], offset[k]}; }
  void set(int64_t k, const QuantParams& p) {
    scale[k] = p.scale;
    step[k] = p.step;
    offset[k] = p.offset;
  }
};

// Statistics and parameters of the `count` groups of `size` elements in v.
void block_params(const float* v, int64_t size, int64_t count, int bits, bool symmetric, BlockParams& bp) {
  float hi[kTile], lo[kTile];
  IntVec top = {};          // largest |x| pattern of the block's vector parts (see abs_bits)
  float tail_poison = 0.0f;  // and the poison of the scalar tails
  const int64_t vec_end = size - size % kVecLanes;
  for (int64_t k = 0; k < count; ++k) {
    const float* x = v + k * size;
    GroupStats s = empty_stats(symmetric);
    if (vec_end > 0) {
      IntVec group_top = {};
      Vec vhi = splat(s.hi), vlo = splat(s.lo);
      for (int64_t i = 0; i < vec_end; i += kVecLanes) {
        const Vec e = load_vec(x + i);
        group_top = imax(group_top, abs_bits(e));
        if (!symmetric) {
          vhi = vmax(vhi, e);
          vlo = vmin(vlo, e);
        }
      }
      top = imax(top, group_top);
      if (symmetric) {
        s.hi = bits_float(static_cast<uint32_t>(reduce_max(group_top)));
      } else {
        s.hi = reduce_max(vhi);
        s.lo = reduce_min(vlo);
      }
    }
    for (int64_t i = vec_end; i < size; ++i) accumulate(s, x[i], symmetric);
    hi[k] = s.hi;
    lo[k] = s.lo;
    tail_poison += s.poison;
  }
  // One pass over the block's groups, which the compiler vectorises (divisions included).
  for (int64_t k = 0; k < count; ++k) {
    bp.set(k, make_params(GroupStats{hi[k], lo[k], 0.0f}, bits, symmetric));
  }
  if (reduce_max(top) < kNonFiniteBits && tail_poison == 0.0f) return;
  for (int64_t k = 0; k < count; ++k) {  // rare: find the groups that saw NaN/Inf
    bp.set(k, make_params(stats_of_floats_exact(v + k * size, size, symmetric), bits, symmetric));
  }
}

// The nearest codes of one group of `size` values, size a multiple of kVecLanes, one
// register at a time: nearest_code_byte's operations, lane for lane, leaving the
// rounding sum's bits in q (the code is their low byte; pack_pairs_wide packs it).
// Inlined into the block loop, so short groups (64 values: four AVX-512 registers) pay
// no call and no loop set-up each, which int_codes_of's general loop costs them.
template <bool kByStep>
inline void group_codes_nearest(const float* x, int64_t size, const QuantParams p, float qmin, float qmax,
                                int32_t* q) {
  const Vec offset = splat(p.offset), factor = splat(kByStep ? p.step : p.scale);
  const Vec lo = splat(qmin), hi = splat(qmax), magic = splat(kRoundingMagic);
  for (int64_t i = 0; i < size; i += kVecLanes) {
    const Vec shifted = load_vec(x + i) - offset;
    Vec u = kByStep ? shifted / factor : shifted * factor;  // code_units
    u = u > lo ? u : lo;                                    // clamp_code
    u = u < hi ? u : hi;
    const IntVec bits = (IntVec)(u + magic);
    std::memcpy(q + i, &bits, sizeof bits);
  }
}

// pack_pairs of group_codes_nearest's output (n even): pack_nibbles keeps the low four
// bits of each, which are the code's. One loop per block, which the compiler
// vectorises (narrowing each register on its own, it does not).
void pack_pairs_wide(const int32_t* bits, int64_t n, int8_t* q) {
  for (int64_t j = 0; j < n / 2; ++j) q[j] = pack_nibbles(bits[2 * j], bits[2 * j + 1]);
}

template <typename T, Sink kSink>
void quantize_group_blocks(const QuantJob& job, const T* in, void* out, float* params_out) {
  const int64_t size = job.numel / job.groups;
  const int64_t per_block = kTile / size;
  // Int4 codes of nearest rounding in groups of whole registers take group_codes_nearest.
  // (For int8 it measured slower than int_codes_of's direct stores: 0.24 vs 0.22 ns per
  // fp16 element at group 64, cache-resident, AVX-512.)
  const bool vector_groups = kSink == Sink::Int4 && job.seed == nullptr && size % kVecLanes == 0;
  const float qmin = code_min(job.bits), qmax = code_max(job.bits);
  parallel_for(0, job.groups, max_of(per_block, kChunk / size), [&](int64_t gb, int64_t ge) {
    float buf[kTile], values[kTile];
    int8_t codes[kTile];
    int32_t wide[kTile];  // group_codes_nearest's output
    BlockParams bp;
    for (int64_t g0 = gb; g0 < ge; g0 += per_block) {
      const int64_t count = min_of(per_block, ge - g0), begin = g0 * size, n = count * size;
      // The next block's input is pulled toward the cache while this one is computed.
      // Without it the loads of each block's conversion stalled on memory (most of the
      // kernel's profile samples) while memory sat idle during the compute before them.
      prefetch(in + begin + n, min_of(n, ge * size - begin - n));
      const float* v = as_float(in + begin, n, buf);
      block_params(v, size, count, job.bits, job.symmetric, bp);
      // fp32 fake quantization and int8 codes go straight to the output (element
      // i is read before it is written, so `out` may be `in`).
      float* y = values;
      if constexpr (kSink == Sink::Fake && std::is_same_v<T, float>) y = static_cast<float*>(out) + begin;
      int8_t* q = codes;
      if constexpr (kSink == Sink::Int8) q = static_cast<int8_t*>(out) + begin;
      for (int64_t k = 0; k < count; ++k) {
        const QuantParams p = bp.of(k);
        maybe_store_params(params_out, g0 + k, p, job.symmetric);
        if constexpr (kSink == Sink::Fake) {
          fake_values_of(v + k * size, size, begin + k * size, p, job, y + k * size);
        } else if (vector_groups) {
          if (divides_by_step(p)) {
            group_codes_nearest<true>(v + k * size, size, p, qmin, qmax, wide + k * size);
          } else {
            group_codes_nearest<false>(v + k * size, size, p, qmin, qmax, wide + k * size);
          }
        } else {
          int_codes_of(v + k * size, size, begin + k * size, p, job, q + k * size);
        }
      }
      if constexpr (kSink == Sink::Fake && !std::is_same_v<T, float>) store(values, n, static_cast<T*>(out) + begin);
      // Even group size here, so an int4 block starts and ends on a byte.
      if constexpr (kSink == Sink::Int4) {
        if (vector_groups) {
          pack_pairs_wide(wide, n, static_cast<int8_t*>(out) + begin / 2);
        } else {
          pack_pairs(codes, n, static_cast<int8_t*>(out) + begin / 2);
        }
      }
    }
  });
}

// Int4 outside the per-group sweep: work is split by byte (pair), never inside
// one, and each element takes its own group's parameters (pairs straddle groups
// when the group size is odd).
template <typename T>
void quantize_int4_pairs(const QuantJob& job, const T* in, int8_t* q, const std::vector<ParamsSlot>& params) {
  const int64_t group_size = job.numel / job.groups;
  parallel_for(0, job.numel / 2, kChunk / 2, [&](int64_t pb, int64_t pe) {
    float buf[kTile];
    int8_t codes[kTile];
    for (int64_t p0 = pb; p0 < pe; p0 += kTile / 2) {
      const int64_t begin = 2 * p0, end = 2 * min_of(pe, p0 + kTile / 2);
      for_each_group_segment(begin, end, group_size, [&](int64_t g, int64_t b, int64_t e) {
        int_codes_of(as_float(in + b, e - b, buf), e - b, b, params[g].params, job, codes + (b - begin));
      });
      pack_pairs(codes, end - begin, q + begin / 2);
    }
  });
}

template <typename T, Sink kSink>
void run_quantizer(const QuantJob& job, const T* in, void* out, float* params_out) {
  if (job.numel == 0) {  // groups without elements still get defined params
    const QuantParams p = make_params(empty_stats(job.symmetric), job.bits, job.symmetric);
    for (int64_t g = 0; g < job.groups; ++g) maybe_store_params(params_out, g, p, job.symmetric);
    return;
  }
  const int64_t group_size = job.numel / job.groups;
  const Transform<T, kSink> transform{job, in, out};
  const bool pairs_straddle = kSink == Sink::Int4 && (group_size & 1);

  if (group_size <= kTile && !pairs_straddle) {
    quantize_group_blocks<T, kSink>(job, in, out, params_out);
    return;
  }
  if (group_size <= kFusedGroupLimit && !pairs_straddle) {
    const int64_t grain = max_of(1, kChunk / group_size);
    parallel_for(0, job.groups, grain, [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t begin = g * group_size;
        const QuantParams p = make_params(stats_of(in + begin, group_size, job.symmetric), job.bits, job.symmetric);
        maybe_store_params(params_out, g, p, job.symmetric);
        // The transform re-reads a group that is in cache, so memory would sit idle
        // meanwhile: fetch the next group of this task during it.
        transform(p, begin, begin + group_size, g + 1 < ge ? group_size : 0);
      }
    });
    return;
  }

  // Large groups (or straddling int4 pairs): statistics of every chunk in
  // parallel, merged per group, then the transform over chunks in parallel.
  const int64_t chunks_per_group = (group_size + kChunk - 1) / kChunk;
  std::vector<StatsSlot> partial(static_cast<size_t>(job.groups * chunks_per_group));
  parallel_for(0, job.groups * chunks_per_group, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const int64_t g = w / chunks_per_group, c = w % chunks_per_group;
      const int64_t begin = g * group_size + c * kChunk;
      partial[w].stats = stats_of(in + begin, min_of(kChunk, group_size - c * kChunk), job.symmetric);
    }
  });
  std::vector<ParamsSlot> params(static_cast<size_t>(job.groups));
  for (int64_t g = 0; g < job.groups; ++g) {
    GroupStats s = empty_stats(job.symmetric);
    for (int64_t c = 0; c < chunks_per_group; ++c) s = merge(s, partial[g * chunks_per_group + c].stats);
    params[g].params = make_params(s, job.bits, job.symmetric);
    maybe_store_params(params_out, g, params[g].params, job.symmetric);
  }
  if constexpr (kSink == Sink::Int4) {
    quantize_int4_pairs(job, in, static_cast<int8_t*>(out), params);
  } else {
    parallel_for(0, job.numel, kChunk, [&](int64_t b, int64_t e) {
      for_each_group_segment(b, e, group_size,
                             [&](int64_t g, int64_t sb, int64_t se) { transform(params[g].params, sb, se); });
    });
  }
}

// Codes [first, first + n) of a packed int4 stream, one int8 each. Whole bytes
// go through a loop that vectorises; a range that starts or ends mid-byte takes
// its odd element through code_at.
void unpack_int4(const int8_t* codes, int64_t first, int64_t n, int8_t* c) {
  const int64_t head = first & 1;
  if (head != 0) c[0] = static_cast<int8_t>(code_at(codes, first, true));
  const int8_t* bytes = codes + ((first + head) >> 1);
  const int64_t pairs = (n - head) / 2;
  int8_t* pair_out = c + head;
  for (int64_t j = 0; j < pairs; ++j) {
    pair_out[2 * j] = static_cast<int8_t>(unpack_high(bytes[j]));
    pair_out[2 * j + 1] = static_cast<int8_t>(unpack_low(bytes[j]));
  }
  for (int64_t i = head + 2 * pairs; i < n; ++i) c[i] = static_cast<int8_t>(code_at(codes, first + i, true));
}

// Tile by tile: the tile's codes are widened to int8 once (int4), every group
// piece is decoded into one fp32 buffer, then the tile is stored in one go (short
// groups would otherwise pay the nibble logic and the 16-bit conversion loop's
// set-up once per group).
template <typename T>
void dequantize_typed(const QuantJob& job, const int8_t* codes, const float* params, T* out) {
  const int64_t group_size = job.numel / job.groups;
  parallel_for(0, job.numel, kChunk, [&](int64_t b, int64_t e) {
    float buf[kTile];
    int8_t unpacked[kTile];
    for (int64_t t = b; t < e; t += kTile) {
      const int64_t n = min_of(kTile, e - t);
      // The next tile's codes are pulled toward the cache during this one (as the
      // quantizers' next block).
      prefetch(codes + (t + n) * job.bits / 8, min_of(n, e - t - n) * job.bits / 8);
      float* v = buf;
      if constexpr (std::is_same_v<T, float>) v = out + t;  // fp32 output: decode in place
      const int8_t* c = codes + t;
      if (job.packed) {
        unpack_int4(codes, t, n, unpacked);
        c = unpacked;
      }
      for_each_group_segment(t, t + n, group_size, [&](int64_t g, int64_t sb, int64_t se) {
        const auto [step, offset] = load_params(params, g, job.symmetric);
        for (int64_t i = sb - t; i < se - t; ++i) v[i] = dequantize_code(static_cast<float>(c[i]), step, offset);
      });
      if constexpr (!std::is_same_v<T, float>) store(buf, n, out + t);
    }
  });
}

}  // namespace

void fake_quantize(const QuantJob& job, const void* in, void* out) {
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    run_quantizer<T, Sink::Fake>(job, static_cast<const T*>(in), out, nullptr);
  });
}

void quantize(const QuantJob& job, const void* in, int8_t* codes, float* params) {
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (!job.packed) {
      run_quantizer<T, Sink::Int8>(job, static_cast<const T*>(in), codes, params);
    } else {
      run_quantizer<T, Sink::Int4>(job, static_cast<const T*>(in), codes, params);
    }
  });
}

void dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out) {
  if (job.numel == 0) return;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_typed(job, codes, params, static_cast<T*>(out));
  });
}

}  // namespace qkit::cpu::QKIT_CPU_ISA_NS

#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC pop_options
#endif
