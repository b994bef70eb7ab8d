// The CPU quantizer kernels for AVX2 + F16C CPUs; see quantize_cpu_impl.h.
#if defined(__x86_64__)
#define QKIT_CPU_ISA_NS avx2
#define QKIT_CPU_TARGET_PRAGMA _Pragma("GCC target(\"avx2,f16c\")")
#define QKIT_CPU_HAS_F16C 1
#define QKIT_CPU_VEC_BYTES 32
#include "quantize_cpu_impl.h"
#include "fp_cpu_impl.h"
#include "zeropp_cpu_impl.h"
#endif
