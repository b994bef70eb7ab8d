// Bindings of the ZeRO++ ops (docs/ops.md §3): swizzle_quantize, quantized_reduction,
// their LoCo variants and dequantize_unsigned. Each op is composed from the core
// quantizer and the small kernels of kernels/*/zeropp_*, on the input's device
// and current stream; schemas live in python/qkit/zeropp_ops.py.
#include <optional>
#include <tuple>
#include <utility>

#include "quantize_ops.h"

namespace qkit::binding {
namespace {

int64_t params_per_group(bool symmetric) { return symmetric ? 1 : 2; }

SwizzleLayout check_layout(int64_t groups, int64_t pipeline, int64_t nodes, int64_t devices, const char* op) {
  QKIT_CHECK(pipeline >= 1, op, "`pipeline` must be >= 1, got ", pipeline);
  QKIT_CHECK(nodes >= 1, op, "`nodes` must be >= 1, got ", nodes);
  QKIT_CHECK(devices >= 1, op, "`devices_per_node` must be >= 1, got ", devices);
  const int64_t slices = checked_product({nodes, devices, pipeline}, "`nodes` * `devices_per_node` * `pipeline`", op);
  QKIT_CHECK(groups % slices == 0, op, "`groups` (", groups,
             ") must be a multiple of `nodes` * `devices_per_node` * `pipeline` (", slices, ")");
  return SwizzleLayout{groups, pipeline, nodes, devices};
}

void check_swizzle_input(const Tensor& input, int64_t groups, int64_t bits, bool symmetric, const char* op) {
  float_dtype(input, op, "input");
  check_wire_bits(bits, op);
  check_groups(input.numel(), groups, op, "input");
  check_params_size(groups, symmetric, op);
  QKIT_CHECK(bits == 8 || (input.numel() / groups) % 2 == 0, op,
             "4-bit swizzling moves whole bytes: `groups` must leave an even group size, got ", input.numel() / groups);
}

// The error buffer a LoCo op updates in place: a float tensor of `numel` elements
// on the device of `like` (the argument `like_name`), of its dtype when `same_dtype`.
void check_error_feedback(const Tensor& error, const Tensor& like, const char* like_name, int64_t numel,
                          bool same_dtype, const char* op) {
  float_dtype(error, op, "error_feedback");
  check_same_device(like, like_name, error, "error_feedback", op);
  QKIT_CHECK(error.numel() == numel, op, "`error_feedback` must have ", numel, " elements, got ", error.numel());
  QKIT_CHECK(!same_dtype || error.scalar_type() == like.scalar_type(), op,
             "`error_feedback` must have the dtype of `", like_name, "` (", dtype_name(like.scalar_type()), "), got ",
             dtype_name(error.scalar_type()));
  check_no_self_overlap(error, op, "error_feedback");
}

void check_beta(double beta, const char* op) {
  QKIT_CHECK(beta >= 0.0 && beta <= 1.0, op, "`err_beta` must be in [0, 1], got ", beta);
}

// Runs `update(contiguous error)` and writes the result back if `error` was not contiguous.
template <typename F>
void update_in_place(Tensor& error, const F& update) {
  if (error.is_contiguous()) {
    update(error);
    return;
  }
  Tensor work = dense(error);
  update(work);
  torch::stable::copy_(error, work);
}

std::tuple<Tensor, Tensor> new_outputs(const Tensor& like, const Shape& code_sizes, int64_t groups,
                                       bool symmetric) {
  return {empty_on(like, code_sizes, ScalarType::Char),
          empty_on(like, {groups, params_per_group(symmetric)}, ScalarType::Float)};
}

void swizzle_on_device(const Tensor& like, const QuantJob& job, const SwizzleLayout& layout, const Tensor& codes_in,
                       const Tensor& params_in, Tensor& codes_out, Tensor& params_out, const char* op) {
  const auto* ci = static_cast<const int8_t*>(codes_in.const_data_ptr());
  const auto* pi = static_cast<const float*>(params_in.const_data_ptr());
  auto* co = static_cast<int8_t*>(codes_out.mutable_data_ptr());
  auto* po = static_cast<float*>(params_out.mutable_data_ptr());
  on_device(
      like, op, [&] { cpu::swizzle_groups(job, layout, ci, pi, co, po); },
      [&](void* stream) { return QKIT_CUDA_CALL(cuda::swizzle_groups(job, layout, ci, pi, co, po, stream)); });
}

void update_error_on_device(const Tensor& like, const QuantJob& job, const SwizzleLayout* layout, const Tensor& s,
                            const Tensor& codes, const Tensor& params, Tensor& error, double beta, const char* op) {
  const auto* sv = static_cast<const float*>(s.const_data_ptr());
  const auto* cv = static_cast<const int8_t*>(codes.const_data_ptr());
  const auto* pv = static_cast<const float*>(params.const_data_ptr());
  const DType edt = float_dtype(error, op, "error_feedback");
  const auto b = static_cast<float>(beta);
  update_in_place(error, [&](Tensor& e) {
    on_device(
        like, op, [&] { cpu::update_error(job, layout, sv, cv, pv, edt, e.mutable_data_ptr(), b); },
        [&](void* stream) {
          return QKIT_CUDA_CALL(cuda::update_error(job, layout, sv, cv, pv, edt, e.mutable_data_ptr(), b, stream));
        });
  });
}

// Slices of at least this many elements are quantized straight into their
// swizzled place, one quantizer call per slice: no natural-order buffers and no
// copy pass. Smaller slices take the two-pass route, where two calls (CUDA
// launches) beat one per slice.
constexpr int64_t kDirectSliceMin = int64_t{1} << 16;

bool quantize_swizzled_directly(const Tensor& in, const QuantJob& job, const SwizzleLayout& layout, Tensor& codes,
                                Tensor& params, const char* op) {
  const int64_t slices = layout.nodes * layout.devices * layout.pipeline;
  const int64_t per_slice = job.groups / slices;
  const int64_t group_size = job.numel / job.groups;
  if (per_slice * group_size < kDirectSliceMin) return false;
  const int64_t group_bytes = group_size * job.bits / 8;  // whole bytes: check_swizzle_input
  const int64_t per_group = params_per_group(job.symmetric);
  const auto* x = static_cast<const char*>(in.const_data_ptr());
  auto* co = static_cast<int8_t*>(codes.mutable_data_ptr());
  auto* po = static_cast<float*>(params.mutable_data_ptr());
  QuantJob slice_job = job;
  slice_job.numel = per_slice * group_size;
  slice_job.groups = per_slice;
#if !defined(QKIT_EMULATED_CUDA)
  // On CPU, one parallel region over the slices when they split evenly among the
  // threads; each slice's quantizer then runs inline on its thread. A region per slice
  // woke the pool once per slice, and on a loaded machine each wake-up can wait for a
  // time slice: 16 slices ran 10x slower than one quantize of the same bytes.
  const int64_t threads = cpu::thread_count();
  if (!in.is_cuda() && (slices % threads == 0 || slices >= 4 * threads)) {
    const int64_t slice_bytes = slice_job.numel * static_cast<int64_t>(in.element_size());
    cpu::parallel_for(0, slices, 1, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        const int64_t slot = swizzled_slot(s * per_slice, layout);
        cpu::quantize(slice_job, x + s * slice_bytes, co + slot * group_bytes, po + slot * per_group);
      }
    });
    return true;
  }
#endif
  for (int64_t g = 0; g < job.groups; g += per_slice) {
    const int64_t slot = swizzled_slot(g, layout);
    quantize_into(in, x + g * group_size * static_cast<int64_t>(in.element_size()), slice_job,
                  co + slot * group_bytes, po + slot * per_group, op);
  }
  return true;
}

