// Helpers shared by the op bindings: argument checks with messages that name the
// argument, dtype translation, and the current CUDA stream. Stable ABI only.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
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

const char* dtype_name(ScalarType t);

// The kernels' element type for a float tensor; errors for anything else.
DType float_dtype(const Tensor& t, const char* op, const char* arg);

void check_groups(int64_t numel, int64_t groups, const char* op, const char* numel_of);
void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, const char* op);

std::vector<int64_t> sizes_of(const Tensor& t);

// One int64 drawn from torch's generator for `like`'s device, left on that
// device (no host sync): the key of the Philox stream of one stochastic call.
Tensor draw_seed(const Tensor& like);

#ifdef QKIT_WITH_CUDA
// torch's current CUDA stream for the device (cudaStream_t as void*).
void* current_cuda_stream(int32_t device_index);
#endif

}  // namespace qkit::binding
