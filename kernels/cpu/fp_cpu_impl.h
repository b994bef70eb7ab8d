// The CPU kernels of the floating-point formats (docs/ops.md §10), compiled once per
// instruction set: quantize_cpu_{generic,avx2,avx512}.cpp include this file right after
// quantize_cpu_impl.h, in the same translation unit, so it reuses that file's tile
// conversions, SIMD helpers (Vec, IntVec), Philox uniforms and group walk (its anonymous
// namespace, this ISA's copy). The math is qkit/fp_formats.h; here, how data is walked.
//
// Groups up to kFusedGroupLimit elements are done in one sweep: a tile of whole groups
// (or one group, tile by tile, while it stays in cache) gets its statistics, its scales
// and its elements before the next, so the input is read from memory once. Larger
// groups take two parallel passes (statistics, then elements). The inner loops are
// branch-free loops over fp32 tiles; mx and nvfp4 get them with their block size as a
// constant (one or two registers per group). Fake quantization computes the format's
// value directly (fp_quantized), without a code; dequantization unpacks FP4 / FP6 codes a
// tile at a time (not element by element), decodes the tile with fp_decode in one plain
// loop (a 256-entry table's gathers measured 2x slower for FP8), then scales each group's
// piece of it.
#ifdef QKIT_CPU_TARGET_PRAGMA
#pragma GCC push_options
QKIT_CPU_TARGET_PRAGMA
#endif

namespace qkit::cpu::QKIT_CPU_ISA_NS {
namespace {

// The element loops (fp_formats.h's functions are always inlined into them) live in a few
// functions that do not depend on the tensor's dtype, called, not inlined, per group piece
// (noinline): inlined into every dtype's walk, they made this translation unit so large
// that GCC stopped inlining elsewhere, the integer kernels' helpers next door included
// ("inline-unit-growth limit reached": int8 fake_quantize ran 6x slower).
// Their loops of a constant 16 elements (nvfp4) must stay loops: fully unrolled first
// (as GCC does up to 16 iterations), they ran as 16 scalar copies.
#if defined(__GNUC__)
#define QKIT_FP_PIECE __attribute__((noinline))
#define QKIT_FP_ALWAYS_INLINE inline __attribute__((always_inline))
#define QKIT_FP_KEEP_LOOP _Pragma("GCC unroll 1")
#else
#define QKIT_FP_PIECE
#define QKIT_FP_ALWAYS_INLINE inline
#define QKIT_FP_KEEP_LOOP
#endif

// ISA-local element types for the scratch vectors (see quantize_cpu_impl.h).
struct FpStatsSlot {
  FpStats stats;
};
struct FpGroupSlot {
  FpGroup group;
};

// Statistics of x[0, n): integer maxima of |x|'s bit pattern, kept as SIMD registers
// (GCC would not vectorise the two scalar reductions: the pass that took most of the time).
QKIT_FP_ALWAYS_INLINE FpStats fp_stats_of_floats(const float* x, int64_t n) {
  IntVec top0{}, top1{}, fin0{}, fin1{};
  const IntVec zero{};
  int64_t i = 0;
  for (; i + 2 * kVecLanes <= n; i += 2 * kVecLanes) {
    const IntVec a0 = abs_bits(load_vec(x + i)), a1 = abs_bits(load_vec(x + i + kVecLanes));
    top0 = imax(top0, a0);
    top1 = imax(top1, a1);
    fin0 = imax(fin0, a0 < kNonFiniteBits ? a0 : zero);
    fin1 = imax(fin1, a1 < kNonFiniteBits ? a1 : zero);
  }
  for (; i + kVecLanes <= n; i += kVecLanes) {
    const IntVec a0 = abs_bits(load_vec(x + i));
    top0 = imax(top0, a0);
    fin0 = imax(fin0, a0 < kNonFiniteBits ? a0 : zero);
  }
  FpStats st{static_cast<uint32_t>(reduce_max(imax(top0, top1))), static_cast<uint32_t>(reduce_max(imax(fin0, fin1)))};
  for (; i < n; ++i) fp_accumulate(st, x[i]);
  return st;
}

// The tile's fp32 values, uniforms and results through these few out-of-line calls, so
// the walks below (one per dtype, format and scaling) stay small (see QKIT_FP_PIECE).
template <typename T>
QKIT_FP_PIECE const float* fp_load(const T* x, int64_t n, float* buf) {
  return as_float(x, n, buf);
}
template <typename T>
QKIT_FP_PIECE void fp_store(const float* y, int64_t n, T* out) {
  store(y, n, out);
}
QKIT_FP_PIECE const float* fp_uniforms(const FpJob& job, int64_t first, int64_t n, float (&buf)[kUniformBuf]) {
  return job.seed != nullptr ? uniforms_for(static_cast<uint64_t>(*job.seed), first, n, buf) : nullptr;
}

// Statistics of `count` groups of `size` elements at v.
QKIT_FP_PIECE void fp_tile_stats(const float* v, int64_t count, int64_t size, FpStats* st) {
  for (int64_t k = 0; k < count; ++k) st[k] = fp_stats_of_floats(v + k * size, size);
}

template <typename T>
QKIT_FP_PIECE FpStats fp_stats_of(const T* x, int64_t n) {
  FpStats st = fp_empty_stats();
  float buf[kTile];
  for (int64_t b = 0; b < n; b += kTile) {
    const int64_t m = min_of(kTile, n - b);
    st = fp_merge(st, fp_stats_of_floats(fp_load(x + b, m, buf), m));
  }
  return st;
}

// The largest finite |x| pattern of the whole tensor (nvfp4's per-tensor scale).
template <typename T>
uint32_t fp_finite_top(const FpJob& job, const T* in) {
  const int64_t tasks = (job.numel + kChunk - 1) / kChunk;
  std::vector<FpStatsSlot> partial(static_cast<size_t>(tasks));
  parallel_for(0, tasks, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) partial[w].stats = fp_stats_of(in + w * kChunk, min_of(kChunk, job.numel - w * kChunk));
  });
  FpStats all = fp_empty_stats();
  for (int64_t w = 0; w < tasks; ++w) all = fp_merge(all, partial[w].stats);
  return all.finite;
}

