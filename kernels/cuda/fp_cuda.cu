// CUDA kernels of the floating-point formats (docs/ops.md §10). No torch headers: the
// bindings hand over raw pointers, a scratch buffer and the current stream; nothing here
// synchronizes with the host. The arithmetic is qkit/fp_formats.h, shared with the CPU
// kernels, so both give the same bits. Launches, all grid-stride on the caller's stream:
//   1. group statistics (max |x| patterns): a thread per group for small groups (mx and
//      nvfp4 blocks), a block per group (shared-memory reduction) for larger ones;
//   2. nvfp4 only: one block reduces them to the fp32 tensor scale;
//   3. a thread per group turns its statistics into its scaling and writes the scales;
//   4. a thread per packing unit (1, 2 or 4 elements: whole output bytes) writes codes,
//      or a thread per element the fake-quantized values.
// Dequantization is one element-wise launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "qkit/fp_formats.h"
#include "qkit/kernels.h"
#include "qkit/philox.h"

namespace qkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;       // then grid-stride (as quantize_cuda.cu)
constexpr int64_t kThreadPerGroupMax = 64;  // groups up to this size get one thread each

unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

#define QKIT_GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

size_t align16(size_t n) { return (n + 15) & ~size_t{15}; }

struct FpScratch {
  FpStats* stats;       // [groups]
  FpGroup* groups;      // [groups]
  float* tensor_scale;  // [1] (nvfp4)
};

FpScratch carve(const FpJob& job, void* workspace) {
  char* base = static_cast<char*>(workspace);
  const size_t stats_bytes = align16(sizeof(FpStats) * job.groups);
  const size_t group_bytes = align16(sizeof(FpGroup) * job.groups);
  return FpScratch{reinterpret_cast<FpStats*>(base), reinterpret_cast<FpGroup*>(base + stats_bytes),
                   reinterpret_cast<float*>(base + stats_bytes + group_bytes)};
}

Status last_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
__global__ void fp_group_stats_small_kernel(FpJob job, const T* __restrict__ in, FpStats* __restrict__ stats) {
  const int64_t size = job.numel / job.groups;
  QKIT_GRID_STRIDE(g, job.groups) {
    FpStats st = fp_empty_stats();
    for (int64_t i = g * size; i < (g + 1) * size; ++i) fp_accumulate(st, to_float(in[i]));
    stats[g] = st;
  }
}

template <typename T>
__global__ void fp_group_stats_block_kernel(FpJob job, const T* __restrict__ in, FpStats* __restrict__ stats) {
  __shared__ uint32_t top[kThreads];
  __shared__ uint32_t finite[kThreads];
  const int64_t size = job.numel / job.groups;
  for (int64_t g = blockIdx.x; g < job.groups; g += gridDim.x) {
    FpStats st = fp_empty_stats();
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) fp_accumulate(st, to_float(in[g * size + i]));
    top[threadIdx.x] = st.top;
    finite[threadIdx.x] = st.finite;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (static_cast<int>(threadIdx.x) < width) {
        const FpStats merged = fp_merge(FpStats{top[threadIdx.x], finite[threadIdx.x]},
                                        FpStats{top[threadIdx.x + width], finite[threadIdx.x + width]});
        top[threadIdx.x] = merged.top;
        finite[threadIdx.x] = merged.finite;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) stats[g] = FpStats{top[0], finite[0]};
    __syncthreads();  // the shared arrays are rewritten for the next group
  }
}

// One block: the nvfp4 tensor scale from every group's largest finite |x|; also stored in
// the first four bytes of `scales` (when quantizing), byte by byte (little endian).
__global__ void fp_tensor_scale_kernel(FpJob job, const FpStats* __restrict__ stats, float* __restrict__ tensor_scale,
                                       uint8_t* __restrict__ scales) {
  __shared__ uint32_t finite[kThreads];
  uint32_t m = 0;
  for (int64_t g = threadIdx.x; g < job.groups; g += blockDim.x) m = stats[g].finite > m ? stats[g].finite : m;
  finite[threadIdx.x] = m;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width && finite[threadIdx.x + width] > finite[threadIdx.x]) {
      finite[threadIdx.x] = finite[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float t = fp_nvfp4_tensor_scale(finite[0]);
    *tensor_scale = t;
    if (scales != nullptr) {
      const uint32_t bits = float_bits(t);
      for (int b = 0; b < 4; ++b) scales[b] = static_cast<uint8_t>(bits >> (8 * b));
    }
  }
}

