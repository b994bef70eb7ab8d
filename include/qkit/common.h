// Portable building blocks shared by the CPU and CUDA kernels: the host/device
// qualifier, the 16-bit float storage types and their exact conversions.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QKIT_HD __host__ __device__ __forceinline__
#else
#define QKIT_HD inline
#endif

namespace qkit {

// Element types the kernels understand. The values are ours, not torch's: the
// kernels never see torch headers, the bindings translate.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// 16-bit floats are carried as raw bits so one definition serves host and device.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

QKIT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

QKIT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// IEEE binary16 <-> binary32, round-to-nearest-even, NaN kept quiet. Written
// out in integer arithmetic so the host and the device give identical bits.
QKIT_HD float half_to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1Fu;
  uint32_t mant = h.bits & 0x3FFu;
  if (exp == 0x1Fu) {
    return bits_float(sign | 0x7F800000u | (mant << 13));
  }
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // Subnormal half: renormalise into a normal float.
    exp = 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3FFu;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

QKIT_HD half_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // Inf or NaN
    const uint16_t nan = abs > 0x7F800000u ? static_cast<uint16_t>(0x200u | ((abs >> 13) & 0x3FFu)) : 0;
    return half_t{static_cast<uint16_t>(sign | 0x7C00u | nan)};
  }
  if (abs >= 0x477FF000u) {  // rounds to >= 65520: overflow to Inf
    return half_t{static_cast<uint16_t>(sign | 0x7C00u)};
  }
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return half_t{sign};  // < 2^-25 rounds to zero
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t result = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half_way = 1u << (shift - 1u);
    if (rem > half_way || (rem == half_way && (result & 1u))) ++result;
    return half_t{static_cast<uint16_t>(sign | result)};
  }
  uint32_t result = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (result & 1u))) ++result;
  return half_t{static_cast<uint16_t>(sign | result)};
}

QKIT_HD float bf16_to_float(bf16_t b) {
  return bits_float(static_cast<uint32_t>(b.bits) << 16);
}

QKIT_HD bf16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  // A select, not a branch, so loops over it vectorise.
  return bf16_t{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded)};
}

// load/store of one element as fp32, overloaded on the storage type.
QKIT_HD float to_float(float v) { return v; }
QKIT_HD float to_float(half_t v) { return half_to_float(v); }
QKIT_HD float to_float(bf16_t v) { return bf16_to_float(v); }

template <typename T>
QKIT_HD T from_float(float v);
template <>
QKIT_HD float from_float<float>(float v) { return v; }
template <>
QKIT_HD half_t from_float<half_t>(float v) { return float_to_half(v); }
template <>
QKIT_HD bf16_t from_float<bf16_t>(float v) { return float_to_bf16(v); }

// Calls f with a value of the storage type that `dtype` names (host code only).
template <typename F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(half_t{}); break;
    case DType::BFloat16: f(bf16_t{}); break;
  }
}

}  // namespace qkit