// Every group's statistics (the two-pass walk of large groups): many tasks per group,
// partial statistics merged afterwards.
template <typename T>
std::vector<FpStatsSlot> fp_group_stats(const FpJob& job, const T* in) {
  std::vector<FpStatsSlot> stats(static_cast<size_t>(job.groups));
  if (job.numel == 0) return stats;
  const int64_t size = job.numel / job.groups;
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

// The scalings of `count` groups from their statistics, one loop over the groups (so
// that nvfp4's, two divisions and an E4M3 rounding each, vectorise).
template <FpFormat F, FpScaling S>
QKIT_FP_PIECE void fp_groups_into(const FpStats* __restrict__ st, int64_t count, float tensor_scale,
                                    FpGroup* __restrict__ grp) {
  constexpr FpSpec spec = fp_spec(F);
  for (int64_t k = 0; k < count; ++k) {
    grp[k] = S == FpScaling::Absmax ? fp_absmax_group(st[k], spec)
             : S == FpScaling::Mx   ? fp_mx_group(st[k], spec)
                                    : fp_nvfp4_group(st[k], tensor_scale);
  }
}

// The stored scales of groups g0 + [0, count) (nvfp4's per-tensor scale: the caller's).
template <FpScaling S>
inline void fp_store_scales(const FpGroup* grp, int64_t count, int64_t g0, uint8_t* scales) {
  if (S == FpScaling::Absmax) {
    for (int64_t k = 0; k < count; ++k) std::memcpy(scales + 4 * (g0 + k), &grp[k].dec, sizeof(float));
  } else {
    uint8_t* dst = scales + (S == FpScaling::Nvfp4 ? 4 : 0) + g0;
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<uint8_t>(grp[k].byte);
  }
}

// The elements of one group piece v[0, n) (kSize, when not 0, is n as a constant):
// fake-quantized values into y (kFake), or codes into c; u: the piece's uniforms, or
// null. absmax divides by the group's step, mx and nvfp4 multiply (fp_scaled).
template <FpFormat F, FpScaling S, bool kFake, int kSize>
QKIT_FP_PIECE void fp_piece(const float* __restrict__ v, int64_t n, const FpGroup grp, const float* __restrict__ u,
                              float* __restrict__ y, uint32_t* __restrict__ c) {
  constexpr FpSpec spec = fp_spec(F);
  constexpr bool kDivide = S == FpScaling::Absmax;
  const FpGroup g{grp.enc, grp.dec, 0u};
  const float dec = grp.dec;
  if (kSize != 0) n = kSize;
  if constexpr (kFake) {
    if (u == nullptr) {
      QKIT_FP_KEEP_LOOP
      for (int64_t i = 0; i < n; ++i) y[i] = fp_quantized(fp_scaled<kDivide>(v[i], g), spec) * dec;
    } else {
      QKIT_FP_KEEP_LOOP
      for (int64_t i = 0; i < n; ++i) y[i] = fp_quantized_stochastic(fp_scaled<kDivide>(v[i], g), u[i], spec) * dec;
    }
  } else {
    if (u == nullptr) {
      QKIT_FP_KEEP_LOOP
      for (int64_t i = 0; i < n; ++i) c[i] = fp_encode(fp_scaled<kDivide>(v[i], g), spec);
    } else {
      QKIT_FP_KEEP_LOOP
      for (int64_t i = 0; i < n; ++i) c[i] = fp_encode_stochastic(fp_scaled<kDivide>(v[i], g), u[i], spec);
    }
  }
}

// Writes the tile's results for elements [t, t + n): values (kFake) or packed codes
// (t and n multiples of the packing unit).
template <typename T, FpFormat F, bool kFake>
QKIT_FP_PIECE void fp_emit(const float* y, const uint32_t* __restrict__ c, int64_t t, int64_t n, void* out) {
  if constexpr (kFake) {
    fp_store(y, n, static_cast<T*>(out) + t);
  } else {
    constexpr int64_t unit = fp_unit(F);
    uint8_t* __restrict__ dst = static_cast<uint8_t*>(out) + fp_code_bytes(t, F);
    if constexpr (fp_bits(F) == 8) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint8_t>(c[i]);
    } else {
      for (int64_t k = 0; k < n / unit; ++k) fp_pack_unit(c + k * unit, dst + k * (unit * fp_bits(F) / 8), F);
    }
  }
}

