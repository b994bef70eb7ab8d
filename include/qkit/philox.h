// Counter-based Philox 4x32-10 (Salmon et al., SC'11). Stateless: draw n of a
// stream is a pure function of (key, n), so CPU and CUDA produce the same
// numbers for the same key and any thread can jump straight to its elements.
// The stream (seed, counter and lane per element): docs/ops.md §7.
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

constexpr int kPhiloxRounds = 10;

// One Philox round on the counter (x, y, z, w) under key (k0, k1). Lanes of separate
// counters are independent, so a loop of rounds over arrays of counters vectorises.
QKIT_HD void philox_round(uint32_t& x, uint32_t& y, uint32_t& z, uint32_t& w, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo(kMul0, x, hi0);
  const uint32_t lo1 = mulhilo(kMul1, z, hi1);
  x = hi1 ^ y ^ k0;
  y = lo1;
  z = hi0 ^ w ^ k1;
  w = lo0;
}

// The key schedule between rounds.
QKIT_HD void philox_next_key(uint32_t& k0, uint32_t& k1) {
  k0 += 0x9E3779B9u;
  k1 += 0xBB67AE85u;
}

QKIT_HD Uint4 philox4x32_10(Uint4 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(ctr.x, ctr.y, ctr.z, ctr.w, k0, k1);
    philox_next_key(k0, k1);
  }
  return ctr;
}

// A uniform in [0, 1) from 24 random bits: exact in fp32 and strictly below 1.
QKIT_HD float uniform_of(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

// Four uniforms in [0, 1) for elements 4*block .. 4*block+3 of the stream `seed`.
struct Uniform4 {
  float v[4];
};

QKIT_HD Uniform4 uniforms_for_block(uint64_t seed, uint64_t block) {
  const Uint4 r = philox4x32_10(
      Uint4{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return Uniform4{{uniform_of(r.x), uniform_of(r.y), uniform_of(r.z), uniform_of(r.w)}};
}

}  // namespace qkit
