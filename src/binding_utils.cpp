#include "binding_utils.h"

#include <torch/csrc/stable/c/shim.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#ifdef QKIT_WITH_CUDA
#include <dlfcn.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace qkit::binding {

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Bool: return "bool";
    case ScalarType::Short: return "int16";
    case ScalarType::UInt16: return "uint16";
    case ScalarType::UInt32: return "uint32";
    case ScalarType::UInt64: return "uint64";
    case ScalarType::ComplexHalf: return "complex32";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    case ScalarType::Float8_e5m2: return "float8_e5m2";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case ScalarType::Float8_e5m2fnuz: return "float8_e5m2fnuz";
    case ScalarType::Float8_e4m3fnuz: return "float8_e4m3fnuz";
    default: return "an unsupported dtype";
  }
}

int32_t dtype_code(const Tensor& t) {
  int32_t code = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &code));
  return code;
}

int32_t dtype_code(ScalarType t) { return torch::stable::detail::to<int32_t>(torch::stable::detail::from(t)); }
// The shim's dtype codes are c10's ScalarType values (aoti_torch_dtype_float32() is 6,
// ScalarType::Float); torch's own getters of these two exist only from torch 2.11/2.12
// headers on, so the enum, which torch 2.10's headers already have, names them.
int32_t float8_e8m0fnu_code() { return static_cast<int32_t>(ScalarType::Float8_e8m0fnu); }
int32_t float4_e2m1fn_x2_code() { return static_cast<int32_t>(ScalarType::Float4_e2m1fn_x2); }

const char* dtype_code_name(int32_t code) {
  if (code == float8_e8m0fnu_code()) return "float8_e8m0fnu";
  if (code == float4_e2m1fn_x2_code()) return "float4_e2m1fn_x2";
  for (ScalarType t : {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16, ScalarType::Double, ScalarType::Char,
                       ScalarType::Byte, ScalarType::Int, ScalarType::Long, ScalarType::Bool, ScalarType::Short,
                       ScalarType::Float8_e5m2, ScalarType::Float8_e4m3fn, ScalarType::Float8_e5m2fnuz,
                       ScalarType::Float8_e4m3fnuz}) {
    if (dtype_code(t) == code) return dtype_name(t);
  }
  return "an unsupported dtype";
}

DType float_dtype(const Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::Float32;
    case ScalarType::Half: return DType::Float16;
    case ScalarType::BFloat16: return DType::BFloat16;
    default:
      fail(op, "`", arg, "` must be float32, float16 or bfloat16, got ", dtype_name(t.scalar_type()));
  }
}

int64_t checked_product(std::initializer_list<int64_t> factors, const char* what, const char* op) {
  // Non-negative factors: unless one is 0, an intermediate product that overflows
  // means the whole does.
  int64_t product = 1;
  bool overflow = false;
  for (int64_t f : factors) {
    if (f == 0) return 0;
    overflow |= __builtin_mul_overflow(product, f, &product);
  }
  if (!overflow) return product;
  std::ostringstream text;
  const char* separator = "";
  for (int64_t f : factors) {
    text << separator << f;
    separator = " * ";
  }
  fail(op, what, " (", text.str(), ") overflows int64");
}

void check_params_size(int64_t groups, bool symmetric, const char* op, const char* name) {
  const std::string what = std::string("the bytes of the float32 params, `") + name + "` * " +
                           (symmetric ? "1" : "2") + " * 4";
  checked_product({groups, symmetric ? 1 : 2, 4}, what.c_str(), op);
}

void check_groups(int64_t numel, int64_t groups, const char* op, const char* numel_of, const char* name) {
  QKIT_CHECK(groups >= 1, op, "`", name, "` must be >= 1, got ", groups);
  QKIT_CHECK(numel % groups == 0, op, "`", name, "` (", groups, ") must divide the number of elements of `", numel_of,
             "` (", numel, ")");
}

void check_no_self_overlap(const Tensor& t, const char* op, const char* arg) {
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (int64_t d = 0; d < t.dim(); ++d) {
    QKIT_CHECK(!(strides[d] == 0 && sizes[d] > 1), op, "`", arg,
               "` has elements that share memory (an expanded view); in-place writes would collide - pass a tensor "
               "that owns its elements (e.g. .clone())");
  }
}

void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, const char* op) {
  QKIT_CHECK(a.device() == b.device(), op, "`", b_name, "` must be on the same device as `", a_name, "`");
}

void check_out(const Tensor& out, const char* name, ScalarType dtype, const Shape& sizes,
               const Tensor& like, const char* like_name, const char* op) {
  check_out(out, name, dtype_code(dtype), sizes, like, like_name, op);
}

void check_out(const Tensor& out, const char* name, int32_t dtype, const Shape& sizes, const Tensor& like,
               const char* like_name, const char* op) {
  const int32_t got_dtype = dtype_code(out);
  QKIT_CHECK(got_dtype == dtype, op, "`", name, "` must be ", dtype_code_name(dtype), ", got ",
             dtype_code_name(got_dtype));
  check_same_device(like, like_name, out, name, op);
  const auto got = out.sizes();
  QKIT_CHECK(std::equal(got.begin(), got.end(), sizes.begin(), sizes.end()), op, "`", name, "` must have shape ",
             shape_text(sizes), ", got ", shape_text(got));
  check_no_self_overlap(out, op, name);
}

namespace {
// [first, last) byte addresses a tensor's elements occupy (empty for no elements).
std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t last_offset = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last_offset += (t.size(d) - 1) * t.stride(d);
  return {first, first + static_cast<uintptr_t>(last_offset + 1) * t.element_size()};
}
}  // namespace

