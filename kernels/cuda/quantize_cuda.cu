// CUDA kernels of the group-wise quantizer. No torch headers: the bindings hand
// over raw pointers, a scratch buffer and the current stream. The arithmetic is
// qkit/quant_math.h, shared with the CPU kernels.
//
// A group of up to kSinglePassMax elements is quantized in one launch that reads
// it once: its threads load it into registers, reduce its statistics there (warp
// shuffles, then shared memory across warps), and write codes / fake-quantized
// values from the registers. Size classes, smallest first (threads per group x
// elements per thread): 4 x 8, 32 x 8, 32 x 32, 256 x 32. Loads and stores are
// 16-byte vectors when the group size and the pointers allow, else scalar.
//
// Larger groups (and 4-bit codes whose pairs straddle groups) take three launches:
//   1. partial statistics of fixed-size chunks of every group,
//   2. one warp per group merges its chunks into the group's parameters,
//   3. an element-wise pass that writes codes / fake-quantized values.
// which takes any group size and any number of groups with the same code.
#include <cuda_runtime.h>

#include <algorithm>

#include "qkit/kernels.h"
#include "qkit/philox.h"
#include "qkit/quant_math.h"

namespace qkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kChunk = 8192;      // elements per statistics work item
constexpr int64_t kWarpItemMax = 1024;  // items up to this size get a warp, not a block
constexpr int kRun = 8;               // consecutive elements per thread in element passes
// Grids stop here and stride: about four waves of 256-thread blocks on a 132-SM
// GPU, enough to keep every SM streaming (and small enough that tests reach the
// strided iterations of every kernel).
constexpr int64_t kMaxBlocks = 4096;
constexpr int64_t kSinglePassMax = 256 * 32;  // the largest class: a block of 256 threads x 32 elements
// Our "warp" is 32 lanes everywhere. On AMD a wavefront is 64 lanes and the
// shuffle mask is 64-bit; the explicit width keeps shuffles inside 32 lanes.
#if defined(__HIPCC__)
constexpr unsigned long long kFullMask = ~0ull;
#else
constexpr unsigned kFullMask = 0xFFFFFFFFu;
#endif

int64_t chunks_per_group(const QuantJob& job) {
  const int64_t group_size = job.numel / job.groups;
  return (group_size + kChunk - 1) / kChunk;
}

size_t align16(size_t n) { return (n + 15) & ~size_t{15}; }

struct Scratch {
  GroupStats* partial;  // [groups * chunks_per_group]
  QuantParams* params;  // [groups]
};

Scratch carve(const QuantJob& job, void* workspace) {
  char* base = static_cast<char*>(workspace);
  const size_t partial_bytes = align16(sizeof(GroupStats) * job.groups * chunks_per_group(job));
  return Scratch{reinterpret_cast<GroupStats*>(base), reinterpret_cast<QuantParams*>(base + partial_bytes)};
}

unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, kMaxBlocks)));
}

// Merges `s` across the kWidth lanes of the caller's aligned lane segment; every
// lane gets the total (max/min are exact, so the order cannot change the bits).
template <int kWidth>
__device__ GroupStats segment_merge(GroupStats s) {
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    GroupStats other;
    other.hi = __shfl_xor_sync(kFullMask, s.hi, offset, kWidth);
    other.lo = __shfl_xor_sync(kFullMask, s.lo, offset, kWidth);
    other.poison = __shfl_xor_sync(kFullMask, s.poison, offset, kWidth);
    s = merge(s, other);
  }
  return s;
}

// Pass 1. kWarpPerItem: each warp takes one work item (small groups);
// otherwise each block does.
template <typename T, bool kWarpPerItem>
__global__ void chunk_stats_kernel(QuantJob job, const T* __restrict__ in, GroupStats* __restrict__ partial) {
  const int64_t group_size = job.numel / job.groups;
  const int64_t chunks = (group_size + kChunk - 1) / kChunk;
  const int64_t items = job.groups * chunks;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t first = kWarpPerItem ? int64_t(blockIdx.x) * kWarpsPerBlock + warp : int64_t(blockIdx.x);
  const int64_t stride = kWarpPerItem ? int64_t(gridDim.x) * kWarpsPerBlock : int64_t(gridDim.x);
  const int width = kWarpPerItem ? kWarp : kThreads;
  const int tid = kWarpPerItem ? lane : threadIdx.x;
  __shared__ GroupStats per_warp[kWarpsPerBlock];

  for (int64_t w = first; w < items; w += stride) {
    const int64_t g = w / chunks, c = w % chunks;
    const int64_t begin = g * group_size + c * kChunk;
    const int64_t n = min(kChunk, group_size - c * kChunk);
    GroupStats s = empty_stats(job.symmetric);
    for (int64_t i = tid; i < n; i += width) accumulate(s, to_float(in[begin + i]), job.symmetric);
    s = segment_merge<kWarp>(s);
    if (kWarpPerItem) {
      if (lane == 0) partial[w] = s;
    } else {
      if (lane == 0) per_warp[warp] = s;
      __syncthreads();
      if (warp == 0) {
        s = lane < kWarpsPerBlock ? per_warp[lane] : empty_stats(job.symmetric);
        s = segment_merge<kWarp>(s);
        if (lane == 0) partial[w] = s;
      }
      __syncthreads();
    }
  }
}