// Groups of at most kTile / 4 elements: tiles of whole groups, a multiple of four groups
// each (so every tile packs into whole bytes), statistics, scales and elements together.
template <typename T, FpFormat F, bool kFake, FpScaling S, int kSize>
void fp_small_groups(const FpJob& job, const T* in, void* out, uint8_t* scales, float tensor_scale) {
  const int64_t size = kSize != 0 ? kSize : job.numel / job.groups;
  const int64_t per_tile = min_of((kTile / size) & ~int64_t{3}, kTile / 4);
  const int64_t quads = (job.groups + 3) / 4;
  parallel_for(0, quads, max_of(1, kChunk / (4 * size)), [&](int64_t qb, int64_t qe) {
    float buf[kTile], y[kTile], ubuf[kUniformBuf];
    uint32_t c[kTile];  // codes: one 32-bit lane per float lane
    FpStats st[kTile / 4];
    FpGroup grp[kTile / 4];
    const int64_t g_end = min_of(4 * qe, job.groups);
    for (int64_t g0 = 4 * qb; g0 < g_end; g0 += per_tile) {
      const int64_t count = min_of(per_tile, g_end - g0), t = g0 * size, n = count * size;
      const float* v = fp_load(in + t, n, buf);
      const float* u = fp_uniforms(job, t, n, ubuf);
      fp_tile_stats(v, count, size, st);
      fp_groups_into<F, S>(st, count, tensor_scale, grp);
      if (scales != nullptr) fp_store_scales<S>(grp, count, g0, scales);
      for (int64_t k = 0; k < count; ++k) {
        const int64_t o = k * size;
        fp_piece<F, S, kFake, kSize>(v + o, size, grp[k], u != nullptr ? u + o : nullptr, y + o, c + o);
      }
      fp_emit<T, F, kFake>(y, c, t, n, out);
    }
  });
}

