// The CPU quantizer kernels for AVX-512 (F, BW, VL) CPUs; see quantize_cpu_impl.h.
#if defined(__x86_64__)
#define QKIT_CPU_ISA_NS avx512
#define QKIT_CPU_TARGET_PRAGMA _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx2,f16c,prefer-vector-width=512\")")
#define QKIT_CPU_HAS_F16C 1
#define QKIT_CPU_VEC_BYTES 64
#include "quantize_cpu_impl.h"
#include "fp_cpu_impl.h"
#include "zeropp_cpu_impl.h"
#endif
