// The CPU kernels of the floating-point formats (docs/ops.md §10), compiled once per
// instruction set: quantize_cpu_{generic,avx2,avx512}.cpp include this file right after
// quantize_cpu_impl.h, in the same translation unit, so it reuses that file's tile
// conversions, Philox uniforms and group walk (its anonymous namespace, this ISA's copy).
// The math is qkit/fp_formats.h; here, how data is walked: group statistics in parallel,
// then the elements in fp32 tiles whose inner loops are plain, branch-free float loops.
#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC push_options
QKIT_CPU_TARGET_PRAGMA
#endif

namespace qkit::cpu::QKIT_CPU_ISA_NS {
namespace {

// ISA-local element types for the scratch vectors (see quantize_cpu_impl.h).
struct FpStatsSlot {
  FpStats stats;
};
struct FpGroupSlot {
  FpGroup group;
};

// Statistics of x[0, n): one loop of integer maxima the compiler vectorises.
inline FpStats fp_stats_of_floats(const float* x, int64_t n) {
  uint32_t top = 0, finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = float_bits(x[i]) & 0x7FFFFFFFu;
    top = a > top ? a : top;
    const uint32_t f = a < 0x7F800000u ? a : 0u;
    finite = f > finite ? f : finite;
  }
  return FpStats{top, finite};
}

template <typename T>
FpStats fp_stats_of(const T* x, int64_t n) {
  FpStats st = fp_empty_stats();
  float buf[kTile];
  for (int64_t b = 0; b < n; b += kTile) {
    const int64_t m = min_of(kTile, n - b);
    st = fp_merge(st, fp_stats_of_floats(as_float(x + b, m, buf), m));
  }
  return st;
}

// Every group's statistics: many groups per task, or many tasks per group when groups
// are large (partial statistics merged afterwards).
template <typename T>
std::vector<FpStatsSlot> fp_group_stats(const FpJob& job, const T* in) {
  std::vector<FpStatsSlot> stats(static_cast<size_t>(job.groups));
  if (job.numel == 0) return stats;
  const int64_t size = job.numel / job.groups;
  if (size <= kChunk) {
    parallel_for(0, job.groups, max_of(1, kChunk / size), [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) stats[g].stats = fp_stats_of(in + g * size, size);
    });
    return stats;
  }
  const int64_t per_group = (size + kChunk - 1) / kChunk;
  std::vector<FpStatsSlot> partial(static_cast<size_t>(job.groups * per_group));
  parallel_for(0, job.groups * per_group, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const int64_t g = w / per_group, c = w % per_group;
      partial[w].stats = fp_stats_of(in + g * size + c * kChunk, min_of(kChunk, size - c * kChunk));
    }
  });
  for (int64_t g = 0; g < job.groups; ++g) {
    FpStats st = fp_empty_stats();
    for (int64_t c = 0; c < per_group; ++c) st = fp_merge(st, partial[g * per_group + c].stats);
    stats[g].stats = st;
  }
  return stats;
}

// Every group's scaling, written to `scales` as storage keeps it when not null.
template <FpFormat F>
std::vector<FpGroupSlot> fp_groups_of(const FpJob& job, const std::vector<FpStatsSlot>& stats, uint8_t* scales) {
  constexpr FpSpec spec = fp_spec(F);
  std::vector<FpGroupSlot> groups(static_cast<size_t>(job.groups));
  float tensor_scale = 0.0f;
  if (job.scaling == FpScaling::Nvfp4) {
    FpStats all = fp_empty_stats();
    for (int64_t g = 0; g < job.groups; ++g) all = fp_merge(all, stats[g].stats);
    tensor_scale = fp_nvfp4_tensor_scale(all.finite);
    if (scales != nullptr) std::memcpy(scales, &tensor_scale, sizeof(float));
  }
  for (int64_t g = 0; g < job.groups; ++g) {
    const FpStats& st = stats[g].stats;
    FpGroup grp;
    switch (job.scaling) {
      case FpScaling::Absmax: grp = fp_absmax_group(st, spec); break;
      case FpScaling::Mx: grp = fp_mx_group(st, spec); break;
      default: grp = fp_nvfp4_group(st, tensor_scale); break;
    }
    groups[g].group = grp;
    if (scales == nullptr) continue;
    if (job.scaling == FpScaling::Absmax) {
      std::memcpy(scales + 4 * g, &grp.dec, sizeof(float));
    } else {
      scales[(job.scaling == FpScaling::Nvfp4 ? 4 : 0) + g] = static_cast<uint8_t>(grp.byte);
    }
  }
  return groups;
}

