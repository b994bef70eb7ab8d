// Picks the CPU quantizer kernels (integer and floating-point formats) for this machine's instruction set, once:
// AVX-512, else AVX2+F16C, else the baseline build. QKIT_CPU_ISA=generic|avx2|avx512
// forces one (tests run each); asking for one the CPU lacks falls back to the best
// it has.
#include <cstdlib>
#include <cstring>

#include "qkit/kernels.h"

namespace qkit::cpu {

#define QKIT_DECLARE_ISA(ns)                                                                \
  namespace ns {                                                                            \
  void fake_quantize(const QuantJob& job, const void* in, void* out);                       \
  void quantize(const QuantJob& job, const void* in, int8_t* codes, float* params);         \
  void dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out); \
  void fake_quantize_fp(const FpJob& job, const void* in, void* out);                       \
  void quantize_fp(const FpJob& job, const void* in, uint8_t* codes, uint8_t* scales);      \
  void dequantize_fp(const FpJob& job, const uint8_t* codes, const uint8_t* scales, void* out); \
  bool quantized_reduction(const ReductionJob& job, int64_t out_groups, const int8_t* codes, const float* params, \
                           int8_t* codes_out, float* params_out);                                               \
  }
QKIT_DECLARE_ISA(generic)
#if defined(__x86_64__)
QKIT_DECLARE_ISA(avx2)
QKIT_DECLARE_ISA(avx512)
#endif
#undef QKIT_DECLARE_ISA

namespace {

enum class Isa { Generic, Avx2, Avx512 };

bool supported(Isa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Isa::Generic: return true;
  }
#endif
  return isa == Isa::Generic;
}

Isa choose() {
  const char* forced = std::getenv("QKIT_CPU_ISA");
  if (forced != nullptr) {
    if (std::strcmp(forced, "generic") == 0) return Isa::Generic;
    if (std::strcmp(forced, "avx2") == 0 && supported(Isa::Avx2)) return Isa::Avx2;
    if (std::strcmp(forced, "avx512") == 0 && supported(Isa::Avx512)) return Isa::Avx512;
  }
  if (supported(Isa::Avx512)) return Isa::Avx512;
  if (supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Generic;
}

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

}  // namespace

#if defined(__x86_64__)
#define QKIT_DISPATCH(call)                    \
  switch (isa()) {                             \
    case Isa::Avx512: return avx512::call;     \
    case Isa::Avx2: return avx2::call;         \
    case Isa::Generic: return generic::call;   \
  }
#else
#define QKIT_DISPATCH(call) return generic::call;
#endif

void fake_quantize(const QuantJob& job, const void* in, void* out) { QKIT_DISPATCH(fake_quantize(job, in, out)) }

void quantize(const QuantJob& job, const void* in, int8_t* codes, float* params) {
  QKIT_DISPATCH(quantize(job, in, codes, params))
}

void dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out) {
  QKIT_DISPATCH(dequantize(job, codes, params, out))
}

void fake_quantize_fp(const FpJob& job, const void* in, void* out) { QKIT_DISPATCH(fake_quantize_fp(job, in, out)) }

void quantize_fp(const FpJob& job, const void* in, uint8_t* codes, uint8_t* scales) {
  QKIT_DISPATCH(quantize_fp(job, in, codes, scales))
}

void dequantize_fp(const FpJob& job, const uint8_t* codes, const uint8_t* scales, void* out) {
  QKIT_DISPATCH(dequantize_fp(job, codes, scales, out))
}

bool quantized_reduction(const ReductionJob& job, int64_t out_groups, const int8_t* codes, const float* params,
                         int8_t* codes_out, float* params_out) {
  QKIT_DISPATCH(quantized_reduction(job, out_groups, codes, params, codes_out, params_out))
  return false;  // not reached: every ISA returns above
}

}  // namespace qkit::cpu
