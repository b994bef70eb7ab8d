// The fused CPU quantized reduction (docs/ops.md §3), compiled once per instruction
// set: quantize_cpu_{generic,avx2,avx512}.cpp include this file after
// quantize_cpu_impl.h, in the same translation unit, so it reuses that file's int4
// unpacking, tile conversions, group walk and quantizer (its anonymous namespace,
// this ISA's copy). The math is qkit/zeropp.h and qkit/quant_math.h.
//
// The unfused route (src/zeropp_ops.cpp) writes the whole fp32 sum to memory, then
// quantizes it: a full-size fp32 buffer allocated, written and read again. Here a
// tile of whole output groups is summed into a small fp32 buffer that stays in
// cache and quantized from it, so memory sees the codes in and the codes out only.
#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC push_options
QKIT_CPU_TARGET_PRAGMA
#endif

namespace qkit::cpu::QKIT_CPU_ISA_NS {
namespace {

// Output values summed, then quantized, at a time (as whole groups; a larger group
// is a tile by itself): 16 KiB of fp32 plus the inputs' codes stay in L1/L2.
constexpr int64_t kReductionTile = 4096;

// A heap fp32 buffer (an ISA-local type rather than a std container of float: see
// the note in quantize_cpu_impl.h).
struct FloatScratch {
  float* data;
  explicit FloatScratch(int64_t n) : data(new float[static_cast<size_t>(n)]) {}
  ~FloatScratch() { delete[] data; }
  FloatScratch(const FloatScratch&) = delete;
  FloatScratch& operator=(const FloatScratch&) = delete;
};

// acc[0, n) = qkit::dequantized_sum of values [first, first + n): 0 + d_0 + d_1 + ...
// in tensor order, element by element, as the unfused kernels (CPU and CUDA) add.
// Walked one kTile piece at a time, every tensor's piece added before the next
// piece, so the partial sums stay in L1 and each piece's codes are widened to int8
// once.
void sum_dequantized(const ReductionJob& job, const int8_t* codes, const float* params, int64_t first, int64_t n,
                     float* acc) {
  const int64_t groups_per_tensor = job.in_groups / job.tensors;
  const int64_t group_size = job.values / groups_per_tensor;
  const bool packed = packed_storage(job.bits);
  int8_t unpacked[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = min_of(kTile, n - t);
    float* a = acc + t;
    for (int64_t i = 0; i < m; ++i) a[i] = 0.0f;
    for (int64_t j = 0; j < job.tensors; ++j) {
      const int64_t at = j * job.values + first + t;  // element index in the code stream
      const int8_t* c = codes + at;
      if (packed) {
        unpack_int4(codes, at, m, unpacked);
        c = unpacked;
      }
      const int64_t base = first + t;
      for_each_group_segment(base, base + m, group_size, [&](int64_t g, int64_t sb, int64_t se) {
        const auto [step, offset] = load_params(params, j * groups_per_tensor + g, job.symmetric);
        for (int64_t i = sb - base; i < se - base; ++i) a[i] += dequantize_code(static_cast<float>(c[i]), step, offset);
      });
    }
  }
}

}  // namespace

bool quantized_reduction(const ReductionJob& job, int64_t out_groups, const int8_t* codes, const float* params,
                         int8_t* codes_out, float* params_out) {
  if (job.values == 0 || out_groups <= 0 || job.values % out_groups != 0) return false;
  const int64_t size = job.values / out_groups;
  const bool packed = packed_storage(job.bits);
  // Beyond one sweep's group size the quantizer splits a group's statistics over
  // tasks; an odd int4 group size puts output bytes across tiles. Both stay unfused.
  if (size > kFusedGroupLimit || (packed && size % 2 != 0)) return false;
  const int64_t per_tile = max_of(1, kReductionTile / size);  // whole output groups
  const int64_t per_group = job.symmetric ? 1 : 2;
  parallel_for(0, out_groups, max_of(per_tile, kChunk / size), [&](int64_t gb, int64_t ge) {
    FloatScratch sum(per_tile * size);
    for (int64_t g0 = gb; g0 < ge; g0 += per_tile) {
      const int64_t count = min_of(per_tile, ge - g0), begin = g0 * size, n = count * size;
      sum_dequantized(job, codes, params, begin, n, sum.data);
      // The tile's groups through the quantizer, exactly as a quantize of the whole
      // fp32 sum would take them (the same group size picks the same path; with no
      // stochastic rounding a group's codes depend on its own values only).
      const QuantJob tile{DType::Float32, n, count, job.bits, job.symmetric, nullptr, packed};
      int8_t* q = codes_out + (packed ? begin / 2 : begin);
      if (packed) {
        run_quantizer<float, Sink::Int4>(tile, sum.data, q, params_out + g0 * per_group);
      } else {
        run_quantizer<float, Sink::Int8>(tile, sum.data, q, params_out + g0 * per_group);
      }
    }
  });
  return true;
}

}  // namespace qkit::cpu::QKIT_CPU_ISA_NS

#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC pop_options
#endif