// Pass 2: one warp per group.
__global__ void group_params_kernel(QuantJob job, const GroupStats* __restrict__ partial,
                                    QuantParams* __restrict__ params, float* __restrict__ params_out) {
  const int64_t group_size = job.numel / job.groups;
  const int64_t chunks = (group_size + kChunk - 1) / kChunk;
  const int lane = threadIdx.x % kWarp;
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  for (int64_t g = first; g < job.groups; g += int64_t(gridDim.x) * kWarpsPerBlock) {
    GroupStats s = empty_stats(job.symmetric);
    for (int64_t c = lane; c < chunks; c += kWarp) s = merge(s, partial[g * chunks + c]);
    s = segment_merge<kWarp>(s);
    if (lane == 0) {
      const QuantParams p = make_params(s, job.bits, job.symmetric);
      if (params != nullptr) params[g] = p;
      if (params_out != nullptr) store_params(params_out, g, p, job.symmetric);
    }
  }
}

enum class Sink { Fake, Int8, Int4 };

// Pass 3: each thread owns kRun consecutive elements (an even count, so int4
// pairs never split between threads), tracking group boundaries as it goes.
template <typename T, Sink kSink>
__global__ void transform_kernel(QuantJob job, const T* __restrict__ in, void* __restrict__ out,
                                 const QuantParams* __restrict__ params) {
  const int64_t group_size = job.numel / job.groups;
  const int64_t runs = (job.numel + kRun - 1) / kRun;
  const float qmin = code_min(job.bits), qmax = code_max(job.bits);
  const uint64_t seed = job.seed != nullptr ? static_cast<uint64_t>(*job.seed) : 0;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < runs; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t begin = r * kRun;
    const int end = static_cast<int>(min(int64_t(kRun), job.numel - begin));
    int64_t g = begin / group_size;
    int64_t next_boundary = (g + 1) * group_size;
    float codes[kRun];
    float u[kRun];
    if (job.seed != nullptr) {
      for (int k = 0; k < kRun; k += 4) {
        const Uniform4 u4 = uniforms_for_block(seed, static_cast<uint64_t>(begin + k) >> 2);
        for (int j = 0; j < 4; ++j) u[k + j] = u4.v[j];
      }
    }
    QuantParams p = params[g];
    for (int k = 0; k < end; ++k) {
      if (begin + k == next_boundary) {
        p = params[++g];
        next_boundary += group_size;
      }
      const float x = to_float(in[begin + k]);
      codes[k] = job.seed != nullptr ? quantize_stochastic(x, p, qmin, qmax, u[k]) : quantize_nearest(x, p, qmin, qmax);
      if constexpr (kSink == Sink::Fake) {
        static_cast<T*>(out)[begin + k] = from_float<T>(dequantize_code(codes[k], p.step, p.offset));
      } else if constexpr (kSink == Sink::Int8) {
        static_cast<int8_t*>(out)[begin + k] = static_cast<int8_t>(static_cast<int>(codes[k]));
      }
    }
    if constexpr (kSink == Sink::Int4) {
      for (int k = 0; k + 1 < end; k += 2) {
        static_cast<int8_t*>(out)[(begin + k) >> 1] =
            pack_nibbles(static_cast<int>(codes[k]), static_cast<int>(codes[k + 1]));
      }
    }
  }
}

