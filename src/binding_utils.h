// Helpers shared by the op bindings: argument checks with messages that name the
// argument, dtype translation, and the current CUDA stream. Stable ABI only.
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "qkit/common.h"

namespace qkit::binding {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Every error names the op and the argument, e.g. "qkit.quantize: `bits` must be 4 or 8, got 3".
// Thrown as std::runtime_error, which torch surfaces as Python's RuntimeError.
template <typename... Parts>
[[noreturn]] void fail(const char* op, const Parts&... parts) {
  std::ostringstream message;
  message << "qkit." << op << ": ";
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

#define QKIT_CHECK(cond, op, ...) \
  do {                            \
    if (!(cond)) ::qkit::binding::fail(op, __VA_ARGS__); \
  } while (0)

// The name Python prints for the dtype, without "torch." (the fake impls use the same).
const char* dtype_name(ScalarType t);

// "[4, 1]": a shape as Python prints a list of ints, for ", got [...]" in messages.
template <typename Sizes>
std::string shape_text(const Sizes& sizes) {
  std::ostringstream text;
  const char* separator = "";
  text << "[";
  for (int64_t s : sizes) {
    text << separator << s;
    separator = ", ";
  }
  text << "]";
  return text.str();
}

// A tensor's dtype as the C shim's code. The bindings target torch 2.10's stable ABI,
// whose ScalarType conversions do not know float8_e8m0fnu and float4_e2m1fn_x2 (torch
// 2.11 added them): Tensor::scalar_type() throws for such a tensor. The codes work on
// every torch that has the dtypes.
int32_t dtype_code(const Tensor& t);
int32_t dtype_code(ScalarType t);
int32_t float8_e8m0fnu_code();
int32_t float4_e2m1fn_x2_code();
// dtype_name of a shim code (the two dtypes above included).
const char* dtype_code_name(int32_t code);

// The kernels' element type for a float tensor; errors for anything else.
DType float_dtype(const Tensor& t, const char* op, const char* arg);

// The product of non-negative int arguments (or sizes), `what` naming them (e.g. "`nodes` *
// `devices_per_node`"); an error saying so when it does not fit in int64, where it
// would silently wrap (to 0, 1 or -1 among others).
int64_t checked_product(std::initializer_list<int64_t> factors, const char* what, const char* op);
// The bytes of a [groups, 1|2] float32 params output must fit in int64: an empty input
// accepts any `groups`, so only the allocation would notice, without naming it.
void check_params_size(int64_t groups, bool symmetric, const char* op, const char* name = "groups");

void check_groups(int64_t numel, int64_t groups, const char* op, const char* numel_of, const char* name = "groups");
// A tensor written in place must not have elements that share memory (expanded views).
void check_no_self_overlap(const Tensor& t, const char* op, const char* arg);
void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, const char* op);

// A tensor shape, held inline up to kInlineDims dimensions so that shaping a small
// call's outputs costs no heap allocation (vectors cost two per output, ~0.1 us a call).
class Shape {
 public:
  static constexpr size_t kInlineDims = 8;
  Shape(std::initializer_list<int64_t> dims) { assign(dims.begin(), dims.size()); }
  explicit Shape(torch::headeronly::IntHeaderOnlyArrayRef dims) { assign(dims.data(), dims.size()); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const int64_t* data() const { return heap_.empty() ? inline_ : heap_.data(); }
  int64_t* data() { return heap_.empty() ? inline_ : heap_.data(); }
  const int64_t* begin() const { return data(); }
  const int64_t* end() const { return data() + size_; }
  int64_t operator[](size_t d) const { return data()[d]; }
  int64_t& operator[](size_t d) { return data()[d]; }
  int64_t& back() { return data()[size_ - 1]; }

 private:
  // Only constructors call this; the default copy keeps both stores consistent.
  void assign(const int64_t* dims, size_t n) {
    size_ = n;
    if (n > kInlineDims) heap_.assign(dims, dims + n);
    else std::copy(dims, dims + n, inline_);
  }
  size_t size_ = 0;
  int64_t inline_[kInlineDims] = {};
  std::vector<int64_t> heap_;
};

inline Shape sizes_of(const Tensor& t) { return Shape(t.sizes()); }

// One int64 drawn from torch's generator for `like`'s device, left on that
// device (no host sync): the key of the Philox stream of one stochastic call.
Tensor draw_seed(const Tensor& like);

#ifdef QKIT_WITH_CUDA
// torch's current CUDA stream for the device (cudaStream_t as void*).
void* current_cuda_stream(int32_t device_index);
#endif

// The launchers' scratch is freed as soon as they return, before the kernels ran:
// on a GPU, torch's caching allocator orders its reuse on the stream. Host memory
// has no such order, so the emulated-CUDA build holds scratch until on_device has
// waited for the kernels; elsewhere this does nothing.
#ifdef QKIT_EMULATED_CUDA
void keep_until_synchronized(const Tensor& scratch);
void release_kept();
#else
inline void keep_until_synchronized(const Tensor&) {}
#endif

#ifdef QKIT_EMULATED_CUDA
}  // namespace qkit::binding
namespace qkit::cuda {
// Test-only build (tests/emulated/): waits for the emulated device, nullptr or the error's text.
const char* emulated_synchronize();
}  // namespace qkit::cuda
namespace qkit::binding {
#endif

// Runs `cpu()` for CPU tensors, or `cuda(stream)` (returning the launcher's
// status) on `like`'s device and current stream for CUDA tensors.
// The emulated-CUDA test build runs the CUDA launchers on CPU tensors instead
// (HIP-CPU: host memory, default stream), then waits for them.
template <typename Cpu, typename Cuda>
void on_device(const Tensor& like, const char* op, const Cpu& cpu, const Cuda& cuda) {
#if defined(QKIT_EMULATED_CUDA)
  (void)cpu;
  QKIT_CHECK(!like.is_cuda(), op, "the emulated-CUDA build takes CPU tensors");
  const char* status = cuda(nullptr);
  if (status == nullptr) status = cuda::emulated_synchronize();
  release_kept();
  QKIT_CHECK(status == nullptr, op, "emulated CUDA launch failed: ", status == nullptr ? "" : status);
#else
  if (!like.is_cuda()) {
    cpu();
    return;
  }
#ifdef QKIT_WITH_CUDA
  torch::stable::accelerator::DeviceGuard guard(like.get_device_index());
  const char* status = cuda(current_cuda_stream(like.get_device_index()));
  QKIT_CHECK(status == nullptr, op, "CUDA launch failed: ", status == nullptr ? "" : status);
#else
  (void)cuda;
  fail(op, "this qkit was built without CUDA kernels");
#endif
#endif
}

// Registers `fn`'s kernels for the op library's devices: CPU, and CUDA in CUDA
// builds; the emulated-CUDA test build registers them as CPU kernels of its own
// namespace, qkit_emu, so both builds can live in one process.
#if defined(QKIT_EMULATED_CUDA)
#define QKIT_REGISTER_KERNELS(fn) \
  STABLE_TORCH_LIBRARY_IMPL(qkit_emu, CPU, m) { fn(m); }
#elif defined(QKIT_WITH_CUDA)
#define QKIT_REGISTER_KERNELS(fn)                      \
  STABLE_TORCH_LIBRARY_IMPL(qkit, CPU, m) { fn(m); } \
  STABLE_TORCH_LIBRARY_IMPL(qkit, CUDA, m) { fn(m); }
#else
#define QKIT_REGISTER_KERNELS(fn) \
  STABLE_TORCH_LIBRARY_IMPL(qkit, CPU, m) { fn(m); }
#endif

// Launchers of the CUDA builds; in CPU-only builds these names are never called.
#ifdef QKIT_WITH_CUDA
#define QKIT_CUDA_CALL(...) __VA_ARGS__
#else
#define QKIT_CUDA_CALL(...) static_cast<const char*>(nullptr)
#endif

// An `out=` tensor: `dtype`, on `like`'s device, exactly `sizes` (no resizing:
// a wrong buffer is a bug in the caller), and no expanded dimensions.
void check_out(const Tensor& out, const char* name, ScalarType dtype, const Shape& sizes,
               const Tensor& like, const char* like_name, const char* op);
// The same for a dtype given by its shim code.
void check_out(const Tensor& out, const char* name, int32_t dtype_code, const Shape& sizes, const Tensor& like,
               const char* like_name, const char* op);
// An output must not share bytes with a tensor the op reads or with another output.
// Compares address ranges, so interleaved views count as overlapping.
void check_no_overlap(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, const char* op);
// Same memory, sizes and strides: writing one is writing the other in place.
bool same_view(const Tensor& a, const Tensor& b);

// A new contiguous tensor of `sizes` and `dtype` on `like`'s device. Goes through
// the empty_strided C shim: torch::stable::new_empty looks the op up by name in
// the dispatcher on every call, which costs about a microsecond.
Tensor empty_on(const Tensor& like, const Shape& sizes, ScalarType dtype);
Tensor empty_on(const Tensor& like, const Shape& sizes, int32_t dtype_code);

// `t` itself when it is already contiguous (no dispatcher call), else a contiguous copy.
Tensor dense(const Tensor& t);

// The kernels write dense memory: `write(dst)` gets `out` itself when it is
// contiguous, else a contiguous temporary that is copied into `out` afterwards.
template <typename Write>
void write_into(Tensor& out, const Write& write) {
  if (out.is_contiguous()) {
    write(out);
    return;
  }
  Tensor staging = empty_on(out, sizes_of(out), dtype_code(out));
  write(staging);
  torch::stable::copy_(out, staging);
}

// A contiguous byte tensor of n bytes on `like`'s device (kernel scratch).
Tensor scratch_bytes(const Tensor& like, int64_t n);

}  // namespace qkit::binding