// absmax groups of kTile / 4 to kFusedGroupLimit elements (a multiple of four when
// packing): each task takes whole groups, each group its statistics, then its elements
// while the group is still in cache.
template <typename T, FpFormat F, bool kFake>
void fp_mid_groups(const FpJob& job, const T* in, void* out, uint8_t* scales) {
  constexpr FpScaling S = FpScaling::Absmax;
  const int64_t size = job.numel / job.groups;
  parallel_for(0, job.groups, max_of(1, kChunk / size), [&](int64_t gb, int64_t ge) {
    float buf[kTile], y[kTile], ubuf[kUniformBuf];
    uint32_t c[kTile];
    for (int64_t g = gb; g < ge; ++g) {
      const FpStats st = fp_stats_of(in + g * size, size);
      FpGroup grp;
      fp_groups_into<F, S>(&st, 1, 0.0f, &grp);
      if (scales != nullptr) fp_store_scales<S>(&grp, 1, g, scales);
      for (int64_t t = g * size; t < (g + 1) * size; t += kTile) {
        const int64_t n = min_of(kTile, (g + 1) * size - t);
        const float* v = fp_load(in + t, n, buf);
        const float* u = fp_uniforms(job, t, n, ubuf);
        fp_piece<F, S, kFake, 0>(v, n, grp, u, y, c);
        fp_emit<T, F, kFake>(y, c, t, n, out);
      }
    }
  });
}

// absmax groups of any size: every group's statistics first (in parallel, many tasks per
// group), then the elements in tiles split at whole output bytes.
template <typename T, FpFormat F, bool kFake>
void fp_large_groups(const FpJob& job, const T* in, void* out, uint8_t* scales) {
  constexpr FpScaling S = FpScaling::Absmax;
  constexpr int64_t unit = kFake ? 1 : fp_unit(F);
  const std::vector<FpStatsSlot> stats = fp_group_stats(job, in);
  std::vector<FpGroupSlot> groups(static_cast<size_t>(job.groups));
  for (int64_t g = 0; g < job.groups; ++g) {
    fp_groups_into<F, S>(&stats[g].stats, 1, 0.0f, &groups[g].group);
    if (scales != nullptr) fp_store_scales<S>(&groups[g].group, 1, g, scales);
  }
  const int64_t size = job.numel / job.groups;
  parallel_for(0, job.numel / unit, kChunk / unit, [&](int64_t ub, int64_t ue) {
    float buf[kTile], y[kTile], ubuf[kUniformBuf];
    uint32_t c[kTile];
    for (int64_t t = ub * unit; t < ue * unit; t += kTile) {
      const int64_t n = min_of(kTile, ue * unit - t);
      const float* v = fp_load(in + t, n, buf);
      const float* u = fp_uniforms(job, t, n, ubuf);
      for_each_group_segment(t, t + n, size, [&](int64_t g, int64_t sb, int64_t se) {
        const int64_t o = sb - t;
        fp_piece<F, S, kFake, 0>(v + o, se - sb, groups[g].group, u != nullptr ? u + o : nullptr, y + o, c + o);
      });
      fp_emit<T, F, kFake>(y, c, t, n, out);
    }
  });
}