template <typename T>
__global__ void dequantize_kernel(QuantJob job, const int8_t* __restrict__ codes, const float* __restrict__ params,
                                  T* __restrict__ out) {
  const int64_t group_size = job.numel / job.groups;
  const int64_t runs = (job.numel + kRun - 1) / kRun;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < runs; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t begin = r * kRun;
    const int end = static_cast<int>(min(int64_t(kRun), job.numel - begin));
    int64_t g = begin / group_size;
    int64_t next_boundary = (g + 1) * group_size;
    for (int k = 0; k < end; ++k) {
      const int64_t i = begin + k;
      if (i == next_boundary) {
        ++g;
        next_boundary += group_size;
      }
      const StoredParams p = load_params(params, g, job.symmetric);
      out[i] = from_float<T>(dequantize_code(static_cast<float>(code_at(codes, i, job.packed)), p.step, p.offset));
    }
  }
}

// ------------------------------------------------------------------ single pass

// The statistics of a group held by kGroupThreads consecutive threads, on all of them.
// Every thread of the block must call it (it may synchronise the block).
template <int kGroupThreads>
__device__ GroupStats group_merge(GroupStats s, GroupStats* per_warp) {
  if constexpr (kGroupThreads <= kWarp) {
    return segment_merge<kGroupThreads>(s);
  } else {
    constexpr int kWarpsPerGroup = kGroupThreads / kWarp;
    s = segment_merge<kWarp>(s);
    const int warp = threadIdx.x / kWarp;
    const int first = warp / kWarpsPerGroup * kWarpsPerGroup;
    if (threadIdx.x % kWarp == 0) per_warp[warp] = s;
    __syncthreads();
    GroupStats total = per_warp[first];
    for (int w = 1; w < kWarpsPerGroup; ++w) total = merge(total, per_warp[first + w]);
    __syncthreads();  // per_warp is reused by the next batch of groups
    return total;
  }
}

// N elements moved as one aligned vector.
template <typename E, int N>
struct alignas(sizeof(E) * N) Vec {
  E v[N];
};

// Elements [i, i + kUnit) of a stream: one vector access when kVec, else scalars.
template <int kUnit, bool kVec, typename T>
__device__ void load_unit(const T* __restrict__ in, int64_t i, float* v) {
  if constexpr (kVec) {
    const Vec<T, kUnit> packed = *reinterpret_cast<const Vec<T, kUnit>*>(in + i);
    for (int k = 0; k < kUnit; ++k) v[k] = to_float(packed.v[k]);
  } else {
    for (int k = 0; k < kUnit; ++k) v[k] = to_float(in[i + k]);
  }
}

template <int kUnit, bool kVec, typename E>
__device__ void store_unit(E* __restrict__ out, int64_t i, const E* v) {
  if constexpr (kVec) {
    Vec<E, kUnit> packed;
    for (int k = 0; k < kUnit; ++k) packed.v[k] = v[k];
    *reinterpret_cast<Vec<E, kUnit>*>(out + i) = packed;
  } else {
    for (int k = 0; k < kUnit; ++k) out[i + k] = v[k];
  }
}

// The stochastic-rounding uniforms of elements [i, i + kUnit): element i draws
// lane i % 4 of Philox block i / 4, as on the CPU.
template <int kUnit>
__device__ void unit_uniforms(uint64_t seed, int64_t i, float* u) {
  if constexpr (kUnit % 4 == 0) {  // i is then a multiple of 4 too
    for (int k = 0; k < kUnit; k += 4) {
      const Uniform4 r = uniforms_for_block(seed, static_cast<uint64_t>(i + k) >> 2);
      for (int j = 0; j < 4; ++j) u[k + j] = r.v[j];
    }
  } else {  // scalar units (1, or 2 from an even i) lie inside one block: one draw
    static_assert(4 % kUnit == 0, "a unit must not straddle Philox blocks");
    const Uniform4 r = uniforms_for_block(seed, static_cast<uint64_t>(i) >> 2);
    for (int k = 0; k < kUnit; ++k) u[k] = r.v[(i + k) & 3];
  }
}

