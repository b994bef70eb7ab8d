// CUDA kernels of the ZeRO++ building blocks (see kernels/cpu/zeropp_cpu.cpp
// for what each computes). Element-wise, grid-stride, on the caller's stream;
// the math is qkit/zeropp.h, shared with the CPU.
#include <cuda_runtime.h>

#include <algorithm>

#include "qkit/kernels.h"
#include "qkit/zeropp.h"

namespace qkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // then grid-stride, as in quantize_cuda.cu

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

#define QKIT_GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

Status last_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

__global__ void swizzle_groups_kernel(QuantJob job, SwizzleLayout layout, const int8_t* __restrict__ codes_in,
                                      const float* __restrict__ params_in, int8_t* __restrict__ codes_out,
                                      float* __restrict__ params_out) {
  const int64_t group_bytes = job.numel / job.groups * job.bits / 8;
  const int64_t per_group = job.symmetric ? 1 : 2;
  QKIT_GRID_STRIDE(k, job.groups * group_bytes) {
    const int64_t g = k / group_bytes;
    codes_out[swizzled_slot(g, layout) * group_bytes + k % group_bytes] = codes_in[k];
  }
  QKIT_GRID_STRIDE(k, job.groups * per_group) {
    params_out[swizzled_slot(k / per_group, layout) * per_group + k % per_group] = params_in[k];
  }
}

template <typename T>
__global__ void add_swizzled_error_kernel(QuantJob job, SwizzleLayout layout, const T* __restrict__ x,
                                          const T* __restrict__ error, float* __restrict__ s) {
  const int64_t group_size = job.numel / job.groups;
  QKIT_GRID_STRIDE(a, job.numel) {
    const int64_t g = a / group_size;
    s[a] = to_float(x[a]) + to_float(error[a + (swizzled_slot(g, layout) - g) * group_size]);
  }
}

template <typename E>
__global__ void update_error_kernel(QuantJob job, SwizzleLayout layout, bool swizzled, const float* __restrict__ s,
                                    const int8_t* __restrict__ codes, const float* __restrict__ params,
                                    E* __restrict__ error, float beta) {
  const int64_t group_size = job.numel / job.groups;
  QKIT_GRID_STRIDE(a, job.numel) {
    const int64_t g = a / group_size;
    const StoredParams p = load_params(params, g, job.symmetric);
    const float d = dequantize_code(static_cast<float>(code_at(codes, a, job.packed)), p.step, p.offset);
    const int64_t pos = swizzled ? a + (swizzled_slot(g, layout) - g) * group_size : a;
    error[pos] = from_float<E>(updated_error(to_float(error[pos]), s[a], d, beta));
  }
}

template <typename E>
__global__ void dequantize_sum_kernel(ReductionJob job, const int8_t* __restrict__ codes,
                                      const float* __restrict__ params, const E* __restrict__ error,
                                      float* __restrict__ out) {
  QKIT_GRID_STRIDE(i, job.values) {
    const float sum = dequantized_sum(job, codes, params, i);
    out[i] = error == nullptr ? sum : sum + to_float(error[i]);
  }
}

template <typename P>
__global__ void dequantize_unsigned_kernel(const int8_t* __restrict__ data, const P* __restrict__ scale,
                                           const P* __restrict__ minv, int64_t groups, int64_t group_size, int bits,
                                           half_t* __restrict__ out) {
  QKIT_GRID_STRIDE(i, groups * group_size) {
    const int64_t g = i / group_size;
    out[i] = float_to_half(dequantize_unsigned_value(data, i, bits, to_float(scale[g]), to_float(minv[g])));
  }
}

}  // namespace

Status swizzle_groups(const QuantJob& job, const SwizzleLayout& layout, const int8_t* codes_in, const float* params_in,
                      int8_t* codes_out, float* params_out, void* stream) {
  if (job.groups == 0) return nullptr;
  const int64_t work = std::max<int64_t>(job.numel * job.bits / 8, job.groups * 2);
  swizzle_groups_kernel<<<blocks_for(work), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      job, layout, codes_in, params_in, codes_out, params_out);
  return last_status();
}

Status add_swizzled_error(const QuantJob& job, const SwizzleLayout& layout, const void* x, const void* error, float* s,
                          void* stream) {
  if (job.numel == 0) return nullptr;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    add_swizzled_error_kernel<T><<<blocks_for(job.numel), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        job, layout, static_cast<const T*>(x), static_cast<const T*>(error), s);
  });
  return last_status();
}

Status update_error(const QuantJob& job, const SwizzleLayout* layout, const float* s, const int8_t* codes,
                    const float* params, DType error_dtype, void* error, float beta, void* stream) {
  if (job.numel == 0) return nullptr;
  const SwizzleLayout identity{job.groups, 1, 1, 1};
  dispatch_dtype(error_dtype, [&](auto tag) {
    using E = decltype(tag);
    update_error_kernel<E><<<blocks_for(job.numel), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        job, layout == nullptr ? identity : *layout, layout != nullptr, s, codes, params, static_cast<E*>(error),
        beta);
  });
  return last_status();
}

Status dequantize_sum(const ReductionJob& job, const int8_t* codes, const float* params, DType error_dtype,
                      const void* error, float* out, void* stream) {
  if (job.values == 0) return nullptr;
  dispatch_dtype(error_dtype, [&](auto tag) {
    using E = decltype(tag);
    dequantize_sum_kernel<E><<<blocks_for(job.values), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        job, codes, params, static_cast<const E*>(error), out);
  });
  return last_status();
}

Status dequantize_unsigned(const int8_t* data, DType param_dtype, const void* scale, const void* minv, int64_t groups,
                           int64_t group_size, int bits, half_t* out, void* stream) {
  if (groups * group_size == 0) return nullptr;
  dispatch_dtype(param_dtype, [&](auto tag) {
    using P = decltype(tag);
    dequantize_unsigned_kernel<P><<<blocks_for(groups * group_size), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        data, static_cast<const P*>(scale), static_cast<const P*>(minv), groups, group_size, bits, out);
  });
  return last_status();
}

}  // namespace qkit::cuda