// The quantizing pass: codes (packed into `codes`) or fake-quantized values (`out`).
// Instantiated per scaling only where it occurs (mx: blocks of 32; nvfp4: E2M1 in blocks
// of 16; absmax: any size), which keeps the translation unit small enough for GCC to
// go on inlining the integer kernels' helpers next door.
template <typename T, FpFormat F, bool kFake>
void run_fp_quantizer(const FpJob& job, const T* in, void* out, uint8_t* scales) {
  float tensor_scale = 0.0f;
  if (job.scaling == FpScaling::Nvfp4) {
    tensor_scale = fp_nvfp4_tensor_scale(job.numel == 0 ? 0u : fp_finite_top(job, in));
    if (scales != nullptr) std::memcpy(scales, &tensor_scale, sizeof(float));
  }
  if (job.numel == 0) {  // the scales of empty groups, if any (absmax: one per group)
    if (job.scaling == FpScaling::Absmax && scales != nullptr) {
      for (int64_t g = 0; g < job.groups; ++g) {
        const FpStats st = fp_empty_stats();
        FpGroup grp;
        fp_groups_into<F, FpScaling::Absmax>(&st, 1, 0.0f, &grp);
        fp_store_scales<FpScaling::Absmax>(&grp, 1, g, scales);
      }
    }
    return;
  }
  const int64_t size = job.numel / job.groups;
  if (job.scaling == FpScaling::Mx) {
    fp_small_groups<T, F, kFake, FpScaling::Mx, kMxBlock>(job, in, out, scales, tensor_scale);
  } else if (job.scaling == FpScaling::Nvfp4) {
    if constexpr (F == FpFormat::E2M1) {
      fp_small_groups<T, F, kFake, FpScaling::Nvfp4, kNvfp4Block>(job, in, out, scales, tensor_scale);
    }
  } else if (4 * size <= kTile) {
    fp_small_groups<T, F, kFake, FpScaling::Absmax, 0>(job, in, out, scales, tensor_scale);
  } else if (size <= kFusedGroupLimit && (kFake || size % fp_unit(F) == 0)) {
    fp_mid_groups<T, F, kFake>(job, in, out, scales);
  } else {
    fp_large_groups<T, F, kFake>(job, in, out, scales);
  }
}

// Codes [t, t + n) of a packed stream, one per byte: FP8's in place, FP4's and FP6's
// unpacked into c (t and n multiples of the packing unit).
template <FpFormat F>
inline const uint8_t* fp_unpack(const uint8_t* __restrict__ codes, int64_t t, int64_t n, uint8_t* __restrict__ c) {
  const uint8_t* b = codes + fp_code_bytes(t, F);
  if constexpr (fp_bits(F) == 8) {
    return b;
  } else if constexpr (fp_bits(F) == 4) {
    for (int64_t k = 0; k < n / 2; ++k) {
      c[2 * k] = static_cast<uint8_t>(b[k] >> 4);
      c[2 * k + 1] = static_cast<uint8_t>(b[k] & 0xFu);
    }
  } else {
    for (int64_t k = 0; k < n / 4; ++k) {
      for (int j = 0; j < 4; ++j) c[4 * k + j] = static_cast<uint8_t>(fp_code_at(b + 3 * k, j, F));
    }
  }
  return c;
}

// The values of codes c[0, n) (n <= kTile), unscaled: one loop over the whole tile (a loop
// per group piece over bytes ran a 16-element nvfp4 block in its scalar remainder: 12x
// slower), on codes widened to 32 bits first (decoding bytes, GCC took 64 elements per
// iteration and spilled its mask registers: FP8 dequantize 20-40% slower than per group).
template <FpFormat F>
QKIT_FP_PIECE void fp_decode_tile(const uint8_t* __restrict__ c, int64_t n, float* __restrict__ y) {
  constexpr FpSpec spec = fp_spec(F);
  uint32_t w[kTile];
  for (int64_t i = 0; i < n; ++i) w[i] = c[i];
  for (int64_t i = 0; i < n; ++i) y[i] = fp_decode(w[i], spec);
}

template <typename T, FpFormat F>
void run_fp_dequantizer(const FpJob& job, const uint8_t* codes, const uint8_t* scales, T* out) {
  constexpr int64_t unit = fp_unit(F);
  const int64_t size = job.numel / job.groups;
  float tensor_scale = 0.0f;
  if (job.scaling == FpScaling::Nvfp4) std::memcpy(&tensor_scale, scales, sizeof(float));
  parallel_for(0, job.numel / unit, kChunk / unit, [&](int64_t ub, int64_t ue) {
    float y[kTile];
    uint8_t c[kTile];
    for (int64_t t = ub * unit; t < ue * unit; t += kTile) {
      const int64_t n = min_of(kTile, ue * unit - t);
      fp_decode_tile<F>(fp_unpack<F>(codes, t, n, c), n, y);
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
        float* __restrict__ ys = y + (sb - t);
        for (int64_t i = 0; i < se - sb; ++i) ys[i] *= dec;  // fp_decode(code) * dec, as one product
      });
      fp_store(y, n, out + t);
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