template <FpFormat F>
__global__ void fp_groups_kernel(FpJob job, const FpStats* __restrict__ stats, const float* __restrict__ tensor_scale,
                                 FpGroup* __restrict__ groups, uint8_t* __restrict__ scales) {
  constexpr FpSpec spec = fp_spec(F);
  QKIT_GRID_STRIDE(g, job.groups) {
    FpGroup grp;
    if (job.scaling == FpScaling::Absmax) {
      grp = fp_absmax_group(stats[g], spec);
    } else if (job.scaling == FpScaling::Mx) {
      grp = fp_mx_group(stats[g], spec);
    } else {
      grp = fp_nvfp4_group(stats[g], *tensor_scale);
    }
    groups[g] = grp;
    if (scales == nullptr) continue;
    if (job.scaling == FpScaling::Absmax) {
      reinterpret_cast<float*>(scales)[g] = grp.dec;
    } else {
      scales[(job.scaling == FpScaling::Nvfp4 ? 4 : 0) + g] = static_cast<uint8_t>(grp.byte);
    }
  }
}

// Element i scaled for its group (grp: that group).
template <typename T>
__device__ __forceinline__ float fp_element_scaled(const FpJob& job, const T* in, const FpGroup* groups, int64_t size,
                                                   int64_t i, FpGroup& grp) {
  grp = groups[i / size];
  const float x = to_float(in[i]);
  return job.scaling == FpScaling::Absmax ? fp_scaled<true>(x, grp) : fp_scaled<false>(x, grp);
}

// Element i's uniform for stochastic rounding, from the job's Philox stream.
__device__ __forceinline__ float fp_element_uniform(const FpJob& job, int64_t i) {
  return uniforms_for_block(static_cast<uint64_t>(*job.seed), static_cast<uint64_t>(i >> 2)).v[i & 3];
}

// The code of element i (nearest, or stochastic when the job has a seed).
template <typename T, FpFormat F>
__device__ __forceinline__ uint32_t fp_element_code(const FpJob& job, const T* in, const FpGroup* groups, int64_t size,
                                                    int64_t i) {
  constexpr FpSpec spec = fp_spec(F);
  FpGroup grp;
  const float v = fp_element_scaled(job, in, groups, size, i, grp);
  return job.seed == nullptr ? fp_encode(v, spec) : fp_encode_stochastic(v, fp_element_uniform(job, i), spec);
}

// Fake quantization takes the format's value directly (fp_quantized: the value of the
// code, as the CPU kernels compute it).
template <typename T, FpFormat F>
__global__ void fp_fake_kernel(FpJob job, const T* __restrict__ in, const FpGroup* __restrict__ groups,
                               T* __restrict__ out) {
  constexpr FpSpec spec = fp_spec(F);
  const int64_t size = job.numel / job.groups;
  QKIT_GRID_STRIDE(i, job.numel) {
    FpGroup grp;
    const float v = fp_element_scaled(job, in, groups, size, i, grp);
    const float q =
        job.seed == nullptr ? fp_quantized(v, spec) : fp_quantized_stochastic(v, fp_element_uniform(job, i), spec);
    out[i] = from_float<T>(q * grp.dec);
  }
}

template <typename T, FpFormat F>
__global__ void fp_codes_kernel(FpJob job, const T* __restrict__ in, const FpGroup* __restrict__ groups,
                                uint8_t* __restrict__ codes) {
  constexpr int unit = fp_unit(F);
  constexpr int unit_bytes = unit * fp_bits(F) / 8;
  const int64_t size = job.numel / job.groups;
  QKIT_GRID_STRIDE(k, job.numel / unit) {
    uint8_t c[unit];
    for (int e = 0; e < unit; ++e) c[e] = static_cast<uint8_t>(fp_element_code<T, F>(job, in, groups, size, k * unit + e));
    fp_pack_unit(c, codes + k * unit_bytes, F);
  }
}

