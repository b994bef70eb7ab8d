// Pieces of the core-op bindings that other op families reuse.
#pragma once

#include "binding_utils.h"
#include "qkit/kernels.h"

namespace qkit::binding {

QuantJob make_job(DType dtype, int64_t numel, int64_t groups, int64_t bits, bool symmetric);
void check_storage_bits(int64_t bits, const char* op);
// Quantized input of an op: int8 codes, float32 params on the codes' device, 4 or 8 bits.
void check_codes_and_params(const Tensor& q, const Tensor& params, int64_t bits, const char* op);
// The quantizing launchers' device scratch for `job`, on like's device.
Tensor workspace_for(const Tensor& like, const QuantJob& job);
// Quantizes contiguous `in` (job.dtype) into codes/params on in's device.
void quantize_into(const Tensor& in, const QuantJob& job, int8_t* codes, float* params, const char* op);
// The same for `in`, a contiguous job.dtype buffer on like's device (a slice of a tensor).
void quantize_into(const Tensor& like, const void* in, const QuantJob& job, int8_t* codes, float* params,
                   const char* op);

}  // namespace qkit::binding