// Quantizes the dense `in` (plus the LoCo error, if any) into `codes` and
// `params`, contiguous and in swizzled group order.
void swizzle_into(const Tensor& in, std::optional<Tensor> error, double beta, const SwizzleLayout& layout,
                  QuantJob job, Tensor& codes, Tensor& params, const char* op) {
  if (!error.has_value() && quantize_swizzled_directly(in, job, layout, codes, params, op)) return;
  const int64_t numel = job.numel;
  auto [natural_codes, natural_params] = new_outputs(in, {numel * job.bits / 8}, job.groups, job.symmetric);
  if (!error.has_value()) {
    quantize_into(in, job, static_cast<int8_t*>(natural_codes.mutable_data_ptr()),
                  static_cast<float*>(natural_params.mutable_data_ptr()), op);
  } else {
    // s = x + e (e read at the swizzled position), quantize s, then e <- update(e, s, dequant).
    check_error_feedback(*error, in, "input", numel, true, op);
    check_beta(beta, op);
    const Tensor e_in = dense(*error);
    Tensor s = empty_on(in, {numel}, ScalarType::Float);
    auto* sv = static_cast<float*>(s.mutable_data_ptr());
    on_device(
        in, op, [&] { cpu::add_swizzled_error(job, layout, in.const_data_ptr(), e_in.const_data_ptr(), sv); },
        [&](void* stream) {
          return QKIT_CUDA_CALL(
              cuda::add_swizzled_error(job, layout, in.const_data_ptr(), e_in.const_data_ptr(), sv, stream));
        });
    job.dtype = DType::Float32;
    quantize_into(s, job, static_cast<int8_t*>(natural_codes.mutable_data_ptr()),
                  static_cast<float*>(natural_params.mutable_data_ptr()), op);
    update_error_on_device(in, job, &layout, s, natural_codes, natural_params, *error, beta, op);
  }
  swizzle_on_device(in, job, layout, natural_codes, natural_params, codes, params, op);
}

