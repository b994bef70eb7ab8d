// CPU kernels of the ZeRO++ building blocks: group swizzle, LoCo error
// add/update, the fp32 dequantize-sum of a quantized reduction, and the
// unsigned-code dequantizer. The math is qkit/zeropp.h.
#include <algorithm>
#include <cstring>

#include "qkit/kernels.h"
#include "qkit/zeropp.h"

namespace qkit::cpu {
namespace {

constexpr int64_t kGrain = 16384;  // elements per task

#include "group_segments.h"  // for_each_group_segment

}  // namespace

void swizzle_groups(const QuantJob& job, const SwizzleLayout& layout, const int8_t* codes_in, const float* params_in,
                    int8_t* codes_out, float* params_out) {
  const int64_t group_bytes = job.numel / job.groups * job.bits / 8;
  const int64_t per_group = job.symmetric ? 1 : 2;
  // Consecutive groups of one slice land in consecutive slots, so whole runs move
  // with one memcpy each (a call per group costs more than the copy for small groups).
  const int64_t per_slice = layout.groups / (layout.nodes * layout.devices * layout.pipeline);
  parallel_for(0, job.groups, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, group_bytes)),
               [&](int64_t gb, int64_t ge) {
                 for (int64_t g = gb; g < ge;) {
                   const int64_t run_end = std::min(ge, (g / per_slice + 1) * per_slice);
                   const int64_t slot = swizzled_slot(g, layout), count = run_end - g;
                   std::memcpy(codes_out + slot * group_bytes, codes_in + g * group_bytes, count * group_bytes);
                   std::memcpy(params_out + slot * per_group, params_in + g * per_group,
                               count * per_group * sizeof(float));
                   g = run_end;
                 }
               });
}

void add_swizzled_error(const QuantJob& job, const SwizzleLayout& layout, const void* x, const void* error, float* s) {
  const int64_t group_size = job.numel / job.groups;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xv = static_cast<const T*>(x);
    const T* ev = static_cast<const T*>(error);
    parallel_for(0, job.numel, kGrain, [&](int64_t b, int64_t e) {
      for_each_group_segment(b, e, group_size, [&](int64_t g, int64_t pb, int64_t pe) {
        const int64_t shift = (swizzled_slot(g, layout) - g) * group_size;
        for (int64_t a = pb; a < pe; ++a) s[a] = to_float(xv[a]) + to_float(ev[a + shift]);
      });
    });
  });
}

void update_error(const QuantJob& job, const SwizzleLayout* layout, const float* s, const int8_t* codes,
                  const float* params, DType error_dtype, void* error, float beta) {
  const int64_t group_size = job.numel / job.groups;
  dispatch_dtype(error_dtype, [&](auto tag) {
    using E = decltype(tag);
    E* ev = static_cast<E*>(error);
    parallel_for(0, job.numel, kGrain, [&](int64_t b, int64_t e) {
      for_each_group_segment(b, e, group_size, [&](int64_t g, int64_t pb, int64_t pe) {
        const auto [step, offset] = load_params(params, g, job.symmetric);
        const int64_t shift = layout == nullptr ? 0 : (swizzled_slot(g, *layout) - g) * group_size;
        for (int64_t a = pb; a < pe; ++a) {
          const float d = dequantize_code(static_cast<float>(code_at(codes, a, job.packed)), step, offset);
          ev[a + shift] = from_float<E>(updated_error(to_float(ev[a + shift]), s[a], d, beta));
        }
      });
    });
  });
}

void dequantize_sum(const ReductionJob& job, const int8_t* codes, const float* params, DType error_dtype,
                    const void* error, float* out) {
  // Same sum as qkit::dequantized_sum (0 + d_0 + d_1 + ... in tensor order), walked
  // one input group at a time so each tensor's step/offset is loaded once and the
  // inner loops vectorise.
  const int64_t groups_per_tensor = job.in_groups / job.tensors;
  const int64_t group_size = job.values / groups_per_tensor;
  parallel_for(0, job.values, kGrain, [&](int64_t b, int64_t e) {
    for_each_group_segment(b, e, group_size, [&](int64_t g, int64_t pb, int64_t pe) {
      float* acc = out + pb;
      const int64_t n = pe - pb;
      for (int64_t i = 0; i < n; ++i) acc[i] = 0.0f;
      for (int64_t j = 0; j < job.tensors; ++j) {
        const auto [step, offset] = load_params(params, j * groups_per_tensor + g, job.symmetric);
        const int64_t first = j * job.values + pb;
        if (job.bits == 8) {
          const int8_t* c = codes + first;
          for (int64_t i = 0; i < n; ++i) acc[i] += dequantize_code(static_cast<float>(c[i]), step, offset);
        } else if (((first | n) & 1) == 0) {  // whole bytes: decode both nibbles of each
          const int8_t* c = codes + first / 2;
          for (int64_t k = 0; k < n / 2; ++k) {
            acc[2 * k] += dequantize_code(static_cast<float>(unpack_high(c[k])), step, offset);
            acc[2 * k + 1] += dequantize_code(static_cast<float>(unpack_low(c[k])), step, offset);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            acc[i] += dequantize_code(static_cast<float>(code_at(codes, first + i, true)), step, offset);
          }
        }
      }
    });
    if (error == nullptr) return;
    dispatch_dtype(error_dtype, [&](auto tag) {
      using E = decltype(tag);
      const E* ev = static_cast<const E*>(error);
      for (int64_t i = b; i < e; ++i) out[i] += to_float(ev[i]);
    });
  });
}

void dequantize_unsigned(const int8_t* data, DType param_dtype, const void* scale, const void* minv, int64_t groups,
                         int64_t group_size, int bits, half_t* out) {
  dispatch_dtype(param_dtype, [&](auto tag) {
    using P = decltype(tag);
    const P* sv = static_cast<const P*>(scale);
    const P* mv = static_cast<const P*>(minv);
    parallel_for(0, groups * group_size, kGrain, [&](int64_t b, int64_t e) {
      for_each_group_segment(b, e, group_size, [&](int64_t g, int64_t pb, int64_t pe) {
        const float s = to_float(sv[g]), m = to_float(mv[g]);
        for (int64_t i = pb; i < pe; ++i) out[i] = float_to_half(dequantize_unsigned_value(data, i, bits, s, m));
      });
    });
  });
}

}  // namespace qkit::cpu
