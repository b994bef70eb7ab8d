// Counter-based Philox 4x32-10 (Salmon et al., SC'11). Stateless: draw n of a
// stream is a pure function of (key, n), so CPU and CUDA produce the same
// numbers for the same key and any thread can jump straight to its elements.
#pragma once

#include <cstdint>

#include "qkit/common.h"

namespace qkit {

struct Uint4 {
  uint32_t x, y, z, w;
};

QKIT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t& hi) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

QKIT_HD Uint4 philox4x32_10(Uint4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kMul0, ctr.x, hi0);
    const uint32_t lo1 = mulhilo(kMul1, ctr.z, hi1);
    ctr = Uint4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return ctr;
}

// Four uniforms in [0, 1) for elements 4*block .. 4*block+3 of the stream `seed`.
// 24 random bits each, so every value is exact in fp32 and strictly below 1.
struct Uniform4 {
  float v[4];
};

QKIT_HD Uniform4 uniforms_for_block(uint64_t seed, uint64_t block) {
  const Uint4 r = philox4x32_10(
      Uint4{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  constexpr float kInv24 = 1.0f / 16777216.0f;
  return Uniform4{{static_cast<float>(r.x >> 8) * kInv24, static_cast<float>(r.y >> 8) * kInv24,
                   static_cast<float>(r.z >> 8) * kInv24, static_cast<float>(r.w >> 8) * kInv24}};
}

}  // namespace qkit