// Quantizes whole groups in one pass: kGroupThreads threads per group, each holding
// up to kPerThread elements in registers as units of kUnit consecutive elements
// (unit u of a group belongs to thread u % kGroupThreads, so a warp's accesses are
// contiguous). Needs group_size % kUnit == 0, and for kVec aligned pointers.
template <typename T, Sink kSink, int kGroupThreads, int kPerThread, int kUnit, bool kVec>
__global__ void __launch_bounds__(kThreads)
    single_pass_kernel(QuantJob job, const T* __restrict__ in, void* __restrict__ out, float* __restrict__ params_out) {
  static_assert(kThreads % kGroupThreads == 0 && kPerThread % kUnit == 0, "size class");
  static_assert(kSink != Sink::Int4 || kUnit % 2 == 0, "4-bit pairs must not split between threads");
  constexpr int kGroupsPerBlock = kThreads / kGroupThreads;
  constexpr int kUnits = kPerThread / kUnit;
  __shared__ GroupStats per_warp[kWarpsPerBlock];
  const int64_t group_size = job.numel / job.groups;
  const int64_t units_per_group = group_size / kUnit;
  const int member = threadIdx.x % kGroupThreads;
  const float qmin = code_min(job.bits), qmax = code_max(job.bits);
  const uint64_t seed = job.seed != nullptr ? static_cast<uint64_t>(*job.seed) : 0;

  // Uniform trip count across the block: the merges need every thread.
  for (int64_t first = int64_t(blockIdx.x) * kGroupsPerBlock; first < job.groups;
       first += int64_t(gridDim.x) * kGroupsPerBlock) {
    const int64_t g = first + threadIdx.x / kGroupThreads;
    const bool active = g < job.groups;
    const int64_t base = g * group_size;
    float v[kPerThread];
    GroupStats s = empty_stats(job.symmetric);
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int64_t unit = member + int64_t(j) * kGroupThreads;
      if (active && unit < units_per_group) {
        load_unit<kUnit, kVec>(in, base + unit * kUnit, v + j * kUnit);
        for (int k = 0; k < kUnit; ++k) accumulate(s, v[j * kUnit + k], job.symmetric);
      }
    }
    s = group_merge<kGroupThreads>(s, per_warp);
    if (!active) continue;
    const QuantParams p = make_params(s, job.bits, job.symmetric);
    if (member == 0 && params_out != nullptr) store_params(params_out, g, p, job.symmetric);
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int64_t unit = member + int64_t(j) * kGroupThreads;
      if (unit >= units_per_group) continue;
      const int64_t i = base + unit * kUnit;
      float codes[kUnit];
      if (job.seed != nullptr) {
        float u[kUnit];
        unit_uniforms<kUnit>(seed, i, u);
        for (int k = 0; k < kUnit; ++k) codes[k] = quantize_stochastic(v[j * kUnit + k], p, qmin, qmax, u[k]);
      } else {
        for (int k = 0; k < kUnit; ++k) codes[k] = quantize_nearest(v[j * kUnit + k], p, qmin, qmax);
      }
      if constexpr (kSink == Sink::Fake) {
        T values[kUnit];
        for (int k = 0; k < kUnit; ++k) values[k] = from_float<T>(dequantize_code(codes[k], p.step, p.offset));
        store_unit<kUnit, kVec>(static_cast<T*>(out), i, values);
      } else if constexpr (kSink == Sink::Int8) {
        int8_t bytes[kUnit];
        for (int k = 0; k < kUnit; ++k) bytes[k] = static_cast<int8_t>(static_cast<int>(codes[k]));
        store_unit<kUnit, kVec>(static_cast<int8_t*>(out), i, bytes);
      } else {
        int8_t bytes[kUnit / 2];
        for (int k = 0; k < kUnit / 2; ++k) {
          bytes[k] = pack_nibbles(static_cast<int>(codes[2 * k]), static_cast<int>(codes[2 * k + 1]));
        }
        store_unit<kUnit / 2, kVec>(static_cast<int8_t*>(out), i / 2, bytes);
      }
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, Sink kSink, int kUnit, bool kVec>
void launch_single_pass(const QuantJob& job, const T* in, void* out, float* params_out, cudaStream_t stream) {
  const int64_t group_size = job.numel / job.groups;
  auto launch = [&](auto kernel, int group_threads) {
    kernel<<<grid_for(job.groups, kThreads / group_threads), kThreads, 0, stream>>>(job, in, out, params_out);
  };
  if (group_size <= 4 * 8) {
    launch(single_pass_kernel<T, kSink, 4, 8, kUnit, kVec>, 4);
  } else if (group_size <= kWarp * 8) {
    launch(single_pass_kernel<T, kSink, kWarp, 8, kUnit, kVec>, kWarp);
  } else if (group_size <= kWarp * 32) {
    launch(single_pass_kernel<T, kSink, kWarp, 32, kUnit, kVec>, kWarp);
  } else {
    launch(single_pass_kernel<T, kSink, kThreads, 32, kUnit, kVec>, kThreads);
  }
}

// Whether the single pass takes `job`: groups that fit a block's registers, and
// for 4 bits even groups (else a byte holds codes of two groups). 4-bit fake
// quantization packs nothing but is judged alike: it only costs unused scratch.
bool fits_single_pass(const QuantJob& job) {
  const int64_t group_size = job.numel / job.groups;
  return group_size <= kSinglePassMax && (!job.packed || group_size % 2 == 0);
}

// Runs the single-pass quantizer when the groups fit it; false otherwise.
template <typename T, Sink kSink>
bool single_pass(const QuantJob& job, const T* in, void* out, float* params_out, cudaStream_t stream) {
  if (!fits_single_pass(job)) return false;
  const int64_t group_size = job.numel / job.groups;
  constexpr int kVecUnit = 16 / sizeof(T);  // elements per 16-byte load
  constexpr size_t kOutBytes = kSink == Sink::Fake ? 16 : kSink == Sink::Int8 ? kVecUnit : kVecUnit / 2;
  if (group_size % kVecUnit == 0 && aligned(in, 16) && aligned(out, kOutBytes)) {
    launch_single_pass<T, kSink, kVecUnit, true>(job, in, out, params_out, stream);
  } else {
    launch_single_pass<T, kSink, kSink == Sink::Int4 ? 2 : 1, false>(job, in, out, params_out, stream);
  }
  return true;
}

Status last_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, Sink kSink>
Status run_quantizer(const QuantJob& job, const T* in, void* out, float* params_out, void* workspace,
                     cudaStream_t stream) {
  if (job.numel == 0) {  // no elements: only the (defined) params of empty groups
    if (params_out != nullptr && job.groups > 0) {
      group_params_kernel<<<grid_for(job.groups, kWarpsPerBlock), kThreads, 0, stream>>>(job, nullptr, nullptr,
                                                                                        params_out);
    }
    return last_status();
  }
  if (single_pass<T, kSink>(job, in, out, params_out, stream)) return last_status();
  const Scratch scratch = carve(job, workspace);
  const int64_t group_size = job.numel / job.groups;
  const int64_t items = job.groups * chunks_per_group(job);
  if (group_size <= kWarpItemMax) {
    chunk_stats_kernel<T, true><<<grid_for(items, kWarpsPerBlock), kThreads, 0, stream>>>(job, in, scratch.partial);
  } else {
    chunk_stats_kernel<T, false><<<grid_for(items, 1), kThreads, 0, stream>>>(job, in, scratch.partial);
  }
  group_params_kernel<<<grid_for(job.groups, kWarpsPerBlock), kThreads, 0, stream>>>(job, scratch.partial,
                                                                                    scratch.params, params_out);
  const int64_t runs = (job.numel + kRun - 1) / kRun;
  transform_kernel<T, kSink><<<grid_for(runs, kThreads), kThreads, 0, stream>>>(job, in, out, scratch.params);
  return last_status();
}

}  // namespace

