// The CPU quantizer kernels for any CPU (baseline instruction set); see quantize_cpu_impl.h.
#define QKIT_CPU_ISA_NS generic
#include "quantize_cpu_impl.h"
#include "fp_cpu_impl.h"
#include "zeropp_cpu_impl.h"
