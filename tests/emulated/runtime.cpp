// Test-only glue of the emulated-CUDA build: lets the bindings wait for the
// HIP-CPU device after each launch (see on_device in src/binding_utils.h).
#include <hip/hip_runtime.h>

namespace qkit::cuda {

const char* emulated_synchronize() {
  hipError_t err = hipDeviceSynchronize();
  if (err == hipSuccess) err = hipGetLastError();
  return err == hipSuccess ? nullptr : hipGetErrorString(err);
}

}  // namespace qkit::cuda