template <typename T, FpFormat F>
__global__ void fp_dequantize_kernel(FpJob job, const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                                     T* __restrict__ out) {
  constexpr FpSpec spec = fp_spec(F);
  const int64_t size = job.numel / job.groups;
  float tensor_scale = 0.0f;
  if (job.scaling == FpScaling::Nvfp4) {
    tensor_scale = bits_float(static_cast<uint32_t>(scales[0]) | (static_cast<uint32_t>(scales[1]) << 8) |
                              (static_cast<uint32_t>(scales[2]) << 16) | (static_cast<uint32_t>(scales[3]) << 24));
  }
  QKIT_GRID_STRIDE(i, job.numel) {
    const int64_t g = i / size;
    const float dec = job.scaling == FpScaling::Absmax ? fp_dec_of_absmax(reinterpret_cast<const float*>(scales)[g])
                      : job.scaling == FpScaling::Mx   ? fp_dec_of_mx(scales[g])
                                                       : fp_dec_of_nvfp4(scales[4 + g], tensor_scale);
    out[i] = from_float<T>(fp_decode(fp_code_at(codes, i, F), spec) * dec);
  }
}

// Launches 1-3: every group's scaling into scratch (and the scales into `scales`).
template <typename T, FpFormat F>
void launch_groups(const FpJob& job, const T* in, const FpScratch& scratch, uint8_t* scales, cudaStream_t stream) {
  if (job.groups > 0) {
    const int64_t size = job.numel / job.groups;
    if (size <= kThreadPerGroupMax) {
      fp_group_stats_small_kernel<T><<<grid_for(job.groups, kThreads), kThreads, 0, stream>>>(job, in, scratch.stats);
    } else {
      fp_group_stats_block_kernel<T><<<grid_for(job.groups, 1), kThreads, 0, stream>>>(job, in, scratch.stats);
    }
  }
  if (job.scaling == FpScaling::Nvfp4) {
    fp_tensor_scale_kernel<<<1, kThreads, 0, stream>>>(job, scratch.stats, scratch.tensor_scale, scales);
  }
  if (job.groups > 0) {
    fp_groups_kernel<F><<<grid_for(job.groups, kThreads), kThreads, 0, stream>>>(job, scratch.stats,
                                                                                scratch.tensor_scale, scratch.groups,
                                                                                scales);
  }
}

}  // namespace

size_t fp_workspace_bytes(const FpJob& job) {
  return align16(sizeof(FpStats) * job.groups) + align16(sizeof(FpGroup) * job.groups) + 16;
}

Status fake_quantize_fp(const FpJob& job, const void* in, void* out, void* workspace, void* stream) {
  if (job.numel == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  const FpScratch scratch = carve(job, workspace);
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(job.format, [&](auto f) {
      constexpr FpFormat F = decltype(f)::value;
      const T* x = static_cast<const T*>(in);
      launch_groups<T, F>(job, x, scratch, nullptr, s);
      fp_fake_kernel<T, F><<<grid_for(job.numel, kThreads), kThreads, 0, s>>>(job, x, scratch.groups,
                                                                             static_cast<T*>(out));
    });
  });
  return last_status();
}

Status quantize_fp(const FpJob& job, const void* in, uint8_t* codes, uint8_t* scales, void* workspace,
                   void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const FpScratch scratch = carve(job, workspace);
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(job.format, [&](auto f) {
      constexpr FpFormat F = decltype(f)::value;
      const T* x = static_cast<const T*>(in);
      launch_groups<T, F>(job, x, scratch, scales, s);
      const int64_t units = job.numel / fp_unit(F);
      if (units > 0) {
        fp_codes_kernel<T, F><<<grid_for(units, kThreads), kThreads, 0, s>>>(job, x, scratch.groups, codes);
      }
    });
  });
  return last_status();
}

Status dequantize_fp(const FpJob& job, const uint8_t* codes, const uint8_t* scales, void* out, void* stream) {
  if (job.numel == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(job.format, [&](auto f) {
      constexpr FpFormat F = decltype(f)::value;
      fp_dequantize_kernel<T, F><<<grid_for(job.numel, kThreads), kThreads, 0, s>>>(job, codes, scales,
                                                                                   static_cast<T*>(out));
    });
  });
  return last_status();
}

}  // namespace qkit::cuda
