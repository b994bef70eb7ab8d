// CPU kernels of the group-wise quantizer: fake quantization, int8/int4
// quantization and dequantization. The arithmetic is qkit/quant_math.h; this file
// only decides how the work is walked and split over torch's thread pool.
#include <algorithm>
#include <vector>

#include "qkit/kernels.h"
#include "qkit/philox.h"
#include "qkit/quant_math.h"

namespace qkit::cpu {
namespace {

// Elements per task: large enough to amortise a task, small enough to stay in L2.
constexpr int64_t kChunk = 16384;
// Groups up to this size are handled in one sweep each (statistics, then the
// transform while the group is still in cache), many groups per task.
constexpr int64_t kFusedGroupLimit = 65536;
constexpr int kLanes = 8;  // independent accumulators, so the loops vectorise

template <typename T>
GroupStats stats_of(const T* x, int64_t n, bool symmetric) {
  float hi[kLanes], lo[kLanes], poison[kLanes];
  const GroupStats init = empty_stats(symmetric);
  for (int l = 0; l < kLanes; ++l) {
    hi[l] = init.hi;
    lo[l] = init.lo;
    poison[l] = 0.0f;
  }
  int64_t i = 0;
  if (symmetric) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = to_float(x[i + l]);
        const float a = v < 0.0f ? -v : v;
        hi[l] = a > hi[l] ? a : hi[l];
        poison[l] += v * 0.0f;
      }
    }
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = to_float(x[i + l]);
        hi[l] = v > hi[l] ? v : hi[l];
        lo[l] = v < lo[l] ? v : lo[l];
        poison[l] += v * 0.0f;
      }
    }
  }
  GroupStats s = init;
  for (int l = 0; l < kLanes; ++l) s = merge(s, GroupStats{hi[l], lo[l], poison[l]});
  for (; i < n; ++i) accumulate(s, to_float(x[i]), symmetric);
  return s;
}

// Calls f(group, begin, end) for each piece of [begin, end) that lies in one group.
template <typename F>
void for_each_group_segment(int64_t begin, int64_t end, int64_t group_size, const F& f) {
  int64_t g = begin / group_size;
  while (begin < end) {
    const int64_t seg_end = std::min(end, (g + 1) * group_size);
    f(g, begin, seg_end);
    begin = seg_end;
    ++g;
  }
}

// Integer codes of x[begin, end) (absolute element indices) into codes[0, end-begin).
template <typename T>
void codes_of_segment(const T* x, int64_t begin, int64_t end, const QuantParams& p, const QuantJob& job,
                      float* codes) {
  const float qmin = code_min(job.bits), qmax = code_max(job.bits);
  if (job.seed == nullptr) {
    for (int64_t i = begin; i < end; ++i) codes[i - begin] = quantize_nearest(to_float(x[i]), p, qmin, qmax);
    return;
  }
  const uint64_t seed = static_cast<uint64_t>(*job.seed);
  Uniform4 u = uniforms_for_block(seed, static_cast<uint64_t>(begin) >> 2);
  for (int64_t i = begin; i < end; ++i) {
    if ((i & 3) == 0) u = uniforms_for_block(seed, static_cast<uint64_t>(i) >> 2);
    codes[i - begin] = quantize_stochastic(to_float(x[i]), p, qmin, qmax, u.v[i & 3]);
  }
}

// What a quantizing pass does with the codes of one segment.
enum class Sink { Fake, Int8, Int4 };

template <typename T, Sink kSink>
struct Transform {
  const QuantJob& job;
  const T* in;
  void* out;

  // Elements [begin, end) of one group. For Int4, begin and end must be even.
  void operator()(const QuantParams& p, int64_t begin, int64_t end) const {
    float codes[kChunk];
    for (int64_t b = begin; b < end; b += kChunk) {
      const int64_t e = std::min(end, b + kChunk);
      codes_of_segment(in, b, e, p, job, codes);
      if constexpr (kSink == Sink::Fake) {
        T* y = static_cast<T*>(out);
        for (int64_t i = b; i < e; ++i) y[i] = from_float<T>(dequantize_code(codes[i - b], p.step, p.offset));
      } else if constexpr (kSink == Sink::Int8) {
        int8_t* q = static_cast<int8_t*>(out);
        for (int64_t i = b; i < e; ++i) q[i] = static_cast<int8_t>(static_cast<int>(codes[i - b]));
      } else {
        int8_t* q = static_cast<int8_t*>(out);
        for (int64_t i = b; i < e; i += 2) {
          q[i >> 1] = pack_nibbles(static_cast<int>(codes[i - b]), static_cast<int>(codes[i - b + 1]));
        }
      }
    }
  }
};

void store_params(float* params, int64_t g, const QuantParams& p, bool symmetric) {
  if (params == nullptr) return;
  if (symmetric) {
    params[g] = p.step;
  } else {
    params[2 * g] = p.step;
    params[2 * g + 1] = p.offset;
  }
}

