// Pieces of the core-op bindings that other op families reuse.
#pragma once

#include "binding_utils.h"
#include "qkit/kernels.h"

namespace qkit::binding {

// `pack`: whether 4-bit codes go two per byte (see packed_storage).
QuantJob make_job(DType dtype, int64_t numel, int64_t groups, int64_t bits, bool symmetric, bool pack = true);
// quantize/dequantize store any width in [2, 8] (one code per int8; 4 bits packed unless asked not to).
void check_storage_bits(int64_t bits, const char* op);
// The ZeRO++ ops move 4- or 8-bit codes only.
void check_wire_bits(int64_t bits, const char* op);
// Quantized input of an op: int8 codes and float32 params on the codes' device.
void check_codes_and_params(const Tensor& q, const Tensor& params, const char* op);
// The quantizing launchers' device scratch for `job`, on like's device.
Tensor workspace_for(const Tensor& like, const QuantJob& job);
// Quantizes contiguous `in` (job.dtype) into codes/params on in's device.
void quantize_into(const Tensor& in, const QuantJob& job, int8_t* codes, float* params, const char* op);
// The same for `in`, a contiguous job.dtype buffer on like's device (a slice of a tensor).
void quantize_into(const Tensor& like, const void* in, const QuantJob& job, int8_t* codes, float* params,
                   const char* op);

// The `out=` buffers of a quantizing op: int8 `q` of `code_sizes` and float32
// `params` [groups, 1|2], on input's device, sharing memory with neither `input`
// nor each other.
void check_code_outputs(const Tensor& input, const Tensor& q, const Shape& code_sizes,
                        const Tensor& params, int64_t groups, bool symmetric, const char* op);

// write(codes, params) on dense stand-ins for `q` and `params` (see write_into).
template <typename Write>
void write_codes_into(Tensor& q, Tensor& params, const Write& write) {
  write_into(q, [&](Tensor& code_dst) { write_into(params, [&](Tensor& param_dst) { write(code_dst, param_dst); }); });
}

}  // namespace qkit::binding