void check_no_overlap(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, const char* op) {
  const auto [a_first, a_last] = byte_span(a);
  const auto [b_first, b_last] = byte_span(b);
  QKIT_CHECK(a_first == a_last || b_first == b_last || a_last <= b_first || b_last <= a_first, op, "`", b_name,
             "` shares memory with `", a_name, "`; pass a separate buffer");
}

bool same_view(const Tensor& a, const Tensor& b) {
  const auto as = a.sizes(), bs = b.sizes(), at = a.strides(), bt = b.strides();
  return a.const_data_ptr() == b.const_data_ptr() && a.scalar_type() == b.scalar_type() &&
         std::equal(as.begin(), as.end(), bs.begin(), bs.end()) && std::equal(at.begin(), at.end(), bt.begin(), bt.end());
}

namespace {
// A large fresh CPU output costs more in 4 KiB page faults than in the kernel that
// fills it (the first write of every page traps into the kernel). Asking for
// transparent huge pages, as torch does under THP_MEM_ALLOC_ENABLE=1, cuts that
// ~500-fold in faults. Only blocks of >= 32 MiB are advised: glibc usually serves
// those with their own mapping, so the advice ends with the block. It can also carve
// one from a free hole in its main heap; advice there would outlive the block and
// give later small allocations huge pages, so blocks below the program break are
// left alone. QKIT_HUGE_PAGES=0 opts out.
constexpr int64_t kHugePageAdviceBytes = int64_t{32} << 20;

bool huge_page_advice_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("QKIT_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (t.is_cuda() || bytes < kHugePageAdviceBytes || !huge_page_advice_enabled()) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (first < reinterpret_cast<uintptr_t>(sbrk(0))) return;  // in the main heap (see above)
  const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1), end = (first + bytes) & ~(kHuge - 1);
  // Advisory only: a kernel without THP refuses it, and the pages stay small.
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}
}  // namespace

Tensor empty_on(const Tensor& like, const Shape& sizes, ScalarType dtype) {
  return empty_on(like, sizes, dtype_code(dtype));
}

Tensor empty_on(const Tensor& like, const Shape& sizes, int32_t code) {
  const auto ndim = static_cast<int64_t>(sizes.size());
  Shape strides = sizes;
  int64_t stride = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  // TORCH_ERROR_CODE_CHECK, not STABLE_TORCH_ERROR_CODE_CHECK: the latter exists only in
  // torch >= 2.13 headers (and under TORCH_TARGET_VERSION 2.10 it expands to the former
  // anyway); a source build must compile against every torch from the target on
  // (ci/check_torch_headers.sh compiles this file against torch 2.10's headers).
  int32_t device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  AtenTensorHandle handle = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, sizes.data(), strides.data(), code, device_type,
                                                  like.get_device_index(), &handle));
  Tensor t(handle);
  advise_huge_pages(t);
  return t;
}

Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

Tensor scratch_bytes(const Tensor& like, int64_t n) { return empty_on(like, {n}, ScalarType::Byte); }

Tensor draw_seed(const Tensor& like) {
  Tensor seed = empty_on(like, {1}, ScalarType::Long);
  // aten::random_(Tensor(a!) self, *, Generator? generator=None): int64 draws
  // cover [0, 2^63), all of it key material for Philox.
  std::array<StableIValue, 2> stack{torch::stable::detail::from(seed), torch::stable::detail::from(std::nullopt)};
  STD_TORCH_CHECK(torch_call_dispatcher("aten::random_", "", stack.data(), TORCH_ABI_VERSION) == 0,
                  "qkit: drawing the stochastic-rounding seed failed");
  return seed;
}

#ifdef QKIT_EMULATED_CUDA
namespace {
thread_local std::vector<Tensor> kept_scratch;
}  // namespace

void keep_until_synchronized(const Tensor& scratch) { kept_scratch.push_back(scratch); }
void release_kept() { kept_scratch.clear(); }
#endif

#ifdef QKIT_WITH_CUDA
// The C shim that knows the current stream lives in torch's GPU library, which a
// CPU-only torch does not ship. Resolving it at first use (instead of linking
// it) keeps one binary loadable under both CPU and CUDA builds of torch.
// ROCm builds of torch name that library libtorch_hip.so (same shim function).
#ifdef QKIT_ROCM
#define QKIT_TORCH_GPU_LIBRARY "libtorch_hip.so"
#else
#define QKIT_TORCH_GPU_LIBRARY "libtorch_cuda.so"
#endif
void* current_cuda_stream(int32_t device_index) {
  using GetStream = AOTITorchError (*)(int32_t, void**);
  static GetStream get_stream = []() -> GetStream {
    void* lib = dlopen(QKIT_TORCH_GPU_LIBRARY, RTLD_NOW | RTLD_NOLOAD);
    return lib == nullptr ? nullptr : reinterpret_cast<GetStream>(dlsym(lib, "aoti_torch_get_current_cuda_stream"));
  }();
  STD_TORCH_CHECK(get_stream != nullptr, "qkit: a GPU tensor reached qkit, but " QKIT_TORCH_GPU_LIBRARY
                                         " (aoti_torch_get_current_cuda_stream) is not loaded in this process");
  void* stream = nullptr;
  STD_TORCH_CHECK(get_stream(device_index, &stream) == 0, "qkit: could not read the current CUDA stream");
  return stream;
}
#endif

}  // namespace qkit::binding