// Codes of the scaled values of v[0, n), elements [first, first + n) of one group.
template <FpFormat F, bool kDivide>
void fp_codes_of(const float* v, int64_t n, int64_t first, const FpGroup grp, const int64_t* seed, uint8_t* c) {
  constexpr FpSpec spec = fp_spec(F);
  if (seed == nullptr) {
    for (int64_t i = 0; i < n; ++i) c[i] = static_cast<uint8_t>(fp_encode(fp_scaled<kDivide>(v[i], grp), spec));
    return;
  }
  float buf[kUniformBuf];
  const float* u = uniforms_for(static_cast<uint64_t>(*seed), first, n, buf);
  for (int64_t i = 0; i < n; ++i) {
    c[i] = static_cast<uint8_t>(fp_encode_stochastic(fp_scaled<kDivide>(v[i], grp), u[i], spec));
  }
}

// The quantizing pass: codes (packed into `codes`) or fake-quantized values (`out`).
template <typename T, FpFormat F, bool kFake>
void run_fp_quantizer(const FpJob& job, const T* in, void* out, uint8_t* scales) {
  constexpr FpSpec spec = fp_spec(F);
  constexpr int64_t unit = kFake ? 1 : fp_unit(F);  // work splits at whole output bytes
  const std::vector<FpStatsSlot> stats = fp_group_stats(job, in);
  const std::vector<FpGroupSlot> groups = fp_groups_of<F>(job, stats, scales);
  if (job.numel == 0) return;
  const int64_t size = job.numel / job.groups;
  const bool divide = job.scaling == FpScaling::Absmax;
  parallel_for(0, job.numel / unit, kChunk / unit, [&](int64_t ub, int64_t ue) {
    float buf[kTile], y[kTile];
    uint8_t c[kTile];
    for (int64_t t = ub * unit; t < ue * unit; t += kTile) {
      const int64_t n = min_of(kTile, ue * unit - t);
      const float* v = as_float(in + t, n, buf);
      for_each_group_segment(t, t + n, size, [&](int64_t g, int64_t sb, int64_t se) {
        const FpGroup grp = groups[g].group;
        if (divide) {
          fp_codes_of<F, true>(v + (sb - t), se - sb, sb, grp, job.seed, c + (sb - t));
        } else {
          fp_codes_of<F, false>(v + (sb - t), se - sb, sb, grp, job.seed, c + (sb - t));
        }
        if constexpr (kFake) {
          for (int64_t i = sb - t; i < se - t; ++i) y[i] = fp_decode(c[i], spec) * grp.dec;
        }
      });
      if constexpr (kFake) {
        store(y, n, static_cast<T*>(out) + t);
      } else {
        uint8_t* dst = static_cast<uint8_t*>(out) + fp_code_bytes(t, F);
        for (int64_t k = 0; k < n / unit; ++k) fp_pack_unit(c + k * unit, dst + k * (unit * fp_bits(F) / 8), F);
      }
    }
  });
}

template <typename T, FpFormat F>
void run_fp_dequantizer(const FpJob& job, const uint8_t* codes, const uint8_t* scales, T* out) {
  constexpr FpSpec spec = fp_spec(F);
  constexpr int64_t unit = fp_unit(F);
  const int64_t size = job.numel / job.groups;
  float tensor_scale = 0.0f;
  if (job.scaling == FpScaling::Nvfp4) std::memcpy(&tensor_scale, scales, sizeof(float));
  parallel_for(0, job.numel / unit, kChunk / unit, [&](int64_t ub, int64_t ue) {
    float y[kTile];
    for (int64_t t = ub * unit; t < ue * unit; t += kTile) {
      const int64_t n = min_of(kTile, ue * unit - t);
      for_each_group_segment(t, t + n, size, [&](int64_t g, int64_t sb, int64_t se) {
        float dec;
        if (job.scaling == FpScaling::Absmax) {
          std::memcpy(&dec, scales + 4 * g, sizeof(float));
          dec = fp_dec_of_absmax(dec);
        } else if (job.scaling == FpScaling::Mx) {
          dec = fp_dec_of_mx(scales[g]);
        } else {
          dec = fp_dec_of_nvfp4(scales[4 + g], tensor_scale);
        }
        for (int64_t i = sb; i < se; ++i) y[i - t] = fp_decode(fp_code_at(codes, i, F), spec) * dec;
      });
      store(y, n, out + t);
    }
  });
}

}  // namespace

void fake_quantize_fp(const FpJob& job, const void* in, void* out) {
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(job.format, [&](auto f) {
      run_fp_quantizer<T, decltype(f)::value, true>(job, static_cast<const T*>(in), out, nullptr);
    });
  });
}

void quantize_fp(const FpJob& job, const void* in, uint8_t* codes, uint8_t* scales) {
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(job.format, [&](auto f) {
      run_fp_quantizer<T, decltype(f)::value, false>(job, static_cast<const T*>(in), codes, scales);
    });
  });
}

void dequantize_fp(const FpJob& job, const uint8_t* codes, const uint8_t* scales, void* out) {
  if (job.numel == 0) return;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_format(job.format, [&](auto f) {
      run_fp_dequantizer<T, decltype(f)::value>(job, codes, scales, static_cast<T*>(out));
    });
  });
}

}  // namespace qkit::cpu::QKIT_CPU_ISA_NS

#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC pop_options
#endif
