// Bindings of the floating-point format ops (docs/ops.md §10): qkit::fake_quantize_fp(_),
// qkit::quantize_fp, qkit::dequantize_fp and their out= forms. Checks arguments,
// allocates outputs, and hands raw pointers to the CPU or CUDA launcher (on the current
// stream). Schemas are defined in python/qkit/fp_ops.py, whose fake impls make the same
// checks with the same words.
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "quantize_ops.h"

namespace qkit::binding {
namespace {

constexpr const char* kFormats = "e4m3, e5m2, e3m2, e2m3 or e2m1";
constexpr const char* kScalings = "absmax, mx or nvfp4";

FpFormat parse_format(const std::string& name, const char* op) {
  if (name == "e4m3") return FpFormat::E4M3;
  if (name == "e5m2") return FpFormat::E5M2;
  if (name == "e3m2") return FpFormat::E3M2;
  if (name == "e2m3") return FpFormat::E2M3;
  if (name == "e2m1") return FpFormat::E2M1;
  fail(op, "`format` must be ", kFormats, ", got '", name, "'");
}

FpScaling parse_scaling(const std::string& name, const char* op) {
  if (name == "absmax") return FpScaling::Absmax;
  if (name == "mx") return FpScaling::Mx;
  if (name == "nvfp4") return FpScaling::Nvfp4;
  fail(op, "`scaling` must be ", kScalings, ", got '", name, "'");
}

const char* format_name(FpFormat f) {
  switch (f) {
    case FpFormat::E4M3: return "e4m3";
    case FpFormat::E5M2: return "e5m2";
    case FpFormat::E3M2: return "e3m2";
    case FpFormat::E2M3: return "e2m3";
    default: return "e2m1";
  }
}

const char* scaling_name(FpScaling s) {
  return s == FpScaling::Absmax ? "absmax" : s == FpScaling::Mx ? "mx" : "nvfp4";
}

int64_t block_of(FpScaling s) { return s == FpScaling::Mx ? kMxBlock : kNvfp4Block; }

struct FpArgs {
  FpFormat format;
  FpScaling scaling;
};

FpArgs parse_args(const std::string& format, const std::string& scaling, const char* op) {
  const FpArgs a{parse_format(format, op), parse_scaling(scaling, op)};
  QKIT_CHECK(a.scaling != FpScaling::Nvfp4 || a.format == FpFormat::E2M1, op,
             "`scaling` nvfp4 needs `format` e2m1, got '", format, "'");
  return a;
}

// `groups` for `numel` elements: any divisor (absmax), or exactly numel / 32 (mx) or
// numel / 16 (nvfp4), the block size those scalings fix.
void check_fp_groups(int64_t numel, int64_t groups, FpScaling scaling, const char* op, const char* numel_of) {
  if (scaling == FpScaling::Absmax) {
    check_groups(numel, groups, op, numel_of);
    checked_product({groups, 4}, "the bytes of the float32 scales, `groups` * 4", op);
    return;
  }
  const int64_t block = block_of(scaling);
  QKIT_CHECK(numel % block == 0, op, scaling_name(scaling), " scaling needs blocks of ", block,
             " elements: the number of elements of `", numel_of, "` (", numel, ") must be a multiple of ", block);
  QKIT_CHECK(groups == numel / block, op, "`groups` must be the number of ", block, "-element blocks of `", numel_of,
             "` (", numel / block, ") for ", scaling_name(scaling), " scaling, got ", groups);
}

// Codes along the last dimension: 4-bit pairs and 6-bit quads must not straddle rows.
void check_fp_packable(const Tensor& t, FpFormat format, const char* op, const char* arg) {
  const int unit = fp_unit(format);
  if (unit == 1 || t.numel() == 0) return;
  QKIT_CHECK(t.dim() >= 1 && t.sizes()[t.dim() - 1] % unit == 0, op, fp_bits(format),
             "-bit storage packs ", unit, " codes per ", unit * fp_bits(format) / 8,
             " byte(s) along the last dimension: `", arg, "` needs a last dimension divisible by ", unit);
}

int32_t codes_dtype(FpFormat f) {
  switch (f) {
    case FpFormat::E4M3: return dtype_code(ScalarType::Float8_e4m3fn);
    case FpFormat::E5M2: return dtype_code(ScalarType::Float8_e5m2);
    case FpFormat::E2M1: return float4_e2m1fn_x2_code();
    default: return dtype_code(ScalarType::Byte);
  }
}

int32_t scales_dtype(FpScaling s) {
  return s == FpScaling::Absmax ? dtype_code(ScalarType::Float)
         : s == FpScaling::Mx   ? float8_e8m0fnu_code()
                                : dtype_code(ScalarType::Float8_e4m3fn);
}

Shape scales_sizes(int64_t groups, FpScaling s) { return {s == FpScaling::Nvfp4 ? groups + 4 : groups}; }

Shape codes_sizes(const Tensor& input, FpFormat f) {
  Shape sizes = sizes_of(input);
  if (!sizes.empty()) sizes[sizes.size() - 1] = fp_code_bytes(sizes[sizes.size() - 1], f);
  return sizes;
}

FpJob make_fp_job(DType dtype, int64_t numel, int64_t groups, const FpArgs& a) {
  return FpJob{dtype, numel, groups, a.format, a.scaling, nullptr};
}

[[maybe_unused]] Tensor fp_workspace_for(const Tensor& like, const FpJob& job) {
#ifdef QKIT_WITH_CUDA
  Tensor workspace = scratch_bytes(like, static_cast<int64_t>(cuda::fp_workspace_bytes(job)));
  keep_until_synchronized(workspace);
  return workspace;
#else
  (void)job;
  return scratch_bytes(like, 0);
#endif
}

// ---- fake_quantize_fp

FpArgs check_fake_args(const Tensor& input, int64_t groups, const std::string& format, const std::string& scaling,
                       const char* op) {
  float_dtype(input, op, "input");
  const FpArgs a = parse_args(format, scaling, op);
  check_fp_groups(input.numel(), groups, a.scaling, op, "input");
  return a;
}

// Fake quantization of a contiguous tensor into `out` (which may be `in`).
void fake_quantize_into(const Tensor& in, Tensor& out, int64_t groups, const FpArgs& a, bool stochastic,
                        const char* op) {
  FpJob job = make_fp_job(float_dtype(in, op, "input"), in.numel(), groups, a);
  std::optional<Tensor> seed;
  if (stochastic && in.numel() > 0) {
    seed = draw_seed(in);
    job.seed = static_cast<const int64_t*>(seed->const_data_ptr());
  }
  on_device(
      in, op, [&] { cpu::fake_quantize_fp(job, in.const_data_ptr(), out.mutable_data_ptr()); },
      [&](void* stream) {
        return QKIT_CUDA_CALL(cuda::fake_quantize_fp(job, in.const_data_ptr(), out.mutable_data_ptr(),
                                                     fp_workspace_for(in, job).mutable_data_ptr(), stream));
      });
}

Tensor fake_quantize_fp(Tensor input, int64_t groups, std::string format, std::string scaling, bool stochastic) {
  const char* op = "fake_quantize_fp";
  const FpArgs a = check_fake_args(input, groups, format, scaling, op);
  const Tensor in = dense(input);
  Tensor out = empty_on(in, sizes_of(in), in.scalar_type());
  fake_quantize_into(in, out, groups, a, stochastic, op);
  return out;
}

void fake_quantize_in_place(Tensor& input, int64_t groups, const FpArgs& a, bool stochastic, const char* op) {
  check_no_self_overlap(input, op, "input");
  if (input.is_contiguous()) {
    fake_quantize_into(input, input, groups, a, stochastic, op);
    return;
  }
  Tensor work = dense(input);
  fake_quantize_into(work, work, groups, a, stochastic, op);
  torch::stable::copy_(input, work);
}

void fake_quantize_fp_(Tensor input, int64_t groups, std::string format, std::string scaling, bool stochastic) {
  const char* op = "fake_quantize_fp_";
  const FpArgs a = check_fake_args(input, groups, format, scaling, op);
  fake_quantize_in_place(input, groups, a, stochastic, op);
}

void fake_quantize_fp_out(Tensor input, int64_t groups, std::string format, std::string scaling, bool stochastic,
                          Tensor out) {
  const char* op = "fake_quantize_fp";
  const FpArgs a = check_fake_args(input, groups, format, scaling, op);
  check_out(out, "out", input.scalar_type(), sizes_of(input), input, "input", op);
  if (same_view(input, out)) {
    fake_quantize_in_place(out, groups, a, stochastic, op);
    return;
  }
  check_no_overlap(input, "input", out, "out", op);
  const Tensor in = dense(input);
  write_into(out, [&](Tensor& dst) { fake_quantize_into(in, dst, groups, a, stochastic, op); });
}

// ---- quantize_fp

std::pair<DType, FpArgs> check_quantize_args(const Tensor& input, int64_t groups, const std::string& format,
                                             const std::string& scaling, const char* op) {
  const DType dtype = float_dtype(input, op, "input");
  const FpArgs a = parse_args(format, scaling, op);
  check_fp_groups(input.numel(), groups, a.scaling, op, "input");
  check_fp_packable(input, a.format, op, "input");
  return {dtype, a};
}

void quantize_tensors(const Tensor& input, const FpJob& job, Tensor& codes, Tensor& scales, const char* op) {
  const Tensor in = dense(input);
  write_into(codes, [&](Tensor& code_dst) {
    write_into(scales, [&](Tensor& scale_dst) {
      auto* code_ptr = static_cast<uint8_t*>(code_dst.mutable_data_ptr());
      auto* scale_ptr = static_cast<uint8_t*>(scale_dst.mutable_data_ptr());
      on_device(
          in, op, [&] { cpu::quantize_fp(job, in.const_data_ptr(), code_ptr, scale_ptr); },
          [&](void* stream) {
            return QKIT_CUDA_CALL(cuda::quantize_fp(job, in.const_data_ptr(), code_ptr, scale_ptr,
                                                    fp_workspace_for(in, job).mutable_data_ptr(), stream));
          });
    });
  });
}

std::tuple<Tensor, Tensor> quantize_fp(Tensor input, int64_t groups, std::string format, std::string scaling) {
  const char* op = "quantize_fp";
  const auto [dtype, a] = check_quantize_args(input, groups, format, scaling, op);
  const FpJob job = make_fp_job(dtype, input.numel(), groups, a);
  Tensor codes = empty_on(input, codes_sizes(input, a.format), codes_dtype(a.format));
  Tensor scales = empty_on(input, scales_sizes(groups, a.scaling), scales_dtype(a.scaling));
  quantize_tensors(input, job, codes, scales, op);
  return std::make_tuple(std::move(codes), std::move(scales));
}

void quantize_fp_out(Tensor input, int64_t groups, std::string format, std::string scaling, Tensor codes,
                     Tensor scales) {
  const char* op = "quantize_fp";
  const auto [dtype, a] = check_quantize_args(input, groups, format, scaling, op);
  const FpJob job = make_fp_job(dtype, input.numel(), groups, a);
  check_out(codes, "codes", codes_dtype(a.format), codes_sizes(input, a.format), input, "input", op);
  check_out(scales, "scales", scales_dtype(a.scaling), scales_sizes(groups, a.scaling), input, "input", op);
  check_no_overlap(input, "input", codes, "codes", op);
  check_no_overlap(input, "input", scales, "scales", op);
  check_no_overlap(codes, "codes", scales, "scales", op);
  quantize_tensors(input, job, codes, scales, op);
}

// ---- dequantize_fp

// dequantize_fp's `dtype`: float32 when absent (FP8 ranges overflow float16).
ScalarType output_scalar_type(std::optional<ScalarType> dtype, const char* op) {
  const ScalarType t = dtype.value_or(ScalarType::Float);
  QKIT_CHECK(t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16, op,
             "`dtype` must be float32, float16 or bfloat16, got ", dtype_name(t));
  return t;
}

// Checks dequantize_fp's inputs; returns the output's sizes.
Shape check_dequantize_args(const Tensor& codes, const Tensor& scales, int64_t groups, const FpArgs& a,
                            const char* op) {
  const int32_t want_codes = codes_dtype(a.format), got_codes = dtype_code(codes);
  QKIT_CHECK(got_codes == want_codes, op, "`codes` must be ", dtype_code_name(want_codes), " for format ",
             format_name(a.format), ", got ", dtype_code_name(got_codes));
  const int32_t want_scales = scales_dtype(a.scaling), got_scales = dtype_code(scales);
  QKIT_CHECK(got_scales == want_scales, op, "`scales` must be ", dtype_code_name(want_scales), " for ",
             scaling_name(a.scaling), " scaling, got ", dtype_code_name(got_scales));
  check_same_device(codes, "codes", scales, "scales", op);
  const int bits = fp_bits(a.format);
  QKIT_CHECK(bits == 8 || codes.dim() >= 1, op, "packed `codes` must have at least one dimension");
  if (bits == 6 && codes.numel() > 0) {
    QKIT_CHECK(codes.sizes()[codes.dim() - 1] % 3 == 0, op,
               "6-bit `codes` hold four codes in three bytes: their last dimension must be divisible by 3");
  }
  const int64_t numel = bits == 8 ? codes.numel() : bits == 4 ? 2 * codes.numel() : codes.numel() / 3 * 4;
  check_fp_groups(numel, groups, a.scaling, op, "the dequantized output");
  const Shape want = scales_sizes(groups, a.scaling);
  const auto got = scales.sizes();
  QKIT_CHECK(got.size() == 1 && got[0] == want[0], op, "`scales` must have shape ", shape_text(want), " for ",
             scaling_name(a.scaling), " scaling, got ", shape_text(got));
  Shape out_sizes = sizes_of(codes);
  if (bits != 8) {
    int64_t& last = out_sizes[out_sizes.size() - 1];
    last = bits == 4 ? 2 * last : last / 3 * 4;
  }
  return out_sizes;
}

void dequantize_tensors(const Tensor& codes, const Tensor& scales, int64_t groups, const FpArgs& a, Tensor& out,
                        const char* op) {
  const Tensor c = dense(codes);
  const Tensor s = dense(scales);
  const FpJob job = make_fp_job(float_dtype(out, op, "out"), out.numel(), groups, a);
  const auto* code_ptr = static_cast<const uint8_t*>(c.const_data_ptr());
  const auto* scale_ptr = static_cast<const uint8_t*>(s.const_data_ptr());
  write_into(out, [&](Tensor& dst) {
    on_device(
        c, op, [&] { cpu::dequantize_fp(job, code_ptr, scale_ptr, dst.mutable_data_ptr()); },
        [&](void* stream) {
          return QKIT_CUDA_CALL(cuda::dequantize_fp(job, code_ptr, scale_ptr, dst.mutable_data_ptr(), stream));
        });
  });
}

Tensor dequantize_fp(Tensor codes, Tensor scales, int64_t groups, std::string format, std::string scaling,
                     std::optional<ScalarType> dtype) {
  const char* op = "dequantize_fp";
  const FpArgs a = parse_args(format, scaling, op);
  const Shape out_sizes = check_dequantize_args(codes, scales, groups, a, op);
  Tensor out = empty_on(codes, out_sizes, output_scalar_type(dtype, op));
  dequantize_tensors(codes, scales, groups, a, out, op);
  return out;
}

void dequantize_fp_out(Tensor codes, Tensor scales, int64_t groups, std::string format, std::string scaling,
                       Tensor out) {
  const char* op = "dequantize_fp";
  const FpArgs a = parse_args(format, scaling, op);
  const Shape out_sizes = check_dequantize_args(codes, scales, groups, a, op);
  float_dtype(out, op, "out");
  check_out(out, "out", out.scalar_type(), out_sizes, codes, "codes", op);
  check_no_overlap(codes, "codes", out, "out", op);
  check_no_overlap(scales, "scales", out, "out", op);
  dequantize_tensors(codes, scales, groups, a, out, op);
}

void register_kernels(torch::stable::detail::StableLibrary& m) {
  m.impl("fake_quantize_fp", TORCH_BOX(&fake_quantize_fp));
  m.impl("fake_quantize_fp_", TORCH_BOX(&fake_quantize_fp_));
  m.impl("fake_quantize_fp.out", TORCH_BOX(&fake_quantize_fp_out));
  m.impl("quantize_fp", TORCH_BOX(&quantize_fp));
  m.impl("quantize_fp.out", TORCH_BOX(&quantize_fp_out));
  m.impl("dequantize_fp", TORCH_BOX(&dequantize_fp));
  m.impl("dequantize_fp.out", TORCH_BOX(&dequantize_fp_out));
}

}  // namespace

QKIT_REGISTER_KERNELS(register_kernels)

}  // namespace qkit::binding
