// Bindings of the core ops: qkit::fake_quantize(_), qkit::quantize, qkit::dequantize.
// Checks arguments, allocates outputs, and hands raw pointers to the CPU or CUDA
// launcher (on the current stream). Schemas are defined in python/qkit/ops.py.
#include <torch/csrc/stable/accelerator.h>

#include <optional>
#include <tuple>

#include "quantize_ops.h"

namespace qkit::binding {

Tensor workspace_for(const Tensor& like, const QuantJob& job) {
#ifdef QKIT_WITH_CUDA
  Tensor workspace = scratch_bytes(like, static_cast<int64_t>(cuda::workspace_bytes(job)));
  keep_until_synchronized(workspace);
  return workspace;
#else
  (void)job;
  return scratch_bytes(like, 0);
#endif
}

void quantize_into(const Tensor& like, const void* in, const QuantJob& job, int8_t* codes, float* params,
                   const char* op) {
  on_device(
      like, op, [&] { cpu::quantize(job, in, codes, params); },
      [&](void* stream) {
        return QKIT_CUDA_CALL(cuda::quantize(job, in, codes, params, workspace_for(like, job).mutable_data_ptr(), stream));
      });
}

void quantize_into(const Tensor& in, const QuantJob& job, int8_t* codes, float* params, const char* op) {
  quantize_into(in, in.const_data_ptr(), job, codes, params, op);
}

void check_code_outputs(const Tensor& input, const Tensor& q, const Shape& code_sizes,
                        const Tensor& params, int64_t groups, bool symmetric, const char* op) {
  check_out(q, "q", ScalarType::Char, code_sizes, input, "input", op);
  check_out(params, "params", ScalarType::Float, {groups, symmetric ? 1 : 2}, input, "input", op);
  check_no_overlap(input, "input", q, "q", op);
  check_no_overlap(input, "input", params, "params", op);
  check_no_overlap(q, "q", params, "params", op);
}

QuantJob make_job(DType dtype, int64_t numel, int64_t groups, int64_t bits, bool symmetric, bool pack) {
  const int width = static_cast<int>(bits);
  return QuantJob{dtype, numel, groups, width, symmetric, nullptr, packed_storage(width, pack)};
}

void check_storage_bits(int64_t bits, const char* op) {
  QKIT_CHECK(bits >= 2 && bits <= 8, op, "`bits` must be in [2, 8], got ", bits);
}

void check_wire_bits(int64_t bits, const char* op) {
  QKIT_CHECK(bits == 4 || bits == 8, op, "`bits` must be 4 or 8, got ", bits);
}

void check_codes_and_params(const Tensor& q, const Tensor& params, const char* op) {
  QKIT_CHECK(q.scalar_type() == ScalarType::Char, op, "`q` must be int8, got ", dtype_name(q.scalar_type()));
  QKIT_CHECK(params.scalar_type() == ScalarType::Float, op, "`params` must be float32, got ",
             dtype_name(params.scalar_type()));
  check_same_device(q, "q", params, "params", op);
}

namespace {

void check_fake_bits(int64_t bits, const char* op) {
  QKIT_CHECK(bits >= 2 && bits <= 16, op, "`bits` must be in [2, 16], got ", bits);
}

void check_packable(const Tensor& t, bool packed, const char* op, const char* arg) {
  if (!packed || t.numel() == 0) return;
  QKIT_CHECK(t.dim() >= 1 && t.sizes()[t.dim() - 1] % 2 == 0, op, "4-bit storage packs pairs along the last dimension: `",
             arg, "` needs an even last dimension");
}


// Fake quantization of a contiguous tensor into `out` (which may be `in`).
void fake_quantize_into(const Tensor& in, Tensor& out, int64_t groups, int64_t bits, bool symmetric, bool stochastic,
                        const char* op) {
  QuantJob job = make_job(float_dtype(in, op, "input"), in.numel(), groups, bits, symmetric);
  std::optional<Tensor> seed;
  if (stochastic && in.numel() > 0) {
    seed = draw_seed(in);
    job.seed = static_cast<const int64_t*>(seed->const_data_ptr());
  }
  on_device(
      in, op, [&] { cpu::fake_quantize(job, in.const_data_ptr(), out.mutable_data_ptr()); },
      [&](void* stream) {
        return QKIT_CUDA_CALL(cuda::fake_quantize(job, in.const_data_ptr(), out.mutable_data_ptr(),
                                                  workspace_for(in, job).mutable_data_ptr(), stream));
      });
}

void check_fake_args(const Tensor& input, int64_t groups, int64_t bits, const char* op) {
  float_dtype(input, op, "input");
  check_fake_bits(bits, op);
  check_groups(input.numel(), groups, op, "input");
}

Tensor fake_quantize(Tensor input, int64_t groups, int64_t bits, bool symmetric, bool stochastic) {
  const char* op = "fake_quantize";
  check_fake_args(input, groups, bits, op);
  const Tensor in = dense(input);
  Tensor out = empty_on(in, sizes_of(in), in.scalar_type());
  fake_quantize_into(in, out, groups, bits, symmetric, stochastic, op);
  return out;
}

void fake_quantize_in_place(Tensor& input, int64_t groups, int64_t bits, bool symmetric, bool stochastic,
                            const char* op) {
  check_no_self_overlap(input, op, "input");
  if (input.is_contiguous()) {
    fake_quantize_into(input, input, groups, bits, symmetric, stochastic, op);
    return;
  }
  Tensor work = dense(input);
  fake_quantize_into(work, work, groups, bits, symmetric, stochastic, op);
  torch::stable::copy_(input, work);
}

void fake_quantize_(Tensor input, int64_t groups, int64_t bits, bool symmetric, bool stochastic) {
  const char* op = "fake_quantize_";
  check_fake_args(input, groups, bits, op);
  fake_quantize_in_place(input, groups, bits, symmetric, stochastic, op);
}

void fake_quantize_out(Tensor input, int64_t groups, int64_t bits, bool symmetric, bool stochastic, Tensor out) {
  const char* op = "fake_quantize";
  check_fake_args(input, groups, bits, op);
  check_out(out, "out", input.scalar_type(), sizes_of(input), input, "input", op);
  if (same_view(input, out)) {
    fake_quantize_in_place(out, groups, bits, symmetric, stochastic, op);
    return;
  }
  check_no_overlap(input, "input", out, "out", op);
  const Tensor in = dense(input);
  write_into(out, [&](Tensor& dst) { fake_quantize_into(in, dst, groups, bits, symmetric, stochastic, op); });
}

Shape code_sizes(const Tensor& input, bool packed) {
  Shape sizes = sizes_of(input);
  if (packed && !sizes.empty()) sizes.back() /= 2;
  return sizes;
}

QuantJob check_quantize_args(const Tensor& input, int64_t groups, int64_t bits, bool symmetric, bool packed,
                             const char* op) {
  const DType dtype = float_dtype(input, op, "input");
  check_storage_bits(bits, op);
  check_groups(input.numel(), groups, op, "input");
  check_params_size(groups, symmetric, op);
  const QuantJob job = make_job(dtype, input.numel(), groups, bits, symmetric, packed);
  check_packable(input, job.packed, op, "input");
  return job;
}

void quantize_tensors(const Tensor& input, const QuantJob& job, Tensor& codes, Tensor& params, const char* op) {
  const Tensor in = dense(input);
  write_codes_into(codes, params, [&](Tensor& code_dst, Tensor& param_dst) {
    quantize_into(in, job, static_cast<int8_t*>(code_dst.mutable_data_ptr()),
                  static_cast<float*>(param_dst.mutable_data_ptr()), op);
  });
}

std::tuple<Tensor, Tensor> quantize(Tensor input, int64_t groups, int64_t bits, bool symmetric, bool packed) {
  const char* op = "quantize";
  const QuantJob job = check_quantize_args(input, groups, bits, symmetric, packed, op);
  Tensor codes = empty_on(input, code_sizes(input, job.packed), ScalarType::Char);
  Tensor params = empty_on(input, {groups, symmetric ? 1 : 2}, ScalarType::Float);
  quantize_tensors(input, job, codes, params, op);
  return std::make_tuple(std::move(codes), std::move(params));
}

void quantize_out(Tensor input, int64_t groups, int64_t bits, bool symmetric, bool packed, Tensor q,
                  Tensor params) {
  const char* op = "quantize";
  const QuantJob job = check_quantize_args(input, groups, bits, symmetric, packed, op);
  check_code_outputs(input, q, code_sizes(input, job.packed), params, groups, symmetric, op);
  quantize_tensors(input, job, q, params, op);
}

// dequantize's `dtype` argument: float16 (DeepSpeed's choice) when absent.
ScalarType output_scalar_type(std::optional<ScalarType> dtype, const char* op) {
  const ScalarType t = dtype.value_or(ScalarType::Half);
  QKIT_CHECK(t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16, op,
             "`dtype` must be float32, float16 or bfloat16, got ", dtype_name(t));
  return t;
}

// Checks dequantize's inputs; returns the output's sizes.
Shape check_dequantize_args(const Tensor& q, const Tensor& params, int64_t groups, int64_t bits, bool symmetric,
                            bool pack, const char* op) {
  check_codes_and_params(q, params, op);
  check_storage_bits(bits, op);
  const bool packed = packed_storage(static_cast<int>(bits), pack);
  QKIT_CHECK(!packed || q.dim() >= 1, op, "4-bit `q` must have at least one dimension");
  const int64_t numel = packed ? 2 * q.numel() : q.numel();
  check_groups(numel, groups, op, "the dequantized output");
  const int64_t per_group = symmetric ? 1 : 2;
  QKIT_CHECK(params.dim() == 2 && params.sizes()[0] == groups && params.sizes()[1] == per_group, op,
             "`params` must have shape [groups, ", per_group, "] = [", groups, ", ", per_group, "] for ",
             symmetric ? "symmetric" : "asymmetric", " quantization, got ", shape_text(params.sizes()));
  Shape out_sizes = sizes_of(q);
  if (packed) out_sizes.back() *= 2;
  return out_sizes;
}

void dequantize_tensors(const Tensor& q, const Tensor& params, int64_t groups, int64_t bits, bool symmetric,
                        bool packed, Tensor& out, const char* op) {
  const Tensor codes = dense(q);
  const Tensor p = dense(params);
  const QuantJob job = make_job(float_dtype(out, op, "out"), out.numel(), groups, bits, symmetric, packed);
  const auto* code_ptr = static_cast<const int8_t*>(codes.const_data_ptr());
  const auto* param_ptr = static_cast<const float*>(p.const_data_ptr());
  write_into(out, [&](Tensor& dst) {
    on_device(
        codes, op, [&] { cpu::dequantize(job, code_ptr, param_ptr, dst.mutable_data_ptr()); },
        [&](void* stream) {
          return QKIT_CUDA_CALL(cuda::dequantize(job, code_ptr, param_ptr, dst.mutable_data_ptr(), stream));
        });
  });
}

Tensor dequantize(Tensor q, Tensor params, int64_t groups, int64_t bits, bool symmetric,
                  std::optional<ScalarType> dtype, bool packed) {
  const char* op = "dequantize";
  const Shape out_sizes = check_dequantize_args(q, params, groups, bits, symmetric, packed, op);
  Tensor out = empty_on(q, out_sizes, output_scalar_type(dtype, op));
  dequantize_tensors(q, params, groups, bits, symmetric, packed, out, op);
  return out;
}

void dequantize_out(Tensor q, Tensor params, int64_t groups, int64_t bits, bool symmetric, bool packed,
                    Tensor out) {
  const char* op = "dequantize";
  const Shape out_sizes = check_dequantize_args(q, params, groups, bits, symmetric, packed, op);
  float_dtype(out, op, "out");
  check_out(out, "out", out.scalar_type(), out_sizes, q, "q", op);
  check_no_overlap(q, "q", out, "out", op);
  check_no_overlap(params, "params", out, "out", op);
  dequantize_tensors(q, params, groups, bits, symmetric, packed, out, op);
}

void register_kernels(torch::stable::detail::StableLibrary& m) {
  m.impl("fake_quantize", TORCH_BOX(&fake_quantize));
  m.impl("fake_quantize_", TORCH_BOX(&fake_quantize_));
  m.impl("quantize", TORCH_BOX(&quantize));
  m.impl("dequantize", TORCH_BOX(&dequantize));
  m.impl("fake_quantize.out", TORCH_BOX(&fake_quantize_out));
  m.impl("quantize.out", TORCH_BOX(&quantize_out));
  m.impl("dequantize.out", TORCH_BOX(&dequantize_out));
}

}  // namespace

// One kernel per op serves every device (it dispatches on the input's device).
QKIT_REGISTER_KERNELS(register_kernels)

}  // namespace qkit::binding