std::tuple<Tensor, Tensor> swizzle_common(const Tensor& input, std::optional<Tensor> error, double beta, int64_t groups,
                                          int64_t bits, bool symmetric, int64_t pipeline, int64_t nodes,
                                          int64_t devices, const char* op) {
  check_swizzle_input(input, groups, bits, symmetric, op);
  const SwizzleLayout layout = check_layout(groups, pipeline, nodes, devices, op);
  const Tensor in = dense(input);
  auto [codes, params] = new_outputs(in, {in.numel() * bits / 8}, groups, symmetric);
  const QuantJob job = make_job(float_dtype(in, op, "input"), in.numel(), groups, bits, symmetric);
  swizzle_into(in, std::move(error), beta, layout, job, codes, params, op);
  return std::make_tuple(codes, params);
}

std::tuple<Tensor, Tensor> swizzle_quantize(Tensor input, int64_t groups, int64_t bits, bool symmetric,
                                            int64_t pipeline, int64_t nodes, int64_t devices_per_node) {
  return swizzle_common(input, std::nullopt, 0.0, groups, bits, symmetric, pipeline, nodes, devices_per_node,
                        "swizzle_quantize");
}

std::tuple<Tensor, Tensor> loco_swizzle_quantize(Tensor input, Tensor error_feedback, double err_beta, int64_t groups,
                                                 int64_t bits, bool symmetric, int64_t pipeline, int64_t nodes,
                                                 int64_t devices_per_node) {
  return swizzle_common(input, error_feedback, err_beta, groups, bits, symmetric, pipeline, nodes, devices_per_node,
                        "loco_swizzle_quantize");
}

void swizzle_quantize_out(Tensor input, int64_t groups, int64_t bits, bool symmetric, int64_t pipeline, int64_t nodes,
                          int64_t devices_per_node, Tensor q, Tensor params) {
  const char* op = "swizzle_quantize";
  check_swizzle_input(input, groups, bits, symmetric, op);
  const SwizzleLayout layout = check_layout(groups, pipeline, nodes, devices_per_node, op);
  check_code_outputs(input, q, {input.numel() * bits / 8}, params, groups, symmetric, op);
  const Tensor in = dense(input);
  const QuantJob job = make_job(float_dtype(in, op, "input"), in.numel(), groups, bits, symmetric);
  write_codes_into(q, params, [&](Tensor& code_dst, Tensor& param_dst) {
    swizzle_into(in, std::nullopt, 0.0, layout, job, code_dst, param_dst, op);
  });
}

