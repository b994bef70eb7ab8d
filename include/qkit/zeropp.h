// ZeRO++ layout and error-feedback math (docs/ops.md §3), shared by CPU and CUDA.
#pragma once

#include <cstdint>

#include "qkit/common.h"
#include "qkit/quant_math.h"

namespace qkit {

// How swizzle_quantize reorders groups: `nodes` x `devices` partitions, each cut
// into `pipeline` slices.
struct SwizzleLayout {
  int64_t groups;
  int64_t pipeline;
  int64_t nodes;
  int64_t devices;
};

// Output slot of input group g: partition z = (node n, device d) moves to
// (device d, node n), and slice y of every partition precedes slice y + 1.
QKIT_HD int64_t swizzled_slot(int64_t g, const SwizzleLayout& s) {
  const int64_t partitions = s.nodes * s.devices;
  const int64_t per_partition = s.groups / partitions;
  const int64_t per_slice = per_partition / s.pipeline;
  const int64_t z = g / per_partition, w = g % per_partition;
  const int64_t n = z / s.devices, d = z % s.devices;
  const int64_t y = w / per_slice, x = w % per_slice;
  return (y * partitions + d * s.nodes + n) * per_slice + x;
}

// LoCo error feedback: e <- beta*e + (1 - beta)*(s - d), every step one fp32 op.
QKIT_HD float updated_error(float e, float s, float d, float beta) {
  const float residual = s - d;
  return beta * e + (1.0f - beta) * residual;
}

// One quantized-reduction job: `tensors` (L) equal tensors of `values` (V)
// codes each, back to back; tensor j uses param rows [j*in_groups/L, (j+1)*in_groups/L).
struct ReductionJob {
  int64_t values;
  int64_t tensors;
  int64_t in_groups;
  int bits;
  bool symmetric;
};

// fp32 sum over the L tensors of the dequantized value at position i, in tensor order.
QKIT_HD float dequantized_sum(const ReductionJob& r, const int8_t* codes, const float* params, int64_t i) {
  const int64_t groups_per_tensor = r.in_groups / r.tensors;
  const int64_t group_size = r.values / groups_per_tensor;
  const int64_t group_in_tensor = i / group_size;
  float acc = 0.0f;
  for (int64_t j = 0; j < r.tensors; ++j) {
    const StoredParams p = load_params(params, j * groups_per_tensor + group_in_tensor, r.symmetric);
    acc += dequantize_code(static_cast<float>(code_at(codes, j * r.values + i, packed_storage(r.bits))), p.step, p.offset);
  }
  return acc;
}

// DeepSpeed's unsigned codes (inference checkpoints): code/scale + min, scale being
// the forward scale. Even element in the high nibble for 4 bits.
QKIT_HD float dequantize_unsigned_value(const int8_t* data, int64_t i, int bits, float scale, float minv) {
  const uint8_t byte = static_cast<uint8_t>(data[bits == 8 ? i : (i >> 1)]);
  const int code = bits == 8 ? byte : ((i & 1) ? (byte & 0xF) : (byte >> 4));
  return static_cast<float>(code) / scale + minv;
}

}  // namespace qkit