// Int4 outside the per-group sweep: work is split by byte (pair), never inside
// one, and each element takes its own group's parameters (pairs straddle groups
// when the group size is odd).
template <typename T>
void quantize_int4_pairs(const QuantJob& job, const T* in, int8_t* q, const std::vector<QuantParams>& params) {
  const int64_t group_size = job.numel / job.groups;
  parallel_for(0, job.numel / 2, kChunk / 2, [&](int64_t pb, int64_t pe) {
    float codes[kChunk];
    for (int64_t p0 = pb; p0 < pe; p0 += kChunk / 2) {
      const int64_t begin = 2 * p0, end = 2 * std::min(pe, p0 + kChunk / 2);
      for_each_group_segment(begin, end, group_size, [&](int64_t g, int64_t b, int64_t e) {
        codes_of_segment(in, b, e, params[g], job, codes + (b - begin));
      });
      for (int64_t i = begin; i < end; i += 2) {
        q[i >> 1] = pack_nibbles(static_cast<int>(codes[i - begin]), static_cast<int>(codes[i - begin + 1]));
      }
    }
  });
}

template <typename T, Sink kSink>
void run_quantizer(const QuantJob& job, const T* in, void* out, float* params_out) {
  if (job.numel == 0) {  // groups without elements still get defined params
    const QuantParams p = make_params(empty_stats(job.symmetric), job.bits, job.symmetric);
    for (int64_t g = 0; g < job.groups; ++g) store_params(params_out, g, p, job.symmetric);
    return;
  }
  const int64_t group_size = job.numel / job.groups;
  const Transform<T, kSink> transform{job, in, out};
  const bool pairs_straddle = kSink == Sink::Int4 && (group_size & 1);

  if (group_size <= kFusedGroupLimit && !pairs_straddle) {
    const int64_t grain = std::max<int64_t>(1, kChunk / group_size);
    parallel_for(0, job.groups, grain, [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t begin = g * group_size;
        const QuantParams p = make_params(stats_of(in + begin, group_size, job.symmetric), job.bits, job.symmetric);
        store_params(params_out, g, p, job.symmetric);
        transform(p, begin, begin + group_size);
      }
    });
    return;
  }

  // Large groups (or straddling int4 pairs): statistics of every chunk in
  // parallel, merged per group, then the transform over chunks in parallel.
  const int64_t chunks_per_group = (group_size + kChunk - 1) / kChunk;
  std::vector<GroupStats> partial(static_cast<size_t>(job.groups * chunks_per_group));
  parallel_for(0, job.groups * chunks_per_group, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const int64_t g = w / chunks_per_group, c = w % chunks_per_group;
      const int64_t begin = g * group_size + c * kChunk;
      const int64_t n = std::min(kChunk, group_size - c * kChunk);
      partial[w] = stats_of(in + begin, n, job.symmetric);
    }
  });
  std::vector<QuantParams> params(static_cast<size_t>(job.groups));
  for (int64_t g = 0; g < job.groups; ++g) {
    GroupStats s = empty_stats(job.symmetric);
    for (int64_t c = 0; c < chunks_per_group; ++c) s = merge(s, partial[g * chunks_per_group + c]);
    params[g] = make_params(s, job.bits, job.symmetric);
    store_params(params_out, g, params[g], job.symmetric);
  }
  if constexpr (kSink == Sink::Int4) {
    quantize_int4_pairs(job, in, static_cast<int8_t*>(out), params);
    return;
  }
  parallel_for(0, job.numel, kChunk, [&](int64_t b, int64_t e) {
    for_each_group_segment(b, e, group_size, [&](int64_t g, int64_t sb, int64_t se) { transform(params[g], sb, se); });
  });
}

template <typename T>
void dequantize_typed(const QuantJob& job, const int8_t* codes, const float* params, T* out) {
  const int64_t group_size = job.numel / job.groups;
  parallel_for(0, job.numel, kChunk, [&](int64_t b, int64_t e) {
    for_each_group_segment(b, e, group_size, [&](int64_t g, int64_t sb, int64_t se) {
      const float step = job.symmetric ? params[g] : params[2 * g];
      const float offset = job.symmetric ? 0.0f : params[2 * g + 1];
      if (job.bits == 8) {  // the common case, kept free of the nibble logic so it vectorises
        for (int64_t i = sb; i < se; ++i) out[i] = from_float<T>(dequantize_code(codes[i], step, offset));
      } else {
        for (int64_t i = sb; i < se; ++i) {
          out[i] = from_float<T>(dequantize_code(static_cast<float>(code_at(codes, i, 4)), step, offset));
        }
      }
    });
  });
}


}  // namespace

void fake_quantize(const QuantJob& job, const void* in, void* out) {
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    run_quantizer<T, Sink::Fake>(job, static_cast<const T*>(in), out, nullptr);
  });
}

void quantize(const QuantJob& job, const void* in, int8_t* codes, float* params) {
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (job.bits == 8) {
      run_quantizer<T, Sink::Int8>(job, static_cast<const T*>(in), codes, params);
    } else {
      run_quantizer<T, Sink::Int4>(job, static_cast<const T*>(in), codes, params);
    }
  });
}

void dequantize(const QuantJob& job, const int8_t* codes, const float* params, void* out) {
  if (job.numel == 0) return;
  dispatch_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_typed(job, codes, params, static_cast<T*>(out));
  });
}

}  // namespace qkit::cpu