std::tuple<Tensor, Tensor> reduction_common(const Tensor& q, const Tensor& params, std::optional<Tensor> error,
                                            double beta, int64_t in_groups, int64_t out_groups, int64_t bits,
                                            bool symmetric, int64_t devices, const char* op) {
  check_codes_and_params(q, params, op);
  check_wire_bits(bits, op);
  QKIT_CHECK(devices >= 1, op, "`devices_per_node` must be >= 1, got ", devices);
  QKIT_CHECK(q.dim() >= 1 && q.sizes()[q.dim() - 1] % devices == 0, op,
             "the last dimension of `q` must split into `devices_per_node` (", devices, ") equal tensors");
  QKIT_CHECK(in_groups >= 1 && in_groups % devices == 0, op, "`in_groups` (", in_groups,
             ") must be a positive multiple of `devices_per_node` (", devices, ")");
  const int64_t values = q.numel() * (8 / bits) / devices;
  QKIT_CHECK(values % (in_groups / devices) == 0, op, "`in_groups` / devices_per_node (", in_groups / devices,
             ") must divide the values per tensor (", values, ")");
  check_groups(values, out_groups, op, "the reduced output", "out_groups");
  check_params_size(out_groups, symmetric, op, "out_groups");
  const int64_t per_group = params_per_group(symmetric);
  QKIT_CHECK(params.dim() == 2 && params.sizes()[0] == in_groups && params.sizes()[1] == per_group, op,
             "`params` must have shape [in_groups, ", per_group, "] = [", in_groups, ", ", per_group, "], got ",
             shape_text(params.sizes()));

  const Tensor codes_in = dense(q);
  const Tensor params_in = dense(params);
  Shape out_sizes = sizes_of(codes_in);
  out_sizes.back() /= devices;
  auto [codes, params_out] = new_outputs(codes_in, out_sizes, out_groups, symmetric);

  const ReductionJob rjob{values, devices, in_groups, static_cast<int>(bits), symmetric};
  const auto* cv = static_cast<const int8_t*>(codes_in.const_data_ptr());
  const auto* pv = static_cast<const float*>(params_in.const_data_ptr());
#if !defined(QKIT_EMULATED_CUDA)
  // On CPU without LoCo, the sum and its quantization fused tile by tile (no fp32
  // buffer, one pass over memory), where the kernel takes the output group size.
  if (!error.has_value() && !codes_in.is_cuda() &&
      cpu::quantized_reduction(rjob, out_groups, cv, pv, static_cast<int8_t*>(codes.mutable_data_ptr()),
                               static_cast<float*>(params_out.mutable_data_ptr()))) {
    return std::make_tuple(codes, params_out);
  }
#endif

  // S = sum_j dequant_j (+ e), in fp32; then the core quantizer on S.
  Tensor sum = empty_on(codes_in, {values}, ScalarType::Float);
  std::optional<Tensor> e_in;
  DType edt = DType::Float32;
  if (error.has_value()) {
    check_error_feedback(*error, codes_in, "q", values, false, op);
    check_beta(beta, op);
    e_in = dense(*error);
    edt = float_dtype(*error, op, "error_feedback");
  }
  const void* ev = e_in.has_value() ? e_in->const_data_ptr() : nullptr;
  auto* sv = static_cast<float*>(sum.mutable_data_ptr());
  on_device(
      codes_in, op, [&] { cpu::dequantize_sum(rjob, cv, pv, edt, ev, sv); },
      [&](void* stream) { return QKIT_CUDA_CALL(cuda::dequantize_sum(rjob, cv, pv, edt, ev, sv, stream)); });
  const QuantJob job = make_job(DType::Float32, values, out_groups, bits, symmetric);
  quantize_into(sum, job, static_cast<int8_t*>(codes.mutable_data_ptr()),
                static_cast<float*>(params_out.mutable_data_ptr()), op);
  if (error.has_value()) update_error_on_device(codes_in, job, nullptr, sum, codes, params_out, *error, beta, op);
  return std::make_tuple(codes, params_out);
}

std::tuple<Tensor, Tensor> quantized_reduction(Tensor q, Tensor params, int64_t in_groups, int64_t out_groups,
                                               int64_t bits, bool symmetric, int64_t devices_per_node) {
  return reduction_common(q, params, std::nullopt, 0.0, in_groups, out_groups, bits, symmetric, devices_per_node,
                          "quantized_reduction");
}