size_t workspace_bytes(const QuantJob& job) {
  if (job.numel == 0 || fits_single_pass(job)) return 0;
  return align16(sizeof(GroupStats) * job.groups * chunks_per_group(job)) + sizeof(QuantParams) * job.groups;
}

Status fake_quantize(const QuantJob& job, const void* in, void* out, void* workspace, void* stream) {
  Status status = nullptr;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    status = run_quantizer<T, Sink::Fake>(job, static_cast<const T*>(in), out, nullptr, workspace,
                                          static_cast<cudaStream_t>(stream));
  });
  return status;
}

Status quantize(const QuantJob& job, const void* in, int8_t* codes, float* params, void* workspace, void* stream) {
  Status status = nullptr;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto s = static_cast<cudaStream_t>(stream);
    status = !job.packed
                 ? run_quantizer<T, Sink::Int8>(job, static_cast<const T*>(in), codes, params, workspace, s)
                 : run_quantizer<T, Sink::Int4>(job, static_cast<const T*>(in), codes, params, workspace, s);
  });
  return status;
}

Status dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out, void* stream) {
  if (job.numel == 0) return nullptr;
  Status status = nullptr;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t runs = (job.numel + kRun - 1) / kRun;
    dequantize_kernel<T><<<grid_for(runs, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        job, codes, params, static_cast<T*>(out));
    status = last_status();
  });
  return status;
}

}  // namespace qkit::cuda
