// Launchers of the quantizer kernels. Raw pointers only: this header is shared
// by the torch-free kernel sources (kernels/) and the bindings (src/).
#pragma once

#include <cstddef>
#include <cstdint>

#include "qkit/common.h"
#include "qkit/fp_formats.h"
#include "qkit/zeropp.h"

namespace qkit {

// One quantization job over a flattened tensor: `numel` elements in `groups`
// contiguous groups (numel % groups == 0, checked by the bindings).
struct QuantJob {
  DType dtype;        // element type of the float side (input, or output of dequantize)
  int64_t numel;
  int64_t groups;
  int bits;
  bool symmetric;
  const int64_t* seed;  // stochastic rounding: one int64 on the job's device; nullptr = nearest
  bool packed;          // codes two per byte (packed_storage); otherwise one per int8
};

// One floating-point quantization job (docs/ops.md §10) over a flattened tensor of
// `numel` elements in `groups` contiguous groups. Codes are packed per fp_formats.h;
// scales are float32 (absmax), E8M0 bytes (mx) or, for nvfp4, the 4 bytes of the fp32
// tensor scale followed by one E4M3 byte per group.
struct FpJob {
  DType dtype;  // element type of the float side
  int64_t numel;
  int64_t groups;
  FpFormat format;
  FpScaling scaling;
  const int64_t* seed;  // stochastic rounding (fake_quantize_fp only); nullptr = nearest
};

namespace cpu {

// Work splitting, implemented by the bindings on top of torch's thread pool.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t begin, int64_t end, int64_t grain, void* ctx, RangeFn fn);
// The threads parallel_for splits work among.
int64_t thread_count();

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for(begin, end, grain, const_cast<F*>(&f), [](void* ctx, int64_t b, int64_t e) {
    (*static_cast<F*>(ctx))(b, e);
  });
}

// out = dequantize(quantize(in)), same dtype as in.
void fake_quantize(const QuantJob& job, const void* in, void* out);
// codes: int8 (bits 8) or packed int4 (bits 4); params: float32 [groups, 1|2].
void quantize(const QuantJob& job, const void* in, int8_t* codes, float* params);
// out (job.dtype) from codes and params; job.numel counts output elements.
void dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out);

// Floating-point formats (docs/ops.md §10): out = dequantize_fp(quantize_fp(in)).
void fake_quantize_fp(const FpJob& job, const void* in, void* out);
void quantize_fp(const FpJob& job, const void* in, uint8_t* codes, uint8_t* scales);
void dequantize_fp(const FpJob& job, const uint8_t* codes, const uint8_t* scales, void* out);

// ZeRO++ building blocks (docs/ops.md §3). Codes/params are for job.groups groups of
// job.numel / job.groups elements, `job.bits` wide.
// Moves every group's codes and params to its swizzled slot.
void swizzle_groups(const QuantJob& job, const SwizzleLayout& layout, const int8_t* codes_in, const float* params_in,
                    int8_t* codes_out, float* params_out);
// s[a] = x[a] + e[position of a after the swizzle], in fp32; x and e of type job.dtype.
void add_swizzled_error(const QuantJob& job, const SwizzleLayout& layout, const void* x, const void* error, float* s);
// LoCo update for every element a (codes/params in natural order):
// e[pos(a)] <- beta*e + (1-beta)*(s[a] - dequant(code(a))); pos = swizzled position, or a when layout is null.
void update_error(const QuantJob& job, const SwizzleLayout* layout, const float* s, const int8_t* codes,
                  const float* params, DType error_dtype, void* error, float beta);
// out[i] = sum over tensors of the dequantized value i (+ error[i] when not null).
void dequantize_sum(const ReductionJob& job, const int8_t* codes, const float* params, DType error_dtype,
                    const void* error, float* out);
// out[g*group_size + j] (float16) = code / scale[g] + minv[g] for unsigned codes.
void dequantize_unsigned(const int8_t* data, DType param_dtype, const void* scale, const void* minv, int64_t groups,
                         int64_t group_size, int bits, half_t* out);
// quantize(dequantize_sum(job, codes, params), out_groups groups, job.bits) into
// codes_out/params_out, fused: tiles of whole output groups summed into a small fp32
// buffer and quantized from it, the same bits as the two steps. Returns false, having
// written nothing, when the output groups do not suit it (empty, larger than one
// quantizer sweep, or an odd size with int4 codes); the caller then takes the two steps.
bool quantized_reduction(const ReductionJob& job, int64_t out_groups, const int8_t* codes, const float* params,
                         int8_t* codes_out, float* params_out);

}  // namespace cpu

namespace cuda {

// Status of a launcher: nullptr on success, else the CUDA error's text.
using Status = const char*;

// Scratch the quantizing launchers need on the device (per-group statistics and
// parameters); the bindings allocate it through torch's caching allocator.
size_t workspace_bytes(const QuantJob& job);

Status fake_quantize(const QuantJob& job, const void* in, void* out, void* workspace, void* stream);
Status quantize(const QuantJob& job, const void* in, int8_t* codes, float* params, void* workspace,
                void* stream);
Status dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out, void* stream);

// Floating-point formats, as in qkit::cpu, on `stream`; the quantizing ones need
// fp_workspace_bytes(job) of device scratch.
size_t fp_workspace_bytes(const FpJob& job);
Status fake_quantize_fp(const FpJob& job, const void* in, void* out, void* workspace, void* stream);
Status quantize_fp(const FpJob& job, const void* in, uint8_t* codes, uint8_t* scales, void* workspace, void* stream);
Status dequantize_fp(const FpJob& job, const uint8_t* codes, const uint8_t* scales, void* out, void* stream);

// The ZeRO++ building blocks, as in qkit::cpu, on `stream`.
Status swizzle_groups(const QuantJob& job, const SwizzleLayout& layout, const int8_t* codes_in, const float* params_in,
                      int8_t* codes_out, float* params_out, void* stream);
Status add_swizzled_error(const QuantJob& job, const SwizzleLayout& layout, const void* x, const void* error, float* s,
                          void* stream);
Status update_error(const QuantJob& job, const SwizzleLayout* layout, const float* s, const int8_t* codes,
                    const float* params, DType error_dtype, void* error, float beta, void* stream);
Status dequantize_sum(const ReductionJob& job, const int8_t* codes, const float* params, DType error_dtype,
                      const void* error, float* out, void* stream);
Status dequantize_unsigned(const int8_t* data, DType param_dtype, const void* scale, const void* minv, int64_t groups,
                           int64_t group_size, int bits, half_t* out, void* stream);

}  // namespace cuda
}  // namespace qkit