std::tuple<Tensor, Tensor> loco_quantized_reduction(Tensor q, Tensor params, Tensor error_feedback, double err_beta,
                                                    int64_t in_groups, int64_t out_groups, int64_t bits,
                                                    bool symmetric, int64_t devices_per_node) {
  return reduction_common(q, params, error_feedback, err_beta, in_groups, out_groups, bits, symmetric,
                          devices_per_node, "loco_quantized_reduction");
}

Tensor dequantize_unsigned(Tensor data, Tensor scale, Tensor minv, int64_t num_groups, int64_t group_size,
                           int64_t bits) {
  const char* op = "dequantize_unsigned";
  QKIT_CHECK(data.scalar_type() == ScalarType::Char || data.scalar_type() == ScalarType::Byte, op,
             "`data` must be int8 or uint8 (raw bytes), got ", dtype_name(data.scalar_type()));
  check_wire_bits(bits, op);
  QKIT_CHECK(num_groups >= 0, op, "`num_groups` must be >= 0, got ", num_groups);
  QKIT_CHECK(group_size >= 1, op, "`group_size` must be >= 1, got ", group_size);
  const int64_t numel = checked_product({num_groups, group_size}, "`num_groups` * `group_size`", op);
  checked_product({num_groups, group_size, 2}, "the bytes of the float16 output, `num_groups` * `group_size` * 2", op);
  QKIT_CHECK(bits == 8 || numel % 2 == 0, op, "4-bit codes come in pairs: `num_groups` * `group_size` (", numel,
             ") must be even");
  const int64_t nbytes = bits == 8 ? numel : numel / 2;  // numel * bits / 8, which could overflow
  QKIT_CHECK(data.numel() == nbytes, op, "`data` must hold `num_groups` * `group_size` * `bits` / 8 = ", nbytes,
             " bytes, got ", data.numel());
  const DType pdt = float_dtype(scale, op, "scale");
  QKIT_CHECK(minv.scalar_type() == scale.scalar_type(), op, "`minv` must have the dtype of `scale`");
  QKIT_CHECK(scale.numel() == num_groups, op, "`scale` must have `num_groups` (", num_groups, ") elements, got ",
             scale.numel());
  QKIT_CHECK(minv.numel() == num_groups, op, "`minv` must have `num_groups` (", num_groups, ") elements, got ",
             minv.numel());
  check_same_device(data, "data", scale, "scale", op);
  check_same_device(data, "data", minv, "minv", op);

  const Tensor d = dense(data);
  const Tensor s = dense(scale);
  const Tensor m = dense(minv);
  Tensor out = empty_on(d, {num_groups, group_size}, ScalarType::Half);
  const auto* dv = static_cast<const int8_t*>(d.const_data_ptr());
  auto* ov = static_cast<half_t*>(out.mutable_data_ptr());
  on_device(
      d, op,
      [&] {
        cpu::dequantize_unsigned(dv, pdt, s.const_data_ptr(), m.const_data_ptr(), num_groups, group_size,
                                 static_cast<int>(bits), ov);
      },
      [&](void* stream) {
        return QKIT_CUDA_CALL(cuda::dequantize_unsigned(dv, pdt, s.const_data_ptr(), m.const_data_ptr(), num_groups,
                                                        group_size, static_cast<int>(bits), ov, stream));
      });
  return out;
}

void register_kernels(torch::stable::detail::StableLibrary& m) {
  m.impl("swizzle_quantize", TORCH_BOX(&swizzle_quantize));
  m.impl("swizzle_quantize.out", TORCH_BOX(&swizzle_quantize_out));
  m.impl("loco_swizzle_quantize", TORCH_BOX(&loco_swizzle_quantize));
  m.impl("quantized_reduction", TORCH_BOX(&quantized_reduction));
  m.impl("loco_quantized_reduction", TORCH_BOX(&loco_quantized_reduction));
  m.impl("dequantize_unsigned", TORCH_BOX(&dequantize_unsigned));
}

}  // namespace

// One kernel per op serves every device (it dispatches on the input's device).
QKIT_REGISTER_KERNELS(register_kernels)

}  // namespace qkit::binding
